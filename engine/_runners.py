"""The runners a control plane has: the local pool, and Docker when ``plait[docker]`` is there.

The Docker runner is started on first use (or at start when attempts of it may still run, so
that it re-attaches to their containers): a control plane that never runs a container never
imports aiodocker nor talks to a Docker daemon.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import anyio
from anyio.abc import TaskGroup, TaskStatus

from plait.api.v1 import task_service_pb2 as tasks
from plait.engine._lazy import lazy_module
from plait.runners import Runner, RunnerContext

if TYPE_CHECKING:
    import sqlalchemy as sa
    from sqlalchemy.engine import Connection

    from plait.engine.store import _schema as db
else:
    sa = lazy_module("sqlalchemy")
    db = lazy_module("plait.engine.store._schema")


def docker_available() -> bool:
    """Whether aiodocker can be imported (without importing it)."""
    return importlib.util.find_spec("aiodocker") is not None


class LazyRunner:
    """A runner made and started the first time a task is submitted to it."""

    def __init__(self, name: str, make: Callable[[], Any]) -> None:
        self.name = name
        self._make = make
        self._real: Any = None
        self._ctx: RunnerContext | None = None
        self._tg: TaskGroup | None = None
        self._lock = anyio.Lock()
        self.eager = False
        """Start the real runner with the control plane (attempts of it may still run)."""

    async def run(
        self, ctx: RunnerContext, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        async with anyio.create_task_group() as tg:
            self._ctx, self._tg = ctx, tg
            if self.eager:
                await self.started()
            task_status.started()
            await anyio.sleep_forever()

    async def started(self) -> Any:
        """The real runner, running."""
        async with self._lock:
            if self._real is None:
                assert self._tg is not None and self._ctx is not None, "the runner is not running"
                real = self._make()
                await self._tg.start(real.run, self._ctx)
                self._real = real
        return self._real

    async def submit(self, task: tasks.Task, options: Any = None) -> str | None:
        real = await self.started()
        if options is None:
            return await real.submit(task)  # type: ignore[no-any-return]
        return await real.submit(task, options=options)  # type: ignore[no-any-return]

    async def cancel(self, token: tasks.LeaseToken) -> None:
        if self._real is not None:
            await self._real.cancel(token)

    def alive(self, handle: str) -> bool | None:
        if self._real is None:
            return None  # not started: its attempts' leases will say
        return self._real.alive(handle)  # type: ignore[no-any-return]


def attempts_of_runner(conn: Connection, runner: str) -> bool:
    """Whether some attempt of ``runner`` is queued or running (its process may still live)."""
    return (
        conn.execute(
            sa.select(db.attempts.c.run_id)
            .where(db.attempts.c.runner == runner, db.attempts.c.status.in_(("QUEUED", "RUNNING")))
            .limit(1)
        ).first()
        is not None
    )


def docker_runner() -> Runner:
    """A Docker runner that starts on first use."""

    def make() -> Any:
        from plait.runners._docker import DockerRunner

        return DockerRunner()

    return LazyRunner("docker", make)
