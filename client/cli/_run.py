"""``plait run``: run a pipeline with live progress."""

from __future__ import annotations

import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import click

from plait._models import LogEntry, StepStatus
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

    Shows live progress, prints what the steps write as they write it (each line prefixed by
    its step's id; stderr to standard error), and exits with status 1 when the run fails. A
    restart of the server meanwhile is waited out.

    \b
    Example:
      plait run examples/quickstart.py:demo -p n=1000
    """
    pipe = load_pipeline(target)
    parameters = parse_params(params)
    from plait._client import Client

    try:
        client = Client.default()
        client.on_reconnect = reconnect_notice
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


def reconnect_notice(notice: str) -> None:
    """Says on standard error that a command lost the server and is reconnecting."""
    click.echo(f"plait: {notice}", err=True)


class LogLines:
    """Cuts the log entries of many steps into whole lines, each step's stream apart."""

    def __init__(self) -> None:
        self._partial: dict[tuple[str, int, str], str] = {}

    def feed(self, entry: LogEntry) -> Iterator[tuple[str, str]]:
        """The lines (without their line end) that `entry` completes, with their stream."""
        key = (entry.step_id, entry.attempt, entry.stream)
        *lines, rest = (self._partial.pop(key, "") + entry.text).split("\n")
        if rest:
            self._partial[key] = rest
        for line in lines:
            yield entry.stream, line

    def rest(self) -> Iterator[tuple[tuple[str, int, str], str]]:
        """The unfinished last line of each (step, attempt, stream), once no more comes."""
        yield from self._partial.items()
        self._partial.clear()


def _print_logs(client: Any, run_id: str, width: int) -> None:
    """Prints the run's output live, each line prefixed by its step (and attempt, after the
    first), until the run ends."""
    lines = LogLines()

    def prefix(step_id: str, attempt: int) -> str:
        name = step_id if attempt == 1 else f"{step_id}#{attempt}"
        return click.style(f"{name:<{width}} |", fg="cyan")

    try:
        for entry in client.stream_logs(run_id):
            for stream, line in lines.feed(entry):
                click.echo(f"{prefix(entry.step_id, entry.attempt)} {line}", err=stream == "stderr")
    except PlaitError:
        pass  # following the run reports the problem
    for (step_id, attempt, stream), line in lines.rest():
        click.echo(f"{prefix(step_id, attempt)} {line}", err=stream == "stderr")


def _run_with_progress(client: Any, pipe: Any, parameters: dict[str, Any], no_cache: bool) -> Any:
    """Runs the pipeline while one status line on standard error counts its steps and the
    steps' output is printed above it, line by line."""
    from rich.live import Live
    from rich.text import Text

    compiled = pipe.compile()
    total = len(compiled.spec.steps)
    width = min(24, max((len(s.id) for s in compiled.spec.steps), default=0))
    printers: list[threading.Thread] = []  # the one that prints the logs, once the run exists
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
            if not printers and events:
                printers.append(
                    threading.Thread(
                        target=_print_logs, args=(client, events[0].run_id, width), daemon=True
                    )
                )
                printers[0].start()
            for e in events:
                if e.step_id and e.step_status is not None:
                    statuses[e.step_id] = e.step_status
            live.update(render())

        run = client.run_pipeline(pipe, parameters, no_cache=no_cache, on_events=on_events)
        for printer in printers:
            printer.join()  # the log stream ends with the run: every line is printed first
        return run
