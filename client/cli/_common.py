"""What the command groups share: the epilog, the console, failing, parameters, printing a run."""

from __future__ import annotations

import importlib
import importlib.util
import json
import sys
from collections import Counter
from pathlib import Path
from typing import Any, NoReturn

EPILOG = (
    "With no PLAIT_SERVER set, commands use the embedded engine and the store under "
    "PLAIT_HOME (default: ~/.local/share/plait)."
)


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
        spec.loader.exec_module(module)
    else:
        sys.path.insert(0, str(Path.cwd()))
        try:
            module = importlib.import_module(where)
        except ImportError as exc:
            fail(f"cannot import {where!r}: {exc}")
    obj = getattr(module, name, None)
    if not isinstance(obj, Pipeline):
        found = sorted(k for k, v in vars(module).items() if isinstance(v, Pipeline))
        fail(f"{where} has no pipeline {name!r}; pipelines there: {', '.join(found) or 'none'}")
    return obj


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

    return is_serving(ChannelConfig.from_env(address), timeout)


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
    for s in run.steps.values():
        if s.status in ("FAILED", "CRASHED") and s.error is not None:
            console.print(
                f"\n[red]step {s.step_id} {s.status.lower()}:[/] {s.error.type}: {s.error.message}"
            )
            if s.error.traceback:
                console.print(s.error.traceback.rstrip(), markup=False)
    console.print(f"details: plait runs show {run.run_id[:12]}", style="dim")
