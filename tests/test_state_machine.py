"""The scheduler's state machine alone: no database, no processes. Commands go in, effects come
out; the lookups it needs are dictionaries. (tests/test_scheduler.py runs it on real stores.)"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any

import networkx as nx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import dags

from plait._models import ArtifactInfo, RunStatus, StepError, StepStatus
from plait.engine._json import plain
from plait.engine.scheduler import (
    RUN_TRANSITIONS,
    STEP_TRANSITIONS,
    Beat,
    CancelRun,
    Completed,
    CreateRun,
    Effects,
    Expire,
    Failed,
    Heartbeat,
    IllegalTransitionError,
    Lease,
    Logs,
    Metadata,
    Release,
    RetrySource,
    RunCreated,
    Scheduler,
    Started,
    StepState,
    StoredRun,
    StoredStep,
    TaskOrder,
    Token,
)
from plait.engine.scheduler._machine import DEFAULT_CRASH_RETRIES, DEFAULT_QUEUE_TIMEOUT
from plait.errors import InUseError, ParameterError, PipelineNotFoundError, RunNotFoundError
from plait.ir.v1 import ir_pb2

VERSION = "v1"


def spec_of(g: nx.DiGraph, retries: int = 0, cache: bool = True) -> ir_pb2.PipelineSpec:
    """A pipeline with one step per node, each reading the outputs of its predecessors."""
    spec = ir_pb2.PipelineSpec(name="p")
    for j in sorted(g.nodes):
        step = spec.steps.add(id=f"n{j}", name=f"n{j}")
        step.code.module, step.code.qualname, step.code.code_digest = "m", f"n{j}", f"code{j}"
        for i in sorted(g.predecessors(j)):
            step.inputs.add(
                name=f"x{i}",
                binding=ir_pb2.Binding(output=ir_pb2.OutputRef(step_id=f"n{i}", output="output")),
            )
        step.outputs.add(name="output", type=ir_pb2.TypeSpec(expr="int"))
        step.settings.retries = retries
        step.settings.cache = cache
    return spec


class MemoryLookups:
    """The scheduler's Lookups port over dictionaries, updated from committed effects."""

    def __init__(self, *specs: ir_pb2.PipelineSpec) -> None:
        self.specs = {VERSION if i == 0 else f"v{i + 1}": s for i, s in enumerate(specs)}
        self.cache: dict[str, dict[str, ArtifactInfo]] = {}
        self.requests: dict[str, str] = {}
        self.retries: dict[str, RetrySource] = {}

    def run_for_request(self, request_id: str) -> str | None:
        return self.requests.get(request_id)

    def pipeline_spec(self, version: str) -> ir_pb2.PipelineSpec:
        if version not in self.specs:
            raise PipelineNotFoundError(f"no pipeline version {version!r} is registered")
        return self.specs[version]

    def active_stack(self) -> str:
        return "default"

    def stack_runner(self, stack: str) -> str:
        return "local"

    def cached_outputs(self, key: str) -> dict[str, ArtifactInfo] | None:
        return self.cache.get(key)

    def retry_source(self, run_id: str) -> RetrySource:
        if run_id not in self.retries:
            raise RunNotFoundError(f"no run {run_id!r}")
        return self.retries[run_id]

    def commit(self, fx: Effects) -> Effects:
        for e in fx.cache_entries:
            # a JSON column's value may come as its text (JsonText), as the store writes it
            outputs = {k: ArtifactInfo.from_json(v) for k, v in plain(e["outputs"]).items()}
            self.cache.setdefault(e["key"], outputs)
        for row in fx.run_inserts:
            if row["request_id"]:
                self.requests[row["request_id"]] = row["id"]
        return fx


class Machine:
    """A scheduler, its lookups and a clock."""

    def __init__(self, *specs: ir_pb2.PipelineSpec) -> None:
        self.scheduler = Scheduler()
        self.lookups = MemoryLookups(*specs)
        self.now = 1000.0

    def apply(self, *commands: Any) -> Effects:
        self.now += 1
        return self.lookups.commit(self.scheduler.apply(commands, self.now, self.lookups))

    def create(self, version: str = VERSION, **kw: Any) -> tuple[str, Effects]:
        cmd = CreateRun(version, {}, **kw)
        fx = self.apply(cmd)
        created = fx.replies[id(cmd)]
        assert isinstance(created, RunCreated), created
        return created.run_id, fx


def output(token: Token, value: int = 1) -> ArtifactInfo:
    return ArtifactInfo(
        f"art-{token.step_id}-{token.attempt}",
        "output",
        f"{value:064x}",
        1,
        "file:///x",
        "plait.json",
        "builtins.int",
        False,
        token.run_id,
        token.step_id,
    )


def done(task: TaskOrder, value: int = 1) -> Completed:
    return Completed(task.token, (output(task.token, value),))


