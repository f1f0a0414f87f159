"""The gRPC API as another language sees it: raw stubs against a real control plane on loopback."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_status import rpc_status

import plait
from plait import _embedded
from plait.api.v1 import (
    artifact_service_pb2 as arts,
)
from plait.api.v1 import (
    artifact_service_pb2_grpc,
    pipeline_service_pb2_grpc,
    run_service_pb2_grpc,
    task_service_pb2_grpc,
)
from plait.api.v1 import (
    pipeline_service_pb2 as pipes,
)
from plait.api.v1 import (
    resources_pb2 as res,
)
from plait.api.v1 import (
    run_service_pb2 as runs,
)
from plait.api.v1 import (
    task_service_pb2 as tasks,
)
from plait.ir.canonical import digest_json, message_digest, message_to_canonical
from plait.ir.v1 import ir_pb2


@plait.step
def double(x: int) -> int:
    print(f"doubling {x}")
    return 2 * x


@plait.pipeline
def doubler(x: int = 1, y: int = 2) -> None:
    double(double(x))


@plait.pipeline
def needs_x(x: int) -> None:
    double(x)


def authorized_channel(address: str, token: str) -> grpc.Channel:
    """A channel to a control plane on loopback whose every call carries ``token``."""
    credentials = grpc.composite_channel_credentials(
        grpc.local_channel_credentials(grpc.LocalConnectionType.LOCAL_TCP),
        grpc.access_token_call_credentials(token),
    )
    return grpc.secure_channel(address, credentials)


class Api:
    def __init__(self, address: str, token: str) -> None:
        self.address = address
        self.token = token
        self.worker_secret = ""
        self.channel = authorized_channel(address, token)
        self.pipelines = pipeline_service_pb2_grpc.PipelineServiceStub(self.channel)
        self.runs = run_service_pb2_grpc.RunServiceStub(self.channel)
        self.artifacts = artifact_service_pb2_grpc.ArtifactServiceStub(self.channel)
        self.tasks = task_service_pb2_grpc.TaskServiceStub(self.channel)

    def register(self, spec: ir_pb2.PipelineSpec) -> str:
        resp = self.pipelines.RegisterPipeline(pipes.RegisterPipelineRequest(spec=spec))
        return str(resp.name)

    def run_to_end(self, version: str, **params: str) -> res.Run:
        created = self.runs.CreateRun(
            runs.CreateRunRequest(
                pipeline_version=version,
                parameters=[ir_pb2.NamedValue(name=k, json=v) for k, v in params.items()],
            )
        )
        for _ in self.runs.WatchRunEvents(
            runs.WatchRunEventsRequest(name=created.run.name, run_events_only=True)
        ):
            pass
        return self.runs.GetRun(runs.GetRunRequest(name=created.run.name)).run


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    client = plait.Client(home=Path(tmp_path_factory.mktemp("grpc")))
    api = Api(client.address, client.token)
    assert client.home is not None
    api.worker_secret = _embedded._running[client.home].control_plane.worker_secret
    yield api
    api.channel.close()
    client.shutdown()


def error_of(call: Any, *args: Any) -> tuple[grpc.StatusCode, str, str]:
    with pytest.raises(grpc.RpcError) as info:
        result = call(*args)
        if hasattr(result, "__iter__") and not hasattr(result, "ListFields"):
            list(result)
    err = info.value
    status = rpc_status.from_call(err)
    reason = ""
    if status is not None:
        for detail in status.details:
            ei = error_details_pb2.ErrorInfo()
            if detail.Unpack(ei):
                reason = ei.reason
                assert ei.domain == "plait.dev"
    return err.code(), err.details(), reason


def test_register_is_idempotent_and_content_addressed(api: Api) -> None:
    spec = doubler.compile().spec
    first = api.pipelines.RegisterPipeline(pipes.RegisterPipelineRequest(spec=spec))
    again = api.pipelines.RegisterPipeline(pipes.RegisterPipelineRequest(spec=spec))
    assert first.version == again.version == message_digest(spec)
    assert first.name == f"pipelines/doubler/versions/{first.version}"
    assert again.created is False
    got = api.pipelines.GetPipelineVersion(pipes.GetPipelineVersionRequest(name=first.name))
    assert got.spec == spec


def test_the_digest_memo_is_never_served_for_other_bytes_or_another_type() -> None:
    spec = doubler.compile().spec
    first = message_digest(spec)
    changed = ir_pb2.PipelineSpec()
    changed.CopyFrom(spec)
    changed.steps[0].code.qualname += "x"
    assert message_digest(changed) == digest_json(message_to_canonical(changed)) != first
    assert message_digest(spec) == first == digest_json(message_to_canonical(spec))
    # one encoding (field 1, a string), two types
    name, expr = ir_pb2.NamedValue(name="x"), ir_pb2.TypeSpec(expr="x")
    assert name.SerializeToString() == expr.SerializeToString()
    assert message_digest(name) == digest_json({"name": "x"})
    assert message_digest(expr) == digest_json({"expr": "x"})


def test_the_canonical_encoding_writes_a_map_as_an_object_and_a_repeated_field_as_a_list() -> None:
    from google.protobuf import struct_pb2

    # Plait's own messages have no map (nor any message type with options); a Struct's
    # `fields` is one, and its entry type is the only kind of type with options it has
    value = struct_pb2.Struct()
    value.update({"b": 2, "a": [1, "x"]})
    assert message_to_canonical(value) == {
        "fields": {
            "a": {"list_value": {"values": [{"number_value": 1.0}, {"string_value": "x"}]}},
            "b": {"number_value": 2.0},
        }
    }


def test_create_run_is_idempotent_by_request_id(api: Api) -> None:
    version = api.register(doubler.compile().spec)
    req = runs.CreateRunRequest(pipeline_version=version, request_id="retry-me-1")
    a = api.runs.CreateRun(req)
    b = api.runs.CreateRun(req)
    assert a.created and not b.created
    assert a.run.run_id == b.run.run_id
    listed = api.runs.ListRuns(runs.ListRunsRequest(page_size=1000)).runs
    assert sum(1 for r in listed if r.request_id == "retry-me-1") == 1


def test_a_run_end_to_end_over_the_api(api: Api) -> None:
    version = api.register(doubler.compile().spec)
    run = api.run_to_end(version, x="5")
    assert run.status == res.RUN_STATUS_SUCCEEDED
    assert [(s.step_id, s.status) for s in run.steps] == [
        ("double", res.STEP_STATUS_SUCCEEDED),
        ("double_2", res.STEP_STATUS_SUCCEEDED),
    ]
    assert list(run.steps[1].upstream) == ["double"]
    out = run.steps[1].outputs[0]
    got = api.artifacts.GetArtifact(arts.GetArtifactRequest(name=out.name)).artifact
    assert got.digest == out.digest and got.materializer == "plait.json"
    assert Path(got.uri.removeprefix("file://")).read_bytes() == b"20"
    logs = api.runs.ListLogs(runs.ListLogsRequest(name=run.name, step_id="double")).entries
    assert "doubling 5" in "".join(e.text for e in logs)


def test_watch_resumes_after_a_sequence(api: Api) -> None:
    version = api.register(doubler.compile().spec)
    run = api.run_to_end(version, x="7")
    every = [
        e
        for r in api.runs.WatchRunEvents(runs.WatchRunEventsRequest(name=run.name))
        for e in r.events
    ]
    seqs = [e.sequence for e in every]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    assert every[-1].run_status == res.RUN_STATUS_SUCCEEDED
    middle = every[len(every) // 2].sequence
    rest = [
        e
        for r in api.runs.WatchRunEvents(
            runs.WatchRunEventsRequest(name=run.name, after_sequence=middle)
        )
        for e in r.events
    ]
    assert [e.sequence for e in rest] == [s for s in seqs if s > middle]
    run_only = [
        e
        for r in api.runs.WatchRunEvents(
            runs.WatchRunEventsRequest(name=run.name, run_events_only=True)
        )
        for e in r.events
    ]
    assert run_only and all(not e.step_id for e in run_only)
    paged = api.runs.ListRunEvents(runs.ListRunEventsRequest(name=run.name, page_size=3))
    assert [e.sequence for e in paged.events] == seqs[:3]
    assert paged.next_after_sequence == seqs[2]


def test_list_runs_pages_without_duplicates(api: Api) -> None:
    version = api.register(needs_x.compile().spec)
    made = {api.run_to_end(version, x=str(i)).run_id for i in range(5)}
    seen: list[str] = []
    token = ""
    while True:
        page = api.runs.ListRuns(
            runs.ListRunsRequest(page_size=2, page_token=token, pipeline="needs_x")
        )
        assert len(page.runs) <= 2
        seen.extend(r.run_id for r in page.runs)
        token = page.next_page_token
        if not token:
            break
    assert len(seen) == len(set(seen)) and made <= set(seen)
    code, _, _ = error_of(api.runs.ListRuns, runs.ListRunsRequest(page_token="garbage"))
    assert code == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize(
    ("request_kw", "code", "reason", "text"),
    [
        (
            {"pipeline_version": "pipelines/x/versions/" + "0" * 64},
            grpc.StatusCode.NOT_FOUND,
            "PIPELINE_NOT_FOUND",
            "no pipeline version",
        ),
        (
            {"parameters": [ir_pb2.NamedValue(name="zz", json="1")]},
            grpc.StatusCode.INVALID_ARGUMENT,
            "INVALID_PARAMETER",
            "no parameter 'zz'",
        ),
        ({}, grpc.StatusCode.INVALID_ARGUMENT, "INVALID_PARAMETER", "parameter 'x' is required"),
        (
            {"parameters": [ir_pb2.NamedValue(name="x", json="{nope")]},
            grpc.StatusCode.INVALID_ARGUMENT,
            "INVALID_PARAMETER",
            "parameter 'x': not JSON",
        ),
    ],
)
def test_create_run_errors(
    api: Api, request_kw: dict[str, Any], code: grpc.StatusCode, reason: str, text: str
) -> None:
    version = api.register(needs_x.compile().spec)
    req = runs.CreateRunRequest(pipeline_version=version)
    for k, v in request_kw.items():
        if k == "parameters":
            req.parameters.extend(v)
        else:
            setattr(req, k, v)
    got_code, details, got_reason = error_of(api.runs.CreateRun, req)
    assert (got_code, got_reason) == (code, reason)
    assert text in details


def test_unknown_ids(api: Api) -> None:
    code, details, reason = error_of(api.runs.GetRun, runs.GetRunRequest(name="runs/nope"))
    assert (code, reason) == (grpc.StatusCode.NOT_FOUND, "RUN_NOT_FOUND")
    assert "nope" in details
    code, _, reason = error_of(
        api.artifacts.GetArtifact, arts.GetArtifactRequest(name="artifacts/" + "f" * 32)
    )
    assert (code, reason) == (grpc.StatusCode.NOT_FOUND, "ARTIFACT_NOT_FOUND")
    code, _, _ = error_of(api.runs.WatchRunEvents, runs.WatchRunEventsRequest(name="runs/nope"))
    assert code == grpc.StatusCode.NOT_FOUND


def _spec_with(mutate: Any) -> ir_pb2.PipelineSpec:
    spec = ir_pb2.PipelineSpec()
    spec.CopyFrom(doubler.compile().spec)
    mutate(spec)
    return spec


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (lambda s: setattr(s, "name", ""), "name"),
        (lambda s: setattr(s.steps[1], "id", "double"), "steps[1] ('double').id"),
        (
            lambda s: setattr(s.steps[1].inputs[0].binding.output, "step_id", "ghost"),
            "steps[1] ('double_2').inputs[0] ('x').binding.output",
        ),
        (
            lambda s: setattr(s.steps[1].inputs[0].binding.output, "output", "nope"),
            "steps[1] ('double_2').inputs[0] ('x').binding.output",
        ),
        (
            lambda s: setattr(s.steps[0].inputs[0].binding, "parameter", "ghost"),
            "steps[0] ('double').inputs[0] ('x').binding.parameter",
        ),
        (
            lambda s: setattr(s.steps[0].inputs[0].binding.literal, "json", "{bad"),
            "steps[0] ('double').inputs[0] ('x').binding.literal",
        ),
        (
            lambda s: (
                s.steps[0]
                .inputs[0]
                .binding.output.CopyFrom(ir_pb2.OutputRef(step_id="double_2", output="output"))
            ),
            "steps[0] ('double').inputs[0] ('x').binding.output",
        ),
        (
            lambda s: setattr(s.steps[0].outputs[0].type, "expr", "list["),
            "steps[0] ('double').outputs[0] ('output').type.expr",
        ),
        (
            lambda s: setattr(s.steps[0].inputs[0].type, "expr", "__import__('os')"),
            "steps[0] ('double').inputs[0] ('x').type.expr",
        ),
        (
            lambda s: s.steps[0].inputs[0].ClearField("binding"),
            "steps[0] ('double').inputs[0] ('x').binding",
        ),
    ],
    ids=[
        "no-name",
        "duplicate-id",
        "dangling-step",
        "unknown-output",
        "unknown-parameter",
        "bad-literal",
        "cycle",
        "bad-output-type",
        "bad-input-type",
        "no-binding",
    ],
)
def test_malformed_ir_is_refused_naming_the_field(api: Api, mutate: Any, field: str) -> None:
    code, details, reason = error_of(
        api.pipelines.RegisterPipeline, pipes.RegisterPipelineRequest(spec=_spec_with(mutate))
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT and reason == "INVALID_PIPELINE"
    assert details.startswith(field), details


def test_oversized_messages_are_refused_and_the_server_lives_on(api: Api) -> None:
    spec = _spec_with(lambda s: setattr(s, "description", "x" * (65 * 1024 * 1024)))
    code, _, _ = error_of(api.pipelines.RegisterPipeline, pipes.RegisterPipelineRequest(spec=spec))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert api.register(doubler.compile().spec)


def test_task_stream_needs_a_hello_for_a_known_pool(api: Api) -> None:
    # the worker-facing service takes the engine's worker secret, not its owner's
    code, details, _ = error_of(api.tasks.Connect, iter([]))
    assert code == grpc.StatusCode.PERMISSION_DENIED and "worker token" in details
    worker = Api(api.address, api.worker_secret)
    started = tasks.ConnectRequest(started=tasks.TaskStarted())
    code, details, _ = error_of(worker.tasks.Connect, iter([started]))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "hello" in details
    hello = tasks.ConnectRequest(hello=tasks.WorkerHello(worker_id="w", runner="nowhere"))
    code, details, _ = error_of(worker.tasks.Connect, iter([hello]))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "nowhere" in details
    # a report whose output carries metadata that is not JSON (found by the fuzz suite)
    local = tasks.ConnectRequest(hello=tasks.WorkerHello(worker_id="w", runner="local"))
    bad = tasks.ConnectRequest(
        completed=tasks.TaskCompleted(outputs=[res.Artifact(output="o", metadata_json="{oops")])
    )
    code, details, _ = error_of(worker.tasks.Connect, iter([local, bad]))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "completed.outputs" in details
    worker.channel.close()


def test_health_and_reflection(api: Api, daemon: Any) -> None:
    """Both serve health checks; the daemon serves reflection too (grpcurl), the embedded
    engine does not: only its own process and workers can call it."""
    health = health_pb2_grpc.HealthStub(api.channel)
    for service in ("", "plait.api.v1.RunService", "plait.api.v1.TaskService"):
        resp = health.Check(health_pb2.HealthCheckRequest(service=service))
        assert resp.status == health_pb2.HealthCheckResponse.SERVING
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    embedded = reflection_pb2_grpc.ServerReflectionStub(api.channel)
    with pytest.raises(grpc.RpcError) as info:
        list(embedded.ServerReflectionInfo(iter([request])))
    assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
    with grpc.insecure_channel(daemon.address) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        metadata = [("authorization", f"Bearer {daemon.credential}")]
        responses = stub.ServerReflectionInfo(iter([request]), metadata=metadata)
        names = {s.name for r in responses for s in r.list_services_response.service}
    assert {
        "plait.api.v1.PipelineService",
        "plait.api.v1.RunService",
        "plait.api.v1.ArtifactService",
        "plait.api.v1.TaskService",
    } <= names


def test_download_streams_verified_chunks(api: Api) -> None:
    version = api.register(doubler.compile().spec)
    run = api.run_to_end(version, x="21")
    out = run.steps[1].outputs[0]
    msgs = list(
        api.artifacts.DownloadArtifact(arts.DownloadArtifactRequest(name=out.name, chunk_size=1))
    )
    assert msgs[0].artifact.digest == out.digest
    assert b"".join(m.data for m in msgs) == b"84" and len(msgs) == 2
    code, _, _ = error_of(
        api.artifacts.DownloadArtifact, arts.DownloadArtifactRequest(name=out.name, chunk_size=-1)
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    blob = Path(out.uri.removeprefix("file://"))
    blob.write_bytes(b"99")  # the store was tampered with
    code, details, _ = error_of(
        api.artifacts.DownloadArtifact, arts.DownloadArtifactRequest(name=out.name)
    )
    assert code == grpc.StatusCode.DATA_LOSS and "do not match" in details
    blob.unlink()
    code, _, _ = error_of(
        api.artifacts.DownloadArtifact, arts.DownloadArtifactRequest(name=out.name)
    )
    assert code == grpc.StatusCode.NOT_FOUND


def _upload(api: Api, header: arts.UploadHeader | None, chunks: list[bytes]) -> Any:
    reqs = [arts.UploadArtifactRequest(header=header)] if header is not None else []
    reqs += [arts.UploadArtifactRequest(data=c) for c in chunks]
    return api.artifacts.UploadArtifact(iter(reqs))


def test_upload_is_content_addressed_and_checked(api: Api) -> None:
    import hashlib

    data = bytes(range(256)) * 5000
    sha = hashlib.sha256(data).hexdigest()
    chunks = [data[i : i + 65536] for i in range(0, len(data), 65536)]
    resp = _upload(api, arts.UploadHeader(size_bytes=len(data), sha256=sha), chunks)
    assert resp.digest == sha and resp.size_bytes == len(data)
    assert Path(resp.uri.removeprefix("file://")).read_bytes() == data
    again = _upload(api, arts.UploadHeader(size_bytes=len(data)), chunks)
    assert again.digest == sha
    bad = [
        (arts.UploadHeader(size_bytes=len(data), sha256="0" * 64), chunks, "not " + "0" * 64),
        (arts.UploadHeader(size_bytes=3), chunks, "more bytes than"),
        (arts.UploadHeader(size_bytes=len(data) + 1), chunks, "the header said"),
        (None, chunks, "must be a header"),
    ]
    for header, body, text in bad:
        with pytest.raises(grpc.RpcError) as info:
            _upload(api, header, body)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert text in info.value.details()
    with pytest.raises(grpc.RpcError) as info:
        _upload(api, arts.UploadHeader(size_bytes=2**40), [])
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_a_remote_client_streams_artifacts(api: Api, tmp_path: Path) -> None:
    client = plait.Client(api.address, token=api.token)
    try:
        assert not client.embedded
        run = client.get_run(api.run_to_end(api.register(doubler.compile().spec), x="4").run_id)
        info = run.steps["double_2"].outputs["output"]
        assert client.download_artifact(info.artifact_id) == b"16"
        # a store this machine cannot see: the client falls back to the stream
        moved = type(info)(**{**info.__dict__, "uri": "file:///nowhere/x"})
        assert moved.load() == 16
        digest = client.upload_artifact(b"hello" * 1000, chunk_size=333)
        import hashlib

        assert digest == hashlib.sha256(b"hello" * 1000).hexdigest()
    finally:
        client.close()


@plait.step
def chatty(x: int) -> int:
    print(f"chatty says {x}")
    return x


@plait.step(cache=False)
def gated_tail(x: int, gate: str) -> int:
    import os
    import time as _t

    # blocks until the test creates `gate`; the deadline is a hang guard that fails the run
    deadline = _t.monotonic() + 90
    while not os.path.exists(gate):
        if _t.monotonic() > deadline:
            raise TimeoutError(f"nobody created {gate}")
        _t.sleep(0.05)
    print("tail done")
    return x


@plait.pipeline
def talkative(gate: str, x: int = 1) -> None:
    gated_tail(chatty(x), gate)


def test_stream_logs_follows_a_run_live(api: Api, tmp_path: Path) -> None:
    version = api.register(talkative.compile().spec)
    gate = tmp_path / "gate"
    created = api.runs.CreateRun(
        runs.CreateRunRequest(
            pipeline_version=version,
            parameters=[ir_pb2.NamedValue(name="gate", json=json.dumps(str(gate)))],
        )
    )
    texts = ""
    seen_while_blocked = False
    for resp in api.runs.StreamLogs(runs.StreamLogsRequest(name=created.run.name)):
        texts += "".join(e.text for e in resp.entries)
        if "chatty says 1" in texts and not gate.exists():
            # gated_tail cannot end before the gate exists: this output came while it ran
            seen_while_blocked = True
            gate.touch()
    assert seen_while_blocked, f"chatty's output did not stream while the run went on: {texts!r}"
    assert "tail done" in texts
    only = [
        e.step_id
        for r in api.runs.StreamLogs(
            runs.StreamLogsRequest(name=created.run.name, step_id="chatty")
        )
        for e in r.entries
    ]
    assert only and set(only) == {"chatty"}


def test_list_pipelines_and_filter_runs(api: Api) -> None:
    api.register(doubler.compile().spec)
    listed = api.pipelines.ListPipelines(pipes.ListPipelinesRequest()).pipelines
    by_name = {p.name: p for p in listed}
    assert "pipelines/doubler" in by_name
    versions = api.pipelines.ListPipelineVersions(
        pipes.ListPipelineVersionsRequest(parent="pipelines/doubler")
    ).versions
    assert by_name["pipelines/doubler"].latest_version == versions[0]
    assert by_name["pipelines/doubler"].version_count == len(versions)
    code, _, reason = error_of(
        api.pipelines.ListPipelineVersions,
        pipes.ListPipelineVersionsRequest(parent="pipelines/nope"),
    )
    assert (code, reason) == (grpc.StatusCode.NOT_FOUND, "PIPELINE_NOT_FOUND")
    succeeded = api.runs.ListRuns(runs.ListRunsRequest(status=res.RUN_STATUS_SUCCEEDED)).runs
    failed = api.runs.ListRuns(runs.ListRunsRequest(status=res.RUN_STATUS_FAILED)).runs
    assert succeeded and all(r.status == res.RUN_STATUS_SUCCEEDED for r in succeeded)
    assert all(r.status == res.RUN_STATUS_FAILED for r in failed)
