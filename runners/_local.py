"""The local process runner: a warm pool of worker processes on this machine, and one-shot
step processes in the virtualenvs built for steps' environments."""

from __future__ import annotations

import asyncio
import collections
import itertools
import math
import os
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from typing import IO

import anyio
from anyio.abc import TaskGroup, TaskStatus

from plait.api.v1 import task_service_pb2 as tasks
from plait.runners._early import FORKS, EarlyWorker, launch, take_early_worker, worker_env
from plait.runners._forks import ForkedProcess, ForkServer
from plait.runners._protocol import RunnerContext, WorkerGone


@dataclass
class _Worker:
    id: str
    process: subprocess.Popen[bytes] | ForkedProcess
    """Spawned by this process, or forked by its fork server (runners/_forks.py)."""
    task: tasks.LeaseToken | None = None
    connected: bool = False
    killed: bool = field(default=False)


@dataclass
class _OneShot:
    """A step process started for one task (``python -m plait.runners.step --lease``)."""

    token: tasks.LeaseToken | None
    """The task's lease; None once nothing is to be reported about it (shutting down)."""
    process: subprocess.Popen[bytes]
    output: IO[bytes]
    """Where its own stdout and stderr go (the step's output is reported over gRPC): read
    when it ends without reporting, to say why."""
    python: str
    killed: bool = False


_REPORTED = (0, 5)
"""The exit codes of a step process whose attempt needs no report from the runner: it
reported the step's end, or it was cancelled (``EXIT_OK`` and ``EXIT_CANCELLED`` of
:mod:`plait.runners.step`, which the control plane does not import)."""

_OUTPUT_TAIL = 2000
"""The most characters of a one-shot process's own output quoted when it ends unreported."""


def _one_shot_path() -> str:
    """PYTHONPATH for a step process in a virtualenv: this process's ``sys.path`` (the step's
    modules are imported as here) less the interpreter's own folders (the standard library,
    site-packages and what their ``.pth`` files add there), which in front of the virtualenv's
    site-packages would hide the versions it installed; its site-packages shows this
    process's after its own."""
    import site
    import sysconfig

    stdlib: set[str] = set()
    sites = {*site.getsitepackages(), site.getusersitepackages()}
    for prefix in {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix}:
        paths = sysconfig.get_paths(vars={"base": prefix, "platbase": prefix})
        stdlib.update((paths["stdlib"], paths["platstdlib"]))
        stdlib.add(os.path.join(paths["platstdlib"], "lib-dynload"))
        sites.update((paths["purelib"], paths["platlib"]))
    stdlib = {os.path.normpath(p) for p in stdlib}
    zipped = f"{os.sep}python{sys.version_info[0]}{sys.version_info[1]}.zip"
    inside = tuple(os.path.normpath(p) + os.sep for p in sites if p)
    keep: list[str] = []
    for entry in sys.path:
        path = os.path.normpath(entry or os.getcwd())
        if path in stdlib or path.endswith(zipped) or (path + os.sep).startswith(inside):
            continue
        keep.append(path)
    return os.pathsep.join(dict.fromkeys(keep))


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


