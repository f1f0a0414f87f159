"""The ``plait`` command line."""

from __future__ import annotations

import importlib
import importlib.util
import json
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any, NoReturn

import click

from plait.errors import PlaitError

EPILOG = (
    "With no PLAIT_SERVER set, commands use the embedded engine and the store under "
    "PLAIT_HOME (default: ~/.local/share/plait)."
)


def _console(stderr: bool = False) -> Any:
    from rich.console import Console

    stream = sys.stderr if stderr else sys.stdout
    # piped output (grep, files, CI logs) is not wrapped at rich's default of 80 columns
    width = None if stream.isatty() else 200
    return Console(stderr=stderr, highlight=False, width=width)


def _fail(message: str, code: int = 2) -> NoReturn:
    _console(stderr=True).print(f"[bold red]error:[/] {message}")
    sys.exit(code)


def load_pipeline(target: str) -> Any:
    """Loads ``FILE.py:NAME`` or ``package.module:NAME`` and returns the pipeline object."""
    from plait._pipeline import Pipeline

    if ":" not in target:
        _fail(
            f"expected FILE_OR_MODULE:PIPELINE, got {target!r} (e.g. examples/quickstart.py:demo)"
        )
    where, _, name = target.rpartition(":")
    path = Path(where)
    if where.endswith(".py") or path.is_file():
        if not path.is_file():
            _fail(f"no such file: {where}")
        path = path.resolve()
        module_name = path.stem
        sys.path.insert(0, str(path.parent))
        spec = importlib.util.spec_from_file_location(module_name, path)
        if spec is None or spec.loader is None:
            _fail(f"cannot load {where}")
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        spec.loader.exec_module(module)
    else:
        sys.path.insert(0, str(Path.cwd()))
        try:
            module = importlib.import_module(where)
        except ImportError as exc:
            _fail(f"cannot import {where!r}: {exc}")
    obj = getattr(module, name, None)
    if not isinstance(obj, Pipeline):
        found = sorted(k for k, v in vars(module).items() if isinstance(v, Pipeline))
        _fail(f"{where} has no pipeline {name!r}; pipelines there: {', '.join(found) or 'none'}")
    return obj


