"""The local credential: how the CLI and SDK of the daemon's own account get in with no config.

At start a daemon with authentication writes ``PLAIT_HOME/credentials.json`` (owner-only, 0600,
in a 0700 folder) holding an admin token and the port it serves. Clients of the same account
send that token to the daemon on loopback (:func:`plait._settings.saved_token`); other OS users
cannot read it. The token is reused across restarts while it stays valid, so restarting the
daemon does not pile up tokens; revoking it makes the next start write a new one.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING

from plait._settings import write_private
from plait.engine.store._tokens import Role, create_token, token_role

if TYPE_CHECKING:
    from sqlalchemy.engine import Connection

NAME = "local admin (PLAIT_HOME/credentials.json)"


def _current_token(path: Path) -> str:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return ""
    return str(data.get("token", "")) if isinstance(data, dict) else ""


def local_admin_token(conn: Connection, path: Path) -> str:
    """The admin token of the credential file at ``path``: its current one while that is still
    a valid admin token, else a new one (in the caller's transaction)."""
    token = _current_token(path)
    if token and token_role(conn, token) is Role.ADMIN:
        return token
    _, secret = create_token(conn, NAME, Role.ADMIN, time.time())
    return secret


def write_credential(path: Path, token: str, port: int) -> None:
    write_private(path, json.dumps({"port": port, "token": token}, indent=2) + "\n")
