"""``plait token …``: the API tokens a server accepts.

Against a server (``PLAIT_SERVER``, the one ``plait login`` saved, or this PLAIT_HOME's running
daemon) the commands call its TokenService, with an admin token. With no server to talk to, or
with ``--database-url``, they open the store themselves: that is how the first tokens of a
server are made before it runs.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import datetime
from typing import Any

import click

from plait.cli._common import EPILOG, fail, get_console, output_option, print_json, time_json
from plait.errors import PlaitError

ROLES = ("user", "worker", "admin")


@click.group("token", epilog=EPILOG)
def token() -> None:
    """Manage the API tokens a server accepts: roles admin, user and worker."""


def _server() -> str | None:
    """The server to manage: PLAIT_SERVER or the saved one, else the daemon of this
    PLAIT_HOME when it runs (its credential file names its port)."""
    import json

    from plait._settings import CREDENTIAL_FILE, plait_home, server_address
    from plait.cli._common import healthy

    address = server_address()
    if address:
        return address
    try:
        port = json.loads((plait_home() / CREDENTIAL_FILE).read_text())["port"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    local = f"127.0.0.1:{port}"
    return local if healthy(local) else None


def _store_call(database_url: str, fn: Callable[..., Any], *args: Any) -> Any:
    """Runs ``fn(conn, *args)`` in a write transaction of the store itself."""
    import anyio

    from plait._settings import plait_home
    from plait.engine._control_plane import ControlPlaneConfig
    from plait.engine.store import Store

    async def go() -> Any:
        store = Store(ControlPlaneConfig(home=plait_home(), database_url=database_url).db_url())
        try:
            await store.open()
            return await store.write(fn, *args)
        finally:
            await store.aclose()

    return anyio.run(go)


def _api_call(address: str, method: str, request: Any) -> Any:
    from plait._client import Client

    return Client(address).tokens(method, request)


_DB_OPTION = click.option(
    "--database-url",
    default="",
    help="Work on this store directly, not through a server (to make a server's first tokens).",
)


def _when(t: float | None) -> str:
    return datetime.fromtimestamp(t).strftime("%Y-%m-%d %H:%M:%S") if t else ""


@token.command("create", epilog=EPILOG)
@click.argument("name")
@click.option(
    "--role",
    type=click.Choice(ROLES),
    default="user",
    show_default=True,
    help="user: pipelines, runs, artifacts, stacks (so: can run code); worker: only the "
    "worker-facing service; admin: tokens too.",
)
@_DB_OPTION
def token_create(name: str, role: str, database_url: str) -> None:
    """Create a token called NAME and print it (once: only its hash is stored).

    Clients send it with PLAIT_TOKEN=<token>, or save it with `plait login HOST:PORT --token`.
    """
    address = None if database_url else _server()
    try:
        if address is None:
            from plait.engine.store._tokens import Role, create_token

            _, secret = _store_call(database_url, create_token, name, Role(role), time.time())
        else:
            from plait.api.v1 import token_service_pb2 as pb

            resp = _api_call(
                address,
                "CreateToken",
                pb.CreateTokenRequest(
                    display_name=name, role=pb.TokenRole.Value(f"TOKEN_ROLE_{role.upper()}")
                ),
            )
            secret = resp.secret
    except PlaitError as exc:
        fail(str(exc))
    click.echo(secret)
    click.echo(f"a {role} token: store it now, it is not shown again", err=True)


@token.command("list", epilog=EPILOG)
@_DB_OPTION
@output_option
def token_list(database_url: str, output: str) -> None:
    """List tokens: id, name, role, created, revoked (never their secrets).

    With --output json: {"tokens": [{"id", "name", "role", "created", "revoked"}]}, times in
    ISO 8601 (UTC), revoked null while the token is valid.
    """
    from rich.table import Table

    address = None if database_url else _server()
    rows: list[tuple[str, str, str, str, str]] = []
    times: list[tuple[float, float | None]] = []
    try:
        if address is None:
            from plait.engine.store._tokens import list_tokens

            for t in _store_call(database_url, list_tokens):
                rows.append((t.id, t.name, t.role, _when(t.created_at), _when(t.revoked_at)))
                times.append((t.created_at, t.revoked_at))
        else:
            from plait.api.v1 import token_service_pb2 as pb

            for m in _api_call(address, "ListTokens", pb.ListTokensRequest()).tokens:
                revoked = m.revoke_time.ToNanoseconds() / 1e9 if m.HasField("revoke_time") else None
                times.append((m.create_time.ToNanoseconds() / 1e9, revoked))
                rows.append(
                    (
                        m.token_id,
                        m.display_name,
                        pb.TokenRole.Name(m.role).removeprefix("TOKEN_ROLE_").lower(),
                        _when(m.create_time.ToNanoseconds() / 1e9),
                        _when(revoked),
                    )
                )
    except PlaitError as exc:
        fail(str(exc))
    if output == "json":
        print_json(
            {
                "tokens": [
                    {
                        "id": row[0],
                        "name": row[1],
                        "role": row[2],
                        "created": time_json(created),
                        "revoked": time_json(revoked),
                    }
                    for row, (created, revoked) in zip(rows, times, strict=True)
                ]
            }
        )
        return
    if not rows:
        click.echo("no tokens: create one with `plait token create NAME`")
        return
    table = Table("id", "name", "role", "created", "revoked")
    for row in rows:
        table.add_row(*row)
    get_console().print(table)


@token.command("revoke", epilog=EPILOG)
@click.argument("token_id")
@_DB_OPTION
def token_revoke(token_id: str, database_url: str) -> None:
    """Revoke the token TOKEN_ID (see `plait token list`); servers refuse it within seconds."""
    address = None if database_url else _server()
    try:
        if address is None:
            from plait.engine.store._tokens import revoke_token

            _store_call(database_url, revoke_token, token_id, time.time())
        else:
            from plait.api.v1 import token_service_pb2 as pb

            _api_call(address, "RevokeToken", pb.RevokeTokenRequest(name=f"tokens/{token_id}"))
    except PlaitError as exc:
        fail(str(exc))
    click.echo(f"revoked token {token_id}")
