"""``plait run``: run a pipeline with live progress."""

from __future__ import annotations

import contextlib
import functools
import json
import signal
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any, NoReturn

import click

from plait._models import LogEntry, StepStatus
from plait.cli._common import EPILOG, fail, get_console, load_pipeline, print_run
from plait.errors import ParameterError, PlaitError


@click.command("run", epilog=EPILOG)
@click.argument("target")
@click.option(
    "-p",
    "--param",
    "params",
    multiple=True,
    metavar="NAME=VALUE",
    help="A pipeline parameter, checked against its type: VALUE is read as JSON (3, 1.5, "
    'true, [1, 2], {"a": 1}), else as a string. Repeatable.',
)
@click.option("--no-cache", is_flag=True, help="Run every step; ignore cached results.")
@click.option(
    "--refresh",
    multiple=True,
    metavar="STEP",
    help="Run this step even if cached (its downstream runs again only where its new "
    "outputs differ). Repeatable.",
)
@click.option("--quiet", "-q", is_flag=True, help="No live progress; print the run id only.")
@click.option(
    "--detach",
    "-d",
    is_flag=True,
    help="Return as soon as the run is accepted (needs a server: PLAIT_SERVER or "
    "`plait login`); follow it with `plait runs watch`.",
)
def run_cmd(
    target: str,
    params: tuple[str, ...],
    no_cache: bool,
    quiet: bool,
    detach: bool,
    refresh: tuple[str, ...] = (),
) -> None:
    """Run the pipeline TARGET (FILE.py:PIPELINE or package.module:PIPELINE).

    Shows live progress, prints what the steps write as they write it (each line prefixed by
    its step's id; stderr to standard error), and exits with status 1 when the run fails. A
    restart of the server meanwhile is waited out.

    Ctrl-C stops following and exits with status 130, printing the run's id: on a server the
    run goes on (follow it with `plait runs watch`, cancel it with `plait runs cancel`); the
    embedded engine stops with this command, so there the run is cancelled.

    \b
    Example:
      plait run examples/quickstart.py:demo -p n=1000
    """
    following = _Following()
    try:
        pipe = load_pipeline(target)
        parameters = typed_params(pipe, params)
        from plait._embedded import expect_runs

        expect_runs()  # (before the client's imports: see there)
        from plait._client import Client

        client = following.client = Client.default()
        client.on_reconnect = reconnect_notice
        if detach:
            if client.embedded:
                fail(
                    "--detach needs a server: the embedded engine stops with this process "
                    "(start one with `plait server start`, then set PLAIT_SERVER or run "
                    "`plait login HOST:PORT`)"
                )
            run = client.run_pipeline(
                pipe, parameters, no_cache=no_cache, wait=False, refresh=refresh
            )
            click.echo(run.run_id)
            return
        if quiet:
            following.creating = True
            run = client.run_pipeline(
                pipe, parameters, no_cache=no_cache, wait=False, refresh=refresh
            )
            following.run_id = run.run_id
            run = client.wait(run.run_id)
        else:
            run = _run_with_progress(client, pipe, parameters, no_cache, following, refresh)
    except PlaitError as exc:
        fail(str(exc))
    except KeyboardInterrupt:
        following.interrupted()
    if quiet:
        click.echo(run.run_id)
    else:
        print_run(run)
    if run.status != "SUCCEEDED":
        sys.exit(1)


EXIT_INTERRUPTED = 130
"""What ``plait run`` exits with after Ctrl-C (128 + SIGINT, as shells report it)."""


class _Following:
    """What ``plait run`` has started, for the message Ctrl-C prints."""

    def __init__(self) -> None:
        self.client: Any = None
        self.creating = False
        """Whether the run was asked for (it may exist before its id is known here)."""
        self.run_id = ""

    def interrupted(self) -> NoReturn:
        """Says what became of the run after Ctrl-C (no traceback), and exits 130.

        On a server the run goes on (this command only followed it); the embedded engine stops
        with this process, so its run is cancelled. A second Ctrl-C meanwhile ends the process
        at once.
        """
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        say = functools.partial(click.echo, err=True)
        say("")  # past the ^C the terminal echoed
        if not self.run_id:
            if self.creating:
                say("interrupted while the run was being created: see `plait runs list`")
            else:
                say("interrupted: no run was started")
        elif self.client is not None and self.client.embedded:
            with contextlib.suppress(PlaitError):
                self.client.cancel_run(self.run_id)
            say(
                f"interrupted: run {self.run_id} is cancelled (the embedded engine stops with "
                f"this command; with a server, `plait server start`, a run goes on without it)"
            )
        else:
            where = f" on the server at {self.client.address}" if self.client is not None else ""
            short = self.run_id[:12]
            say(
                f"interrupted: run {self.run_id} goes on{where}; this command only stopped "
                f"following it\n"
                f"  follow it:  plait runs watch {short}\n"
                f"  cancel it:  plait runs cancel {short}"
            )
        sys.exit(EXIT_INTERRUPTED)