def by_step(tasks: Iterable[TaskOrder]) -> dict[str, TaskOrder]:
    return {t.token.step_id: t for t in tasks}


CHAIN = nx.DiGraph([(0, 1), (1, 2)])


# ---- the tables ----


def test_the_tables_cover_every_status_and_final_ones_are_left_by_nothing() -> None:
    assert set(STEP_TRANSITIONS) == set(StepStatus)
    assert set(RUN_TRANSITIONS) == set(RunStatus)
    for status, nexts in STEP_TRANSITIONS.items():
        assert (not nexts) == status.is_final, status
    for run_status, run_nexts in RUN_TRANSITIONS.items():
        assert (not run_nexts) == run_status.is_final, run_status


def test_an_illegal_transition_is_refused() -> None:
    st = StepState(spec=ir_pb2.StepSpec(id="s"), position=0, status=StepStatus.SUCCEEDED)
    with pytest.raises(IllegalTransitionError, match="SUCCEEDED -> RUNNING"):
        st.move(StepStatus.RUNNING)
    assert st.status is StepStatus.SUCCEEDED
    pending = StepState(spec=ir_pb2.StepSpec(id="s"), position=0)
    with pytest.raises(IllegalTransitionError):
        pending.move(StepStatus.SUCCEEDED)  # never without being queued and run


# ---- commands and their effects ----


def test_a_new_run_queues_its_roots_in_the_same_effects() -> None:
    m = Machine(spec_of(nx.DiGraph([(0, 2), (1, 2)])))
    run_id, fx = m.create()
    assert sorted(by_step(fx.tasks)) == ["n0", "n1"]
    assert [r["id"] for r in fx.run_inserts] == [run_id]
    assert {r["step_id"] for r in fx.step_inserts} == {"n0", "n1", "n2"}
    assert fx.run_updates == {}
    statuses = {(e.step_id, e.step_status) for e in fx.events if e.step_id}
    assert statuses == {("n0", StepStatus.QUEUED), ("n1", StepStatus.QUEUED)}
    assert [e.run_status for e in fx.events if not e.step_id] == [RunStatus.RUNNING]


def test_a_chain_runs_step_by_step_and_the_run_ends() -> None:
    m = Machine(spec_of(CHAIN))
    run_id, fx = m.create()
    for expected in ("n1", "n2"):
        (task,) = fx.tasks
        fx = m.apply(done(task))
        assert [t.token.step_id for t in fx.tasks] == [expected]
        # the upstream's output is handed to the next step
        (_, (kind, info)) = fx.tasks[0].inputs[0]
        assert kind == "artifact" and info.step_id == task.token.step_id
    fx = m.apply(done(fx.tasks[0]))
    assert fx.run_updates[run_id]["status"] == RunStatus.SUCCEEDED
    assert run_id not in m.scheduler.runs


def test_a_second_run_is_served_from_the_cache_without_a_task() -> None:
    m = Machine(spec_of(CHAIN))
    _, fx = m.create()
    while fx.tasks:
        fx = m.apply(*(done(t) for t in fx.tasks))
    run_id, fx = m.create()
    assert fx.tasks == []
    assert fx.run_updates[run_id]["status"] == RunStatus.SUCCEEDED
    cached = [e.step_id for e in fx.events if e.step_status is StepStatus.CACHED]
    assert sorted(cached) == ["n0", "n1", "n2"]
    _, fx = m.create(no_cache=True)
    assert [t.token.step_id for t in fx.tasks] == ["n0"]


def test_a_retry_reuses_what_succeeded_and_runs_the_rest_without_the_cache() -> None:
    # a diamond n0 -> n1, n0 -> n2, n1 -> n3, n2 -> n3; no step caches
    m = Machine(spec_of(nx.DiGraph([(0, 1), (0, 2), (1, 3), (2, 3)]), cache=False))
    old, fx = m.create()
    root = fx.tasks[0]
    fx = m.apply(done(root))
    tasks = by_step(fx.tasks)
    fx = m.apply(done(tasks["n1"]), Failed(tasks["n2"].token, StepError("E", "boom")))
    assert fx.run_updates[old]["status"] == RunStatus.FAILED
    outputs = {"n0": {"output": output(root.token)}, "n1": {"output": output(tasks["n1"].token)}}
    m.lookups.retries[old] = RetrySource(old, RunStatus.FAILED, VERSION, {}, "", "", False, outputs)
    new, fx = m.create(retry_of=old)
    assert [t.token.step_id for t in fx.tasks] == ["n2"]  # the failed step, nothing else
    cached = {e.step_id: e.message for e in fx.events if e.step_status is StepStatus.CACHED}
    assert cached == {"n0": f"reused from run {old}", "n1": f"reused from run {old}"}
    assert fx.run_inserts[0]["retry_of"] == old and fx.run_inserts[0]["version"] == VERSION
    fx = m.apply(done(fx.tasks[0]))
    fx = m.apply(done(fx.tasks[0]))  # n3, downstream of the failed step, runs
    assert fx.run_updates[new]["status"] == RunStatus.SUCCEEDED
    # a run that has not ended is not retried; an unknown one is not found
    m.lookups.retries["busy"] = RetrySource(
        "busy", RunStatus.RUNNING, VERSION, {}, "", "", False, {}
    )
    for run_id, error in (("busy", InUseError), ("nope", RunNotFoundError)):
        cmd = CreateRun("", {}, retry_of=run_id)
        assert isinstance(m.apply(cmd).replies[id(cmd)], error)


