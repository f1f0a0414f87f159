"""Retry policies: delays with backoff, jitter and a cap, retry_on and no_retry_on, and the crash
budget apart from them.

First the scheduler alone (no database, no processes: tests/test_state_machine.py's harness),
then real runs: an embedded engine whose steps prove what happened through files they write,
and real daemons that are killed with SIGKILL (a delayed retry survives a restart) and started
with ``--crash-retries``. Delays are checked as lower bounds on stored times, never upper ones.
"""

from __future__ import annotations

import math
import os
import signal
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import networkx as nx
import pytest
from processes import wait_for
from test_leases import client, daemons, finished, make_project, restart, submit
from test_state_machine import VERSION, DurableMachine, Machine, by_step, done, spec_of

import plait
from plait._models import RunStatus, StepError, StepStatus
from plait.engine.scheduler import Expire, Failed, Scheduler, StoredRun, StoredStep, retry_delay
from plait.errors import PipelineDefinitionError, PipelineValidationError
from plait.ir.v1 import ir_pb2

# ---- the delay formula ----


def settings(**kw: Any) -> ir_pb2.StepSettings:
    return ir_pb2.StepSettings(**kw)


def test_delays_grow_by_the_backoff_up_to_the_cap() -> None:
    s = settings(retry_delay_seconds=1.0, retry_backoff=3.0, retry_max_delay_seconds=20.0)
    assert [retry_delay(s, k) for k in range(1, 6)] == [1.0, 3.0, 9.0, 20.0, 20.0]
    default = settings(retry_delay_seconds=0.5)  # backoff 2 and no cap but a day
    assert [retry_delay(default, k) for k in (1, 2, 3)] == [0.5, 1.0, 2.0]
    assert retry_delay(default, 100) == 86_400.0
    # a large factor and many retries: the cap, not an OverflowError
    huge = settings(retry_delay_seconds=1.0, retry_backoff=100.0)
    assert retry_delay(huge, 10_000) == 86_400.0
    assert retry_delay(settings(), 3) == 0.0  # no delay asked: at once


# ---- the scheduler alone ----


def policy_spec(retries: int = 3, **policy: Any) -> ir_pb2.PipelineSpec:
    spec = spec_of(nx.DiGraph([(0, 1)]), retries=retries)
    for name, value in policy.items():
        field = getattr(spec.steps[0].settings, name)
        if isinstance(value, tuple):
            field.extend(value)
        else:
            setattr(spec.steps[0].settings, name, value)
    return spec


def value_error(message: str = "boom") -> StepError:
    return StepError(
        "builtins.ValueError",
        message,
        types=("builtins.ValueError", "builtins.Exception", "builtins.BaseException"),
    )


def test_a_delayed_retry_waits_for_its_deadline_then_queues_the_next_attempt() -> None:
    m = Machine(policy_spec(retry_delay_seconds=10.0, retry_jitter=0.0))
    run_id, fx = m.create()
    (task,) = fx.tasks
    fx = m.apply(Failed(task.token, value_error()))
    failed_at = m.now
    assert fx.tasks == []
    (event,) = [e for e in fx.events if e.step_id == "n0"]
    assert event.step_status is StepStatus.RETRYING
    assert event.message == "retrying in 10.0 s: builtins.ValueError: boom"
    row = fx.step_updates[(run_id, "n0")]
    assert row["status"] == StepStatus.RETRYING and row["retry_at"] == failed_at + 10.0
    assert m.scheduler.next_deadline() == failed_at + 10.0
    m.now = failed_at + 5.0
    assert m.apply(Expire()).tasks == []  # not due yet
    m.now = failed_at + 9.5
    fx = m.apply(Expire())  # the clock passes the deadline
    (retry,) = fx.tasks
    assert retry.token.attempt == 2
    assert fx.step_updates[(run_id, "n0")]["retry_at"] is None
    assert fx.step_updates[(run_id, "n0")]["status"] == StepStatus.QUEUED


