"""The domain records and statuses: tied to the API's messages and enums, and round-tripping."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from hypothesis import given
from hypothesis import strategies as st
from strategies import json_values

from plait._models import (
    FINAL_RUN_STATUSES,
    FINAL_STEP_STATUSES,
    ArtifactInfo,
    LogEntry,
    Run,
    RunEvent,
    RunStatus,
    StepError,
    StepRun,
    StepStatus,
)
from plait.api.v1 import resources_pb2 as res

times = st.datetimes(
    min_value=datetime(1971, 1, 1), max_value=datetime(2200, 1, 1), timezones=st.just(UTC)
)
ids = st.text("0123456789abcdef", min_size=1, max_size=32)
names = st.text(min_size=0, max_size=12)
json_objects = st.dictionaries(st.text(max_size=6), json_values, max_size=4)

artifacts = st.builds(
    ArtifactInfo,
    artifact_id=ids,
    output=names,
    digest=st.text("0123456789abcdef", min_size=64, max_size=64),
    size=st.integers(0, 2**62),
    uri=names,
    materializer=names,
    data_type=names,
    unsafe=st.booleans(),
    run_id=ids,
    step_id=names,
    created_at=st.none() | times,
    metadata=json_objects,
)
step_errors = st.builds(StepError, type=names, message=names, traceback=names)


@st.composite
def step_runs(draw: st.DrawFn) -> StepRun:
    outputs = draw(st.lists(artifacts, max_size=3, unique_by=lambda a: a.output))
    return StepRun(
        step_id=draw(names),
        status=draw(st.sampled_from(StepStatus)),
        attempt=draw(st.integers(0, 2**31)),
        start_time=draw(st.none() | times),
        end_time=draw(st.none() | times),
        outputs={a.output: a for a in outputs},
        metadata=draw(json_objects),
        error=draw(st.none() | step_errors),
        cache_key=draw(names),
        upstream=draw(st.lists(names, max_size=3)),
    )


@st.composite
def runs(draw: st.DrawFn) -> Run:
    steps = draw(st.lists(step_runs(), max_size=3, unique_by=lambda s: s.step_id))
    return Run(
        run_id=draw(ids),
        pipeline=draw(names),
        pipeline_version=draw(ids),
        status=draw(st.sampled_from(RunStatus)),
        parameters=draw(json_objects),
        create_time=draw(st.none() | times),
        end_time=draw(st.none() | times),
        steps={s.step_id: s for s in steps},
        no_cache=draw(st.booleans()),
        stack=draw(st.text("abc-", max_size=8)),
        request_id=draw(names),
        last_sequence=draw(st.integers(0, 2**62)),
    )


events = st.builds(
    RunEvent,
    run_id=ids,
    step_id=names,
    run_status=st.none() | st.sampled_from(RunStatus),
    step_status=st.none() | st.sampled_from(StepStatus),
    attempt=st.integers(0, 2**31),
    message=names,
    time=times,
    sequence=st.integers(0, 2**62),
)
log_entries = st.builds(
    LogEntry,
    step_id=names,
    attempt=st.integers(0, 2**31),
    stream=st.sampled_from(["stdout", "stderr"]),
    text=st.text(max_size=20),
    time=times,
    sequence=st.integers(0, 2**62),
)


def test_statuses_are_the_apis_enums_by_name() -> None:
    def names_of(enum: Any, prefix: str) -> set[str]:
        return {n.removeprefix(prefix) for n in enum.DESCRIPTOR.values_by_name} - {"UNSPECIFIED"}

    assert {s.name for s in RunStatus} == names_of(res.RunStatus, "RUN_STATUS_")
    assert {s.name for s in StepStatus} == names_of(res.StepStatus, "STEP_STATUS_")
    for s in StepStatus:
        assert res.StepStatus.Name(s.to_proto()) == f"STEP_STATUS_{s.name}"
        assert StepStatus.from_proto(s.to_proto()) is s
    for r in RunStatus:
        assert res.RunStatus.Name(r.to_proto()) == f"RUN_STATUS_{r.name}"
        assert RunStatus.from_proto(r.to_proto()) is r


def test_final_statuses_are_defined_once_and_agree() -> None:
    assert {s for s in StepStatus if s.is_final} == FINAL_STEP_STATUSES
    assert {s for s in RunStatus if s.is_final} == FINAL_RUN_STATUSES
    # every final run status is also a final step status of the same name
    assert {str(s) for s in FINAL_RUN_STATUSES} <= {str(s) for s in FINAL_STEP_STATUSES}
    assert StepStatus.CACHED.is_success and not StepStatus.SKIPPED.is_success


@given(artifacts)
def test_artifact_round_trips(a: ArtifactInfo) -> None:
    assert ArtifactInfo.from_proto(a.to_proto()) == a
    # the store keeps the metadata apart from the step's outputs
    assert ArtifactInfo.from_json(a.to_json(), a.metadata) == a


@given(step_errors)
def test_step_error_round_trips(e: StepError) -> None:
    assert StepError.from_proto(e.to_proto()) == e
    assert StepError.from_json(e.to_json()) == e


@given(step_runs())
def test_step_run_round_trips(s: StepRun) -> None:
    assert StepRun.from_proto(s.to_proto()) == s


@given(runs())
def test_run_round_trips(r: Run) -> None:
    assert Run.from_proto(r.to_proto()) == r


@given(events)
def test_run_event_round_trips(e: RunEvent) -> None:
    assert RunEvent.from_proto(e.to_proto()) == e


@given(log_entries)
def test_log_entry_round_trips(e: LogEntry) -> None:
    assert LogEntry.from_proto(e.to_proto()) == e


def test_an_error_record_names_the_exception_type() -> None:
    try:
        raise ValueError("bad value")
    except ValueError as exc:
        err = StepError.of(exc)
    assert (err.type, err.message, str(err)) == (
        "builtins.ValueError",
        "bad value",
        "builtins.ValueError: bad value",
    )


@given(runs())
def test_a_run_read_from_its_message_converts_its_steps_on_first_use(r: Run) -> None:
    """Run.from_proto keeps the steps' messages until they are read: the steps must still be
    the same mapping, however they are read first, and pickle as a plain dict."""
    import pickle

    msg = r.to_proto()
    for first in ("len", "in", "eq", "pickle", "iter"):
        read = Run.from_proto(msg)
        if first == "len":
            assert len(read.steps) == len(r.steps)
        elif first == "in":
            assert all(k in read.steps for k in r.steps) and "no such step" not in read.steps
        elif first == "eq":
            assert read.steps == r.steps and read == r
        elif first == "pickle":
            again = pickle.loads(pickle.dumps(read))
            assert type(again.steps) is dict and again == r
        else:
            assert list(read.steps) == list(r.steps)
        assert dict(read.steps) == dict(r.steps) and len(read.steps) == len(r.steps)
        assert read.steps == r.steps and read == r