def test_a_stale_or_repeated_report_changes_nothing() -> None:
    m = Machine(spec_of(CHAIN))
    run_id, fx = m.create()
    (task,) = fx.tasks
    stale = Token(run_id, "n0", task.token.attempt, task.token.epoch + 1)
    quiet = m.apply(
        Completed(stale, (output(stale),)),
        Started(Token(run_id, "n0", 9, 1)),
        Logs(Token("no-such-run", "n0", 1, 1), "stdout", "x"),
    )
    assert quiet == Effects()
    first = m.apply(done(task))
    assert len(first.tasks) == 1
    assert m.apply(done(task)) == Effects()  # the first completion of an attempt wins


def test_a_failure_with_retries_left_queues_a_new_attempt() -> None:
    m = Machine(spec_of(nx.DiGraph([(0, 1)]), retries=1))
    run_id, fx = m.create()
    (task,) = fx.tasks
    fx = m.apply(Failed(task.token, StepError("builtins.ValueError", "boom")))
    (retry,) = fx.tasks
    assert retry.token.attempt == 2
    assert [e.step_status for e in fx.events] == [StepStatus.RETRYING, StepStatus.QUEUED]
    assert fx.attempt_updates[(run_id, "n0", 1)]["status"] == StepStatus.FAILED
    fx = m.apply(Failed(retry.token, StepError("builtins.ValueError", "again")))
    assert fx.tasks == []
    assert fx.step_updates[(run_id, "n0")]["status"] == StepStatus.FAILED
    assert fx.step_updates[(run_id, "n1")]["status"] == StepStatus.SKIPPED
    assert fx.run_updates[run_id]["status"] == RunStatus.FAILED


def test_an_interrupted_step_cancels_its_run_whether_or_not_the_cancel_came_first() -> None:
    """Ctrl-C reaches `plait run` (which cancels the run) and its engine's workers (whose step
    raises KeyboardInterrupt) at once: either report may come first, and the run is CANCELLED."""
    interrupted = StepError("builtins.KeyboardInterrupt", "", types=("builtins.KeyboardInterrupt",))
    for cancel_first in (False, True):
        m = Machine(spec_of(nx.DiGraph([(0, 1), (0, 2)]), retries=3))
        run_id, fx = m.create()
        (task,) = fx.tasks
        fx = m.apply(done(task))
        first, second = fx.tasks
        commands = [Failed(first.token, interrupted), CancelRun(run_id)]
        fx = m.apply(*(reversed(commands) if cancel_first else commands))
        assert fx.tasks == []  # no retry, for all its retries
        assert fx.run_updates[run_id]["status"] == RunStatus.CANCELLED
        assert {fx.step_updates[(run_id, t.token.step_id)]["status"] for t in (first, second)} == {
            StepStatus.CANCELLED
        }
        assert second.token in fx.cancels  # the other step's attempt is stopped
    # a failure of the step's code is a failure, as before
    m = Machine(spec_of(nx.DiGraph([(0, 1)])))
    run_id, fx = m.create()
    (task,) = fx.tasks
    fx = m.apply(Failed(task.token, StepError("builtins.ValueError", "boom")))
    assert fx.run_updates[run_id]["status"] == RunStatus.FAILED


def test_crashes_draw_on_their_own_budget_and_never_on_the_steps_retries() -> None:
    m = Machine(spec_of(nx.DiGraph([(0, 1)]), retries=1))
    run_id, fx = m.create()
    (task,) = fx.tasks
    lost = StepError("plait.WorkerLost", "gone")
    for attempt in range(1, DEFAULT_CRASH_RETRIES + 1):  # every crash is retried
        fx = m.apply(Failed(task.token, lost, crashed=True))
        (task,) = fx.tasks
        assert task.token.attempt == attempt + 1
    # the step's own retry is still there for a failure of its code
    fx = m.apply(Failed(task.token, StepError("builtins.ValueError", "boom")))
    (task,) = fx.tasks
    fx = m.apply(Failed(task.token, lost, crashed=True))
    assert fx.tasks == []  # the crash budget is spent: CRASHED for good
    assert fx.step_updates[(run_id, "n0")]["status"] == StepStatus.CRASHED
    assert fx.run_updates[run_id]["status"] == RunStatus.FAILED


