"""What the command groups share: the epilog, the console, failing, parameters, printing a run,
and the ``--output json`` documents of the list and show commands.

Every list and show command takes ``--output table|json``. With ``json`` it prints one JSON
document on standard output and nothing else there: a list command an object with one key, the
plural of what it lists, holding an array (``{"runs": [...]}``), a show command the object
itself. Keys are snake_case and sorted, and stay: new ones may be added, none renamed or
removed. Times are ISO 8601 in UTC (``2026-11-03T09:12:44.123456+00:00``) or null, durations
``*_seconds`` numbers, sizes ``*_bytes``, ids in full (never cut to 12 characters).
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import json
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import click

EPILOG = (
    "With no PLAIT_SERVER set, commands use the embedded engine and the store under "
    "PLAIT_HOME (default: ~/.local/share/plait)."
)


OUTPUT_HELP = (
    "table: for people; json: one JSON document on standard output, for scripts (a list "
    'command prints {"<things>": [...]}, a show command the object; keys are stable and '
    "sorted, times ISO 8601 in UTC, ids in full)."
)

_F = TypeVar("_F", bound=Callable[..., Any])


def output_option(fn: _F) -> _F:
    """The ``--output table|json`` option of every list and show command (as ``output``)."""
    option = click.option(
        "--output",
        "output",
        type=click.Choice(["table", "json"]),
        default="table",
        show_default=True,
        help=OUTPUT_HELP,
    )
    return option(fn)


def print_json(document: Any) -> None:
    """Prints one JSON document on standard output: sorted keys, indented, UTF-8."""
    click.echo(json.dumps(document, indent=2, sort_keys=True, ensure_ascii=False))


def time_json(when: datetime | float | None) -> str | None:
    """A time as JSON: ISO 8601 in UTC; None (and 0, an unset epoch time) stays null."""
    if when is None or (not isinstance(when, datetime) and not when):
        return None
    if not isinstance(when, datetime):
        when = datetime.fromtimestamp(when, UTC)
    return when.astimezone(UTC).isoformat()


def artifact_json(a: Any) -> dict[str, Any]:
    """A ``plait.ArtifactInfo`` as ``--output json`` prints it."""
    return {
        "artifact_id": a.artifact_id,
        "output": a.output,
        "digest": a.digest,
        "size_bytes": a.size,
        "uri": a.uri,
        "materializer": a.materializer,
        "data_type": a.data_type,
        "unsafe": a.unsafe,
        "run_id": a.run_id,
        "step_id": a.step_id,
        "create_time": time_json(a.created_at),
        "metadata": a.metadata,
    }


def step_json(s: Any) -> dict[str, Any]:
    """A ``plait.StepRun`` as ``--output json`` prints it."""
    error = None
    if s.error is not None:
        error = {"type": s.error.type, "message": s.error.message, "traceback": s.error.traceback}
    return {
        "step_id": s.step_id,
        "status": str(s.status),
        "attempt": s.attempt,
        "start_time": time_json(s.start_time),
        "end_time": time_json(s.end_time),
        "duration_seconds": s.duration,
        "cached": s.cached,
        "cached_from": s.cached_from or None,
        "cache_key": s.cache_key,
        "upstream": list(s.upstream),
        "metadata": s.metadata,
        "outputs": {name: artifact_json(a) for name, a in s.outputs.items()},
        "error": error,
    }


def run_json(run: Any, *, steps: bool = True) -> dict[str, Any]:
    """A ``plait.Run`` as ``--output json`` prints it; ``steps`` adds its steps, in order."""
    duration = None
    if run.create_time and run.end_time:
        duration = (run.end_time - run.create_time).total_seconds()
    doc: dict[str, Any] = {
        "run_id": run.run_id,
        "pipeline": run.pipeline,
        "pipeline_version": run.pipeline_version,
        "status": str(run.status),
        "stack": run.stack or None,
        "parameters": run.parameters,
        "create_time": time_json(run.create_time),
        "end_time": time_json(run.end_time),
        "duration_seconds": duration,
        "retry_of": run.retry_of or None,
    }
    if steps:
        doc["steps"] = [step_json(s) for s in run.steps.values()]
    return doc


def get_console(stderr: bool = False) -> Any:
    """A rich console on standard output (or error), sized for terminals and pipes alike.

    Args:
        stderr: Print to standard error instead of standard output.

    Returns:
        A ``rich.console.Console``.
    """
    from rich.console import Console

    stream = sys.stderr if stderr else sys.stdout
    # piped output (grep, files, CI logs) is not wrapped at rich's default of 80 columns
    width = None if stream.isatty() else 200
    return Console(stderr=stderr, highlight=False, width=width)


def fail(message: str, code: int = 2) -> NoReturn:
    """Prints ``error: MESSAGE`` to standard error and exits.

    Args:
        message: What went wrong, for the user (no traceback).
        code: The exit status.
    """
    from rich.markup import escape

    # the message may echo what the user typed: brackets in it are text, not markup
    get_console(stderr=True).print(f"[bold red]error:[/] {escape(message)}")
    sys.exit(code)


def load_pipeline(target: str) -> Any:
    """Loads ``FILE.py:NAME`` or ``package.module:NAME`` and returns the pipeline object.

    Args:
        target: The file or module, a colon, and the pipeline's name in it.

    Returns:
        The ``plait.Pipeline``; any problem ends the command with a message.
    """
    from plait._pipeline import Pipeline

    if ":" not in target:
        fail(f"expected FILE_OR_MODULE:PIPELINE, got {target!r} (e.g. examples/quickstart.py:demo)")
    where, _, name = target.rpartition(":")
    path = Path(where)
    if where.endswith(".py") or path.is_file():
        if not path.is_file():
            fail(f"no such file: {where}")
        path = path.resolve()
        module_name = path.stem
        sys.path.insert(0, str(path.parent))
        spec = importlib.util.spec_from_file_location(module_name, path)
        if spec is None or spec.loader is None:
            fail(f"cannot load {where}")
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        # a pipeline call at the file's top level would run here, then again: the guard says
        # to put it under `if __name__ == "__main__":`, as a worker importing the file would
        with _guarded(where):
            spec.loader.exec_module(module)
    else:
        sys.path.insert(0, str(Path.cwd()))
        try:
            with _guarded(where):
                module = importlib.import_module(where)
        except ImportError as exc:
            fail(f"cannot import {where!r}: {exc}")
    obj = getattr(module, name, None)
    if not isinstance(obj, Pipeline):
        found = sorted(k for k, v in vars(module).items() if isinstance(v, Pipeline))
        fail(f"{where} has no pipeline {name!r}; pipelines there: {', '.join(found) or 'none'}")
    return obj


@contextlib.contextmanager
def _guarded(where: str) -> Iterator[None]:
    """Loading a pipeline's module: a pipeline it runs at import time ends the command with
    the guard's message (see plait.runners.worker._code.refusing_pipeline_runs)."""
    from plait.errors import PlaitError
    from plait.runners.worker._code import refusing_pipeline_runs

    try:
        with refusing_pipeline_runs(where, Path.cwd()):
            yield
    except PlaitError as exc:
        fail(str(exc))