class _Tasks:
    """The pool's queued tasks, first in, first out, and its idle workers' waits for one, last
    in, first out: the worker idle for the shortest time gets the next task (the one that has
    just reported the end of a chain's last step gets its next: warm, where a worker idle for
    long has cold caches and sleeping threads).

    Only the event loop's thread uses it. A deque and futures: an anyio memory stream cost a
    task lookup, an event and its statistics per hand-off, on the path of every step."""

    def __init__(self) -> None:
        self._queue: collections.deque[tasks.Task] = collections.deque()
        self._waiters: collections.deque[asyncio.Future[tasks.Task]] = collections.deque()
        self._closed = False

    def __len__(self) -> int:
        return len(self._queue)

    def idle(self) -> int:
        """The waits not handed a task yet. (A counter the waits decrement when they resume
        lags: a task handed to a wait and a second one put before it resumes saw the first
        wait as still idle, and no worker was started for the second.)"""
        return sum(1 for waiter in self._waiters if not waiter.done())

    def put(self, task: tasks.Task, *, first: bool = False) -> None:
        if self._closed:
            raise anyio.ClosedResourceError("the worker pool is stopping")
        while self._waiters:
            waiter = self._waiters.pop()
            if not waiter.done():  # (a cancelled wait stays in line until here)
                waiter.set_result(task)
                return
        if first:
            self._queue.appendleft(task)
        else:
            self._queue.append(task)

    async def get(self) -> tasks.Task:
        """The next task; waits for one (``anyio.EndOfStream`` once closed)."""
        if self._queue:
            return self._queue.popleft()
        if self._closed:
            raise anyio.EndOfStream
        waiter: asyncio.Future[tasks.Task] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            return await waiter
        except BaseException:
            handed = waiter.done() and not waiter.cancelled() and waiter.exception() is None
            if handed and not self._closed:
                # handed a task, then cancelled before taking it: first in line again
                self.put(waiter.result(), first=True)
            else:
                waiter.cancel()
            raise

    def close(self) -> None:
        self._closed = True
        self._queue.clear()
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_exception(anyio.EndOfStream())
        self._waiters.clear()