def test_a_lease_is_kept_by_heartbeats_and_an_expired_one_crashes_the_attempt() -> None:
    m = Machine(spec_of(nx.DiGraph([(0, 1)])))
    run_id, fx = m.create()
    (task,) = fx.tasks
    lease = Lease(task.token, "w1", "host:1", ask=True)
    assert m.apply(lease).replies[id(lease)] is True
    other = Lease(task.token, "w2", "host:2", ask=True)
    assert m.apply(other).replies[id(other)] is False  # one holder at a time
    beat = Heartbeat(task.token, ask=True)
    answer = m.apply(beat).replies[id(beat)]
    assert answer == Beat(alive=True, lease_seconds=m.scheduler.lease_seconds)
    m.now += m.scheduler.lease_seconds - 2  # renewed one second ago: still held
    assert m.apply(Expire()).tasks == []
    m.now += 10
    fx = m.apply(Expire())
    assert fx.attempt_updates[(run_id, "n0", 1)]["status"] == StepStatus.CRASHED
    assert fx.cancels == [task.token]
    (retry,) = fx.tasks
    assert retry.token.attempt == 2
    # the old holder's reports are refused and change nothing
    late = Completed(task.token, (output(task.token),), ask=True)
    fx = m.apply(late)
    assert fx.replies[id(late)] is False and not fx.step_updates
    beat = Heartbeat(task.token, ask=True)
    assert m.apply(beat).replies[id(beat)] == Beat(alive=False)


def test_a_timeout_runs_from_the_hand_off_and_asks_the_worker_to_stop() -> None:
    spec = spec_of(nx.DiGraph([(0, 2), (1, 2)]))  # n1 keeps the run going
    spec.steps[0].settings.timeout_seconds = 5
    m = Machine(spec)
    run_id, fx = m.create()
    task = by_step(fx.tasks)["n0"]
    m.apply(Lease(task.token, "w1", "1"))  # no start report ever comes
    m.now += 10
    fx = m.apply(Expire())
    assert fx.attempt_updates[(run_id, "n0", 1)]["status"] == StepStatus.FAILED
    assert "timeout of 5 s" in fx.step_updates[(run_id, "n0")]["error"]["message"]
    assert fx.cancels == [task.token]
    beat = Heartbeat(task.token, ask=True)
    assert m.apply(beat).replies[id(beat)] == Beat(alive=True, cancel=True)


def test_a_released_attempt_is_handed_out_again_under_the_next_epoch() -> None:
    m = Machine(spec_of(nx.DiGraph([(0, 1)])))
    run_id, fx = m.create()
    (task,) = fx.tasks
    m.apply(Lease(task.token, "w1", "1"))
    release = Release(task.token, ask=True)
    fx = m.apply(release)
    assert fx.replies[id(release)] is True
    (again,) = fx.tasks
    assert (again.token.attempt, again.token.epoch) == (1, 2)
    stale = Started(task.token, ask=True)
    assert m.apply(stale).replies[id(stale)] is False  # fenced off
    fx = m.apply(Lease(again.token, "w2", "2"), done(again))
    assert fx.step_updates[(run_id, "n0")]["status"] == StepStatus.SUCCEEDED


def test_a_queued_attempt_no_worker_takes_fails_at_its_queue_deadline() -> None:
    spec = spec_of(nx.DiGraph([(0, 1)]))
    spec.steps[0].settings.pool = "gpu"
    m = Machine(spec)
    run_id, fx = m.create()
    (task,) = fx.tasks
    assert task.pool == "gpu"
    m.now += DEFAULT_QUEUE_TIMEOUT + 1
    fx = m.apply(Expire())
    assert fx.step_updates[(run_id, "n0")]["status"] == StepStatus.CRASHED
    assert "pool 'gpu'" in fx.step_updates[(run_id, "n0")]["error"]["message"]


def test_a_log_batch_sent_twice_is_stored_once() -> None:
    m = Machine(spec_of(nx.DiGraph([(0, 1)])))
    _, fx = m.create()
    (task,) = fx.tasks
    first = m.apply(Logs(task.token, "stdout", "a\n", 1, (("stderr", "b\n"),)))
    assert [row["text"] for row in first.logs] == ["a\n", "b\n"]
    assert m.apply(Logs(task.token, "stdout", "a\n", 1, (("stderr", "b\n"),))).logs == []
    assert [row["text"] for row in m.apply(Logs(task.token, "stdout", "c\n", 2)).logs] == ["c\n"]


