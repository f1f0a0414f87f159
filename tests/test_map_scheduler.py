"""Mapped steps (``step.map``) in the scheduler's state machine alone: a step with a map binding
makes one step run per item once its list is known, each with its own cache key; what reads it
gets the list; a failed item fails the mapped step only once every item ended; a failed batch
and a restarted control plane rebuild the items from the store. (tests/test_map.py runs maps
for real, embedded and through a daemon.)"""

from __future__ import annotations

import copy
import json
from typing import Any

from test_state_machine import VERSION, DurableMachine, Machine, by_step

from plait._models import ArtifactInfo, RunStatus, StepError, StepStatus
from plait.engine.scheduler import Completed, Effects, Failed, RunCreated, Scheduler, TaskOrder
from plait.engine.scheduler._machine import StoredRun
from plait.ir.canonical import canonical_json
from plait.ir.mapping import MAX_MAP_ITEMS, item_name
from plait.ir.v1 import ir_pb2


def _step(spec: ir_pb2.PipelineSpec, step_id: str) -> ir_pb2.StepSpec:
    step = spec.steps.add(id=step_id, name=step_id)
    step.code.module, step.code.qualname, step.code.code_digest = "m", step_id, f"code-{step_id}"
    step.outputs.add(name="output", type=ir_pb2.TypeSpec(expr="int"))
    return step


def _ref(step_id: str) -> ir_pb2.Binding:
    return ir_pb2.Binding(output=ir_pb2.OutputRef(step_id=step_id, output="output"))


def fan(*, fail_fast: bool = False, literal: list[Any] | None = None) -> ir_pb2.PipelineSpec:
    """make -> leaf.map(make) -> again.map(leaf) -> total(again): a map over a step's list, a
    map over a map's results, and a step that reads the last map's results as one list. With
    ``literal``, leaf maps over that constant list (and make is not its upstream)."""
    spec = ir_pb2.PipelineSpec(name="fan", fail_fast=fail_fast)
    make = _step(spec, "make")
    make.outputs[0].items = True
    make.outputs[0].type.expr = "list[int]"
    make.settings.cache = False  # each run's list is the test's
    leaf = _step(spec, "leaf")
    binding = (
        ir_pb2.Binding(literal=ir_pb2.Literal(json=canonical_json(literal)))
        if literal is not None
        else _ref("make")
    )
    leaf.inputs.add(name="x", binding=binding, mapped=True)
    leaf.inputs.add(name="k", binding=ir_pb2.Binding(literal=ir_pb2.Literal(json="2")))
    again = _step(spec, "again")
    again.inputs.add(name="x", binding=_ref("leaf"), mapped=True)
    total = _step(spec, "total")
    total.inputs.add(name="xs", binding=_ref("again"))
    return spec


def artifact(run_id: str, step_id: str, output: str, value: Any) -> ArtifactInfo:
    """An output whose digest stands for its value (equal values, equal digests)."""
    digest = canonical_json(value).encode().hex().ljust(64, "0")[:64]
    return ArtifactInfo(
        f"art-{step_id}-{output}", output, digest, 1, "file:///x", "plait.json", "int", False,
        run_id, step_id,
    )  # fmt: skip


def made(task: TaskOrder, values: list[int]) -> Completed:
    """make's report: the list, and each item as output[i]."""
    run_id, step_id = task.token.run_id, task.token.step_id
    outputs = [artifact(run_id, step_id, "output", values)]
    outputs += [artifact(run_id, step_id, item_name("output", i), v) for i, v in enumerate(values)]
    return Completed(task.token, tuple(outputs))


def done(task: TaskOrder, value: int) -> Completed:
    return Completed(
        task.token, (artifact(task.token.run_id, task.token.step_id, "output", value),)
    )


def _value_of(info: ArtifactInfo) -> Any:
    raw = info.digest.rstrip("0")
    raw += "0" * (len(raw) % 2)
    return json.loads(bytes.fromhex(raw).decode())


def run_map(m: Machine, values: list[int], **kw: Any) -> tuple[str, dict[str, TaskOrder]]:
    """Creates a run of fan and completes make with ``values``: the tasks of leaf's items."""
    run_id, fx = m.create(**kw)
    fx = m.apply(made(by_step(fx.tasks)["make"], values))
    return run_id, by_step(fx.tasks)


