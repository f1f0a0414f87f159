"""The control-plane daemon: the engine served over gRPC until SIGTERM, resuming runs at start."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import logging.handlers
import os
import signal
import socket
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import anyio

from plait._settings import CREDENTIAL_FILE, is_loopback, private_dir
from plait._settings import DEFAULT_PORT as DEFAULT_PORT  # the one default, shared
from plait.engine._control_plane import (
    ControlPlane,
    ControlPlaneConfig,
    heartbeat_timeout_setting,
    max_log_bytes_setting,
)
from plait.engine.scheduler._machine import DEFAULT_CRASH_RETRIES

if TYPE_CHECKING:
    from plait.engine.dashboard import Dashboard
from plait.errors import PlaitError

log = logging.getLogger("plait.server")

PID_FILE = "server.pid"
DASHBOARD_FILE = "dashboard.json"
"""Where the daemon writes its dashboard's URL (``plait dashboard`` reads it), owner-only."""
"""In PLAIT_HOME: ``PID\nHOST:PORT\n``, written once the daemon listens."""
LOCK_FILE = "server.lock"
"""In PLAIT_HOME: the daemon holds an exclusive flock on it for its whole life, so a pid file is
trusted only while its lock is held (engine/admin/_server.py checks it before any signal)."""
LOG_MAX_BYTES = 10 * 1024 * 1024
"""The size at which server.log rotates (PLAIT_SERVER_LOG_BYTES overrides it)."""
LOG_BACKUPS = 3
"""Rotated logs kept: server.log.1 … server.log.3."""
MAX_CRASH_RETRIES = 100
"""The largest crash budget a daemon takes."""
MAX_POOL_LIMIT = 1_000_000
"""The largest per-pool limit of steps at once."""


def crash_retries_setting(value: int | None) -> int:
    """The crash budget: ``value`` (a flag, the variable or a config key), else
    DEFAULT_CRASH_RETRIES; 0 to MAX_CRASH_RETRIES, or PlaitError."""
    if value is None:
        return DEFAULT_CRASH_RETRIES
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_CRASH_RETRIES:
        raise PlaitError(f"crash retries: expected 0 to {MAX_CRASH_RETRIES}, got {value!r}")
    return value


def pool_limits_setting(limits: Mapping[str, int] | None) -> dict[str, int]:
    """Per-pool limits of steps at once, by pool (a runner's name, ``local``, or a remote
    pool's); each name non-empty and each limit 1 to MAX_POOL_LIMIT, or PlaitError."""
    checked: dict[str, int] = {}
    for pool, limit in (limits or {}).items():
        if not pool or len(pool) > 256 or any(c.isspace() or c in ",=" for c in pool):
            raise PlaitError(f"pool limit: {pool!r} is not a pool name")
        if isinstance(limit, bool) or not isinstance(limit, int):
            raise PlaitError(f"pool limit of {pool!r}: expected a number of steps, got {limit!r}")
        if not 1 <= limit <= MAX_POOL_LIMIT:
            raise PlaitError(
                f"pool limit of {pool!r}: expected 1 to {MAX_POOL_LIMIT} steps at once, got {limit}"
            )
        checked[pool] = limit
    return checked


class _Log(logging.handlers.RotatingFileHandler):
    """server.log, rotated by size; fds 1 and 2 follow it, so what is written there (a
    library's warning, a crash's traceback) lands in the current file, not a rotated one."""

    def _open(self) -> object:  # type: ignore[override]
        stream = super()._open()
        for fd in (1, 2):
            os.dup2(stream.fileno(), fd)
        return stream


def _log_to(log_file: Path | None) -> None:
    fmt = "%(asctime)s %(name)s %(levelname)s %(message)s"
    # one line per plugin each time Alembic loads: noise in a server's log
    logging.getLogger("alembic.runtime.plugins").setLevel(logging.WARNING)
    if log_file is None:
        logging.basicConfig(level=logging.INFO, format=fmt)
        return
    raw = os.environ.get("PLAIT_SERVER_LOG_BYTES", "")
    try:
        max_bytes = int(raw) if raw else LOG_MAX_BYTES
    except ValueError:
        raise PlaitError(
            f"PLAIT_SERVER_LOG_BYTES: expected a number of bytes, got {raw!r}"
        ) from None
    handler = _Log(log_file, maxBytes=max(1, max_bytes), backupCount=LOG_BACKUPS)
    handler.setFormatter(logging.Formatter(fmt))
    logging.basicConfig(level=logging.INFO, handlers=[handler])