def test_cancelling_stops_what_runs_and_ends_the_run_once() -> None:
    m = Machine(spec_of(nx.DiGraph([(0, 2), (1, 2)])))
    run_id, fx = m.create()
    m.apply(Started(fx.tasks[0].token))
    cancel = CancelRun(run_id)
    fx2 = m.apply(cancel)
    assert fx2.replies[id(cancel)] is True
    assert sorted(t.step_id for t in fx2.cancels) == ["n0", "n1"]
    assert {v["status"] for v in fx2.step_updates.values()} == {StepStatus.CANCELLED}
    assert fx2.run_updates[run_id]["status"] == RunStatus.CANCELLED
    again = CancelRun(run_id)
    assert m.apply(again).replies[id(again)] is False
    assert m.apply(done(fx.tasks[1])) == Effects()  # a report after the end: nothing


def test_a_request_id_makes_one_run_within_and_across_batches() -> None:
    m = Machine(spec_of(CHAIN))
    a, b = CreateRun(VERSION, {}, request_id="r1"), CreateRun(VERSION, {}, request_id="r1")
    fx = m.apply(a, b)
    first, second = fx.replies[id(a)], fx.replies[id(b)]
    assert isinstance(first, RunCreated) and isinstance(second, RunCreated)
    assert first.created and not second.created and first.run_id == second.run_id
    later = CreateRun(VERSION, {}, request_id="r1")
    assert m.apply(later).replies[id(later)] == RunCreated(first.run_id, created=False)


def test_a_bad_create_fails_only_itself() -> None:
    m = Machine(spec_of(CHAIN))
    bad, unknown, good = (
        CreateRun(VERSION, {"nope": "1"}),
        CreateRun("missing", {}),
        CreateRun(VERSION, {}),
    )
    fx = m.apply(bad, unknown, good)
    assert isinstance(fx.replies[id(bad)], ParameterError)
    assert isinstance(fx.replies[id(unknown)], PipelineNotFoundError)
    assert isinstance(fx.replies[id(good)], RunCreated)
    assert len(fx.run_inserts) == 1


def test_recovery_crashes_lost_attempts_and_queues_them_again() -> None:
    m = Machine(spec_of(CHAIN))
    finished = output(Token("r", "n0", 1, 1))
    stored = StoredRun(
        run_id="r",
        version=VERSION,
        parameters={},
        no_cache=False,
        stack="default",
        steps=[
            StoredStep("n0", StepStatus.SUCCEEDED, 1, "k0", {"output": finished}, {}),
            StoredStep("n1", StepStatus.RUNNING, 1, "k1", None, {}),
            StoredStep("n2", StepStatus.PENDING, 0, None, None, {}),
        ],
    )
    fx = m.scheduler.recover([stored], m.now, m.lookups)
    assert fx.attempt_updates[("r", "n1", 1)]["status"] == StepStatus.CRASHED
    (task,) = fx.tasks
    assert (task.token.step_id, task.token.attempt) == ("n1", 2)
    (_, (kind, info)) = task.inputs[0]
    assert kind == "artifact" and info == finished  # nothing that succeeded runs again


def test_recovery_hands_out_queued_attempts_again_and_keeps_live_leases() -> None:
    m = Machine(spec_of(nx.DiGraph([(0, 2), (1, 2)])))
    far = m.now + 100
    stored = StoredRun(
        run_id="r",
        version=VERSION,
        parameters={},
        no_cache=False,
        stack="default",
        steps=[
            # queued, no holder: the durable queue hands out the very same attempt
            StoredStep("n0", StepStatus.QUEUED, 1, "k0", None, {}, epoch=1, runner="local"),
            # running on a worker that may still be alive: re-attached, not run again
            StoredStep(
                "n1",
                StepStatus.RUNNING,
                1,
                "k1",
                None,
                {},
                epoch=1,
                runner="local",
                pool="gpu",
                holder="w1",
                handle="host:7",
                lease_expires=far,
            ),
            StoredStep("n2", StepStatus.PENDING, 0, None, None, {}),
        ],
    )
    fx = m.scheduler.recover([stored], m.now, m.lookups, lambda runner, handle: None)
    (task,) = fx.tasks
    assert (task.token.step_id, task.token.attempt, task.token.epoch) == ("n0", 1, 1)
    assert not fx.attempt_updates
    reattached = Token("r", "n1", 1, 1)
    beat = Heartbeat(reattached, ask=True)
    assert m.apply(beat).replies[id(beat)].alive
    m.now = far + m.scheduler.lease_seconds + 1  # it never heartbeats again
    fx = m.apply(Expire())
    assert fx.attempt_updates[("r", "n1", 1)]["status"] == StepStatus.CRASHED


# ---- properties over random DAGs, failures and cancellations ----


