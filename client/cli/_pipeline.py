"""``plait pipeline …``: list registered pipelines and compile one to its IR."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from plait.cli._common import EPILOG, fail, get_console, load_pipeline, output_option, print_json
from plait.errors import PlaitError


@click.group("pipeline", epilog=EPILOG)
def pipeline() -> None:
    """Compile and inspect pipelines."""


@pipeline.command("list", epilog=EPILOG)
@output_option
def pipeline_list(output: str) -> None:
    """List registered pipelines: versions and the newest one.

    With --output json: {"pipelines": [{"name", "version_count", "latest_version"}]}.
    """
    from rich.table import Table

    from plait._client import Client

    try:
        found = Client.default().list_pipelines()
    except PlaitError as exc:
        fail(str(exc))
    if output == "json":
        print_json(
            {
                "pipelines": [
                    {"name": name, "version_count": count, "latest_version": latest}
                    for name, count, latest in found
                ]
            }
        )
        return
    if not found:
        click.echo("no pipelines yet: running one registers it")
        return
    table = Table("pipeline", "versions", "latest version")
    for name, count, latest in found:
        table.add_row(name, str(count), latest.rsplit("/", 1)[-1][:12])
    get_console().print(table)


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
@click.option(
    "-p",
    "--param",
    "params",
    multiple=True,
    metavar="NAME=VALUE",
    help="A parameter value to compile with (as `plait run -p` reads it); it matters for the "
    "structural parameters, those the pipeline function uses as values. Repeatable.",
)
def pipeline_compile(target: str, output_dir: str, params: tuple[str, ...]) -> None:
    """Compile TARGET to its IR: NAME.pb (binary), NAME.json, and NAME.dot (the graph).

    The version printed is the sha256 of the canonical IR. A parameter the pipeline function
    uses as a value (`range(n)`, `if flag:`, `n - 1`) is structural: the graph is compiled
    for its value (given with -p, else its default), which is part of the version; the
    structural parameters are listed with their values.

    \b
    Example:
      plait pipeline compile examples/parameters.py:fan_out -p n=3
    """
    from google.protobuf.json_format import MessageToJson

    from plait.cli._run import typed_params

    pipe = load_pipeline(target)
    values = typed_params(pipe, params)
    try:
        compiled = pipe.compile(values)
    except PlaitError as exc:
        fail(str(exc))
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    name = compiled.spec.name
    (out / f"{name}.pb").write_bytes(compiled.spec.SerializeToString())
    (out / f"{name}.json").write_text(
        MessageToJson(compiled.spec, preserving_proto_field_name=True) + "\n"
    )
    (out / f"{name}.dot").write_text(to_dot(compiled))
    click.echo(f"{name} {compiled.version}")
    if compiled.structural:
        shown = ", ".join(f"{k}={v}" for k, v in compiled.structural.items())
        click.echo(f"  structural parameters: {shown}")
    for ext in ("pb", "json", "dot"):
        click.echo(f"  {out / f'{name}.{ext}'}")


def to_dot(compiled: Any) -> str:
    """The step graph in Graphviz DOT: nodes are steps, edges carry the inputs they bind.

    Args:
        compiled: A compiled pipeline (its IR ``spec`` and step ``graph``).

    Returns:
        The DOT source, ending in a newline.
    """

    def q(s: str) -> str:
        return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'

    lines = [f"digraph {q(compiled.spec.name)} {{", "  rankdir=LR;", "  node [shape=box];"]
    for s in compiled.spec.steps:
        lines.append(f"  {q(s.id)} [label={q(s.id + chr(10) + s.code.qualname)}];")
    for u, v in compiled.graph.edges:
        lines.append(f"  {q(u)} -> {q(v)};")
    lines.append("}")
    return "\n".join(lines) + "\n"