def _hold_lock(home: Path) -> int:
    """Takes the daemon's lock of `home` (kept until the process exits) and removes a pid file
    left by a daemon that died; PlaitError when another daemon of `home` holds the lock."""
    fd = os.open(home / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
    for _ in range(50):  # `plait server status` and friends hold it for an instant
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            time.sleep(0.02)
    else:
        os.close(fd)
        with contextlib.suppress(OSError, IndexError):
            pid = (home / PID_FILE).read_text().split()[0]
            raise PlaitError(f"a server of {home} is already running (pid {pid})") from None
        raise PlaitError(f"a server of {home} is already running")
    pid_file = home / PID_FILE
    if pid_file.exists():
        log.info("removed a stale %s (its server is gone)", pid_file)
        pid_file.unlink(missing_ok=True)
    return fd


def _check_port(host: str, port: int) -> None:
    """One clear error when the address is taken (gRPC's own is a RuntimeError)."""
    if port == 0:
        return
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise PlaitError(f"cannot listen on {host}:{port}: {exc}") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(address)
        except OSError as exc:
            hint = (
                " (another server? choose another --port)" if exc.errno == errno.EADDRINUSE else ""
            )
            raise PlaitError(
                f"cannot listen on {host}:{port}: {exc.strerror or exc}{hint}"
            ) from None


async def serve_daemon(
    config: ControlPlaneConfig,
    host: str,
    port: int,
    dashboard_port: int | None = None,
    dashboard_required: bool = True,
) -> None:
    """Serves until SIGTERM or SIGINT, then stops gracefully; runs stay resumable. With
    ``dashboard_port``, serves the dashboard there too (0: any free port); when that port is
    taken the daemon does not start, unless the port is only the default
    (``dashboard_required`` False): then it serves without a dashboard, saying so."""
    if not is_loopback(host, resolve=True) and not config.auth:
        raise PlaitError(
            f"refusing to bind {host} without authentication: --no-auth is for loopback only "
            f"(drop --no-auth; create tokens with `plait token create NAME`)"
        )
    if not config.auth:
        log.warning(
            "AUTHENTICATION IS OFF (--no-auth): every local user and process can reach "
            "%s:%s and run code as this user. Use it only on a machine you alone use.",
            host,
            port,
        )
    if not is_loopback(host, resolve=True) and not config.tls_cert:
        log.warning(
            "serving %s without TLS: tokens cross the network in the clear "
            "(--tls-cert and --tls-key turn TLS on)",
            host,
        )
    _check_port(host, port)
    cp = ControlPlane(config)
    pid_file = config.home / PID_FILE
    async with anyio.create_task_group() as tg:
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            bound = await tg.start(cp.serve, f"{host}:{port}")
            dashboard = None
            if dashboard_port is not None:
                dashboard = await _start_dashboard(
                    tg, cp, config, host, dashboard_port, dashboard_required
                )
            pid_file.write_text(f"{os.getpid()}\n{host}:{bound}\n")
            log.info(
                "plait server %s:%s ready (pid %s, store %s)",
                host,
                bound,
                os.getpid(),
                config.db_url(),
            )
            async for signum in signals:
                log.info(
                    "%s: shutting down; unfinished runs resume at the next start",
                    signal.Signals(signum).name,
                )
                cp.stop()
                if dashboard is not None:
                    dashboard.stop()
                break
    pid_file.unlink(missing_ok=True)
    (config.home / DASHBOARD_FILE).unlink(missing_ok=True)
    log.info("plait server stopped")


async def _start_dashboard(
    tg: anyio.abc.TaskGroup,
    cp: ControlPlane,
    config: ControlPlaneConfig,
    host: str,
    port: int,
    required: bool,
) -> Dashboard | None:
    """Serves the dashboard beside the API (same host, same TLS certificate) and writes its
    URL to PLAIT_HOME/dashboard.json."""
    import json
    import ssl

    from plait.engine.dashboard import Dashboard

    context = None
    if config.tls_cert:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(config.tls_cert, config.tls_key)
    dashboard = Dashboard(cp.internal_address, cp.role_of, auth=config.auth, ssl_context=context)
    try:
        bound = await tg.start(dashboard.serve, host, port)
    except OSError as exc:
        if required:
            raise PlaitError(str(exc)) from None
        log.warning("%s; serving the API without a dashboard", exc)
        return None
    shown = socket.gethostname() if host in ("0.0.0.0", "::", "[::]") else host
    url = f"{'https' if context else 'http'}://{shown}:{bound}"
    path = config.home / DASHBOARD_FILE
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump({"url": url, "pid": os.getpid(), "tls_cert": config.tls_cert}, f)
    log.info("dashboard at %s (sign in with the link `plait dashboard` prints)", url)
    return dashboard


def run_daemon(
    home: Path,
    host: str,
    port: int,
    database_url: str = "",
    artifact_store: str = "",
    max_workers: int | None = None,
    *,
    auth: bool | None = None,
    tls_cert: str = "",
    tls_key: str = "",
    tls_client_ca: str = "",
    max_log_bytes: int | None = None,
    heartbeat_timeout: float | None = None,
    crash_retries: int | None = None,
    pool_limits: Mapping[str, int] | None = None,
    log_file: Path | None = None,
    dashboard_port: int | None = None,
    dashboard_required: bool = True,
) -> None:
    """Runs the daemon in this process (``plait server start --foreground``).

    ``auth`` None means on, everywhere, loopback included; False (``--no-auth``) is allowed
    only on loopback. ``max_log_bytes`` None means PLAIT_MAX_LOG_BYTES or the default, and
    ``heartbeat_timeout`` None PLAIT_HEARTBEAT_TIMEOUT or the default. ``crash_retries`` is
    the crash budget of every step (None: DEFAULT_CRASH_RETRIES); ``pool_limits`` the most
    steps queued or running at once by pool (a runner's name, or a remote pool's). With
    ``log_file``, logs (and fds 1 and 2) go to that file, rotated by size; else to stderr.
    """
    # the daemon is a process of its own: everything it creates (logs, database, pid file,
    # artifacts) is the owner's only, whatever umask it was started with
    os.umask(0o077)
    _log_to(log_file)
    if bool(tls_cert) != bool(tls_key):
        raise PlaitError("--tls-cert and --tls-key go together")
    if tls_client_ca and not tls_cert:
        raise PlaitError("--tls-client-ca (mutual TLS) needs --tls-cert and --tls-key")
    crashes = crash_retries_setting(crash_retries)
    limits = pool_limits_setting(pool_limits)
    private_dir(home)
    _hold_lock(home)  # held until this process exits
    config = ControlPlaneConfig(
        home=home,
        database_url=database_url,
        artifact_store_uri=artifact_store,
        max_workers=max_workers,
        resume=True,
        auth=True if auth is None else auth,
        credential_file=home / CREDENTIAL_FILE,
        tls_cert=tls_cert,
        tls_key=tls_key,
        tls_client_ca=tls_client_ca,
        max_log_bytes=max_log_bytes_setting(max_log_bytes),
        heartbeat_timeout=heartbeat_timeout_setting(heartbeat_timeout),
        crash_retries=crashes,
        pool_limits=limits,
    )
    try:
        anyio.run(serve_daemon, config, host, port, dashboard_port, dashboard_required)
    except BaseExceptionGroup as group:
        # a refusal (unknown schema, busy port) surfaces from inside the task group: show it
        # as itself, so the command prints one clear line instead of a group's traceback
        refusal = _first_plait_error(group)
        if refusal is None:
            raise
        raise refusal from None


def _first_plait_error(group: BaseExceptionGroup[BaseException]) -> PlaitError | None:
    for exc in group.exceptions:
        if isinstance(exc, PlaitError):
            return exc
        if isinstance(exc, RuntimeError) and str(exc).startswith("Failed to bind"):
            # gRPC's own words for a port taken after _check_port looked
            return PlaitError(f"cannot listen: {str(exc).split(';')[0]}")
        if isinstance(exc, BaseExceptionGroup):
            found = _first_plait_error(exc)
            if found is not None:
                return found
    return None
