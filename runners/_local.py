"""The local process runner: a warm pool of worker processes on this machine."""

from __future__ import annotations

import itertools
import math
import os
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass, field

import anyio
from anyio.abc import TaskGroup, TaskStatus
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from plait.api.v1 import task_service_pb2 as tasks
from plait.runners._protocol import RunnerContext


@dataclass
class _Worker:
    id: str
    process: subprocess.Popen[bytes]
    task: tasks.LeaseToken | None = None
    connected: bool = False
    killed: bool = field(default=False)


def _exit_reason(code: int) -> str:
    """How a worker process ended, for people: a signal by name; SIGKILL that no one here sent
    is most often the kernel's out-of-memory killer."""
    if code >= 0:
        return f"exited with code {code}"
    try:
        name = signal.Signals(-code).name
    except ValueError:
        return f"killed by signal {-code}"
    if -code == signal.SIGKILL:
        return f"killed by signal {-code} (SIGKILL: out of memory?)"
    return f"killed by signal {-code} ({name})"


def _reap_own_children() -> None:
    """Makes sure this process, not the kernel, reaps its children: with SIGCHLD ignored (a
    disposition inherited from whoever started this process) the kernel reaps them at once and
    no exit status can be read, so a worker's death could not be told from a success."""
    if signal.getsignal(signal.SIGCHLD) != signal.SIG_IGN:
        return
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    elif sys.platform != "win32":  # Python lets only the main thread set a handler
        import ctypes

        ctypes.CDLL(None).signal(int(signal.SIGCHLD), 0)  # 0 is SIG_DFL


class LocalRunner:
    """Runs steps in worker processes of this machine, kept warm between steps and runs.

    Workers start on demand, up to ``max_workers`` (default: the number of CPUs), and each runs
    one step at a time in the interpreter that runs the control plane, with the same
    ``sys.path``: steps defined in a script or in an importable module both work.

    Args:
        max_workers: the most worker processes at once (the bound on concurrent steps).
        prestart: workers to start at once, before any step is ready (saves a cold start).
    """

    name = "local"

    def __init__(self, max_workers: int | None = None, *, prestart: int = 1) -> None:
        self.max_workers = max(1, max_workers or os.cpu_count() or 1)
        self.prestart = min(prestart, self.max_workers)
        self._send: MemoryObjectSendStream[tasks.Task]
        self._recv: MemoryObjectReceiveStream[tasks.Task]
        self._send, self._recv = anyio.create_memory_object_stream[tasks.Task](math.inf)
        self._workers: dict[str, _Worker] = {}
        self._waiting = 0
        self._ids = itertools.count(1)
        self._ctx: RunnerContext | None = None
        self._waiters: anyio.CapacityLimiter | None = None
        self._tg: TaskGroup | None = None

    async def run(
        self, ctx: RunnerContext, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Runs the pool until cancelled, then kills and reaps every worker process."""
        self._ctx = ctx
        self._waiters = anyio.CapacityLimiter(math.inf)  # one blocked thread per worker
        _reap_own_children()
        try:
            async with anyio.create_task_group() as tg:
                self._tg = tg
                for _ in range(self.prestart):
                    await self._spawn()
                task_status.started()
                await anyio.sleep_forever()
        finally:
            self._tg = None
            with anyio.CancelScope(shield=True):
                await self._kill_all()
            self._send.close()
            self._recv.close()

    async def _spawn(self) -> None:
        assert self._ctx is not None and self._tg is not None
        worker_id = f"local-{os.getpid()}-{next(self._ids)}"
        env = dict(os.environ)
        # the worker imports step modules exactly as this process does
        path = [p or os.getcwd() for p in sys.path]
        env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(path))
        env["PLAIT_WORKER_ID"] = worker_id
        # the worker dies with this process (see runners/worker/__main__.py)
        env["PLAIT_PARENT_PID"] = str(os.getpid())
        env.pop("PLAIT_WORKER_TOKEN", None)
        if self._ctx.token:
            env["PLAIT_WORKER_TOKEN"] = self._ctx.token
        # the Popen object is the one owner of the process: only its wait() reaps it (asyncio's
        # subprocess transport could reap it from close() behind its own watcher's back, which
        # then reports a made-up exit status). Started from the event loop's own thread, as
        # asyncio does: the worker's PR_SET_PDEATHSIG follows the thread that forks it, and this
        # one lives as long as the control plane
        process = subprocess.Popen(  # noqa: ASYNC220
            [
                sys.executable,
                "-m",
                "plait.runners.worker",
                "--address",
                self._ctx.address,
                "--worker-id",
                worker_id,
                "--runner",
                self.name,
            ],
            stdin=subprocess.DEVNULL,
            stdout=None,
            stderr=None,
            env=env,
        )
        worker = _Worker(worker_id, process)
        self._workers[worker_id] = worker
        self._tg.start_soon(self._watch, worker)

    async def _reaped(self, process: subprocess.Popen[bytes]) -> int:
        """Waits for the process to end and reaps it, in a thread of the runner's own."""
        assert self._waiters is not None
        return await anyio.to_thread.run_sync(
            process.wait, abandon_on_cancel=True, limiter=self._waiters
        )

    async def _watch(self, worker: _Worker) -> None:
        code = await self._reaped(worker.process)
        self._workers.pop(worker.id, None)
        if worker.task is not None and self._ctx is not None:
            reason = "killed (timeout or cancel)" if worker.killed else _exit_reason(code)
            self._ctx.report_lost(worker.task, f"worker process {reason}")
            worker.task = None
        await self._scale()

    async def _scale(self) -> None:
        backlog = self._send.statistics().current_buffer_used
        starting = sum(1 for w in self._workers.values() if not w.connected)
        idle = self._waiting + starting
        while backlog > idle and len(self._workers) < self.max_workers:
            await self._spawn()
            idle += 1

    async def submit(self, task: tasks.Task) -> None:
        self._send.send_nowait(task)
        await self._scale()
        return None  # the worker that takes it is known at the hand-off

    async def next_task(self, worker_id: str) -> tasks.Task:
        worker = self._workers.get(worker_id)
        if worker is not None:
            worker.connected = True
        self._waiting += 1
        try:
            task = await self._recv.receive()
        finally:
            self._waiting -= 1
        if worker is not None:
            worker.task = task.token
        return task

    def task_done(self, worker_id: str) -> None:
        worker = self._workers.get(worker_id)
        if worker is not None:
            worker.task = None

    def worker_gone(self, worker_id: str) -> None:
        worker = self._workers.get(worker_id)
        if worker is not None and worker.process.returncode is None:
            worker.process.kill()

    def alive(self, handle: str) -> bool:
        """Whether a worker process of this pool runs under the pid ``handle``. The workers of
        an earlier control plane died with it: their handles are never alive here."""
        for worker in self._workers.values():
            if str(worker.process.pid) == handle:
                return worker.process.returncode is None
        return False

    def handle(self, worker_id: str) -> str:
        """The handle (pid) of a worker process, for its lease."""
        worker = self._workers.get(worker_id)
        return str(worker.process.pid) if worker is not None else ""

    async def cancel(self, token: tasks.LeaseToken) -> None:
        for worker in self._workers.values():
            if worker.task is not None and worker.task == token:
                worker.killed = True
                worker.process.kill()

    async def _kill_all(self) -> None:
        workers = list(self._workers.values())
        for worker in workers:
            worker.task = None  # shutting down: nothing is lost that a restart won't redo
            if worker.process.returncode is None:
                worker.process.kill()
        # reap them before the event loop that watches them goes away
        with anyio.move_on_after(5):
            for worker in workers:
                await self._reaped(worker.process)