def typed_params(pipe: Any, items: tuple[str, ...]) -> dict[str, Any]:
    """Parses ``-p NAME=VALUE`` options against the pipeline's parameters.

    VALUE is read as JSON when that fits the parameter's declared type (``3``, ``1.5``,
    ``true``, ``[1, 2]``, ``{"a": 1}``; ``True``/``False`` too for a ``bool``), else taken as
    text when the type takes a string (``-p tag=2024`` for a ``str`` is ``"2024"``). The
    values come back converted as a run takes them (``-p C=1`` for a ``float`` is ``1.0``).
    An unknown name or a value that fits nothing ends the command with a message naming the
    parameter, its type and the value, before anything runs.

    Args:
        pipe: The pipeline.
        items: The repeated option's values.

    Returns:
        The checked values by name.
    """
    out: dict[str, Any] = {}
    for item in items:
        name, sep, raw = item.partition("=")
        if not sep or not name:
            fail(f"-p takes name=value, got {item!r}")
        candidates: list[Any] = []
        try:
            candidates.append(json.loads(raw))
        except ValueError:
            if raw.lower() in ("true", "false"):
                candidates.append(raw.lower() == "true")
        candidates.append(raw)
        error: ParameterError | None = None
        for value in candidates:
            try:
                out.update(pipe.check_parameters({name: value}))
                break
            except ParameterError as exc:
                error = error or exc
        else:
            fail(str(error))
    return out


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


def _run_with_progress(
    client: Any,
    pipe: Any,
    parameters: dict[str, Any],
    no_cache: bool,
    following: _Following,
    refresh: tuple[str, ...] = (),
) -> Any:
    """Runs the pipeline while one status line on standard error counts its steps, with a
    clock that runs on between events (a long step), and the steps' output is printed above
    it, line by line."""
    from rich.live import Live
    from rich.text import Text

    from plait.ir.mapping import split_item

    compiled = pipe.compile(parameters)
    width = min(24, max((len(s.id) for s in compiled.spec.steps), default=0))
    statuses: dict[str, StepStatus] = {}
    lock = threading.Lock()  # the live display renders in a thread of its own
    console = get_console(stderr=True)
    started = time.monotonic()

    def render() -> Text:
        with lock:
            now = dict(statuses)
        counts = Counter(now.values())
        done = sum(n for s, n in counts.items() if s.is_final)
        total = len(compiled.spec.steps) + sum(1 for k in now if split_item(k))  # map items
        parts = [
            f"{counts[s]} {s.lower()}"
            for s in StepStatus
            if counts[s] and s not in (StepStatus.PENDING, StepStatus.QUEUED)
        ]
        running = [k for k, v in now.items() if v is StepStatus.RUNNING][:3]
        line = Text(f"{pipe.name}: {done}/{total} steps  ", style="bold")
        line.append(", ".join(parts))
        if running:
            line.append(f"  running: {', '.join(running)}", style="dim")
        line.append(f"  {time.monotonic() - started:.1f}s", style="dim")
        return line

    # get_renderable: each refresh (8 a second) renders afresh, so the clock runs on while a
    # long step sends no event
    with Live(console=console, get_renderable=render, refresh_per_second=8, transient=True) as live:

        def on_events(events: list[Any]) -> None:
            with lock:
                for e in events:
                    if e.step_id and e.step_status is not None:
                        statuses[e.step_id] = e.step_status
            live.refresh()

        following.creating = True
        run = client.run_pipeline(pipe, parameters, no_cache=no_cache, wait=False, refresh=refresh)
        following.run_id = run.run_id
        printer = threading.Thread(
            target=_print_logs, args=(client, run.run_id, width), daemon=True
        )
        printer.start()
        run = client.wait(run.run_id, on_events=on_events)
        printer.join()  # the log stream ends with the run: every line is printed first
        return run