class LocalRunner:
    """Runs steps in worker processes of this machine, kept warm between steps and runs.

    Workers start on demand, up to ``max_workers`` (default: the number of CPUs), and each runs
    one step at a time in the interpreter that runs the control plane, with the same
    ``sys.path``: steps defined in a script or in an importable module both work.

    On Linux the first worker's process is a fork server (the embedded engine's early worker,
    or one this runner starts): it forks that worker and every later one, which then pay for
    no imports. Should it end, the runner spawns its workers (``subprocess.Popen``) from then
    on, as it always does elsewhere.

    Args:
        max_workers: the most worker processes at once (the bound on concurrent steps).
        prestart: workers to start at once, before any step is ready (saves a cold start).
    """

    name = "local"

    def __init__(self, max_workers: int | None = None, *, prestart: int = 1) -> None:
        self.max_workers = max(1, max_workers or os.cpu_count() or 1)
        self.prestart = min(prestart, self.max_workers)
        self._tasks = _Tasks()
        self._workers: dict[str, _Worker] = {}
        self._ids = itertools.count(1)
        self._one_shots: dict[str, _OneShot] = {}
        self._ctx: RunnerContext | None = None
        self._waiters: anyio.CapacityLimiter | None = None
        self._tg: TaskGroup | None = None
        self._forks: ForkServer | None = None
        self._forking = FORKS and self.name == "local"
        """Whether a fork server may be started or used (False once one failed)."""

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
            self._tasks.close()

    async def _spawn(self) -> None:
        assert self._ctx is not None and self._tg is not None
        forks = self._forks
        if forks is not None and forks.usable:
            worker_id = f"local-{os.getpid()}-{next(self._ids)}"
            forked = forks.fork(worker_id)
            self._add(_Worker(worker_id, forked))
            self._tg.start_soon(forks.forked_in_time, forked)
            return
        early = take_early_worker() if self.name == "local" else None
        if early is not None and early.hand(self._ctx.address, self._ctx.token):
            # started before this control plane, its imports done meanwhile (runners/_early.py)
            if early.replies is not None:
                self._adopt(early)
            else:
                self._add(_Worker(early.worker_id, early.process))
            return
        if early is not None:  # it died before it could take the address
            early.close()
            early.process.kill()
            early.process.wait()
        worker_id = f"local-{os.getpid()}-{next(self._ids)}"
        if self._forking and forks is None:
            # No early process: this first worker's process becomes the fork server. It costs
            # the first worker a fork and a pipe's hop (~2 ms); each later one saves the imports
            # (~150 ms of CPU). Started from the event loop's thread, as a worker (below).
            first = launch(worker_id, self.name)
            if first.hand(self._ctx.address, self._ctx.token):
                self._adopt(first)
                return
            first.close()  # it died at once: spawn
            first.process.kill()
            first.process.wait()
            self._forking = False
        # the worker dies with this process (see runners/worker/__main__.py)
        env = worker_env(worker_id, self._ctx.token)
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
        self._add(_Worker(worker_id, process))

    def _add(self, worker: _Worker) -> None:
        assert self._tg is not None
        self._workers[worker.id] = worker
        self._tg.start_soon(self._watch, worker)

    def _adopt(self, early: EarlyWorker) -> None:
        """Takes a fork server as this runner's, and its first worker."""
        assert self._tg is not None
        forks = self._forks = ForkServer(early)
        self._add(_Worker(early.worker_id, forks.first))
        self._tg.start_soon(self._serve_forks, forks)

    async def _serve_forks(self, forks: ForkServer) -> None:
        await forks.run(self._reaped)
        # it ended before this runner did: its workers ended with it (their _watch reports
        # them), and later ones are spawned
        self._forking = False

    async def _reaped(self, process: subprocess.Popen[bytes] | ForkedProcess) -> int:
        """Waits for the process to end and reaps it, in a thread of the runner's own (a forked
        one: until its fork server reports it)."""
        if isinstance(process, ForkedProcess):
            return await process.wait()
        assert self._waiters is not None
        return await anyio.to_thread.run_sync(
            process.wait, abandon_on_cancel=True, limiter=self._waiters
        )

    async def _watch(self, worker: _Worker) -> None:
        code = await self._reaped(worker.process)
        self._workers.pop(worker.id, None)
        if worker.task is not None and self._ctx is not None:
            reason = "killed (timeout or cancel)" if worker.killed else _exit_reason(code)
            orphaned_by = getattr(worker.process, "orphaned_by", None)
            if orphaned_by is not None and not worker.killed:
                reason = f"killed as its fork server {_exit_reason(orphaned_by)}"
            self._ctx.report_lost(worker.task, f"worker process {reason}")
            worker.task = None
        await self._scale()

    async def _scale(self) -> None:
        backlog = len(self._tasks)
        starting = sum(1 for w in self._workers.values() if not w.connected)
        idle = self._tasks.idle() + starting
        while backlog > idle and len(self._workers) < self.max_workers:
            await self._spawn()
            idle += 1

    async def submit(self, task: tasks.Task) -> str | None:
        """Queues a task for the warm pool (None: the worker that takes it is known at the
        hand-off), or, when the task names a virtualenv's interpreter (``task.python``),
        starts a step process for it there and returns its handle, the pid."""
        if task.python:
            return self._start_one_shot(task)
        self._tasks.put(task)
        await self._scale()
        return None

    def _start_one_shot(self, task: tasks.Task) -> str:
        """Starts ``task.python -m plait.runners.step --lease TOKEN``: the step's process
        claims its lease itself, and the runner watches it end."""
        assert self._ctx is not None and self._tg is not None
        worker_id = f"local-{os.getpid()}-{next(self._ids)}"
        t = task.token
        lease = f"{t.run_id}/{t.step_id}/{t.attempt}/{t.epoch}"  # as format_lease writes it
        env = dict(os.environ)
        env["PYTHONPATH"] = _one_shot_path()
        env["PLAIT_WORKER_ID"] = worker_id
        env["PLAIT_PARENT_PID"] = str(os.getpid())  # dies with this process, as workers do
        env.pop("PLAIT_WORKER_TOKEN", None)
        env.pop("PLAIT_TOKEN", None)
        if self._ctx.token:
            env["PLAIT_TOKEN"] = self._ctx.token
        # the runner's address is plain loopback (see ControlPlane.serve), whatever this
        # process's own client uses
        for name in ("PLAIT_TLS_CA", "PLAIT_TLS_CERT", "PLAIT_TLS_KEY", "PLAIT_SERVER"):
            env.pop(name, None)
        import tempfile  # only a one-shot process pays for it

        output = tempfile.TemporaryFile()  # noqa: SIM115 (closed when the process is reaped)
        try:
            # started from the event loop's thread, and reaped by its Popen only, as workers
            process = subprocess.Popen(
                [
                    task.python,
                    "-m",
                    "plait.runners.step",
                    "--server",
                    self._ctx.address,
                    "--lease",
                    lease,
                    "--worker-id",
                    worker_id,
                ],
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                env=env,
            )
        except BaseException:
            output.close()
            raise
        shot = _OneShot(task.token, process, output, task.python)
        self._one_shots[str(process.pid)] = shot
        self._tg.start_soon(self._watch_one_shot, shot)
        return str(process.pid)

    async def _watch_one_shot(self, shot: _OneShot) -> None:
        code = await self._reaped(shot.process)  # cancelled: _kill_all kills and reaps it
        self._one_shots.pop(str(shot.process.pid), None)
        with shot.output:
            if shot.token is None or self._ctx is None:
                return
            if shot.killed:
                reason = "killed (timeout or cancel)"
            elif code in _REPORTED:
                return  # it reported the step's end, or the control plane ended the attempt
            else:
                reason = _exit_reason(code)
            shot.output.seek(0, os.SEEK_END)
            shot.output.seek(max(0, shot.output.tell() - 4 * _OUTPUT_TAIL))
            text = shot.output.read().decode(errors="replace").strip()
        said = f"; it said: {text[-_OUTPUT_TAIL:]}" if text else ""
        self._ctx.report_lost(shot.token, f"step process ({shot.python}) {reason}{said}")

    async def next_task(self, worker_id: str) -> tasks.Task:
        worker = self._workers.get(worker_id)
        if worker is None:
            raise WorkerGone(f"worker {worker_id} is not one of this pool's processes")
        worker.connected = True
        if type(worker.process) is ForkedProcess and worker.process.pid is None:
            await worker.process.forked.wait()  # its handle, the pid, is known first
        task = await self._tasks.get()
        if self._workers.get(worker_id) is not worker:
            # it ended while it waited (its fork server killed, say) and _watch has been: no
            # one would report the task lost, whose lease would only expire. Another takes it
            try:
                self._tasks.put(task, first=True)
            except anyio.ClosedResourceError:
                pass  # stopping: nothing is lost that a restart won't redo
            else:
                await self._scale()
            raise WorkerGone(f"worker {worker_id} ended while it waited for a task")
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
        shot = self._one_shots.get(handle)
        if shot is not None:
            return shot.process.returncode is None
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
        for shot in self._one_shots.values():
            if shot.token == token and shot.process.returncode is None:
                shot.killed = True
                shot.process.kill()

    async def _kill_all(self) -> None:
        workers = list(self._workers.values())
        for worker in workers:
            worker.task = None  # shutting down: nothing is lost that a restart won't redo
            if worker.process.returncode is None:
                worker.process.kill()
        shots = list(self._one_shots.values())
        for shot in shots:
            shot.token = None
            if shot.process.returncode is None:
                shot.process.kill()
        # reap them before the event loop that watches them goes away (a fork server reaps its
        # own, then exits: its standard input closes)
        forks, self._forks = self._forks, None
        with anyio.move_on_after(5):
            if forks is not None:
                await forks.aclose(self._reaped)
            for process in [w.process for w in workers] + [s.process for s in shots]:
                if isinstance(process, subprocess.Popen):
                    await self._reaped(process)
        if forks is not None and forks.process.returncode is None:
            forks.abort()  # its workers die with it
            with anyio.move_on_after(5):
                await self._reaped(forks.process)
        for shot in shots:
            shot.output.close()
