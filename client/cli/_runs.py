"""``plait runs …``: list, show, follow and cancel runs, and print their logs."""

from __future__ import annotations

import json
import sys

import click

from plait._models import RunStatus
from plait.cli._common import EPILOG, fail, get_console, print_run, styled
from plait.cli._run import reconnect_notice
from plait.errors import PlaitError


@click.group("runs", epilog=EPILOG)
def runs() -> None:
    """List and inspect runs."""


@runs.command("list", epilog=EPILOG)
@click.option("--limit", "-n", default=20, show_default=True, help="How many runs to show.")
@click.option("--pipeline", default="", help="Only runs of this pipeline.")
@click.option(
    "--status",
    type=click.Choice([s.name for s in RunStatus], case_sensitive=False),
    help="Only runs in this state.",
)
def runs_list(limit: int, pipeline: str, status: str | None) -> None:
    """List runs, newest first."""
    from rich.table import Table

    from plait._client import Client

    try:
        found = Client.default().list_runs(
            limit=limit, pipeline=pipeline, status=(status or "").upper()
        )
    except PlaitError as exc:
        fail(str(exc))
    table = Table("run", "pipeline", "status", "created", "duration")
    for r in found:
        duration = (
            f"{(r.end_time - r.create_time).total_seconds():.2f}s"
            if r.end_time and r.create_time
            else ""
        )
        table.add_row(
            r.run_id[:12],
            r.pipeline,
            styled(r.status),
            r.create_time.strftime("%Y-%m-%d %H:%M:%S") if r.create_time else "",
            duration,
        )
    if not found:
        if pipeline:
            click.echo(f"no runs of pipeline {pipeline!r}")
        else:
            click.echo("no runs yet: try `plait run examples/quickstart.py:demo`")
        return
    get_console().print(table)


@runs.command("show", epilog=EPILOG)
@click.argument("run_id")
def runs_show(run_id: str) -> None:
    """Show a run's steps: status, duration, cached, outputs and metadata.

    RUN_ID may be a unique prefix of the id.
    """
    from rich.table import Table

    from plait._client import Client

    try:
        run = Client.default().get_run(run_id)
    except PlaitError as exc:
        fail(str(exc))
    console = get_console()
    console.print(
        f"run [bold]{run.run_id}[/]  pipeline {run.pipeline}  "
        f"version {run.pipeline_version[:12]}  stack {run.stack or '-'}  {styled(run.status)}"
    )
    if run.parameters:
        console.print("parameters: " + json.dumps(run.parameters), markup=False)
    table = Table("step", "status", "attempt", "duration", "cached", "outputs", "metadata")
    for s in run.steps.values():
        outputs = "\n".join(
            f"{name}: {a.artifact_id[:12]} ({a.data_type}"
            f"{', UNSAFE pickle' if a.unsafe else ''})"
            + (f" {json.dumps(a.metadata)}" if a.metadata else "")
            for name, a in s.outputs.items()
        )
        table.add_row(
            s.step_id,
            styled(s.status),
            str(s.attempt),
            f"{s.duration:.3f}s" if s.duration is not None else "",
            "yes" if s.cached else "",
            outputs,
            json.dumps(s.metadata) if s.metadata else "",
        )
    console.print(table)
    for s in run.steps.values():
        if s.error is not None:
            console.print(f"[red]{s.step_id}:[/] {s.error.type}: {s.error.message}", markup=True)


@runs.command("logs", epilog=EPILOG)
@click.argument("run_id")
@click.argument("step", required=False)
@click.option(
    "-f",
    "--follow",
    is_flag=True,
    help="Keep printing output live, as the steps write it, until the run ends "
    "(waiting out a restart of the server).",
)
def runs_logs(run_id: str, step: str | None, follow: bool) -> None:
    """Print the captured stdout and stderr of a run's steps (or of STEP).

    Each step's output is headed by a line naming it and its attempt; stderr goes to standard
    error. RUN_ID may be a unique prefix of the id.
    """
    from plait._client import Client

    try:
        client = Client.default()
        client.on_reconnect = reconnect_notice
        run = client.get_run(run_id)
        if step is not None and step not in run.steps:
            fail(
                f"run {run.run_id[:12]} has no step {step!r}; steps: "
                f"{', '.join(list(run.steps)[:20])}"
            )
        entries = client.stream_logs(run.run_id, step) if follow else client.logs(run.run_id, step)
        current: tuple[str, int] | None = None
        ended = {"stdout": True, "stderr": True}  # whether each stream's output ended a line
        for e in entries:
            if step is None and (e.step_id, e.attempt) != current:
                for name, done in ended.items():
                    if not done:  # the step stopped mid-line: the header starts a line
                        click.echo("", err=name == "stderr")
                        ended[name] = True
                click.secho(f"--- {e.step_id} (attempt {e.attempt})", fg="cyan")
                current = (e.step_id, e.attempt)
            click.echo(e.text, nl=False, err=e.stream == "stderr")
            if e.text:
                ended[e.stream] = e.text.endswith("\n")
    except PlaitError as exc:
        fail(str(exc))


@runs.command("watch", epilog=EPILOG)
@click.argument("run_id")
def runs_watch(run_id: str) -> None:
    """Follow a run live until it ends, printing each step's transitions.

    When the server restarts meanwhile, the command says so on standard error, reconnects and
    goes on after the last event it printed. Exits with status 1 when the run does not succeed.
    """
    from plait._client import Client

    try:
        client = Client.default()
        client.on_reconnect = reconnect_notice
        run = client.get_run(run_id)
        console = get_console()
        for events in client.watch(run.run_id):
            for e in events:
                when = e.time.astimezone().strftime("%H:%M:%S.%f")[:-3]
                if e.step_id:
                    what = f"step {e.step_id} {styled(str(e.step_status))}"
                else:
                    what = f"run {styled(str(e.run_status))}"
                detail = f"  [dim]{e.message}[/]" if e.message else ""
                console.print(f"{when}  {what}{detail}")
        run = client.get_run(run.run_id)
    except PlaitError as exc:
        fail(str(exc))
    print_run(run)
    if run.status != "SUCCEEDED":
        sys.exit(1)


@runs.command("cancel", epilog=EPILOG)
@click.argument("run_id")
def runs_cancel(run_id: str) -> None:
    """Cancel a run: running steps are stopped, pending ones never run."""
    from plait._client import Client

    try:
        run = Client.default().cancel_run(run_id)
    except PlaitError as exc:
        fail(str(exc))
    click.echo(f"run {run.run_id}: {run.status}")