@settings(max_examples=60, deadline=None)
@given(g=dags(max_steps=10), data=st.data(), retries=st.integers(0, 2))
def test_every_run_ends_and_no_step_starts_before_its_upstreams(
    g: nx.DiGraph, data: st.DataObject, retries: int
) -> None:
    m = Machine(spec_of(g, retries=retries, cache=data.draw(st.booleans(), label="cache")))
    runs = [m.create()[1] for _ in range(data.draw(st.integers(1, 3), label="runs"))]
    outstanding: list[TaskOrder] = [t for fx in runs for t in fx.tasks]
    status: dict[tuple[str, str], StepStatus] = {}
    ended: dict[str, RunStatus] = {}

    def record(fx: Effects) -> None:
        for e in fx.events:
            if e.step_id:
                assert e.step_status is not None
                status[(e.run_id, e.step_id)] = e.step_status
            else:
                assert e.run_status is not None
                assert e.run_id not in ended, "a run ended twice"
                if e.run_status.is_final:
                    ended[e.run_id] = e.run_status
        for task in fx.tasks:  # queued only once every upstream has its outputs
            for up in g.predecessors(int(task.token.step_id[1:])):
                assert status[(task.token.run_id, f"n{up}")].is_success
        stopped = set(fx.cancels)
        outstanding[:] = [t for t in outstanding if t.token not in stopped] + fx.tasks

    for fx in runs:
        record(fx)
    for _ in range(200):
        if not outstanding:
            break
        task = outstanding.pop(data.draw(st.integers(0, len(outstanding) - 1), label="pick"))
        what = data.draw(
            st.sampled_from(["done", "done", "done", "fail", "crash", "start", "cancel"]),
            label="outcome",
        )
        if what == "start":
            record(m.apply(Started(task.token)))
            outstanding.append(task)
        elif what == "cancel":
            record(m.apply(CancelRun(task.token.run_id)))
            assert m.apply(done(task)) == Effects()  # its report comes too late
        elif what == "done":
            record(m.apply(done(task, data.draw(st.integers(0, 3), label="value"))))
        else:
            error = StepError("builtins.RuntimeError", what)
            record(m.apply(Failed(task.token, error, crashed=what == "crash")))
    assert outstanding == []
    assert m.scheduler.runs == {}, "every run reached a final status"
    assert len(ended) == len(runs)
    for (run_id, step_id), s in status.items():
        assert s.is_final, (run_id, step_id, s)
    for run_id, run_status in ended.items():
        steps = [s for (r, _), s in status.items() if r == run_id]
        if run_status is RunStatus.SUCCEEDED:
            assert len(steps) == len(g) and all(s.is_success for s in steps)


# ---- a failed transaction: rollback, then restore from the store ----


class Rows:
    """What the store holds of runs, steps and attempts: the rows of committed effects."""

    def __init__(self) -> None:
        self.runs: dict[str, dict[str, Any]] = {}
        self.steps: dict[tuple[str, str], dict[str, Any]] = {}
        self.attempts: dict[tuple[str, str, int], dict[str, Any]] = {}

    def commit(self, fx: Effects) -> Effects:
        for r in fx.run_inserts:
            self.runs[r["id"]] = dict(r)
        for r in fx.step_inserts:
            self.steps[(r["run_id"], r["step_id"])] = dict(r)
        for r in fx.attempt_inserts:
            self.attempts[(r["run_id"], r["step_id"], r["attempt"])] = dict(r)
        for run_id, values in fx.run_updates.items():
            self.runs[run_id].update(values)
        for step_key, values in fx.step_updates.items():
            self.steps[step_key].update(values)
        for attempt_key, values in fx.attempt_updates.items():
            self.attempts[attempt_key].update(values)
        return fx

    def stored(self, run_ids: Iterable[str]) -> list[StoredRun]:
        """As store/_scheduling.load_active_runs reads them."""
        out = []
        for run_id in sorted(run_ids):
            run = self.runs.get(run_id)
            if run is None or RunStatus(run["status"]).is_final:
                continue
            steps = []
            for (r, step_id), row in self.steps.items():
                if r != run_id:
                    continue
                attempt = self.attempts.get((run_id, step_id, row["attempt"]))
                outputs = plain(row.get("outputs"))  # (as the store reads a JsonText back)
                steps.append(
                    StoredStep(
                        step_id,
                        StepStatus(row["status"]),
                        row["attempt"],
                        row.get("cache_key"),
                        {k: ArtifactInfo.from_json(v) for k, v in outputs.items()}
                        if outputs is not None
                        else None,
                        dict(row.get("step_metadata") or {}),
                        epoch=attempt["epoch"] if attempt else 0,
                        crashes=sum(
                            1
                            for (r2, s2, _), a in self.attempts.items()
                            if (r2, s2) == (run_id, step_id) and a["status"] == "CRASHED"
                        ),
                        runner=attempt["runner"] if attempt else "",
                        pool=(attempt.get("pool") or "") if attempt else "",
                        holder=attempt.get("holder") if attempt else None,
                        handle=attempt.get("handle") if attempt else None,
                        lease_expires=attempt.get("lease_expires_at") if attempt else None,
                        queue_deadline=attempt.get("queue_deadline") if attempt else None,
                        close_deadline=attempt.get("close_deadline") if attempt else None,
                        log_batch=attempt.get("log_batch", 0) if attempt else 0,
                        retry_at=row.get("retry_at"),
                    )
                )
            out.append(
                StoredRun(
                    run_id, run["version"], run["parameters"], run["no_cache"], run["stack"], steps
                )
            )
        return out


