"""``plait artifacts …``: read step outputs."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from plait.cli._common import EPILOG, fail
from plait.errors import PlaitError


@click.group("artifacts", epilog=EPILOG)
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
