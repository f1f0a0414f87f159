"""The fork server: a process that imported what a worker needs, and forks the local workers.

A worker started with ``python -m plait.runners.worker`` spends ~150 ms of CPU importing Plait,
gRPC and protobuf before its first step. On Linux the local runner starts one process that
does those imports once (``--address - --fork-server FD``), and every local worker is a
``fork()`` of it: a copy of an interpreter that has imported everything already. Forking is
safe because this process never creates a thread or a gRPC channel: each child makes its own
channel after the fork (gRPC is not fork-safe once it has threads).

At once, right after its imports, the fork server forks its first worker, which waits for the
control plane's address on a pipe of its own (its fork overlaps the engine's start). The first
line on the fork server's standard input is that address and the worker secret; it passes the
line on to the first worker. Every later line is a request:

- ``{"fork": WORKER_ID}``: fork a worker with that id; the answer ``{"worker": WORKER_ID,
  "pid": PID}``, or ``{"worker": WORKER_ID, "error": TEXT}`` when the fork failed;
- ``{"kill": PID}``: SIGKILL that child (only a child not yet reaped: its pid is not reused).

It reaps its children and answers ``{"exit": PID, "code": CODE}`` for each, CODE as
``Popen.returncode`` says it (negative: killed by that signal), so that the runner knows
each worker's exit status as it knows a spawned worker's. Answers go to the pipe ``FD`` it
inherited, one JSON line each (shorter than ``PIPE_BUF``: never torn).

Trust: the fork server takes requests only from its parent, the control plane, over its
standard input, a pipe the parent created and whose write end no other process holds; it
answers over a pipe inherited the same way. It opens no socket and no file that anyone else
could open. When its standard input ends (the runner stops) it kills and reaps its children
and exits; it dies with its parent (``PR_SET_PDEATHSIG``), and each child dies with it, so no
worker outlives the control plane.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import select
import signal
from dataclasses import dataclass
from typing import Any

from plait.runners.worker._lease import die_with_parent

__all__ = ["Forked", "serve_forks"]


@dataclass
class Forked:
    """What a forked child returns to ``main``: the worker it is, to serve as a spawned one."""

    worker_id: str
    address: str


class _Server:
    def __init__(self, replies: int) -> None:
        self.pid = os.getpid()
        self.replies = replies
        self.children: dict[int, str] = {}
        self.address = ""
        self.token = ""
        self.sigint: Any = signal.SIG_DFL
        """SIGINT's handler before the fork server ignored it: its children's again."""
        self.wake_r, self.wake_w = os.pipe()
        for fd in (self.wake_r, self.wake_w):
            os.set_blocking(fd, False)

    def reply(self, message: dict[str, Any]) -> None:
        os.write(self.replies, (json.dumps(message) + "\n").encode())

    def fork(self, worker_id: str, first: tuple[int, int] | None = None) -> Forked | None:
        """Forks a worker: in the child, what it must serve (``first``: the pipe its address
        comes on, for the first one); in this process None, once the runner knows its pid."""
        try:
            pid = os.fork()
        except OSError as exc:
            self.reply({"worker": worker_id, "error": str(exc)})
            return None
        if pid == 0:
            return self._child(worker_id, first)
        self.children[pid] = worker_id
        self.reply({"worker": worker_id, "pid": pid})
        return None

    def _child(self, worker_id: str, first: tuple[int, int] | None) -> Forked:
        # undo what is the fork server's alone: its signal handling, its pipes, its stdin
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        signal.signal(signal.SIGINT, self.sigint)
        die_with_parent(self.pid)
        for fd in (self.wake_r, self.wake_w, self.replies):
            os.close(fd)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)  # a spawned worker's stdin is /dev/null too
        os.close(null)
        address, token = self.address, self.token
        if first is not None:  # forked before the address came: it comes on this pipe
            given, writer = first
            os.close(writer)  # (else it would never see the pipe end)
            line = _read_line(given)
            os.close(given)
            if not line:
                os._exit(0)  # its control plane never came
            address, token = _parse(line)
        os.environ["PLAIT_WORKER_ID"] = worker_id
        os.environ["PLAIT_PARENT_PID"] = str(self.pid)
        os.environ.pop("PLAIT_WORKER_TOKEN", None)
        if token:
            os.environ["PLAIT_WORKER_TOKEN"] = token
        return Forked(worker_id, address)

    def reap(self) -> None:
        while self.children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            self.children.pop(pid, None)
            self.reply({"exit": pid, "code": os.waitstatus_to_exitcode(status)})

    def kill_all(self) -> None:
        for pid in list(self.children):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for pid in list(self.children):
            with contextlib.suppress(ChildProcessError):
                _, status = os.waitpid(pid, 0)
                self.children.pop(pid, None)
                with contextlib.suppress(OSError):
                    self.reply({"exit": pid, "code": os.waitstatus_to_exitcode(status)})


def serve_forks(first_worker: str, replies: int) -> Forked | int:
    """Runs the fork server until its standard input ends.

    Args:
        first_worker: the id of the worker it forks at once.
        replies: the inherited pipe its answers go to.

    Returns:
        In a forked child, the worker it must serve; in the fork server, its exit code.
    """
    server = _Server(replies)
    # A Ctrl-C reaches the whole process group: the workers stop as spawned ones do, while
    # this process lives on until the control plane closes its standard input or dies.
    server.sigint = signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGCHLD, lambda signum, frame: None)
    signal.set_wakeup_fd(server.wake_w)
    # What the imports allocated stays put: children do not walk it (nor copy its pages)
    gc.freeze()
    given_r, given_w = os.pipe()
    pending = b""
    try:
        child = server.fork(first_worker, first=(given_r, given_w))
        if child is not None:
            return child
        os.close(given_r)
        while True:
            ready, _, _ = select.select([0, server.wake_r], [], [])
            if server.wake_r in ready:
                with contextlib.suppress(BlockingIOError):
                    while os.read(server.wake_r, 512):
                        pass
                server.reap()
            if 0 not in ready:
                continue
            data = os.read(0, 65536)
            if not data:
                return 0  # the runner stops
            pending += data
            *lines, pending = pending.split(b"\n")
            for line in lines:
                if given_w >= 0:  # the first line: the address
                    server.address, server.token = _parse(line)
                    with contextlib.suppress(OSError):  # (the first worker died meanwhile)
                        os.write(given_w, line + b"\n")
                    os.close(given_w)
                    given_w = -1
                    continue
                request = json.loads(line)
                if "fork" in request:
                    child = server.fork(str(request["fork"]))
                    if child is not None:
                        return child
                elif "kill" in request and int(request["kill"]) in server.children:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(int(request["kill"]), signal.SIGKILL)
    except BrokenPipeError:
        return 0  # the runner is gone
    finally:
        if os.getpid() == server.pid:  # (a child returns through here too)
            server.kill_all()


def _read_line(fd: int) -> bytes:
    """One line from a pipe, read whole (empty: it ended first)."""
    data = b""
    while not data.endswith(b"\n"):
        chunk = os.read(fd, 4096)
        if not chunk:
            return b""
        data += chunk
    return data


def _parse(line: bytes) -> tuple[str, str]:
    """The address and the secret of an address line."""
    try:
        given = json.loads(line)
        return str(given["address"]), str(given.get("token", ""))
    except (ValueError, KeyError, TypeError) as exc:
        raise SystemExit(f"plait worker: standard input is not an address line: {exc}") from None