def test_backoff_doubles_the_delay_and_the_cap_holds_it() -> None:
    m = Machine(
        policy_spec(
            retries=4,
            retry_delay_seconds=2.0,
            retry_max_delay_seconds=5.0,
            retry_jitter=0.0,
        )
    )
    run_id, fx = m.create()
    (task,) = fx.tasks
    delays = []
    for _ in range(4):
        fx = m.apply(Failed(task.token, value_error()))
        delays.append(fx.step_updates[(run_id, "n0")]["retry_at"] - m.now)
        m.now += delays[-1]
        (task,) = m.apply(Expire()).tasks
    assert delays == [2.0, 4.0, 5.0, 5.0]


def test_jitter_moves_each_delay_within_its_fraction() -> None:
    spec = policy_spec(retry_delay_seconds=10.0, retry_jitter=0.5)
    seen = set()
    for _ in range(30):
        m = Machine(spec)
        run_id, fx = m.create()
        (task,) = fx.tasks
        fx = m.apply(Failed(task.token, value_error()))
        delay = fx.step_updates[(run_id, "n0")]["retry_at"] - m.now
        assert 5.0 <= delay <= 15.0
        seen.add(delay)
    assert len(seen) > 1  # at random, not a constant


def first_outcome(spec: ir_pb2.PipelineSpec, error: StepError) -> tuple[str, Any]:
    """(the step's first status, its event) after the first attempt fails with `error`."""
    m = Machine(spec)
    _, fx = m.create()
    (task,) = fx.tasks
    fx = m.apply(Failed(task.token, error))
    event = next(e for e in fx.events if e.step_id == "n0")
    return event.step_status, event


class Flaky(ConnectionError):
    """A subclass: retry_on=(OSError,) matches it through its class chain."""


def chain(exc: type[BaseException]) -> StepError:
    return StepError.of(exc("x"))


def test_retry_on_matches_subclasses_and_no_retry_on_wins() -> None:
    on_os = policy_spec(retry_on=("builtins.OSError",))
    assert first_outcome(on_os, chain(Flaky))[0] == StepStatus.RETRYING  # a subclass
    status, event = first_outcome(on_os, chain(KeyError))
    assert status == StepStatus.FAILED
    assert "not retried" in event.message and "retry_on" in event.message
    both = policy_spec(
        retry_on=("builtins.Exception",), no_retry_on=(f"{__name__}.Flaky", "builtins.KeyError")
    )
    assert first_outcome(both, chain(ValueError))[0] == StepStatus.RETRYING
    status, event = first_outcome(both, chain(Flaky))
    assert status == StepStatus.FAILED and "no_retry_on" in event.message
    # a base class of a no_retry_on type is not refused
    assert first_outcome(both, chain(LookupError))[0] == StepStatus.RETRYING
    # a failure that carries no class chain is matched by its type alone
    assert first_outcome(on_os, StepError("builtins.OSError", "x"))[0] == StepStatus.RETRYING


def test_a_timeout_is_a_timeout_error_for_retry_on() -> None:
    spec = policy_spec(retry_on=("builtins.OSError",))
    spec.steps[0].settings.timeout_seconds = 5.0
    m = Machine(spec)
    _, fx = m.create()
    (task,) = fx.tasks
    m.apply(plait_lease(task))
    m.now += 10
    fx = m.apply(Expire())
    (retry,) = fx.tasks  # TimeoutError is an OSError
    assert retry.token.attempt == 2


def plait_lease(task: Any) -> Any:
    from plait.engine.scheduler import Lease

    return Lease(task.token, "worker-1", "")


def test_crashes_are_retried_at_once_whatever_the_policy_says() -> None:
    m = Machine(policy_spec(retries=0, retry_on=("builtins.KeyError",), retry_delay_seconds=60.0))
    run_id, fx = m.create()
    (task,) = fx.tasks
    lost = StepError("plait.WorkerLost", "gone")
    fx = m.apply(Failed(task.token, lost, crashed=True))
    (retry,) = fx.tasks  # no delay, no retry_on match needed, no user retry used
    assert retry.token.attempt == 2
    fx = m.apply(Failed(retry.token, value_error()))
    assert fx.step_updates[(run_id, "n0")]["status"] == StepStatus.FAILED  # retries=0


