"""``plait run``: run a pipeline with live progress."""

from __future__ import annotations

import sys
import time
from collections import Counter
from typing import Any

import click

from plait._models import StepStatus
from plait.cli._common import EPILOG, fail, get_console, load_pipeline, parse_params, print_run
from plait.errors import PlaitError


@click.command("run", epilog=EPILOG)
@click.argument("target")
@click.option(
    "-p",
    "--param",
    "params",
    multiple=True,
    metavar="NAME=VALUE",
    help="A pipeline parameter; VALUE is read as JSON, else as a string. Repeatable.",
)
@click.option("--no-cache", is_flag=True, help="Run every step; ignore cached results.")
@click.option("--quiet", "-q", is_flag=True, help="No live progress; print the run id only.")
@click.option(
    "--detach",
    "-d",
    is_flag=True,
    help="Return as soon as the run is accepted (needs a server: PLAIT_SERVER or "
    "`plait login`); follow it with `plait runs watch`.",
)
def run_cmd(
    target: str, params: tuple[str, ...], no_cache: bool, quiet: bool, detach: bool
) -> None:
    """Run the pipeline TARGET (FILE.py:PIPELINE or package.module:PIPELINE).

    Shows live progress and exits with status 1 when the run fails.

    \b
    Example:
      plait run examples/quickstart.py:demo -p n=1000
    """
    pipe = load_pipeline(target)
    parameters = parse_params(params)
    from plait._client import Client

    try:
        client = Client.default()
        if detach:
            if client.embedded:
                fail(
                    "--detach needs a server: the embedded engine stops with this process "
                    "(start one with `plait server start`, then set PLAIT_SERVER or run "
                    "`plait login HOST:PORT`)"
                )
            run = pipe.run(parameters, no_cache=no_cache, client=client, wait=False)
            click.echo(run.run_id)
            return
        if quiet:
            run = pipe.run(parameters, no_cache=no_cache, client=client)
        else:
            run = _run_with_progress(client, pipe, parameters, no_cache)
    except PlaitError as exc:
        fail(str(exc))
    if quiet:
        click.echo(run.run_id)
    else:
        print_run(run)
    if run.status != "SUCCEEDED":
        sys.exit(1)


def _run_with_progress(client: Any, pipe: Any, parameters: dict[str, Any], no_cache: bool) -> Any:
    """Runs the pipeline while one status line on standard error counts its steps."""
    from rich.live import Live
    from rich.text import Text

    compiled = pipe.compile()
    total = len(compiled.spec.steps)
    statuses: dict[str, StepStatus] = {}
    console = get_console(stderr=True)
    started = time.monotonic()

    def render() -> Text:
        counts = Counter(statuses.values())
        done = sum(n for s, n in counts.items() if s.is_final)
        parts = [
            f"{counts[s]} {s.lower()}"
            for s in StepStatus
            if counts[s] and s not in (StepStatus.PENDING, StepStatus.QUEUED)
        ]
        running = [k for k, v in statuses.items() if v is StepStatus.RUNNING][:3]
        line = Text(f"{pipe.name}: {done}/{total} steps  ", style="bold")
        line.append(", ".join(parts))
        if running:
            line.append(f"  running: {', '.join(running)}", style="dim")
        line.append(f"  {time.monotonic() - started:.1f}s", style="dim")
        return line

    with Live(render(), console=console, refresh_per_second=8, transient=True) as live:

        def on_events(events: list[Any]) -> None:
            for e in events:
                if e.step_id and e.step_status is not None:
                    statuses[e.step_id] = e.step_status
            live.update(render())

        return client.run_pipeline(pipe, parameters, no_cache=no_cache, on_events=on_events)
