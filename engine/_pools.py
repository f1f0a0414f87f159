"""The queues of remote worker pools: tasks waiting for a worker's PollTask.

What decides what runs is the attempts table (a QUEUED attempt with no holder); these queues
only hold the tasks of those attempts in memory so that a long-poll answers at once. A restarted
control plane fills them again from the store (``Scheduler.recover``), and a task taken from
here is handed out only once its lease is committed.
"""

from __future__ import annotations

from collections import deque

import anyio

from plait.api.v1 import task_service_pb2 as tasks


class TaskPools:
    """One FIFO of tasks per pool name, with long-polling takers."""

    def __init__(self) -> None:
        self._queues: dict[str, deque[tasks.Task]] = {}
        self._arrived: dict[str, anyio.Event] = {}
        self._held: dict[bytes, tasks.Task] = {}
        """Tasks of processes a runner started for them (a container, a one-shot process),
        until that process claims its task by its lease (``PollTask(lease=...)``)."""

    def hold(self, task: tasks.Task) -> None:
        """Keeps a task for the one-shot process a runner starts for it to claim."""
        self._held[task.token.SerializeToString(deterministic=True)] = task

    def put(self, pool: str, task: tasks.Task) -> None:
        """Queues a task and wakes the pool's waiting takers."""
        self._queues.setdefault(pool, deque()).append(task)
        event = self._arrived.pop(pool, None)
        if event is not None:
            event.set()

    def discard(self, token: tasks.LeaseToken) -> None:
        """Drops the task of an attempt that ended before anyone took it (a cancelled run)."""
        if self._held.pop(token.SerializeToString(deterministic=True), None) is not None:
            return
        for queue in self._queues.values():
            for task in queue:
                if task.token == token:
                    queue.remove(task)
                    return

    def claim(self, token: tasks.LeaseToken) -> tasks.Task | None:
        """Takes the queued task of one attempt (a one-shot step process started for it)."""
        held = self._held.pop(token.SerializeToString(deterministic=True), None)
        if held is not None:
            return held
        for queue in self._queues.values():
            for task in queue:
                if task.token == token:
                    queue.remove(task)
                    return task
        return None

    async def take(self, pool: str, wait: float) -> tasks.Task | None:
        """The pool's next task, waiting up to ``wait`` seconds for one; None if none came."""
        deadline = anyio.current_time() + wait
        while True:
            queue = self._queues.get(pool)
            if queue:
                return queue.popleft()
            left = deadline - anyio.current_time()
            if left <= 0:
                return None
            event = self._arrived.setdefault(pool, anyio.Event())
            with anyio.move_on_after(left):
                await event.wait()

    def depth(self, pool: str) -> int:
        """How many tasks wait in a pool."""
        return len(self._queues.get(pool, ()))

    def pools(self) -> dict[str, int]:
        """Every pool with waiting tasks, and how many."""
        return {name: len(q) for name, q in self._queues.items() if q}


__all__ = ["TaskPools"]
