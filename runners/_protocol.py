"""The runner protocol: small, async, and free of the engine's types."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import anyio
from anyio.abc import TaskStatus

from plait.api.v1 import task_service_pb2 as tasks


@dataclass(frozen=True)
class RunnerContext:
    """What the control plane gives a runner when it starts it."""

    address: str
    """The control plane's gRPC address, which step processes report to."""
    home: Path
    """PLAIT_HOME, for the runner's own files (logs, builds)."""
    report_lost: Callable[[tasks.LeaseToken, str], None]
    """Tells the control plane an attempt's infrastructure died (the attempt is CRASHED)."""
    token: str = ""
    """The bearer token step processes authenticate with; empty when auth is off."""
    resume: bool = True
    """Whether a restarted control plane takes the runs up (a daemon): a runner then leaves
    processes that outlive a restart (containers) running when it stops, to re-attach to
    them; when False (an embedded engine) it stops them."""


@runtime_checkable
class Runner(Protocol):
    """Executes tasks somewhere; step code there reports back over gRPC (TaskService)."""

    name: str

    async def run(
        self, ctx: RunnerContext, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Runs the runner: call ``task_status.started()`` once it accepts tasks, then run until
        cancelled, and on cancellation stop everything it started (shielded). The control
        plane starts it with ``await task_group.start(runner.run, ctx)``."""

    async def submit(self, task: tasks.Task) -> str | None:
        """Accepts a task: it must eventually run, or be reported lost. Must not block long.

        A runner that starts a process (a container, a cluster job) for the task returns its
        handle: the control plane records it on the attempt's lease (holder ``runner:NAME``),
        asks :meth:`alive` about it after a restart, and the process may claim the lease for
        itself (``python -m plait.runners.step --lease``). A runner whose workers pull tasks
        returns None; the hand-off records the handle then."""

    async def cancel(self, token: tasks.LeaseToken) -> None:
        """Stops the attempt the token names, if it is still running here."""

    def alive(self, handle: str) -> bool | None:
        """Whether the process (container, job) this runner started under ``handle`` still
        runs: a restarted control plane re-attaches to an attempt whose handle is alive and
        retries one whose handle is gone. None when the runner cannot tell."""


class WorkerGone(Exception):
    """The worker asking for a task is not, or no longer, one of the pool's processes (it
    ended while it waited): it is handed no task, and the one it was about to get goes to
    another worker."""


@runtime_checkable
class WorkerPool(Runner, Protocol):
    """A runner whose worker processes pull tasks over TaskService.Connect."""

    async def next_task(self, worker_id: str) -> tasks.Task:
        """Waits for the next task for the given (connected, idle) worker.

        Raises:
            WorkerGone: the worker is not one of the pool's, or ended while it waited.
        """

    def task_done(self, worker_id: str) -> None:
        """The worker finished its task (reported completion or failure) and is idle again."""

    def worker_gone(self, worker_id: str) -> None:
        """The worker's stream ended."""

    def handle(self, worker_id: str) -> str:
        """The handle of the worker's process (its lease's handle)."""
