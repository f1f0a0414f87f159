"""Where Plait keeps its data, which control plane a client talks to, and with which token.

Everything Plait writes for a user is owner-only, whatever the umask: folders 0700, files 0600
(:func:`private_dir`, :func:`write_private`).
"""

from __future__ import annotations

import ipaddress
import json
import os
import socket
from pathlib import Path
from typing import Any

from plait.errors import PlaitError

CREDENTIAL_FILE = "credentials.json"
"""In PLAIT_HOME: the local admin token a daemon writes for the CLI and SDK of its account."""


def private_dir(path: Path) -> Path:
    """Creates ``path`` (and its missing parents) owner-only, and makes it so if it exists."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    if path.stat().st_mode & 0o077:
        path.chmod(0o700)
    return path


def write_private(path: Path, text: str) -> None:
    """Writes a file owner-only (0600) and atomically: it never exists with wider rights."""
    private_dir(path.parent)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)  # O_CREAT's mode is cut by the umask; this is not
        os.write(fd, text.encode())
    finally:
        os.close(fd)
    os.replace(tmp, path)


def plait_home() -> Path:
    """``$PLAIT_HOME``, else ``$XDG_DATA_HOME/plait``, else ``~/.local/share/plait``."""
    home = os.environ.get("PLAIT_HOME")
    if home:
        return Path(home).expanduser().resolve()
    xdg = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return (Path(xdg) / "plait").resolve()


def config_path() -> Path:
    """The user's config file: ``$XDG_CONFIG_HOME/plait/config.json``."""
    xdg = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(xdg) / "plait" / "config.json"


def read_config() -> dict[str, Any]:
    try:
        data = json.loads(config_path().read_text())
    except FileNotFoundError:
        return {}
    except ValueError as exc:
        raise PlaitError(f"{config_path()} is not valid JSON: {exc}") from None
    return data if isinstance(data, dict) else {}


def write_config(data: dict[str, Any]) -> None:
    """Saves the user's config, owner-only: it may hold tokens."""
    write_private(config_path(), json.dumps(data, indent=2) + "\n")


def server_address() -> str | None:
    """The shared control plane to use: ``$PLAIT_SERVER`` (host:port), else the one saved by
    ``plait login``; None means the embedded engine."""
    env = os.environ.get("PLAIT_SERVER")
    if env is not None:
        return env or None  # PLAIT_SERVER="" forces the embedded engine
    server = read_config().get("server")
    return str(server) if server else None


def is_loopback(host: str, *, resolve: bool = False) -> bool:
    """Whether ``host`` (an address, ``[::1]``, ``localhost``) is this machine's loopback; with
    ``resolve``, a host name is looked up too (a server choosing what to bind)."""
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        if not resolve:
            return False
    try:
        return ipaddress.ip_address(socket.gethostbyname(host)).is_loopback
    except OSError:
        return False


def saved_token(address: str) -> str:
    """The token to send to ``address`` when none is given: the one ``plait login`` saved for
    it, else the local daemon's credential (PLAIT_HOME/credentials.json) when ``address`` is that
    daemon on loopback; "" when there is none."""
    saved = read_config().get("tokens", {})
    if isinstance(saved, dict) and isinstance(saved.get(address), str):
        return str(saved[address])
    host, _, port = address.rpartition(":")
    if not is_loopback(host):
        return ""  # a local credential never goes to another machine
    try:
        local = json.loads((plait_home() / CREDENTIAL_FILE).read_text())
    except (OSError, ValueError):
        return ""
    if isinstance(local, dict) and str(local.get("port")) == port:
        return str(local.get("token", ""))
    return ""
