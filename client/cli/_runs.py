"""``plait runs …``: list, show, follow, cancel and retry runs, and print their logs."""

from __future__ import annotations

import json
import sys
from typing import Any, NoReturn

import click

from plait._models import RunStatus
from plait.cli._common import (
    EPILOG,
    ItemGroup,
    fail,
    get_console,
    group_items,
    load_pipeline,
    output_lines,
    output_option,
    print_json,
    print_run,
    run_json,
    styled,
)
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
@output_option
def runs_list(limit: int, pipeline: str, status: str | None, output: str) -> None:
    """List runs, newest first.

    With --output json: {"runs": [RUN, ...]}, each RUN as `plait runs show --output json`
    prints it without its steps.
    """
    from rich.table import Table

    from plait._client import Client

    try:
        found = Client.default().list_runs(
            limit=limit, pipeline=pipeline, status=(status or "").upper()
        )
    except PlaitError as exc:
        fail(str(exc))
    if output == "json":
        print_json({"runs": [run_json(r, steps=False) for r in found]})
        return
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
@output_option
def runs_show(run_id: str, output: str) -> None:
    """Show a run's steps: status, duration, cached, outputs and metadata.

    RUN_ID may be a unique prefix of the id.

    \b
    With --output json, the run: run_id, pipeline, pipeline_version, status, stack,
    parameters, create_time, end_time, duration_seconds, and steps: [STEP, ...] in order,
    each with step_id, status, attempt, start_time, end_time, duration_seconds, cached,
    cache_key, upstream, metadata, outputs {NAME: ARTIFACT} and error (type, message,
    traceback; null unless it failed).
    """
    from rich.table import Table

    from plait._client import Client

    try:
        run = Client.default().get_run(run_id)
    except PlaitError as exc:
        fail(str(exc))
    if output == "json":
        print_json(run_json(run))
        return
    console = get_console()
    console.print(
        f"run [bold]{run.run_id}[/]  pipeline {run.pipeline}  "
        f"version {run.pipeline_version[:12]}  stack {run.stack or '-'}  {styled(run.status)}"
    )
    if run.retry_of:
        console.print(f"retry of run {run.retry_of}", markup=False)
    if run.parameters:
        console.print("parameters: " + json.dumps(run.parameters), markup=False)
    table = Table("step", "status", "attempt", "duration", "cached", "outputs", "metadata")
    for row in group_items(run.steps.values()):
        if isinstance(row, ItemGroup):
            # a mapped step's items: one row, and a row of their own for those that failed
            cached = sum(1 for s in row.items if s.cached)
            table.add_row(
                row.label,
                row.summary,
                str(max(s.attempt for s in row.items)),
                _span(row.items),
                f"{cached} of {len(row.items)}" if cached else "",
                f"{len(row.items)} items",
                "",
            )
            for s in row.failed:
                _step_row(table, s, f"  {s.step_id}")
        else:
            _step_row(table, row, row.step_id)
    console.print(table)
    errors = [(s.step_id, s.error) for s in run.steps.values() if s.error is not None]
    for step_id, error in errors[:_SHOWN_ERRORS]:
        console.print(f"[red]{step_id}:[/] {error.type}: {error.message}", markup=True)
    if len(errors) > _SHOWN_ERRORS:
        console.print(
            f"[red]... and {len(errors) - _SHOWN_ERRORS} more[/] (--output json lists them all)"
        )


_SHOWN_ERRORS = 20
"""The step errors `runs show` prints under its table."""


def _step_row(table: Any, s: Any, label: str) -> None:
    outputs = "\n".join(
        f"{name}: {a} items"
        if isinstance(a, int)
        else f"{name}: {a.artifact_id[:12]} ({a.data_type}"
        f"{', UNSAFE pickle' if a.unsafe else ''})"
        + (f" {json.dumps(a.metadata)}" if a.metadata else "")
        for name, a in output_lines(s.outputs)
    )
    table.add_row(
        label,
        styled(s.status),
        str(s.attempt),
        f"{s.duration:.3f}s" if s.duration is not None else "",
        _cached(s),
        outputs,
        json.dumps(s.metadata) if s.metadata else "",
    )


