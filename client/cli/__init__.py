"""The ``plait`` command line: the root group, and one module per command group.

Server administration (``server``, ``up``, ``down``, ``token``) lives with the engine in
``plait.engine.admin``; the root group imports it only when one of those commands runs, so the
other commands and ``plait --help`` never load the engine.
"""

from __future__ import annotations

import importlib

import click

from plait.cli._artifacts import artifacts
from plait.cli._builds import builds
from plait.cli._common import EPILOG
from plait.cli._login import login, logout
from plait.cli._pipeline import pipeline
from plait.cli._run import run_cmd
from plait.cli._runs import runs
from plait.cli._stacks import component, stack
from plait.cli._worker import worker

__all__ = ["EPILOG", "cli", "main"]

# name -> (module, attribute, short help); the short help is what `plait --help` prints, and a
# test checks it against the commands themselves
_ADMIN = {
    "server": (
        "plait.engine.admin._server",
        "server",
        "Run the control plane as a daemon that clients share (PLAIT_SERVER=HOST:PORT).",
    ),
    "up": (
        "plait.engine.admin._server",
        "up",
        "Start the daemon: the same as `plait server start`.",
    ),
    "down": (
        "plait.engine.admin._server",
        "down",
        "Stop the daemon: the same as `plait server stop`.",
    ),
    "dashboard": (
        "plait.engine.admin._server",
        "dashboard",
        "Open the daemon's web dashboard, signed in (a one-time login link).",
    ),
    "token": (
        "plait.engine.admin._tokens",
        "token",
        "Manage the API tokens a server accepts: roles admin, user and worker.",
    ),
}


class _RootGroup(click.Group):
    """The root group: it knows the administration commands by name and loads them on use."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        """All command names, the administration ones included, sorted."""
        return sorted({*self.commands, *_ADMIN})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        """The command ``cmd_name``; an administration command is imported here, once."""
        if cmd_name in _ADMIN and cmd_name not in self.commands:
            module, attribute, _ = _ADMIN[cmd_name]
            command: click.Command = getattr(importlib.import_module(module), attribute)
            self.add_command(command, cmd_name)
        return super().get_command(ctx, cmd_name)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        """Lists the commands in ``--help``, the administration ones from their short help.

        Importing them for one line of help each would load the engine.
        """
        stubs = {name: click.Command(name, help=text) for name, (_, _, text) in _ADMIN.items()}
        # click's own formatting, over stand-ins for the commands not loaded yet
        listing = click.Group(self.name, commands={**stubs, **self.commands})
        listing.format_commands(ctx, formatter)


@click.group(
    cls=_RootGroup, epilog=EPILOG, context_settings={"help_option_names": ["-h", "--help"]}
)
@click.version_option(package_name="plait")
def cli() -> None:
    """Plait: define pipelines of Python steps, run them embedded or on a shared server."""


for _command in (
    run_cmd,
    runs,
    artifacts,
    builds,
    component,
    stack,
    login,
    logout,
    pipeline,
    worker,
):
    cli.add_command(_command)


def main() -> None:
    """Entry point of the ``plait`` command."""
    cli(prog_name="plait")
