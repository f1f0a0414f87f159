"""A local worker process started before the control plane it will serve exists.

A pipeline run as a fresh ``python train.py`` waits for its first worker: a Python that imports
Plait, gRPC and then the user's module. A pipeline call starts that process first, before this
one imports the client and the engine (``plait._embedded.expect_runs``; or the embedded engine
does as it starts), so that the imports happen at once (on two cores), and the engine hands it
the engine's address and worker secret on its standard input once the engine listens
(``python -m plait.runners.worker --address -``). The local runner adopts it as its first
worker (:meth:`plait.runners._local.LocalRunner._spawn`).

Only the main thread starts one: a worker dies with the thread that started it (Linux's
``PR_SET_PDEATHSIG``), and the main thread lives as long as the process.

On Linux that process is a fork server (:mod:`plait.runners.worker._forks`): once its imports
are done it forks the first worker, which waits for the address, and stays to fork the
runner's later workers, so that none of them pays for the imports again
(:class:`plait.runners._forks.ForkServer` is the runner's side). ``PLAIT_FORK_SERVER=0``
turns that off: every worker is then a process of its own, as on other systems.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import threading
from dataclasses import dataclass

__all__ = [
    "FORKS",
    "EarlyWorker",
    "discard_early_workers",
    "ensure_early_worker",
    "launch",
    "start_early_worker",
    "take_early_worker",
    "worker_env",
]

FORKS = sys.platform.startswith("linux") and os.environ.get("PLAIT_FORK_SERVER", "") != "0"
"""Whether local workers are forked by a fork server (Linux: its workers die with it)."""


@dataclass
class EarlyWorker:
    """A worker process waiting for its control plane's address on its standard input."""

    worker_id: str
    process: subprocess.Popen[bytes]
    replies: int | None = None
    """When the process is a fork server (then ``worker_id`` is its first worker's): the read
    end of the pipe it answers on; it takes requests on its standard input, kept open."""

    def hand(self, address: str, token: str) -> bool:
        """Gives it the control plane's address and secret; False when it is gone."""
        assert self.process.stdin is not None
        try:
            line = json.dumps({"address": address, "token": token}) + "\n"
            self.process.stdin.write(line.encode())
            if self.replies is None:
                self.process.stdin.close()
            else:
                self.process.stdin.flush()
        except OSError:  # it died meanwhile
            return False
        return self.process.poll() is None

    def close(self) -> None:
        """Closes this side's pipes (a fork server then kills its workers and exits)."""
        if self.process.stdin is not None:
            with contextlib.suppress(OSError):
                self.process.stdin.close()
        if self.replies is not None:
            os.close(self.replies)
            self.replies = None


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


def launch(worker_id: str, runner: str = "local", *, forks: bool = FORKS) -> EarlyWorker:
    """Starts a worker process that waits for its address on its standard input; with
    ``forks``, a fork server whose first worker is ``worker_id``. It dies with the thread that
    calls this (Linux), which must live as long as the control plane."""
    command = [sys.executable, "-m", "plait.runners.worker", "--address", "-"]
    command += ["--worker-id", worker_id, "--runner", runner]
    replies, answers = os.pipe() if forks else (-1, -1)
    if forks:
        command += ["--fork-server", str(answers)]
    try:
        process = subprocess.Popen(
            command,
            stdin=subprocess.PIPE,
            stdout=None,
            stderr=None,
            env=worker_env(worker_id),
            pass_fds=(answers,) if forks else (),
        )
    except BaseException:
        if forks:
            os.close(replies)
            os.close(answers)
        raise
    if not forks:
        return EarlyWorker(worker_id, process)
    os.close(answers)  # the fork server's alone: its end shows when it is gone
    return EarlyWorker(worker_id, process, replies)


def start_early_worker() -> None:
    """Starts one local worker process now (from the main thread only; otherwise nothing)."""
    if threading.current_thread() is not threading.main_thread():
        return
    early = launch(f"local-{os.getpid()}-0")
    with _lock:
        _waiting.append(early)


def ensure_early_worker() -> None:
    """Starts one local worker process now unless one is waiting already (from the main thread
    only; otherwise nothing)."""
    with _lock:
        if any(early.process.poll() is None for early in _waiting):
            return
    start_early_worker()


def take_early_worker() -> EarlyWorker | None:
    """A waiting early worker of this process, if one is alive (it is no longer waiting)."""
    with _lock:
        while _waiting:
            early = _waiting.pop()
            if early.process.poll() is None:
                return early
            early.close()
            early.process.wait()  # reaped
    return None


def discard_early_workers() -> None:
    """Ends the early workers no runner took: their standard input closes, and they exit."""
    with _lock:
        left = list(_waiting)
        _waiting.clear()
    for early in left:
        early.close()
        try:
            early.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            early.process.kill()
            early.process.wait()
