"""The local runner's side of its fork server (Linux): workers forked, not spawned.

The fork server (:mod:`plait.runners.worker._forks`) is a child of the control plane that has
imported what a worker needs; it forks each worker on request, so no worker pays for those
imports. Its workers are its children, not the control plane's: it reports each one's pid
when it forks it and its exit status when it reaps it, and kills one when asked. A
:class:`ForkedProcess` stands for such a worker where a ``subprocess.Popen`` stands for a
spawned one (``pid``, ``returncode``, ``kill``, and :meth:`ForkedProcess.wait`).

Requests go over the fork server's standard input, answers come back over a pipe it
inherited: both pipes are this process's and its alone, no socket or file anyone else could
open. When the fork server ends (killed, or failing), its workers die with it
(``PR_SET_PDEATHSIG``): each of them ends with the fork server's exit status beside its own
(``orphaned_by``), so the runner reports their tasks lost, and it spawns its later workers.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
from collections.abc import Awaitable, Callable
from typing import Any

import anyio

from plait.runners._early import EarlyWorker

__all__ = ["FORK_SECONDS", "ForkServer", "ForkedProcess"]

FORK_SECONDS = 10.0
"""How long a fork may take, once the fork server forked its first worker (a fork takes a few
milliseconds): a fork server that does not answer within it is killed, as a failed one."""


class ForkedProcess:
    """A worker process the fork server forked: known by its pid once the fork server says it."""

    def __init__(self, server: ForkServer, worker_id: str) -> None:
        self._server = server
        self.worker_id = worker_id
        self.pid: int | None = None
        """None until the fork server reports it (or when the fork failed)."""
        self.returncode: int | None = None
        """As ``Popen.returncode`` says it: negative when a signal killed it."""
        self.orphaned_by: int | None = None
        """The fork server's own exit status when it ended before it could report this one's
        (the worker then died with it, killed by the kernel)."""
        self.forked = anyio.Event()
        """Set once the pid is known, or the fork did not happen."""
        self._ended = anyio.Event()
        self._kill = False

    def kill(self) -> None:
        """SIGKILLs it (through the fork server, which alone knows whether the pid is still
        its child's)."""
        if self.returncode is not None:
            return
        if self.pid is None:
            self._kill = True  # once the fork server says which process it is
        else:
            self._server.request({"kill": self.pid})

    async def wait(self) -> int:
        """Its exit status, once the fork server reaped it (or ended)."""
        await self._ended.wait()
        assert self.returncode is not None
        return self.returncode

    def _forked(self, pid: int) -> None:
        self.pid = pid
        self.forked.set()
        if self._kill:
            self._server.request({"kill": pid})

    def _end(self, code: int, *, orphaned_by: int | None = None) -> None:
        if self.returncode is None:
            self.returncode = code
            self.orphaned_by = orphaned_by
        self.forked.set()
        self._ended.set()


class ForkServer:
    """A fork server the local runner owns: started by :func:`plait.runners._early.launch`
    (the embedded engine's early worker, or the runner's own first worker), already handed the
    control plane's address, its first worker on its way.

    Only the event loop's thread uses it. :meth:`run` reads its answers until it ends;
    :meth:`aclose` ends it.
    """

    def __init__(self, early: EarlyWorker) -> None:
        assert early.replies is not None and early.process.stdin is not None
        self.process: subprocess.Popen[bytes] = early.process
        self.usable = True
        """False once it failed or ended: the runner spawns its workers instead."""
        self._early = early
        self._requests = early.process.stdin.fileno()
        self._replies = early.replies
        os.set_blocking(self._replies, False)
        self._pending = b""
        self._by_pid: dict[int, ForkedProcess] = {}
        self._forking: dict[str, ForkedProcess] = {}
        self.first = ForkedProcess(self, early.worker_id)
        """Its first worker, forked before the control plane's address came."""
        self._forking[early.worker_id] = self.first

    def fork(self, worker_id: str) -> ForkedProcess:
        """Asks for one more worker; its pid comes later (:attr:`ForkedProcess.forked`)."""
        process = ForkedProcess(self, worker_id)
        self._forking[worker_id] = process
        self.request({"fork": worker_id})
        return process

    def request(self, message: dict[str, Any]) -> None:
        if self._requests < 0:  # closed (its number may be another file's by now)
            return
        try:
            os.write(self._requests, (json.dumps(message) + "\n").encode())
        except OSError:  # it is gone: run() is about to learn it
            self.usable = False

    async def run(self, reaped: Callable[[subprocess.Popen[bytes]], Awaitable[int]]) -> None:
        """Reads its answers until it ends, then ends every worker it left (they died with
        it). ``reaped`` waits for a process to end and reaps it."""
        while await self._read():
            pass
        await self._finish(reaped)

    async def aclose(self, reaped: Callable[[subprocess.Popen[bytes]], Awaitable[int]]) -> None:
        """Ends it: its standard input closes, it kills and reaps its workers, reports them
        and exits; this waits for all that (the caller bounds the wait)."""
        self.usable = False
        self._requests = -1
        with contextlib.suppress(OSError):
            self._early.process.stdin.close()  # type: ignore[union-attr]
        await self.run(reaped)

    async def forked_in_time(self, process: ForkedProcess) -> None:
        """Kills the fork server when it does not answer a fork within :data:`FORK_SECONDS`
        (counted once its first worker is forked, that is once its imports are done)."""
        await self.first.forked.wait()
        with anyio.move_on_after(FORK_SECONDS):
            await process.forked.wait()
        if not process.forked.is_set() and self.usable:
            self.usable = False
            self.abort()  # run() then ends its workers, and the runner spawns

    def abort(self) -> None:
        """SIGKILLs it (its workers die with it), when :meth:`aclose` took too long."""
        if self.process.returncode is None:
            with contextlib.suppress(OSError):
                os.kill(self.process.pid, signal.SIGKILL)

    async def _read(self) -> bool:
        """Takes the answers that came; False once its pipe ended."""
        if self._replies < 0:
            return False
        await anyio.wait_readable(self._replies)
        try:
            data = os.read(self._replies, 65536)
        except BlockingIOError:
            return True
        if not data:
            self._requests = self._replies = -1
            self._early.close()
            return False
        self._pending += data
        *lines, self._pending = self._pending.split(b"\n")
        for line in lines:
            try:
                self._take(json.loads(line))
            except (ValueError, KeyError, TypeError):  # not a fork server's answer: end it
                self.usable = False
                self.abort()
        return True

    def _take(self, answer: dict[str, Any]) -> None:
        if "exit" in answer:
            process = self._by_pid.pop(int(answer["exit"]), None)
            if process is not None:
                process._end(int(answer["code"]))
            return
        process = self._forking.pop(str(answer.get("worker")), None)
        if process is None:
            return
        if "pid" in answer:
            self._by_pid[int(answer["pid"])] = process
            process._forked(int(answer["pid"]))
        else:  # the fork failed (out of memory or processes): spawn from now on
            self.usable = False
            process._end(1)

    async def _finish(self, reaped: Callable[[subprocess.Popen[bytes]], Awaitable[int]]) -> None:
        self.usable = False
        code = await reaped(self.process)
        left = [*self._forking.values(), *self._by_pid.values()]
        self._forking.clear()
        self._by_pid.clear()
        for process in left:  # killed by the kernel as their parent died
            process._end(-signal.SIGKILL, orphaned_by=code)
