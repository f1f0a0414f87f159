"""Where Plait keeps its data, which control plane a client talks to, and with which token.

Everything Plait writes for a user is owner-only, whatever the umask: folders 0700, files 0600
(:func:`private_dir`, :func:`write_private`).
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from plait.errors import PlaitError

CREDENTIAL_FILE = "credentials.json"
"""In PLAIT_HOME: the local admin token a daemon writes for the CLI and SDK of its account."""

DEFAULT_PORT = 7676
"""The port ``plait server start`` listens on unless told otherwise, and so the port of a
server address that names none."""
DEFAULT_DASHBOARD_PORT = 7677
"""The port the daemon serves its dashboard on unless told otherwise (``--dashboard-port``)."""

SERVER_FORMS = (
    f"HOST:PORT, HOST (port {DEFAULT_PORT}), grpc://HOST[:PORT] (plain text), "
    "grpcs://HOST[:PORT] (TLS), or several of one form comma-separated (the replicas of one "
    "control plane); an IPv6 address goes in brackets: [::1]:7676"
)
"""The forms PLAIT_SERVER, ``--server`` and ``plait login`` accept, as error messages list
them."""

_SCHEMES = {"grpc": False, "grpcs": True}
_HOST_NAME = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_.-]{0,252}[A-Za-z0-9_])?")


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


@dataclass(frozen=True)
class ServerAddress:
    """One control plane (or replica) as an address names it."""

    host: str
    """A host name, an IPv4 address, or an IPv6 address in brackets (``[::1]``)."""
    port: int
    tls: bool | None
    """True for ``grpcs://``, False for ``grpc://``; None without a scheme (TLS when
    PLAIT_TLS_CA is set)."""

    def __str__(self) -> str:
        scheme = {True: "grpcs://", False: "grpc://", None: ""}[self.tls]
        return f"{scheme}{self.host}:{self.port}"

    @property
    def host_port(self) -> str:
        """``host:port``: what gRPC connects to."""
        return f"{self.host}:{self.port}"


def _refuse(address: str, item: str, why: str) -> PlaitError:
    where = f"{item!r} in {address!r}" if item != address else repr(address)
    return PlaitError(f"not a server address: {where} ({why}); accepted: {SERVER_FORMS}")


def _parse_one(address: str, item: str) -> ServerAddress:
    rest = item
    tls: bool | None = None
    if "://" in rest:
        scheme, _, rest = rest.partition("://")
        if scheme.lower() not in _SCHEMES:
            raise _refuse(address, item, f"the scheme {scheme}:// is not one Plait speaks")
        tls = _SCHEMES[scheme.lower()]
    if any(c in rest for c in "/?#@") or not rest:
        raise _refuse(address, item, "a server address is a host and a port, nothing more")
    if rest.startswith("["):  # [IPv6] or [IPv6]:PORT
        host, close, after = rest.partition("]")
        host += close
        if not close or (after and not after.startswith(":")):
            raise _refuse(address, item, "an IPv6 address goes in brackets: [::1]:7676")
        port_text = after[1:] if after else None
        try:
            ipaddress.IPv6Address(host[1:-1].split("%")[0])
        except ValueError:
            raise _refuse(address, item, f"{host} is not an IPv6 address") from None
    else:
        if rest.count(":") > 1:
            raise _refuse(address, item, "an IPv6 address goes in brackets: [::1]:7676")
        host, sep, after = rest.partition(":")
        port_text = after if sep else None
        if not _HOST_NAME.fullmatch(host):
            raise _refuse(address, item, f"{host!r} is not a host name or address")
    if port_text is None:
        return ServerAddress(host, DEFAULT_PORT, tls)
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise _refuse(address, item, f"the port {port_text!r} is not a number from 1 to 65535")
    return ServerAddress(host, int(port_text), tls)


def parse_server(address: str) -> tuple[ServerAddress, ...]:
    """The control plane(s) ``address`` names: one of the forms of `SERVER_FORMS`.

    Raises:
        PlaitError: ``address`` has another form; the message lists the accepted ones.
    """
    items = [item.strip() for item in address.split(",")]
    if not any(items):
        raise _refuse(address, address, "it is empty")
    parsed = tuple(_parse_one(address, item) for item in items)
    if len({p.tls for p in parsed}) > 1:
        raise _refuse(address, address, "the replicas of one control plane share one scheme")
    return parsed


def normalize_server(address: str) -> str:
    """``address`` in its one spelling: each replica ``[grpc(s)://]host:port`` (the default port
    filled in, the scheme lower-case), comma-separated without spaces.

    Raises:
        PlaitError: ``address`` is not one of the forms of `SERVER_FORMS`.
    """
    return ",".join(str(p) for p in parse_server(address))


def server_address() -> str | None:
    """The shared control plane to use: ``$PLAIT_SERVER``, else the one saved by ``plait
    login``; None means the embedded engine. The address is normalized
    (:func:`normalize_server`).

    Raises:
        PlaitError: the address is not one of the forms of `SERVER_FORMS`.
    """
    env = os.environ.get("PLAIT_SERVER")
    if env is not None:
        if not env.strip():
            return None  # PLAIT_SERVER="" forces the embedded engine
        try:
            return normalize_server(env)
        except PlaitError as exc:
            raise PlaitError(f"PLAIT_SERVER: {exc}") from None
    server = read_config().get("server")
    return normalize_server(str(server)) if server else None


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
    try:
        servers = parse_server(address)
    except PlaitError:
        servers = ()
    for key in (address, ",".join(str(s) for s in servers)):
        if isinstance(saved, dict) and isinstance(saved.get(key), str):
            return str(saved[key])
    if len(servers) != 1 or not is_loopback(servers[0].host):
        return ""  # a local credential never goes to another machine
    try:
        local = json.loads((plait_home() / CREDENTIAL_FILE).read_text())
    except (OSError, ValueError):
        return ""
    if isinstance(local, dict) and str(local.get("port")) == str(servers[0].port):
        return str(local.get("token", ""))
    return ""
