"""``plait login`` and ``plait logout``: choose the server commands use by default, and the
token to send it."""

from __future__ import annotations

import click

from plait.cli._common import EPILOG, fail, healthy


@click.command("login", epilog=EPILOG)
@click.argument("address")
@click.option(
    "--token",
    default=None,
    help="The API token to send to ADDRESS; saved owner-only (0600) beside the server's address.",
)
def login(address: str, token: str | None) -> None:
    """Use the server at ADDRESS from now on, when PLAIT_SERVER is not set.

    \b
    ADDRESS is one of (as PLAIT_SERVER and --server take it):
      HOST:PORT
      HOST                  the default port, 7676
      grpc://HOST[:PORT]    plain text
      grpcs://HOST[:PORT]   TLS (PLAIT_TLS_CA, else the system's roots, trust the server)
      several of one form, comma-separated: the replicas of one control plane
    """
    from plait._settings import config_path, normalize_server, read_config, write_config
    from plait.errors import PlaitError

    try:
        address = normalize_server(address)
    except PlaitError as exc:
        fail(str(exc))
    if not healthy(address):
        fail(f"no Plait server answers at {address}")
    config = read_config()
    config["server"] = address
    if token is not None:
        from plait._client import Client

        try:
            Client(address, token=token).list_runs(limit=1)
        except PlaitError as exc:
            fail(f"the server at {address} refuses that token: {exc}")
        tokens = config.get("tokens")
        config["tokens"] = {**(tokens if isinstance(tokens, dict) else {}), address: token}
    write_config(config)
    saved = " and its token" if token is not None else ""
    click.echo(f"using the server at {address}{saved} (saved in {config_path()})")


@click.command("logout", epilog=EPILOG)
def logout() -> None:
    """Forget the server saved by `plait login` (and its token): back to the embedded engine."""
    from plait._settings import read_config, write_config

    config = read_config()
    server = config.pop("server", None)
    tokens = config.get("tokens")
    if isinstance(tokens, dict) and server in tokens:
        del tokens[server]
    write_config(config)
    click.echo("using the embedded engine")