def parse_params(items: tuple[str, ...]) -> dict[str, Any]:
    """Parses ``NAME=VALUE`` options; VALUE is read as JSON, else kept as a string.

    Args:
        items: The repeated option's values.

    Returns:
        The values by name; a malformed item ends the command with a message.
    """
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            fail(f"-p takes name=value, got {item!r}")
        try:
            out[key] = json.loads(raw)
        except ValueError:
            out[key] = raw  # not JSON: a plain string
    return out


def healthy(address: str, timeout: float = 2.0) -> bool:
    """Whether a Plait server answers health checks at ``address`` (HOST:PORT).

    Args:
        address: Where the server listens.
        timeout: Seconds to wait for the answer.

    Returns:
        True when it reports SERVING.
    """
    from plait._channel import ChannelConfig, is_serving
    from plait.errors import PlaitError

    try:
        config = ChannelConfig.from_env(address)
    except PlaitError:
        return False  # not an address: nothing answers there
    return is_serving(config, timeout)


_STYLE = {
    "SUCCEEDED": "green",
    "CACHED": "cyan",
    "FAILED": "red",
    "CRASHED": "red",
    "SKIPPED": "yellow",
    "RUNNING": "blue",
    "QUEUED": "dim",
    "PENDING": "dim",
    "RETRYING": "yellow",
    "CANCELLED": "magenta",
}