def test_a_map_makes_one_step_run_per_item_and_the_reader_gets_the_list_in_order() -> None:
    m = Machine(fan())
    run_id, tasks = run_map(m, [3, 4, 5])
    assert sorted(tasks) == ["leaf[0]", "leaf[1]", "leaf[2]"]
    for i, v in enumerate([3, 4, 5]):
        (kind, info) = dict(tasks[f"leaf[{i}]"].inputs)["x"]
        assert kind == "artifact" and info.output == f"output[{i}]" and _value_of(info) == v
        assert dict(tasks[f"leaf[{i}]"].inputs)["k"] == ("json", "2")  # the fixed input
    run = m.scheduler.runs[run_id]
    assert run.steps["leaf"].status is StepStatus.RUNNING and run.steps["leaf"].attempt == 0
    # the items finish out of order; the map over their results waits for them all
    fx = m.apply(done(tasks["leaf[2]"], 50), done(tasks["leaf[0]"], 30))
    assert not fx.tasks
    fx = m.apply(done(tasks["leaf[1]"], 40))
    again = by_step(fx.tasks)
    assert sorted(again) == ["again[0]", "again[1]", "again[2]"]
    assert [_value_of(dict(again[f"again[{i}]"].inputs)["x"][1]) for i in range(3)] == [30, 40, 50]
    assert run.steps["leaf"].status is StepStatus.SUCCEEDED
    fx = m.apply(*(done(t, 1 + i) for i, t in enumerate(again.values())))
    (total,) = fx.tasks
    kind, items = dict(total.inputs)["xs"]
    assert kind == "list" and [k for k, _ in items] == ["artifact"] * 3
    assert [info.step_id for _, info in items] == ["again[0]", "again[1]", "again[2]"]
    fx = m.apply(done(total, 6))
    assert fx.run_updates[run_id]["status"] == RunStatus.SUCCEEDED


def test_each_item_caches_on_its_own_item() -> None:
    m = Machine(fan())
    _, tasks = run_map(m, [1, 2])
    m.apply(*(done(t, 10) for t in tasks.values()))
    # the next run's list has the same items moved and one more: only the new item runs
    run_id, tasks = run_map(m, [2, 7, 1])
    assert sorted(tasks) == ["leaf[1]"]
    run = m.scheduler.runs[run_id]
    assert run.steps["leaf[0]"].status is StepStatus.CACHED
    assert run.steps["leaf[2]"].status is StepStatus.CACHED
    assert run.steps["leaf[0]"].key != run.steps["leaf[1]"].key


def test_an_empty_list_succeeds_the_map_at_once_and_the_reader_gets_an_empty_list() -> None:
    m = Machine(fan())
    run_id, tasks = run_map(m, [])
    (total,) = tasks.values()
    assert dict(total.inputs)["xs"] == ("list", [])
    run = m.scheduler.runs[run_id]
    assert run.steps["leaf"].status is StepStatus.SUCCEEDED
    assert run.steps["again"].items == []


def test_a_failed_item_fails_the_map_once_every_item_ended_and_skips_the_reader() -> None:
    m = Machine(fan())
    run_id, tasks = run_map(m, [1, 2, 3])
    fx = m.apply(Failed(tasks["leaf[1]"].token, StepError("builtins.ValueError", "no")))
    run = m.scheduler.runs[run_id]
    assert run.steps["leaf"].status is StepStatus.RUNNING  # its other items go on
    fx = m.apply(done(tasks["leaf[0]"], 1), done(tasks["leaf[2]"], 3))
    assert fx.step_updates[(run_id, "leaf")]["status"] == StepStatus.FAILED
    error = fx.step_updates[(run_id, "leaf")]["error"]
    assert error["type"] == "plait.MapItemFailed" and "leaf[1] failed" in error["message"]
    assert fx.step_updates[(run_id, "again")]["status"] == StepStatus.SKIPPED
    assert fx.run_updates[run_id]["status"] == RunStatus.FAILED


def test_fail_fast_cancels_the_other_items_at_the_first_failure() -> None:
    m = Machine(fan(fail_fast=True))
    run_id, tasks = run_map(m, [1, 2, 3])
    fx = m.apply(Failed(tasks["leaf[0]"].token, StepError("builtins.ValueError", "no")))
    assert {c.step_id for c in fx.cancels} == {"leaf[1]", "leaf[2]"}  # no attempt of leaf's
    assert fx.run_updates[run_id]["status"] == RunStatus.FAILED
    assert fx.step_updates[(run_id, "leaf")]["status"] == StepStatus.CANCELLED


def test_a_map_over_a_constant_list_and_one_over_no_list() -> None:
    m = Machine(
        fan(literal=[5, 6]), fan(literal={"a": 1}), fan(literal=list(range(MAX_MAP_ITEMS + 1)))
    )  # type: ignore[arg-type]
    _, fx = m.create()
    tasks = by_step(fx.tasks)
    assert {k: dict(t.inputs)["x"] for k, t in tasks.items() if k.startswith("leaf")} == {
        "leaf[0]": ("json", "5"),
        "leaf[1]": ("json", "6"),
    }
    for version, says in (("v2", "not a list"), ("v3", f"at most {MAX_MAP_ITEMS}")):
        run_id, fx = m.create(version)
        error = fx.step_updates[(run_id, "leaf")]["error"]
        assert error["type"] == "plait.MapError" and says in error["message"], error


