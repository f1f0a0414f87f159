"""The control-plane daemon: the engine served over gRPC until SIGTERM, resuming runs at start."""

from __future__ import annotations

import ipaddress
import logging
import os
import signal
import socket
from pathlib import Path

import anyio

from plait.engine._control_plane import ControlPlane, ControlPlaneConfig
from plait.errors import PlaitError

log = logging.getLogger("plait.server")

DEFAULT_PORT = 7676


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        try:
            return ipaddress.ip_address(socket.gethostbyname(host)).is_loopback
        except OSError:
            return False


async def serve_daemon(config: ControlPlaneConfig, host: str, port: int) -> None:
    """Serves until SIGTERM or SIGINT, then stops gracefully; runs stay resumable."""
    if not is_loopback(host) and not config.auth:
        raise PlaitError(
            f"refusing to bind {host} without authentication: off loopback every call needs "
            f"an API token (drop --no-auth; create tokens with `plait token create NAME`)"
        )
    if not is_loopback(host) and not config.tls_cert:
        log.warning(
            "serving %s without TLS: tokens cross the network in the clear "
            "(--tls-cert and --tls-key turn TLS on)",
            host,
        )
    cp = ControlPlane(config)
    pid_file = config.home / "server.pid"
    async with anyio.create_task_group() as tg:
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            bound = await tg.start(cp.serve, f"{host}:{port}")
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
                break
    pid_file.unlink(missing_ok=True)
    log.info("plait server stopped")


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
) -> None:
    """Runs the daemon in this process (``plait server start --foreground``).

    ``auth`` None means: on when ``host`` is not a loopback address.
    """
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if bool(tls_cert) != bool(tls_key):
        raise PlaitError("--tls-cert and --tls-key go together")
    if tls_client_ca and not tls_cert:
        raise PlaitError("--tls-client-ca (mutual TLS) needs --tls-cert and --tls-key")
    home.mkdir(parents=True, exist_ok=True)
    config = ControlPlaneConfig(
        home=home,
        database_url=database_url,
        artifact_store_uri=artifact_store,
        max_workers=max_workers,
        resume=True,
        auth=(not is_loopback(host)) if auth is None else auth,
        tls_cert=tls_cert,
        tls_key=tls_key,
        tls_client_ca=tls_client_ca,
    )
    try:
        anyio.run(serve_daemon, config, host, port)
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
        if isinstance(exc, BaseExceptionGroup):
            found = _first_plait_error(exc)
            if found is not None:
                return found
    return None