def styled(status: str) -> str:
    """A status as rich markup, coloured by what it means."""
    return f"[{_STYLE.get(status, 'default')}]{status}[/]"


class ItemGroup:
    """The items of one mapped step (``leaf[0]`` ... ``leaf[99]``), shown as one row."""

    def __init__(self, step_id: str) -> None:
        self.step_id = step_id
        self.items: list[Any] = []

    @property
    def label(self) -> str:
        """``leaf[0..99]``."""
        return f"{self.step_id}[0..{len(self.items) - 1}]"

    @property
    def summary(self) -> str:
        """How many items are in each status: ``97 succeeded, 3 cached``."""
        counts = Counter(str(s.status) for s in self.items)
        return ", ".join(f"{n} {k.lower()}" for k, n in sorted(counts.items()))

    @property
    def failed(self) -> list[Any]:
        """The items that failed or crashed, in order."""
        return [s for s in self.items if s.status in ("FAILED", "CRASHED")]


def group_items(steps: Any) -> list[Any]:
    """A run's steps in order, with the items of each mapped step gathered in one
    :class:`ItemGroup` right after it (``steps``: ``plait.StepRun`` values)."""
    from plait.ir.mapping import split_item

    rows: list[Any] = []
    groups: dict[str, ItemGroup] = {}
    steps = list(steps)
    ids = {s.step_id for s in steps}
    for s in steps:
        parent = split_item(s.step_id)
        if parent is not None and parent[0] in ids:
            group = groups.get(parent[0])
            if group is None:
                group = groups[parent[0]] = ItemGroup(parent[0])
                rows.append(group)
            group.items.append(s)
        else:
            rows.append(s)
    return rows


def output_lines(outputs: dict[str, Any]) -> list[tuple[str, Any]]:
    """A step's outputs to show, with the items of an output a map iterates counted in one
    line (``output[0..4]``, the number of items) instead of listed."""
    from plait.ir.mapping import split_item

    shown: list[tuple[str, Any]] = []
    counts: Counter[str] = Counter()
    for name, a in outputs.items():
        parent = split_item(name)
        if parent is not None and parent[0] in outputs:
            counts[parent[0]] += 1
        else:
            shown.append((name, a))
    for name, n in counts.items():
        shown.append((f"{name}[0..{n - 1}]", n))
    return shown


_SHOWN_FAILURES = 5
"""The failed steps whose tracebacks a finished run prints (the rest are counted)."""


def print_run(run: Any) -> None:
    """Prints a finished run: its status, step counts, and the errors of failed steps.

    Args:
        run: A ``plait.Run``.
    """
    console = get_console()
    counts = Counter(s.status.value for s in run.steps.values())
    summary = ", ".join(f"{n} {k.lower()}" for k, n in sorted(counts.items()))
    took = ""
    if run.create_time and run.end_time:
        took = f" in {(run.end_time - run.create_time).total_seconds():.2f}s"
    console.print(
        f"run [bold]{run.run_id}[/] of {run.pipeline}: {styled(run.status)}{took} ({summary})"
    )
    failed = [s for s in run.steps.values() if s.status in ("FAILED", "CRASHED") and s.error]
    for s in failed[:_SHOWN_FAILURES]:
        console.print(
            f"\n[red]step {s.step_id} {s.status.lower()}:[/] {s.error.type}: {s.error.message}"
        )
        if s.error.traceback:
            console.print(s.error.traceback.rstrip(), markup=False)
    if len(failed) > _SHOWN_FAILURES:
        console.print(f"\n... and {len(failed) - _SHOWN_FAILURES} more failed steps", style="red")
    console.print(f"details: plait runs show {run.run_id[:12]}", style="dim")
