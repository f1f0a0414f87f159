"""Concurrency limits (per run: ``max_concurrency``; per pool: ``--pool-limit``) and the failure
policy (``fail_fast``).

First the scheduler alone, with a property over random DAGs and outcomes (never more attempts
at once than a limit allows, every run ends, a failed batch is undone exactly), then real runs:
steps record start and end markers in files, and the overlap is computed from those records,
never from timing.
"""

from __future__ import annotations

import itertools
import json
import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from unittest import mock

import networkx as nx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from processes import spawned, wait_for
from strategies import dags
from test_security import PLAIT, free_port
from test_state_machine import (
    VERSION,
    DurableMachine,
    Machine,
    by_step,
    done,
    snapshot,
    spec_of,
)
from test_workers import running

import plait
from plait._models import RunStatus, StepError, StepStatus
from plait.engine.scheduler import (
    CancelRun,
    Completed,
    Effects,
    Failed,
    Scheduler,
    Started,
    StoredRun,
    StoredStep,
    TaskOrder,
)

FAN = nx.DiGraph()
FAN.add_nodes_from(range(5))


def limited(g: nx.DiGraph, limit: int | None = None, fail_fast: bool = False, **kw: Any) -> Any:
    spec = spec_of(g, **kw)
    if limit is not None:
        spec.max_concurrency = limit
    spec.fail_fast = fail_fast
    return spec


# ---- the scheduler alone ----


def test_a_runs_limit_holds_ready_steps_until_a_slot_frees() -> None:
    m = Machine(limited(FAN, 2))
    _, fx = m.create()
    first = sorted(by_step(fx.tasks))
    assert len(first) == 2
    order = []
    outstanding = list(fx.tasks)
    while outstanding:
        task = outstanding.pop(0)
        fx = m.apply(done(task))
        order += [t.token.step_id for t in fx.tasks]
        outstanding += fx.tasks
        assert len(outstanding) <= 2
        assert len(fx.tasks) <= 1  # one slot freed, one step queued
    assert sorted(first + order) == [f"n{i}" for i in range(5)]


def test_a_pools_limit_is_shared_by_runs() -> None:
    m = Machine(spec_of(nx.DiGraph([(0, 1)]), cache=False))
    m.scheduler = Scheduler(pool_limits={"local": 1})
    _, fx_a = m.create()
    b, fx_b = m.create()
    (task,) = fx_a.tasks
    assert fx_b.tasks == []  # run b's root waits for the pool's one slot
    fx = m.apply(done(task))  # a's n0 ends: its n1 queues behind b's n0
    assert [(t.token.run_id, t.token.step_id) for t in fx.tasks] == [(b, "n0")]


def test_a_retrying_step_holds_no_slot() -> None:
    spec = limited(FAN, 1, retries=1)
    for step in spec.steps:
        step.settings.retry_delay_seconds = 30.0
    m = Machine(spec)
    _, fx = m.create()
    (task,) = fx.tasks
    fx = m.apply(Failed(task.token, StepError("builtins.ValueError", "x")))
    (other,) = fx.tasks  # the slot went to the next step while the first waits for its delay
    assert other.token.step_id != task.token.step_id


def test_fail_fast_cancels_running_siblings_and_pending_steps() -> None:
    m = Machine(limited(FAN, 3, fail_fast=True))
    run_id, fx = m.create()
    first, running, queued = fx.tasks  # two of the five wait for a slot
    m.apply(Started(running.token))
    fx = m.apply(Failed(first.token, StepError("builtins.ValueError", "x")))
    assert set(fx.cancels) == {running.token, queued.token}
    others = {f"n{i}" for i in range(5)} - {first.token.step_id}
    statuses = {s: fx.step_updates[(run_id, s)]["status"] for s in others}
    assert set(statuses.values()) == {StepStatus.CANCELLED}
    assert fx.attempt_updates[(run_id, running.token.step_id, 1)]["status"] == "CANCELLED"
    assert fx.run_updates[run_id]["status"] == RunStatus.FAILED
    assert fx.tasks == []


def test_without_fail_fast_independent_branches_keep_going() -> None:
    m = Machine(limited(nx.DiGraph([(0, 1), (2, 3)])))
    run_id, fx = m.create()
    tasks = by_step(fx.tasks)
    fx = m.apply(Failed(tasks["n0"].token, StepError("builtins.ValueError", "x")))
    assert fx.cancels == [] and fx.step_updates[(run_id, "n1")]["status"] == StepStatus.SKIPPED
    (n3,) = m.apply(done(tasks["n2"])).tasks
    fx = m.apply(done(n3))
    assert fx.run_updates[run_id]["status"] == RunStatus.FAILED  # after the other branch ended