def _span(steps: list[Any]) -> str:
    """From the first start to the last end of ``steps``, when they all ended."""
    starts = [s.start_time for s in steps if s.start_time is not None]
    ends = [s.end_time for s in steps if s.end_time is not None]
    if not starts or len(ends) < len(steps):
        return ""
    return f"{(max(ends) - min(starts)).total_seconds():.3f}s"


def _cached(s: Any) -> str:
    """The cached column of a step: the run its outputs came from, for a CACHED step."""
    if not s.cached:
        return ""
    return f"from {s.cached_from[:12]}" if s.cached_from else "yes"


_RETRY_EPILOG = f"""\b
Exit codes: 0 the new run succeeded (or, with --detach, was accepted); 1 it did not; 2 no
such run, the run has not ended, or the server could not be reached.

{EPILOG}"""


@runs.command("retry", epilog=_RETRY_EPILOG)
@click.argument("run_id")
@click.argument("target", required=False)
@click.option(
    "--detach",
    "-d",
    is_flag=True,
    help="Print the new run's id as soon as it is accepted; follow it with `plait runs watch`.",
)
def runs_retry(run_id: str, target: str | None, detach: bool) -> None:
    """Retry an ended run: a new run with the same parameters reuses every step that
    succeeded (CACHED, the old run's outputs) and runs the failed, skipped and cancelled
    steps and their downstream.

    RUN_ID may be a unique prefix of the id. With TARGET (FILE.py:PIPELINE or
    package.module:PIPELINE) the pipeline is compiled from the code as it is now (with the
    old run's parameters) and the new run executes that code: fix the bug, then retry. A step
    that is not in the pipeline any more is ignored; a new one runs. Without TARGET the old
    run's pipeline version and code run again (on the embedded engine, whose runs do not
    record their code, the steps are imported from this folder's path: pass TARGET there).

    \b
    Example:
      plait runs retry 3f2a9c examples/quickstart.py:demo
    """
    from plait._client import Client

    try:
        pipe = load_pipeline(target) if target else None
        client = Client.default()
        client.on_reconnect = reconnect_notice
        if detach and client.embedded:
            fail(
                "--detach needs a server: the embedded engine stops with this process "
                "(start one with `plait server start`, then set PLAIT_SERVER)"
            )
        run = client.retry_run(run_id, pipe, wait=False)
        if detach:
            click.echo(run.run_id)
            return
        click.echo(f"run {run.run_id} retries run {run.retry_of}", err=True)
        run = client.wait(run.run_id)
    except PlaitError as exc:
        fail(str(exc))
    print_run(run)
    if run.status != "SUCCEEDED":
        sys.exit(1)


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


_CANCEL_EPILOG = f"""\b
Exit codes: 0 the run is cancelled (or its cancellation is under way: it was running on
another replica); 1 the run had already ended, so nothing was cancelled (its status is
printed); 2 no such run, or the server could not be reached.

{EPILOG}"""


@runs.command("cancel", epilog=_CANCEL_EPILOG)
@click.argument("run_id")
def runs_cancel(run_id: str) -> None:
    """Cancel a run: running steps are stopped, pending ones never run.

    RUN_ID may be a unique prefix of the id. A run that already ended is left as it is.
    """
    from plait._client import Client

    try:
        client = Client.default()
        before = client.get_run(run_id)
        if before.status.is_final:
            _already_ended(before)
        run = client.cancel_run(before.run_id)
    except PlaitError as exc:
        fail(str(exc))
    if run.status.is_final and run.status != RunStatus.CANCELLED:
        _already_ended(run)  # it ended while the cancellation was on its way
    if run.status == RunStatus.CANCELLED:
        click.echo(f"run {run.run_id}: CANCELLED")
    else:
        click.echo(f"run {run.run_id}: cancelling (it is {run.status}; its steps are stopping)")


def _already_ended(run: Any) -> NoReturn:
    click.echo(
        f"run {run.run_id} already ended: {run.status}; nothing to cancel "
        f"(see `plait runs show {run.run_id[:12]}`)",
        err=True,
    )
    sys.exit(1)


from plait.cli._explain import runs_explain  # noqa: E402

runs.add_command(runs_explain)
