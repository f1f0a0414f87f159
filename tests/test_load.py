"""Load: 50 runs of 100 steps each, created at once, through a real daemon and 4 real
`plait worker` processes of one pool, on SQLite and on PostgreSQL.

Every step appends one line, ``run_id step_id attempt``, to a file opened with O_APPEND in a
single write (atomic for a line this short), so the test counts executions: each (run, step)
ran exactly once, none was lost, none ran twice. The store must agree: one attempt per step,
SUCCEEDED. No assertion on time: the deadlines are hang guards for a loaded 2-core machine.
`python benchmarks/run.py --only load` measures the same workload.
"""

from __future__ import annotations

import collections
import contextlib
import importlib
import os
import sys
import textwrap
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import ModuleType

import anyio
import pytest
import sqlalchemy as sa
from processes import spawned, wait_for
from sqlalchemy.ext.asyncio import create_async_engine
from test_postgres import postgres_database
from test_security import PLAIT, Daemon

import plait

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

RUNS = 50
STEPS_PER_RUN = 100
WORKERS = 4
DEADLINE = 400.0
"""For all the runs to end: a hang guard, not a speed expectation (20 to 40 s on 2 cores)."""

STEPS = '''
"""The load test's steps (imported by the test and by the workers)."""

import os

import plait


def _record(log: str) -> None:
    """One line per execution, in one O_APPEND write: lines of concurrent steps never mix."""
    ctx = plait.get_step_context()
    fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, f"{ctx.run_id} {ctx.step_id} {ctx.attempt}\\n".encode())
    finally:
        os.close(fd)


@plait.step(pool="load")
def root(seed: int, log: str) -> int:
    _record(log)
    return seed


@plait.step(pool="load")
def branch(x: int, i: int, log: str) -> int:
    _record(log)
    return x + i


@plait.step(pool="load")
def join(xs: list[int], log: str) -> int:
    _record(log)
    return sum(xs)


@plait.pipeline
def load(seed: int, log: str) -> None:
    """100 steps: a root fans out to 98 branches, which one step joins."""
    x = root(seed, log)
    join([branch(x, i, log) for i in range(98)], log)
'''


@pytest.fixture(scope="module")
def steps(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ModuleType, Path]]:
    """The steps module in a folder of its own (its source root, shipped as the code archive)."""
    folder = tmp_path_factory.mktemp("load_steps")
    (folder / "load_steps.py").write_text(textwrap.dedent(STEPS))
    sys.path.insert(0, str(folder))
    try:
        yield importlib.import_module("load_steps"), folder
    finally:
        sys.path.remove(str(folder))
        sys.modules.pop("load_steps", None)


@pytest.fixture(
    params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)],
)
def database_url(request: pytest.FixtureRequest) -> Iterator[str]:
    """The daemon's store: its default (SQLite in its home) or a fresh PostgreSQL database."""
    if request.param == "sqlite":
        yield ""
        return
    url, drop = postgres_database(request)
    try:
        yield url
    finally:
        drop()


@contextlib.contextmanager
def workers(daemon: Daemon, folder: Path, tmp: Path) -> Iterator[None]:
    """`WORKERS` processes of `plait worker --pool load`, each killed (its group) on exit."""
    token = daemon.token("create", "load-workers", "--role", "worker")
    with contextlib.ExitStack() as stack:
        for i in range(WORKERS):
            env = {k: v for k, v in os.environ.items() if not k.startswith("PLAIT_")}
            env.update(PLAIT_HOME=str(tmp / f"worker-home-{i}"), PLAIT_TOKEN=token)
            log = stack.enter_context(open(tmp / f"worker-{i}.log", "wb"))
            stack.enter_context(
                spawned(
                    [PLAIT, "worker", "--server", daemon.address, "--pool", "load"],
                    env=env,
                    cwd=folder,
                    stdout=log,
                    stderr=log,
                )
            )
        yield


def attempts(url: str) -> list[tuple[str, str, int, str]]:
    """Every attempt the store holds: (run_id, step_id, attempt, status)."""

    async def read() -> list[tuple[str, str, int, str]]:
        engine = create_async_engine(url)
        try:
            async with engine.connect() as conn:
                rows = await conn.execute(
                    sa.text("SELECT run_id, step_id, attempt, status FROM attempts")
                )
                return [(r[0], r[1], r[2], r[3]) for r in rows]
        finally:
            await engine.dispose()

    return anyio.run(read)


def test_50_runs_of_100_steps_on_4_workers_each_step_runs_once(
    tmp_path: Path, steps: tuple[ModuleType, Path], database_url: str
) -> None:
    module, folder = steps
    log = tmp_path / "executions.log"
    flags = ("--database-url", database_url) if database_url else ()
    daemon = Daemon(tmp_path / "home", *flags)
    try:
        client = plait.Client(daemon.address, token=daemon.credential)
        try:
            with workers(daemon, folder, tmp_path):

                def create(seed: int) -> str:
                    params = {"seed": seed, "log": str(log)}
                    run = client.run_pipeline(module.load, params, no_cache=True, wait=False)
                    return run.run_id

                with ThreadPoolExecutor(RUNS) as threads:  # the runs are created concurrently
                    run_ids = list(threads.map(create, range(RUNS)))
                assert len(set(run_ids)) == RUNS

                def ended() -> bool:
                    runs = client.list_runs(limit=RUNS + 1)
                    return len(runs) == RUNS and all(r.status.is_final for r in runs)

                wait_for(ended, f"{RUNS} runs ending", deadline=DEADLINE, every=0.5)
                runs = [client.get_run(run_id) for run_id in run_ids]
                total = runs[7].steps["join"].output() if runs[7].status == "SUCCEEDED" else None
        finally:
            client.close()
    finally:
        daemon.stop()

    assert [str(r.status) for r in runs] == ["SUCCEEDED"] * RUNS
    for run in runs:
        assert len(run.steps) == STEPS_PER_RUN
        assert {(str(s.status), s.attempt) for s in run.steps.values()} == {("SUCCEEDED", 1)}
    assert total == 98 * 7 + sum(range(98))

    expected = {(run.run_id, step) for run in runs for step in run.steps}
    assert len(expected) == RUNS * STEPS_PER_RUN
    lines = log.read_text().splitlines()
    executions = collections.Counter((run_id, step) for run_id, step, _ in map(str.split, lines))
    assert set(executions) == expected, "a step was lost, or ran outside these runs"
    twice = {key: n for key, n in executions.items() if n != 1}
    assert not twice, f"steps that ran more than once: {sorted(twice.items())[:10]}"
    assert {line.split()[2] for line in lines} == {"1"}

    rows = attempts(database_url or f"sqlite+aiosqlite:///{daemon.home / 'plait.db'}")
    assert len(rows) == RUNS * STEPS_PER_RUN, "one attempt per step, no more"
    assert {(run_id, step) for run_id, step, _, _ in rows} == expected
    assert {(attempt, status) for _, _, attempt, status in rows} == {(1, "SUCCEEDED")}
