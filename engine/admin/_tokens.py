"""``plait token …``: the API tokens a server accepts, kept in its metadata store.

These commands open the store themselves, so they run where the server's database is.
"""

from __future__ import annotations

from typing import Any

import click

from plait.cli._common import EPILOG, fail, get_console
from plait.errors import PlaitError


@click.group("token", epilog=EPILOG)
def token() -> None:
    """Manage the API tokens a server accepts (run these where the server's store is)."""


def _token_store(database_url: str) -> Any:
    """The metadata store at ``database_url`` (default: SQLite in PLAIT_HOME), not yet open."""
    # engine internals are imported here, not at the top: the engine is reorganized around this
    from plait._settings import plait_home
    from plait.engine._control_plane import ControlPlaneConfig
    from plait.engine.store import Store

    return Store(ControlPlaneConfig(home=plait_home(), database_url=database_url).db_url())


_DB_OPTION = click.option(
    "--database-url",
    default="",
    envvar="PLAIT_DATABASE_URL",
    help="The server's store [default: SQLite in PLAIT_HOME].",
)


def _with_store(database_url: str, fn: Any, *args: Any) -> Any:
    """Runs ``fn(*args)`` in a write transaction of the store; an error ends the command."""
    import anyio

    async def go() -> Any:
        store = _token_store(database_url)
        try:
            await store.open()
            return await store.write(fn, *args)
        finally:
            await store.aclose()

    try:
        return anyio.run(go)
    except PlaitError as exc:
        fail(str(exc))


@token.command("create", epilog=EPILOG)
@click.argument("name")
@_DB_OPTION
def token_create(name: str, database_url: str) -> None:
    """Create a token called NAME and print it (once: only its hash is stored).

    Clients send it with PLAIT_TOKEN=<token>.
    """
    import time

    from plait.engine.store._tokens import create_token

    click.echo(_with_store(database_url, create_token, name, time.time()))
    click.echo("store it now: it is not shown again", err=True)


@token.command("list", epilog=EPILOG)
@_DB_OPTION
def token_list(database_url: str) -> None:
    """List tokens: id, name, created, revoked."""
    from datetime import datetime

    from rich.table import Table

    from plait.engine.store._tokens import list_tokens

    tokens = _with_store(database_url, list_tokens)
    if not tokens:
        click.echo("no tokens: create one with `plait token create NAME`")
        return
    table = Table("id", "name", "created", "revoked")
    for t in tokens:
        table.add_row(
            t.id,
            t.name,
            datetime.fromtimestamp(t.created_at).strftime("%Y-%m-%d %H:%M:%S"),
            datetime.fromtimestamp(t.revoked_at).strftime("%Y-%m-%d %H:%M:%S")
            if t.revoked_at
            else "",
        )
    get_console().print(table)


@token.command("revoke", epilog=EPILOG)
@click.argument("token_id")
@_DB_OPTION
def token_revoke(token_id: str, database_url: str) -> None:
    """Revoke the token TOKEN_ID (see `plait token list`); servers refuse it within seconds."""
    import time

    from plait.engine.store._tokens import revoke_token

    _with_store(database_url, revoke_token, token_id, time.time())
    click.echo(f"revoked token {token_id}")
