"""``plait artifacts …``: read step outputs."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from plait.cli._common import EPILOG, artifact_json, fail, output_option, print_json, time_json
from plait.errors import PlaitError


@click.group("artifacts", epilog=EPILOG)
def artifacts() -> None:
    """Read artifacts (step outputs)."""


@artifacts.command("show", epilog=EPILOG)
@click.argument("artifact_id")
@output_option
def artifacts_show(artifact_id: str, output: str) -> None:
    """Show an artifact's record: the step output it is, its digest, size, type and metadata.

    ARTIFACT_ID may be a unique prefix (see `plait runs show`); `plait artifacts get` prints
    its bytes.

    \b
    With --output json: artifact_id, output, digest, size_bytes, uri, materializer,
    data_type, unsafe, run_id, step_id, create_time and metadata.
    """
    from plait._client import Client

    try:
        info = Client.default().get_artifact(artifact_id)
    except PlaitError as exc:
        fail(str(exc))
    doc = artifact_json(info)
    if output == "json":
        print_json(doc)
        return
    click.echo(f"artifact {info.artifact_id}")
    for key in ("run_id", "step_id", "output", "data_type", "materializer", "digest", "uri"):
        click.echo(f"  {key.replace('_', ' ')}: {doc[key] or '-'}")
    click.echo(f"  size: {info.size} bytes")
    if info.unsafe:
        click.echo("  UNSAFE: loading it runs code (pickle)")
    click.echo(f"  created: {time_json(info.created_at) or '-'}")
    if info.metadata:
        click.echo(f"  metadata: {json.dumps(info.metadata, sort_keys=True)}")


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
        fail(str(exc))
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
            fail(
                f"artifact {info.artifact_id[:12]} is binary ({info.materializer}, "
                f"{info.size} bytes): write it to a file with -o FILE"
            )
        sys.stdout.buffer.write(data)
        return
    click.echo(text)