def test_recovery_counts_what_holds_a_slot() -> None:
    m = Machine(limited(FAN, 2))
    steps = [
        StoredStep("n0", StepStatus.RUNNING, 1, "k", None, {}, epoch=1, runner="local", holder="w"),
        StoredStep("n1", StepStatus.QUEUED, 1, "k", None, {}, epoch=1, runner="local"),
        *(StoredStep(f"n{i}", StepStatus.PENDING, 0, None, None, {}) for i in (2, 3, 4)),
    ]
    stored = StoredRun("r", VERSION, {}, False, "default", steps)
    fx = m.scheduler.recover([stored], m.now, m.lookups, alive=lambda runner, handle: True)
    assert [t.token.step_id for t in fx.tasks] == ["n1"]  # handed out again; no new one
    (task,) = fx.tasks
    fx = m.apply(done(task))
    assert len(fx.tasks) == 1  # one slot freed: one waiting step queued


def overlap_guard(limit: int | None, pool: int | None) -> Any:
    """Records every outstanding attempt and asserts no limit is passed, batch after batch."""
    outstanding: list[TaskOrder] = []

    def record(fx: Effects, finished: set[Any] | None = None) -> None:
        stopped = set(fx.cancels) | (finished or set())
        outstanding[:] = [t for t in outstanding if t.token not in stopped] + fx.tasks
        runs: dict[str, int] = {}
        for t in outstanding:
            runs[t.token.run_id] = runs.get(t.token.run_id, 0) + 1
        if limit is not None:
            assert max(runs.values(), default=0) <= limit
        if pool is not None:
            assert len(outstanding) <= pool

    return outstanding, record


@settings(deadline=None, max_examples=60)
@given(
    g=dags(max_steps=8),
    data=st.data(),
    limit=st.none() | st.integers(1, 3),
    pool=st.none() | st.integers(1, 3),
)
def test_no_limit_is_ever_passed_and_every_run_ends(
    g: nx.DiGraph, data: st.DataObject, limit: int | None, pool: int | None
) -> None:
    # run ids in order, not at random: the scheduler's view is rebuilt in run-id order after a
    # failed batch, and the next draw's range must not depend on chance (hypothesis replays)
    ids = itertools.count(1)
    with mock.patch("uuid.uuid4", lambda: uuid.UUID(int=next(ids))):
        _run_with_limits(g, data, limit, pool)


def _run_with_limits(
    g: nx.DiGraph, data: st.DataObject, limit: int | None, pool: int | None
) -> None:
    fail_fast = data.draw(st.booleans(), label="fail_fast")
    m = DurableMachine(limited(g, limit, fail_fast, retries=1, cache=False))
    m.scheduler = Scheduler(pool_limits={"local": pool} if pool else None)
    outstanding, record = overlap_guard(limit, pool)
    for _ in range(data.draw(st.integers(1, 3), label="runs")):
        record(m.create()[1])
    for _ in range(300):
        if not outstanding:
            break
        task = outstanding[data.draw(st.integers(0, len(outstanding) - 1), label="pick")]
        what = data.draw(st.sampled_from(["done", "done", "fail", "crash", "cancel"]), label="w")
        if what == "cancel":
            cmd: Any = CancelRun(task.token.run_id)
        elif what == "done":
            cmd = done(task)
        else:
            cmd = Failed(
                task.token, StepError("builtins.RuntimeError", "x"), crashed=what == "crash"
            )
        if data.draw(st.booleans(), label="the batch fails first"):
            before = snapshot(m)
            m.fail(cmd)
            assert snapshot(m) == before
        ended = {cmd.token} if isinstance(cmd, Completed | Failed) else set()
        record(m.apply(cmd), ended)
    assert outstanding == []
    assert m.scheduler.runs == {}, "every run ended"
    for row in m.rows.runs.values():
        assert RunStatus(row["status"]).is_final


# ---- real runs ----


def _mark(marks: str, what: str, step: str) -> None:
    with open(os.path.join(marks, f"{step}.{what}"), "w") as f:
        f.write(str(time.monotonic_ns()))


@plait.step
def busy(i: int, marks: str) -> int:
    _mark(marks, "start", f"s{i}")
    time.sleep(0.3)
    _mark(marks, "end", f"s{i}")
    return i


@plait.pipeline(max_concurrency=2)
def bounded(marks: str, n: int = 6) -> None:
    for i in range(6):
        busy(i, marks, id=f"s{i}")


@plait.pipeline
def unbounded(marks: str) -> None:
    for i in range(4):
        busy(i, marks, id=f"s{i}")


def max_overlap(marks: Path) -> int:
    """The most steps between their start and end marks at once, from the marks alone."""
    points = []
    for f in marks.iterdir():
        _, what = f.name.split(".")
        points.append((int(f.read_text()), 1 if what == "start" else -1))
    assert len(points) % 2 == 0
    most = now = 0
    for _, delta in sorted(points, key=lambda p: (p[0], p[1])):  # an end before a start
        now += delta
        most = max(most, now)
    return most