class DurableMachine(Machine):
    """A machine whose committed effects are kept as rows, and whose transactions can fail."""

    def __init__(self, *specs: ir_pb2.PipelineSpec) -> None:
        super().__init__(*specs)
        self.rows = Rows()

    def apply(self, *commands: Any) -> Effects:
        fx = self.rows.commit(super().apply(*commands))
        self.scheduler.committed()
        return fx

    def fail(self, *commands: Any) -> Effects:
        """Applies a batch whose transaction then fails: nothing of it reaches the store (nor
        the cache), and the view is rolled back and restored from the rows."""
        self.now += 1
        fx = self.scheduler.apply(commands, self.now, self.lookups)
        self.restore()
        return fx

    def restore(self) -> None:
        missing = self.scheduler.rollback()
        self.scheduler.restore(self.rows.stored(missing), self.lookups)


def snapshot(m: Machine) -> dict[str, Any]:
    return copy.deepcopy(m.scheduler.runs)


def test_a_failed_batch_leaves_the_view_as_it_was_before_it() -> None:
    fan_in = nx.DiGraph([(0, 2), (1, 2), (2, 3)])
    m = DurableMachine(spec_of(fan_in, retries=1))
    a, fx_a = m.create()
    b, fx_b = m.create(no_cache=True)
    c, _ = m.create(no_cache=True)
    tasks_a, tasks_b = by_step(fx_a.tasks), by_step(fx_b.tasks)
    m.apply(Started(tasks_a["n0"].token), Started(tasks_b["n1"].token))
    fx = m.apply(done(tasks_b["n0"]), done(tasks_b["n1"]))  # b's n2 is queued
    n2 = by_step(fx.tasks)["n2"]
    m.apply(Metadata(n2.token, "output", {"rows": 3}), Metadata(n2.token, "", {"phase": 1}))
    before, cached = snapshot(m), dict(m.lookups.cache)
    assert set(before) == {a, b, c}

    new = CreateRun(VERSION, {})
    cancel = CancelRun(c)
    m.fail(
        done(tasks_a["n0"]),
        Failed(tasks_a["n1"].token, StepError("builtins.ValueError", "x")),  # a retry
        done(n2),  # b's n3 would be queued
        Metadata(n2.token, "", {"phase": 2}),
        Logs(n2.token, "stdout", "hello"),
        cancel,
        new,
        Started(Token("no-such-run", "n0", 1, 1)),
    )
    assert snapshot(m) == before
    assert m.lookups.cache == cached  # nothing of it was committed

    # tried again, the batch does what it would have done the first time
    fx = m.apply(done(n2), cancel, new)
    assert fx.replies[id(cancel)] is True
    assert isinstance(fx.replies[id(new)], RunCreated)
    assert [t.token.step_id for t in fx.tasks if t.token.run_id == b] == ["n3"]
    # the output's metadata, held only in memory, survived the failed batch
    (artifact,) = fx.artifacts
    assert artifact["artifact_metadata"] == {"rows": 3}


def test_a_restored_attempt_keeps_its_lease_and_finishes_the_run() -> None:
    m = DurableMachine(spec_of(CHAIN))
    run_id, fx = m.create()
    (task,) = fx.tasks
    m.apply(Started(task.token))
    before = snapshot(m)
    m.fail(done(task))
    assert snapshot(m) == before
    st = m.scheduler.runs[run_id].steps["n0"]
    assert (st.status, st.attempt, st.epoch) == (StepStatus.RUNNING, 1, 1)
    assert st.material is not None and st.key == m.rows.steps[(run_id, "n0")]["cache_key"]
    while fx.tasks:  # the worker's report, sent again, is still current
        fx = m.apply(*(done(t) for t in fx.tasks))
    assert m.rows.runs[run_id]["status"] == RunStatus.SUCCEEDED
    assert m.scheduler.runs == {}