def _parse_params(items: tuple[str, ...]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            _fail(f"-p takes name=value, got {item!r}")
        try:
            out[key] = json.loads(raw)
        except ValueError:
            out[key] = raw  # not JSON: a plain string
    return out


@click.group(epilog=EPILOG, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="plait")
def cli() -> None:
    """Plait: define pipelines of Python steps, run them embedded or on a shared server."""


@cli.command("run", epilog=EPILOG)
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
def run_cmd(target: str, params: tuple[str, ...], no_cache: bool, quiet: bool) -> None:
    """Run the pipeline TARGET (FILE.py:PIPELINE or package.module:PIPELINE).

    Shows live progress and exits with status 1 when the run fails.

    \b
    Example:
      plait run examples/quickstart.py:demo -p n=1000
    """
    pipe = load_pipeline(target)
    parameters = _parse_params(params)
    from plait._client import Client

    try:
        client = Client.default()
        if quiet:
            run = pipe.run(parameters, no_cache=no_cache, client=client)
        else:
            run = _run_with_progress(client, pipe, parameters, no_cache)
    except PlaitError as exc:
        _fail(str(exc))
    if quiet:
        click.echo(run.run_id)
    else:
        _print_run(run)
    if run.status != "SUCCEEDED":
        sys.exit(1)


def _run_with_progress(client: Any, pipe: Any, parameters: dict[str, Any], no_cache: bool) -> Any:
    from rich.live import Live
    from rich.text import Text

    compiled = pipe.compile()
    total = len(compiled.spec.steps)
    statuses: dict[str, str] = {}
    console = _console(stderr=True)
    started = time.monotonic()

    def render() -> Text:
        counts = Counter(statuses.values())
        done = sum(counts[s] for s in ("SUCCEEDED", "CACHED", "FAILED", "SKIPPED", "CRASHED"))
        parts = [
            f"{counts[s]} {s.lower()}"
            for s in ("RUNNING", "SUCCEEDED", "CACHED", "FAILED", "SKIPPED", "CRASHED")
            if counts[s]
        ]
        running = [k for k, v in statuses.items() if v == "RUNNING"][:3]
        line = Text(f"{pipe.name}: {done}/{total} steps  ", style="bold")
        line.append(", ".join(parts))
        if running:
            line.append(f"  running: {', '.join(running)}", style="dim")
        line.append(f"  {time.monotonic() - started:.1f}s", style="dim")
        return line

    from plait.api.v1 import resources_pb2

    with Live(render(), console=console, refresh_per_second=8, transient=True) as live:

        def on_events(events: list[Any]) -> None:
            for e in events:
                if e.step_id:
                    statuses[e.step_id] = resources_pb2.StepStatus.Name(e.step_status).removeprefix(
                        "STEP_STATUS_"
                    )
            live.update(render())

        return client.run_pipeline(pipe, parameters, no_cache=no_cache, on_events=on_events)


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


def _styled(status: str) -> str:
    """A status as rich markup, coloured by what it means."""
    return f"[{_STYLE.get(status, 'default')}]{status}[/]"


def _print_run(run: Any) -> None:
    console = _console()
    counts = Counter(s.status.value for s in run.steps.values())
    summary = ", ".join(f"{n} {k.lower()}" for k, n in sorted(counts.items()))
    took = ""
    if run.create_time and run.end_time:
        took = f" in {(run.end_time - run.create_time).total_seconds():.2f}s"
    console.print(
        f"run [bold]{run.run_id}[/] of {run.pipeline}: {_styled(run.status)}{took} ({summary})"
    )
    for s in run.steps.values():
        if s.status in ("FAILED", "CRASHED") and s.error is not None:
            console.print(
                f"\n[red]step {s.step_id} {s.status.lower()}:[/] {s.error.type}: {s.error.message}"
            )
            if s.error.traceback:
                console.print(s.error.traceback.rstrip(), markup=False)
    console.print(f"details: plait runs show {run.run_id[:12]}", style="dim")


@cli.group(epilog=EPILOG)
def runs() -> None:
    """List and inspect runs."""


@runs.command("list", epilog=EPILOG)
@click.option("--limit", "-n", default=20, show_default=True, help="How many runs to show.")
@click.option("--pipeline", default="", help="Only runs of this pipeline.")
def runs_list(limit: int, pipeline: str) -> None:
    """List runs, newest first."""
    from rich.table import Table

    from plait._client import Client

    try:
        found = Client.default().list_runs(limit=limit, pipeline=pipeline)
    except PlaitError as exc:
        _fail(str(exc))
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
            _styled(r.status),
            r.create_time.strftime("%Y-%m-%d %H:%M:%S") if r.create_time else "",
            duration,
        )
    if not found:
        if pipeline:
            click.echo(f"no runs of pipeline {pipeline!r}")
        else:
            click.echo("no runs yet: try `plait run examples/quickstart.py:demo`")
        return
    _console().print(table)


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
        _fail(str(exc))
    console = _console()
    console.print(
        f"run [bold]{run.run_id}[/]  pipeline {run.pipeline}  "
        f"version {run.pipeline_version[:12]}  {_styled(run.status)}"
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
            _styled(s.status),
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
def runs_logs(run_id: str, step: str | None) -> None:
    """Print the captured stdout and stderr of a run's steps (or of STEP)."""
    from plait._client import Client

    try:
        client = Client.default()
        run = client.get_run(run_id)
        if step is not None and step not in run.steps:
            _fail(
                f"run {run.run_id[:12]} has no step {step!r}; steps: "
                f"{', '.join(list(run.steps)[:20])}"
            )
        entries = client.logs(run.run_id, step)
    except PlaitError as exc:
        _fail(str(exc))
    current = None
    for e in entries:
        if step is None and e.step_id != current:
            click.secho(f"--- {e.step_id} (attempt {e.attempt})", fg="cyan", err=False)
            current = e.step_id
        click.echo(e.text, nl=False, err=e.stream == "stderr")


@cli.group(epilog=EPILOG)
def artifacts() -> None:
    """Read artifacts (step outputs)."""


@artifacts.command("get", epilog=EPILOG)
@click.argument("artifact_id")
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, writable=True),
    help="Write the stored bytes to this file instead of standard output.",
)
def artifacts_get(artifact_id: str, output: str | None) -> None:
    """Print an artifact's stored bytes, or write them to a file with -o.

    ARTIFACT_ID may be a unique prefix (see `plait runs show`). Text artifacts (JSON, str)
    print as they are; binary ones need -o when standard output is a terminal.
    """
    from plait._client import Client

    try:
        info = Client.default().get_artifact(artifact_id)
        data = info.read_bytes()
    except PlaitError as exc:
        _fail(str(exc))
    if output:
        Path(output).write_bytes(data)
        click.echo(
            f"wrote {len(data)} bytes ({info.materializer}, {info.data_type}) to {output}", err=True
        )
        return
    try:
        text = data.decode()
    except UnicodeDecodeError:
        if sys.stdout.isatty():
            _fail(
                f"artifact {info.artifact_id[:12]} is binary ({info.materializer}, "
                f"{info.size} bytes): write it to a file with -o FILE"
            )
        sys.stdout.buffer.write(data)
        return
    click.echo(text)


@cli.group(epilog=EPILOG)
def pipeline() -> None:
    """Compile and inspect pipelines."""


@pipeline.command("compile", epilog=EPILOG)
@click.argument("target")
@click.option(
    "-o",
    "--output-dir",
    default=".",
    show_default=True,
    type=click.Path(file_okay=False),
    help="Where to write the files.",
)
def pipeline_compile(target: str, output_dir: str) -> None:
    """Compile TARGET to its IR: NAME.pb (binary), NAME.json, and NAME.dot (the graph).

    The version printed is the sha256 of the canonical IR.
    """
    from google.protobuf.json_format import MessageToJson

    pipe = load_pipeline(target)
    try:
        compiled = pipe.compile()
    except PlaitError as exc:
        _fail(str(exc))
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    name = compiled.spec.name
    (out / f"{name}.pb").write_bytes(compiled.spec.SerializeToString())
    (out / f"{name}.json").write_text(
        MessageToJson(compiled.spec, preserving_proto_field_name=True) + "\n"
    )
    (out / f"{name}.dot").write_text(to_dot(compiled))
    click.echo(f"{name} {compiled.version}")
    for ext in ("pb", "json", "dot"):
        click.echo(f"  {out / f'{name}.{ext}'}")


def to_dot(compiled: Any) -> str:
    """The step graph in Graphviz DOT: nodes are steps, edges carry the inputs they bind."""

    def q(s: str) -> str:
        return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'

    lines = [f"digraph {q(compiled.spec.name)} {{", "  rankdir=LR;", "  node [shape=box];"]
    for s in compiled.spec.steps:
        lines.append(f"  {q(s.id)} [label={q(s.id + chr(10) + s.code.qualname)}];")
    for u, v in compiled.graph.edges:
        lines.append(f"  {q(u)} -> {q(v)};")
    lines.append("}")
    return "\n".join(lines) + "\n"


def main() -> None:
    """Entry point of the ``plait`` command."""
    cli(prog_name="plait")
