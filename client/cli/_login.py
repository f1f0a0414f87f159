"""``plait login`` and ``plait logout``: choose the server commands use by default."""

from __future__ import annotations

import click

from plait.cli._common import EPILOG, fail, healthy


@click.command("login", epilog=EPILOG)
@click.argument("address")
def login(address: str) -> None:
    """Use the server at ADDRESS (HOST:PORT) from now on, when PLAIT_SERVER is not set."""
    from plait._settings import config_path, read_config, write_config

    if not healthy(address):
        fail(f"no Plait server answers at {address}")
    write_config({**read_config(), "server": address})
    click.echo(f"using the server at {address} (saved in {config_path()})")


@click.command("logout", epilog=EPILOG)
def logout() -> None:
    """Forget the server saved by `plait login`: back to the embedded engine."""
    from plait._settings import read_config, write_config

    config = read_config()
    config.pop("server", None)
    write_config(config)
    click.echo("using the embedded engine")