def test_a_crash_budget_of_zero_makes_a_crash_final() -> None:
    m = Machine(policy_spec(retries=3))
    m.scheduler = Scheduler(crash_retries=0)
    run_id, fx = m.create()
    (task,) = fx.tasks
    fx = m.apply(Failed(task.token, StepError("plait.WorkerLost", "gone"), crashed=True))
    assert fx.tasks == []
    assert fx.step_updates[(run_id, "n0")]["status"] == StepStatus.CRASHED
    assert fx.run_updates[run_id]["status"] == RunStatus.FAILED


def test_recovery_keeps_a_delayed_retry_waiting_until_it_is_due() -> None:
    m = Machine(policy_spec(retry_delay_seconds=30.0))
    due = m.now + 20
    stored = StoredRun(
        "r1",
        VERSION,
        {},
        False,
        "default",
        [
            StoredStep("n0", StepStatus.RETRYING, 1, "k0", None, {}, epoch=1, retry_at=due),
            StoredStep("n1", StepStatus.PENDING, 0, None, None, {}),
        ],
    )
    fx = m.scheduler.recover([stored], m.now, m.lookups)
    assert fx.tasks == []  # not retried at once
    assert m.scheduler.next_deadline() == due
    m.now = due
    (retry,) = m.apply(Expire()).tasks
    assert (retry.token.step_id, retry.token.attempt) == ("n0", 2)
    # a RETRYING row without a time (an older control plane's) is retried at once
    m2 = Machine(policy_spec())
    old = StoredRun(
        "r2",
        VERSION,
        {},
        False,
        "default",
        [
            StoredStep("n0", StepStatus.RETRYING, 1, "k0", None, {}, epoch=1),
            StoredStep("n1", StepStatus.PENDING, 0, None, None, {}),
        ],
    )
    (task,) = m2.scheduler.recover([old], m2.now, m2.lookups).tasks
    assert task.token.attempt == 2


def test_a_failed_batch_with_a_delayed_retry_is_undone_and_the_retry_still_comes() -> None:
    m = DurableMachine(policy_spec(retry_delay_seconds=5.0, retry_jitter=0.0))
    run_id, fx = m.create()
    (task,) = fx.tasks
    fx = m.apply(Failed(task.token, value_error()))
    assert m.rows.steps[(run_id, "n0")]["retry_at"] == m.now + 5.0
    m.now += 5.0
    m.fail(Expire())  # the batch that would queue attempt 2 is lost
    assert m.scheduler.runs[run_id].steps["n0"].status is StepStatus.RETRYING
    (retry,) = m.apply(Expire()).tasks
    assert retry.token.attempt == 2
    fx = m.apply(done(retry))
    assert by_step(fx.tasks).keys() == {"n1"}


# ---- the SDK and validation ----


def test_the_policy_compiles_to_the_ir_by_qualified_names() -> None:
    spec = policy_pipeline.compile().spec
    s = spec.steps[0].settings
    assert s.retries == 3
    assert (s.retry_delay_seconds, s.retry_backoff, s.retry_max_delay_seconds) == (1.0, 3.0, 9.0)
    assert math.isclose(s.retry_jitter, 0.25)
    assert list(s.retry_on) == ["builtins.OSError", "mypkg.errors.Flaky"]
    assert list(s.no_retry_on) == [f"{__name__}.Flaky"]
    # the defaults stay out of the IR: a step without a policy keeps its pipeline's version
    plain = spec.steps[1].settings
    assert not plain.HasField("retry_backoff") and not plain.HasField("retry_jitter")
    assert not plain.retry_on and plain.retry_delay_seconds == 0


