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
    if not is_loopback(host):
        raise PlaitError(
            f"refusing to bind {host}: this version has no authentication or TLS yet, so the "
            f"server listens on loopback addresses only (127.0.0.1, ::1, localhost)"
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
) -> None:
    """Runs the daemon in this process (``plait server start --foreground``)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    home.mkdir(parents=True, exist_ok=True)
    config = ControlPlaneConfig(
        home=home,
        database_url=database_url,
        artifact_store_uri=artifact_store,
        max_workers=max_workers,
        resume=True,
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