def test_a_failed_abort_is_rolled_back_too() -> None:
    m = DurableMachine(spec_of(CHAIN))
    run_id, _ = m.create()
    before = snapshot(m)
    aborted = m.scheduler.abort([run_id], m.now, "boom", RunStatus.FAILED)
    assert aborted.cancels and run_id not in m.scheduler.runs
    m.restore()
    assert snapshot(m) == before
    m.restore()  # again: nothing more to undo
    assert snapshot(m) == before


def test_restore_forgets_runs_the_store_no_longer_has_active() -> None:
    m = DurableMachine(spec_of(CHAIN))
    run_id, _ = m.create()
    m.scheduler.apply([CancelRun(run_id)], m.now, m.lookups)
    m.rows.runs[run_id]["status"] = RunStatus.CANCELLED  # ended by someone else meanwhile
    m.restore()
    assert m.scheduler.runs == {}


@settings(max_examples=40, deadline=None)
@given(g=dags(max_steps=8), data=st.data())
def test_any_failed_batch_is_undone_exactly(g: nx.DiGraph, data: st.DataObject) -> None:
    m = DurableMachine(spec_of(g, retries=data.draw(st.integers(0, 1), label="retries")))
    outstanding = [
        t for _ in range(data.draw(st.integers(1, 3), label="runs")) for t in m.create()[1].tasks
    ]

    def commands(n: int) -> list[Any]:
        out: list[Any] = []
        for _ in range(n):
            if not outstanding:
                break
            task = outstanding[data.draw(st.integers(0, len(outstanding) - 1), label="pick")]
            what = data.draw(
                st.sampled_from(["done", "fail", "start", "meta", "cancel", "create"]),
                label="what",
            )
            if what == "done":
                out.append(done(task, data.draw(st.integers(0, 2), label="value")))
            elif what == "fail":
                out.append(Failed(task.token, StepError("builtins.RuntimeError", "x")))
            elif what == "start":
                out.append(Started(task.token))
            elif what == "meta":
                out.append(Metadata(task.token, "output", {"n": 1}))
            elif what == "cancel":
                out.append(CancelRun(task.token.run_id))
            else:
                out.append(CreateRun(VERSION, {}))
        return out

    for _ in range(12):
        if not outstanding:
            break
        batch = commands(data.draw(st.integers(1, 4), label="size"))
        if data.draw(st.booleans(), label="fails"):
            before = snapshot(m)
            m.fail(*batch)
            assert snapshot(m) == before
        fx = m.apply(*batch)
        stopped = set(fx.cancels)
        finished = {c.token for c in batch if isinstance(c, Completed | Failed)}
        outstanding[:] = [
            t for t in outstanding if t.token not in stopped and t.token not in finished
        ] + fx.tasks


def test_a_transaction_that_fails_before_the_batch_is_applied_undoes_nothing() -> None:
    # the database was busy at BEGIN: the scheduler never saw the batch, and what it committed
    # before (a run it just created) stays
    m = DurableMachine(spec_of(CHAIN))
    run_id, _ = m.create()
    before = snapshot(m)
    m.restore()
    assert snapshot(m) == before and run_id in m.scheduler.runs


def test_the_reapers_heap_holds_about_what_is_due(monkeypatch: pytest.MonkeyPatch) -> None:
    from plait.engine.scheduler import _machine

    monkeypatch.setattr(_machine, "COMPACT_EVERY", 8)
    m = Machine(spec_of(nx.DiGraph([(i, i + 1) for i in range(40)])))
    _, fx = m.create()
    while fx.tasks:
        (task,) = fx.tasks
        fx = m.apply(done(task))
    # every attempt ended long before its queue deadline: at most a compaction's worth is left
    assert len(m.scheduler._deadlines) <= 8


def test_recovery_that_fails_a_runs_last_step_ends_the_run_once() -> None:
    """A container gone at a restart, no crash retries left, and no other open step: the
    failure ends the run, and recovery does not end it a second time (the control plane would
    not start)."""
    m = Machine(spec_of(nx.DiGraph([(0, 1)])))
    m.scheduler = Scheduler(crash_retries=0)
    finished = output(Token("r", "n0", 1, 1))
    stored = StoredRun(
        run_id="r",
        version=VERSION,
        parameters={},
        no_cache=False,
        stack="default",
        steps=[
            StoredStep("n0", StepStatus.SUCCEEDED, 1, "k0", {"output": finished}, {}),
            StoredStep(
                "n1",
                StepStatus.RUNNING,
                1,
                "k1",
                None,
                {},
                epoch=1,
                runner="docker",
                holder="runner:docker",
                handle="plait-r-n1-1-1",
                lease_expires=m.now + 100,
            ),
        ],
    )
    fx = m.scheduler.recover([stored], m.now, m.lookups, lambda runner, handle: False)
    assert fx.attempt_updates[("r", "n1", 1)]["status"] == StepStatus.CRASHED
    assert fx.run_updates["r"]["status"] == RunStatus.FAILED
    assert not fx.tasks