@pytest.fixture
def engine(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[plait.Client]:
    monkeypatch.setenv("PLAIT_WORKERS", "4")
    c = plait.Client(home=tmp_path / "home")
    yield c
    c.shutdown()


def test_a_runs_max_concurrency_is_never_passed(engine: plait.Client, tmp_path: Path) -> None:
    marks = tmp_path / "marks"
    marks.mkdir()
    r = bounded.run({"marks": str(marks)}, client=engine)
    assert r.status == "SUCCEEDED"
    assert len(list(marks.iterdir())) == 12
    assert max_overlap(marks) <= 2


@plait.step
def sleeper(marks: str) -> int:
    with open(os.path.join(marks, "pid"), "w") as f:
        f.write(str(os.getpid()))
    time.sleep(300)  # only a cancellation ends it: a run that ends proves it was stopped
    return 1


@plait.step
def fails_soon(marks: str) -> int:
    while not os.path.exists(os.path.join(marks, "pid")):  # the sibling is running
        time.sleep(0.01)
    raise ValueError("the first failure")


@plait.step
def quick(x: int) -> int:
    return x + 1


@plait.pipeline(fail_fast=True)
def fast_failing(marks: str) -> None:
    sleeper(marks)
    fails_soon(marks)


@plait.pipeline
def keeps_going(marks: str) -> None:
    fails_soon(marks)
    quick(quick(1))
    sleeper_done(marks)


@plait.step
def sleeper_done(marks: str) -> int:
    with open(os.path.join(marks, "pid"), "w") as f:
        f.write(str(os.getpid()))
    time.sleep(0.5)
    return 2


def test_fail_fast_stops_a_running_sibling(engine: plait.Client, tmp_path: Path) -> None:
    marks = tmp_path / "marks"
    marks.mkdir()
    r = fast_failing.run({"marks": str(marks)}, client=engine)
    assert r.status == "FAILED"
    assert r.steps["fails_soon"].status == "FAILED"
    assert r.steps["sleeper"].status == "CANCELLED"
    pid = int((marks / "pid").read_text())
    wait_for(lambda: not running(pid), "the cancelled sibling's process stopping")


def test_by_default_independent_branches_finish(engine: plait.Client, tmp_path: Path) -> None:
    marks = tmp_path / "marks"
    marks.mkdir()
    r = keeps_going.run({"marks": str(marks)}, client=engine)
    assert r.status == "FAILED"
    assert r.steps["fails_soon"].status == "FAILED"
    assert r.steps["quick_2"].output() == 3
    assert r.steps["sleeper_done"].status == "SUCCEEDED"


DAEMON_PIPELINES = """
import os
import time

import plait


@plait.step
def busy(i: int, marks: str) -> int:
    for what in ("start", "end"):
        with open(os.path.join(marks, f"s{i}.{what}"), "w") as f:
            f.write(str(time.monotonic_ns()))
        if what == "start":
            time.sleep(0.3)
    return i


@plait.pipeline
def wide(marks: str) -> None:
    for i in range(3):
        busy(i, marks, id=f"s{i}")
"""


def test_a_pool_limit_holds_steps_of_every_run(tmp_path: Path) -> None:
    from test_leases import finished, submit

    root = tmp_path / "project"
    root.mkdir()
    (root / "pyproject.toml").write_text('[project]\nname = "pool-test"\n')
    (root / "pipes.py").write_text(DAEMON_PIPELINES)
    marks = tmp_path / "marks"
    for k in range(2):
        (marks / str(k)).mkdir(parents=True)
    home, port = tmp_path / "home", free_port()
    # four local workers (test_security.Daemon keeps one): only the pool's limit keeps the
    # steps to two at once
    env = {**os.environ, "PLAIT_HOME": str(home), "PLAIT_WORKERS": "4"}
    env.pop("PLAIT_SERVER", None)
    env.pop("PLAIT_TOKEN", None)
    args = [PLAIT, "server", "start", "--foreground", "--port", str(port)]
    with spawned([*args, "--pool-limit", "local=2"], env=env) as proc:
        wait_for(lambda: (home / "server.pid").exists() or proc.poll() is not None, "a daemon")
        assert proc.poll() is None
        credential = json.loads((home / "credentials.json").read_text())["token"]
        d = SimpleNamespace(env=env, address=f"127.0.0.1:{port}", credential=credential)
        runs = [submit(d, root, "wide", f"marks={marks / str(k)}") for k in range(2)]
        for run_id in runs:
            assert finished(d, run_id).status == "SUCCEEDED"
    both = tmp_path / "both"
    both.mkdir()
    for k in range(2):
        for f in (marks / str(k)).iterdir():
            (both / f"{k}{f.name}").write_text(f.read_text())
    assert len(list(both.iterdir())) == 12
    assert max_overlap(both) <= 2