def test_bad_policies_are_refused_where_they_are_written() -> None:
    for bad in (
        {"retry_delay": -1.0},
        {"retry_delay": math.inf},
        {"retry_backoff": 0.5},
        {"retry_jitter": 1.5},
        {"retry_max_delay": math.nan},
        {"retry_on": (int,)},
        {"no_retry_on": ("",)},
    ):
        with pytest.raises(PipelineDefinitionError):
            plait.step(**bad)(noop)


def test_the_engine_bounds_every_policy_field() -> None:
    from plait.engine._validate import validate_pipeline

    def check(**kw: Any) -> None:
        validate_pipeline(policy_spec(**kw))

    check(retries=100, retry_delay_seconds=86_400.0, retry_on=("a.B",) * 64)
    for bad, match in (
        ({"retries": 101}, "retries"),
        ({"retry_delay_seconds": math.inf}, "retry_delay_seconds"),
        ({"retry_delay_seconds": 86_401.0}, "retry_delay_seconds"),
        ({"retry_max_delay_seconds": -1.0}, "retry_max_delay_seconds"),
        ({"retry_backoff": 0.5}, "retry_backoff"),
        ({"retry_backoff": math.nan}, "retry_backoff"),
        ({"retry_jitter": 2.0}, "retry_jitter"),
        ({"retry_on": ("",)}, r"retry_on\[0\]"),
        ({"no_retry_on": ("x" * 1025,)}, r"no_retry_on\[0\]"),
        ({"retry_on": ("a.B",) * 65}, "65 types"),
    ):
        with pytest.raises(PipelineValidationError, match=match):
            check(**bad)


# ---- real runs on the embedded engine ----


@plait.step
def noop() -> None:
    pass


@plait.step(
    retries=3,
    retry_delay=1.0,
    retry_backoff=3.0,
    retry_max_delay=9.0,
    retry_jitter=0.25,
    retry_on=(OSError, "mypkg.errors.Flaky"),
    no_retry_on=Flaky,
)
def with_policy() -> None:
    pass


@plait.pipeline
def policy_pipeline() -> None:
    with_policy()
    noop()


class Transient(ConnectionError):
    """Raised by the steps below: a subclass of OSError and of ConnectionError."""


def _count(marks: str) -> int:
    """Counts this execution in a file of the step's own; returns how many came before."""
    path = Path(marks)
    n = int(path.read_text()) if path.exists() else 0
    path.write_text(str(n + 1))
    return n


@plait.step(retries=3, retry_delay=0.3, retry_backoff=2.0, retry_jitter=0.0)
def backs_off(marks: str) -> int:
    if _count(marks) < 3:
        raise Transient("not yet")
    return plait.get_step_context().attempt


@plait.pipeline
def backing_off(marks: str) -> None:
    backs_off(marks)


@plait.step(retries=3, retry_delay=0.2, retry_max_delay=0.2, retry_on=(OSError,))
def on_os_errors(marks: str, kind: str) -> int:
    if _count(marks) == 0:
        raise {"transient": Transient, "key": KeyError}[kind]("first attempt")
    return plait.get_step_context().attempt


@plait.pipeline
def matching(marks: str, kind: str) -> None:
    on_os_errors(marks, kind)


@plait.step(retries=3, retry_on=(Exception,), no_retry_on=(ConnectionError,))
def refused(marks: str) -> int:
    _count(marks)
    raise Transient("never retried: no_retry_on wins")


@plait.pipeline
def refusing(marks: str) -> None:
    refused(marks)


@plait.step(retries=2, retry_delay=0.1)
def once(marks: str) -> int:
    _count(marks)
    return 1


@plait.step(retries=2, retry_delay=0.1)
def fails_twice(x: int, marks: str) -> int:
    if _count(marks) < 2:
        raise ValueError("not yet")
    return x + 1


@plait.pipeline
def upstream_once(first: str, second: str) -> None:
    fails_twice(once(first), second)


