"""The in-process control plane: the client's only door into the engine.

Nothing else in the client imports :mod:`plait.engine`; this module does so only when an
embedded control plane is started, so ``import plait`` and a client of a remote server never
load the engine, SQLAlchemy or Alembic.

Who may call it: only this process and the workers it starts. The engine listens on loopback
and accepts no stored API token, only two secrets that live in this process's memory (one it
hands to its clients here, one to its worker processes through their environment, which other
OS users cannot read). We chose a per-process secret over an owner-only Unix socket because it
keeps one transport (TCP on loopback) for the embedded engine, the daemon, and the containers
and cluster jobs that later report to it, and the secret never touches the disk.
"""

from __future__ import annotations

import atexit
import contextlib
import gc
import os
import threading
from pathlib import Path
from typing import Any


class EmbeddedControlPlane:
    """A control plane on its own thread and event loop, for the process's life."""

    def __init__(self, home: Path) -> None:
        from plait.runners._early import discard_early_workers, ensure_early_worker

        # about to run a pipeline: the first worker imports Plait and gRPC while this process
        # imports the engine (runners/_early.py); the local runner adopts it once the engine
        # listens. A command that only reads (`plait runs show`) starts none.
        if _runs_expected and os.environ.get("PLAIT_WORKERS", "") != "0":
            ensure_early_worker()  # (expect_runs may have started it already)
        # What the engine's start allocates (its modules, SQLAlchemy's, its tables) lives as
        # long as the process: a collection during it walks it for nothing (~30 ms)
        collecting = gc.isenabled()
        gc.disable()
        try:
            self._start(home)
        except BaseException:
            discard_early_workers()
            raise
        finally:
            if collecting:
                gc.enable()

    def _start(self, home: Path) -> None:
        from anyio.from_thread import start_blocking_portal

        from plait.engine import ControlPlane, ControlPlaneConfig

        workers = os.environ.get("PLAIT_WORKERS")
        self.control_plane: Any = ControlPlane(
            ControlPlaneConfig(
                home=home,
                database_url=os.environ.get("PLAIT_DATABASE_URL", ""),
                max_workers=int(workers) if workers else None,
                auth=True,
                api_tokens=False,
                reflection=False,
            )
        )
        self.token: str = self.control_plane.owner_secret
        self._portal_cm = start_blocking_portal("asyncio", name="plait-engine")
        self.portal = self._portal_cm.__enter__()
        try:
            self._future, port = self.portal.start_task(
                self.control_plane.serve, "127.0.0.1:0", name="plait-control-plane"
            )
        except BaseException:
            self._portal_cm.__exit__(None, None, None)
            raise
        self._closed = False
        atexit.register(self._close_at_exit)  # first: whatever fails next, the engine stops
        self.address = f"127.0.0.1:{port}"

    def _close_at_exit(self) -> None:
        self.close()
        # The interpreter's exit then collects garbage three times, each walking every object
        # left (the engine's, SQLAlchemy's, gRPC's, protobuf's): a hundred milliseconds of a
        # short run's process. Frozen, they are skipped: only the cyclic garbage older than
        # the young generations, collected here, goes without its finalizers, which Python
        # never promised at exit anyway. Freezing earlier would hide objects from
        # gc.get_referrers() for the process's whole life.
        gc.collect(1)
        gc.freeze()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(BaseException):
            self.portal.call(self.control_plane.stop)
            self._future.result(timeout=30)
        # shutting down at exit: there is nobody left to report a failure to
        with contextlib.suppress(BaseException):
            self._portal_cm.__exit__(None, None, None)
        from plait.runners._early import discard_early_workers

        discard_early_workers()  # one the runner never took


_running: dict[Path, EmbeddedControlPlane] = {}
_runs_expected = False
"""Set by :func:`expect_runs`: an engine started now starts its first worker early."""


def expect_runs() -> None:
    """Says that this process is about to run a pipeline (``pipeline()``, ``plait run``): an
    embedded engine started after this starts its first worker at once, beside itself.

    When the default client will be embedded (no server is configured) and no engine runs in
    this process yet, that worker starts now: its imports (Plait, gRPC) then overlap this
    process's import of the client and the engine, rather than follow them (without SQLAlchemy
    the engine is ready first, and the run waited for its worker)."""
    global _runs_expected
    _runs_expected = True
    if _running or os.environ.get("PLAIT_WORKERS", "") == "0":
        return
    from plait._settings import server_address

    try:
        if server_address() is not None:
            return
    except Exception:  # a malformed address: the client says so when it is made
        return
    from plait.runners._early import ensure_early_worker

    ensure_early_worker()


_lock = threading.Lock()


def embedded_address(home: Path) -> tuple[str, str]:
    """The address of this process's control plane for ``home`` (started on first use) and the
    secret its clients send."""
    with _lock:
        if home not in _running:
            _running[home] = EmbeddedControlPlane(home)
        return _running[home].address, _running[home].token


def stop_embedded(home: Path) -> None:
    """Stops this process's control plane for ``home``, if one runs."""
    with _lock:
        embedded = _running.pop(home, None)
    if embedded is not None:
        embedded.close()
