"""A local worker process started before the control plane it will serve exists.

A pipeline run as a fresh ``python train.py`` waits for its first worker: a Python that imports
Plait, gRPC and then the user's module. The embedded engine starts that process first, before
it imports the engine itself, so that both imports happen at once (on two cores), and hands it
the engine's address and worker secret on its standard input once the engine listens
(``python -m plait.runners.worker --address -``). The local runner adopts it as its first
worker (:meth:`plait.runners._local.LocalRunner._spawn`).

Only the main thread starts one: a worker dies with the thread that started it (Linux's
``PR_SET_PDEATHSIG``), and the main thread lives as long as the process.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import threading
from dataclasses import dataclass

__all__ = ["EarlyWorker", "discard_early_workers", "start_early_worker", "take_early_worker"]


@dataclass
class EarlyWorker:
    """A worker process waiting for its control plane's address on its standard input."""

    worker_id: str
    process: subprocess.Popen[bytes]

    def hand(self, address: str, token: str) -> bool:
        """Gives it the control plane's address and secret; False when it is gone."""
        assert self.process.stdin is not None
        try:
            line = json.dumps({"address": address, "token": token}) + "\n"
            self.process.stdin.write(line.encode())
            self.process.stdin.close()
        except OSError:  # it died meanwhile
            return False
        return self.process.poll() is None


_waiting: list[EarlyWorker] = []
_lock = threading.Lock()


def worker_env(worker_id: str, token: str = "") -> dict[str, str]:
    """The environment of a local worker process: this process's, with its ``sys.path`` (the
    worker imports step modules exactly as this process does), its id, this process as the
    parent it dies with, and the worker secret when there is one."""
    env = dict(os.environ)
    path = [p or os.getcwd() for p in sys.path]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(path))
    env["PLAIT_WORKER_ID"] = worker_id
    env["PLAIT_PARENT_PID"] = str(os.getpid())
    env.pop("PLAIT_WORKER_TOKEN", None)
    if token:
        env["PLAIT_WORKER_TOKEN"] = token
    return env


def start_early_worker() -> None:
    """Starts one local worker process now (from the main thread only; otherwise nothing)."""
    if threading.current_thread() is not threading.main_thread():
        return
    worker_id = f"local-{os.getpid()}-0"
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "plait.runners.worker",
            "--address",
            "-",
            "--worker-id",
            worker_id,
            "--runner",
            "local",
        ],
        stdin=subprocess.PIPE,
        stdout=None,
        stderr=None,
        env=worker_env(worker_id),
    )
    with _lock:
        _waiting.append(EarlyWorker(worker_id, process))


def take_early_worker() -> EarlyWorker | None:
    """A waiting early worker of this process, if one is alive (it is no longer waiting)."""
    with _lock:
        while _waiting:
            early = _waiting.pop()
            if early.process.poll() is None:
                return early
            early.process.wait()  # reaped
    return None


def discard_early_workers() -> None:
    """Ends the early workers no runner took: their standard input closes, and they exit."""
    with _lock:
        left = list(_waiting)
        _waiting.clear()
    for early in left:
        if early.process.stdin is not None:
            with contextlib.suppress(OSError):
                early.process.stdin.close()
        try:
            early.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            early.process.kill()
            early.process.wait()
