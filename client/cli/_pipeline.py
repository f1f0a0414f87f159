"""``plait pipeline …``: list registered pipelines and compile one to its IR."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from plait.cli._common import EPILOG, fail, get_console, load_pipeline
from plait.errors import PlaitError


@click.group("pipeline", epilog=EPILOG)
def pipeline() -> None:
    """Compile and inspect pipelines."""


@pipeline.command("list", epilog=EPILOG)
def pipeline_list() -> None:
    """List registered pipelines: versions and the newest one."""
    from rich.table import Table

    from plait._client import Client

    try:
        found = Client.default().list_pipelines()
    except PlaitError as exc:
        fail(str(exc))
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
def pipeline_compile(target: str, output_dir: str) -> None:
    """Compile TARGET to its IR: NAME.pb (binary), NAME.json, and NAME.dot (the graph).

    The version printed is the sha256 of the canonical IR.
    """
    from google.protobuf.json_format import MessageToJson

    pipe = load_pipeline(target)
    try:
        compiled = pipe.compile()
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