def test_cancelling_a_run_stops_its_items_and_not_the_mapped_step() -> None:
    from plait.engine.scheduler import CancelRun

    m = Machine(fan())
    run_id, _ = run_map(m, [1, 2])
    cancel = CancelRun(run_id)
    fx = m.apply(cancel)
    assert fx.replies[id(cancel)] is True
    assert {c.step_id for c in fx.cancels} == {"leaf[0]", "leaf[1]"}
    assert fx.step_updates[(run_id, "leaf")]["status"] == StepStatus.CANCELLED


def test_a_failed_batch_that_made_items_is_undone_and_done_again() -> None:
    m = DurableMachine(fan())
    _, fx = m.create()
    make = by_step(fx.tasks)["make"]
    before = copy.deepcopy(m.scheduler.runs)
    m.fail(made(make, [1, 2]))
    assert m.scheduler.runs == before
    fx = m.apply(made(make, [1, 2]))
    tasks = by_step(fx.tasks)
    assert sorted(tasks) == ["leaf[0]", "leaf[1]"]
    fx = m.apply(done(tasks["leaf[0]"], 1))
    # a batch that fails after some items ended: the view comes back from the rows, items
    # and all, and equals the view before it
    before = copy.deepcopy(m.scheduler.runs)
    m.fail(done(tasks["leaf[1]"], 2))
    assert m.scheduler.runs == before
    fx = m.apply(done(tasks["leaf[1]"], 2))
    assert sorted(by_step(fx.tasks)) == ["again[0]", "again[1]"]


def test_a_restarted_control_plane_rebuilds_the_items_and_finishes_the_run() -> None:
    m = DurableMachine(fan())
    run_id, tasks = run_map(m, [1, 2, 3])
    m.apply(done(tasks["leaf[0]"], 10), done(tasks["leaf[1]"], 20))
    fx = m.apply(done(tasks["leaf[2]"], 30))
    again = by_step(fx.tasks)
    m.apply(done(again["again[0]"], 1))
    # a new control plane, from the rows alone; the attempts of again[1..2] died with the old
    m.scheduler = Scheduler()
    stored: list[StoredRun] = m.rows.stored([run_id])
    fx = m.lookups.commit(m.rows.commit(m.scheduler.recover(stored, m.now, m.lookups)))
    m.scheduler.committed()
    run = m.scheduler.runs[run_id]
    assert run.steps["leaf"].items == ["leaf[0]", "leaf[1]", "leaf[2]"]
    assert run.steps["again"].open_items == 2 and run.steps["again[0]"].status.is_success
    retried = by_step(fx.tasks)
    assert sorted(retried) == ["again[1]", "again[2]"]  # CRASHED, queued again
    fx = m.apply(*(done(t, 2) for t in retried.values()))
    (total,) = fx.tasks
    assert [i.step_id for _, i in dict(total.inputs)["xs"][1]] == [
        "again[0]",
        "again[1]",
        "again[2]",
    ]
    fx = m.apply(done(total, 5))
    assert fx.run_updates[run_id]["status"] == RunStatus.SUCCEEDED


def test_a_retry_reuses_the_items_that_succeeded() -> None:
    from plait.engine.scheduler import RetrySource

    m = Machine(fan())
    run_id, tasks = run_map(m, [1, 2])
    fx = m.apply(
        done(tasks["leaf[0]"], 10),
        Failed(tasks["leaf[1]"].token, StepError("builtins.ValueError", "no")),
    )
    assert fx.run_updates[run_id]["status"] == RunStatus.FAILED
    run_outputs = {
        "make": {
            k: artifact(run_id, "make", k, v)
            for k, v in (("output", [1, 2]), ("output[0]", 1), ("output[1]", 2))
        },
        "leaf[0]": {"output": artifact(run_id, "leaf[0]", "output", 10)},
    }
    m.lookups.retries[run_id] = RetrySource(
        run_id, RunStatus.FAILED, VERSION, {}, "", "", False, run_outputs
    )
    from plait.engine.scheduler import CreateRun

    cmd = CreateRun("", {}, retry_of=run_id)
    fx: Effects = m.apply(cmd)
    created = fx.replies[id(cmd)]
    assert isinstance(created, RunCreated)
    assert sorted(by_step(fx.tasks)) == ["leaf[1]"]  # make and leaf[0] reused
    assert fx.step_updates[(created.run_id, "leaf[0]")]["status"] == StepStatus.CACHED