@pytest.fixture
def engine(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[plait.Client]:
    monkeypatch.setenv("PLAIT_WORKERS", "2")
    c = plait.Client(home=tmp_path / "home")
    yield c
    c.shutdown()


def attempt_times(home: Path, run_id: str, step: str) -> list[tuple[float, float | None]]:
    """(created_at, ended_at) of a step's attempts, in order, from the store."""
    with sqlite3.connect(home / "plait.db") as db:
        return list(
            db.execute(
                "SELECT created_at, ended_at FROM attempts WHERE run_id = ? AND step_id = ? "
                "ORDER BY attempt",
                (run_id, step),
            )
        )


def test_backoff_delays_are_recorded_between_attempts(engine: plait.Client, tmp_path: Path) -> None:
    r = backing_off.run({"marks": str(tmp_path / "n")}, client=engine)
    assert r.status == "SUCCEEDED", r
    assert r.steps["backs_off"].output() == 4
    times = attempt_times(tmp_path / "home", r.run_id, "backs_off")
    assert len(times) == 4
    gaps = [times[k + 1][0] - (times[k][1] or 0) for k in range(3)]
    for gap, delay in zip(gaps, (0.3, 0.6, 1.2), strict=True):
        assert gap >= delay  # no jitter asked: at least the delay itself
    events = [e for batch in engine.watch(r.run_id) for e in batch]
    retrying = [e.message for e in events if e.step_status == "RETRYING"]
    assert [m.split(":")[0] for m in retrying] == [
        "retrying in 0.3 s",
        "retrying in 0.6 s",
        "retrying in 1.2 s",
    ]
    assert all(f"{__name__}.Transient: not yet" in m for m in retrying)


def test_retry_on_retries_a_subclass_and_fails_what_it_does_not_name(
    engine: plait.Client, tmp_path: Path
) -> None:
    r = matching.run({"marks": str(tmp_path / "a"), "kind": "transient"}, client=engine)
    assert r.status == "SUCCEEDED" and r.steps["on_os_errors"].output() == 2
    times = attempt_times(tmp_path / "home", r.run_id, "on_os_errors")
    assert times[1][0] - (times[0][1] or 0) >= 0.2 * 0.9  # the delay, less its jitter at most
    r = matching.run({"marks": str(tmp_path / "b"), "kind": "key"}, client=engine)
    assert r.status == "FAILED"
    step = r.steps["on_os_errors"]
    assert (step.status, step.attempt) == ("FAILED", 1)
    assert step.error is not None and step.error.type == "builtins.KeyError"
    assert step.error.types[:2] == ("builtins.KeyError", "builtins.LookupError")
    events = [e for batch in engine.watch(r.run_id) for e in batch]
    (final,) = [e for e in events if e.step_status == "FAILED"]
    assert "not retried" in final.message and "retry_on" in final.message


def test_no_retry_on_wins_over_retry_on(engine: plait.Client, tmp_path: Path) -> None:
    r = refusing.run({"marks": str(tmp_path / "n")}, client=engine)
    assert r.status == "FAILED"
    assert r.steps["refused"].attempt == 1
    assert (tmp_path / "n").read_text() == "1"  # executed once


def test_a_step_that_succeeded_is_never_executed_again(
    engine: plait.Client, tmp_path: Path
) -> None:
    first, second = tmp_path / "first", tmp_path / "second"
    r = upstream_once.run({"first": str(first), "second": str(second)}, client=engine)
    assert r.status == "SUCCEEDED"
    assert r.steps["fails_twice"].attempt == 3
    assert first.read_text() == "1"  # its downstream's retries never ran it again
    assert second.read_text() == "3"


# ---- real daemons: crashes, the crash budget, restarts ----

DAEMON_PIPELINES = '''
import os
import time

import plait


@plait.step(retries=1)
def dies(marks: str) -> int:
    """Attempt k writes its pid to marks/k; the first waits to be killed, later ones return."""
    ctx = plait.get_step_context()
    with open(os.path.join(marks, str(ctx.attempt)), "w") as f:
        f.write(str(os.getpid()))
    if ctx.attempt == 1:
        time.sleep(300)
    if ctx.attempt == 2:
        raise ValueError("a failure of the code: uses the step's one retry")
    return ctx.attempt


@plait.pipeline
def killed(marks: str) -> None:
    dies(marks)


@plait.step(retries=1, retry_delay=6.0, retry_jitter=0.0)
def later(marks: str) -> int:
    """Attempt 1 fails; attempt 2, six seconds later, writes its mark and returns."""
    ctx = plait.get_step_context()
    with open(os.path.join(marks, str(ctx.attempt)), "w") as f:
        f.write(str(time.time()))
    if ctx.attempt == 1:
        raise ValueError("retry me later")
    return ctx.attempt


@plait.pipeline
def delayed(marks: str) -> None:
    later(marks)
'''


@pytest.fixture
def project(tmp_path: Path) -> Path:
    return make_project(tmp_path, "retries-test", DAEMON_PIPELINES)


def _pid(path: Path) -> int | None:
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    return int(text) if text else None


def test_a_killed_worker_does_not_use_the_steps_retries(tmp_path: Path, project: Path) -> None:
    marks = tmp_path / "marks"
    with daemons(tmp_path / "home") as started:
        d = started[0]
        run_id = submit(d, project, "killed", f"marks={marks}")
        wait_for(lambda: _pid(marks / "1") is not None, "attempt 1 starting")
        os.kill(_pid(marks / "1") or 0, signal.SIGKILL)  # the node is gone
        run = finished(d, run_id)
        # attempt 1 CRASHED (the crash budget), attempt 2 FAILED (the step's one retry), 3 won
        assert run.status == "SUCCEEDED", run
        assert run.steps["dies"].output() == 3
        events = [e for batch in client(d).watch(run_id) for e in batch]
        retrying = [e.message for e in events if e.step_status == "RETRYING"]
        assert len(retrying) == 2
        assert "ValueError" in retrying[1]


def test_a_crash_budget_of_zero_fails_the_step_at_its_first_crash(
    tmp_path: Path, project: Path
) -> None:
    marks = tmp_path / "marks"
    with daemons(tmp_path / "home", "--crash-retries", "0") as started:
        d = started[0]
        run_id = submit(d, project, "killed", f"marks={marks}")
        wait_for(lambda: _pid(marks / "1") is not None, "attempt 1 starting")
        os.kill(_pid(marks / "1") or 0, signal.SIGKILL)
        run = finished(d, run_id)
        assert run.status == "FAILED"
        step = run.steps["dies"]
        assert (step.status, step.attempt) == ("CRASHED", 1)  # its user retry is unused
        assert not (marks / "2").exists()


def test_a_delayed_retry_survives_a_killed_daemon(tmp_path: Path, project: Path) -> None:
    marks = tmp_path / "marks"
    with daemons(tmp_path / "home") as started:
        run_id = submit(started[0], project, "delayed", f"marks={marks}")
        c = client(started[0])
        wait_for(lambda: c.get_run(run_id).steps["later"].status == "RETRYING", "the step retrying")
        with sqlite3.connect(tmp_path / "home" / "plait.db") as db:
            (retry_at,) = db.execute(
                "SELECT retry_at FROM step_runs WHERE run_id = ?", (run_id,)
            ).fetchone()
        assert retry_at is not None
        started[0].kill()
        d = restart(started)
        run = finished(d, run_id)
        assert run.status == "SUCCEEDED", run
        assert run.steps["later"].output() == 2
        # attempt 2 ran after the stored deadline, not at once when the daemon came back
        assert float((marks / "2").read_text()) >= retry_at
        with sqlite3.connect(tmp_path / "home" / "plait.db") as db:
            (cleared,) = db.execute(
                "SELECT retry_at FROM step_runs WHERE run_id = ?", (run_id,)
            ).fetchone()
        assert cleared is None
