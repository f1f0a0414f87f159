"""Every request field validated and bounded: the limits table, undecodable messages, non-finite
numbers, parameter types, resource names and page sizes, over real gRPC on loopback."""

from __future__ import annotations

import importlib
import logging
import pkgutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf.descriptor import FieldDescriptor
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from test_grpc import Api as GrpcApi

import plait
import plait.api.v1
from plait.api.v1 import (
    artifact_service_pb2 as arts,
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
    stack_service_pb2 as stacks,
)
from plait.api.v1 import (
    stack_service_pb2_grpc,
)
from plait.api.v1 import (
    task_service_pb2 as tasks,
)
from plait.engine._ir import NAME_PATTERN, coerce_parameter, load_json, valid_name
from plait.engine.api import _limits
from plait.engine.api._convert import component_from_proto, metadata_from_json, strict_name
from plait.engine.api._runs import (
    DEFAULT_PAGE,
    DEFAULT_RUNS_PAGE,
    MAX_PAGE,
    MAX_RUNS_PAGE,
    _page_size,
)
from plait.errors import ParameterError, PipelineError, PipelineValidationError
from plait.ir.v1 import ir_pb2


@plait.step
def scale(x: float) -> float:
    return 2 * x


@plait.pipeline
def scaled(f: float = 1.0) -> None:
    scale(f)


@plait.step
def count(n: int) -> int:
    return n


@plait.pipeline
def counted(n: int, label: str | None = None) -> None:
    count(n)


@plait.pipeline
def _private_pipeline(n: int = 1) -> None:
    count(n)


class Api(GrpcApi):
    """Raw stubs on a control plane served in this process without auth (auth has its own
    tests; here every call must reach the limits)."""

    def __init__(self, home: Path) -> None:
        from anyio.from_thread import start_blocking_portal

        from plait.engine import ControlPlane, ControlPlaneConfig

        self.cp = ControlPlane(ControlPlaneConfig(home=home, auth=False))
        self._portal_cm = start_blocking_portal("asyncio")
        self.portal = self._portal_cm.__enter__()
        self._future, port = self.portal.start_task(self.cp.serve, "127.0.0.1:0")
        super().__init__(f"127.0.0.1:{port}", token="no auth here")
        self.stacks = stack_service_pb2_grpc.StackServiceStub(self.channel)

    def close(self) -> None:
        self.channel.close()
        self.portal.call(self.cp.stop)
        self._future.result(timeout=30)
        self._portal_cm.__exit__(None, None, None)


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    api = Api(Path(tmp_path_factory.mktemp("validation")))
    yield api
    api.close()


def error_of(call: Any, *args: Any) -> tuple[grpc.StatusCode, str, str]:
    with pytest.raises(grpc.RpcError) as info:
        result = call(*args)
        if hasattr(result, "__iter__") and not hasattr(result, "ListFields"):
            list(result)
    err = info.value
    reason = ""
    status = rpc_status.from_call(err)
    if status is not None:
        for detail in status.details:
            ei = error_details_pb2.ErrorInfo()
            if detail.Unpack(ei):
                reason = ei.reason
    return err.code(), err.details(), reason


def _spec(pipe: Any) -> ir_pb2.PipelineSpec:
    """A copy of a pipeline's IR, to change (compile() returns a shared one)."""
    spec = ir_pb2.PipelineSpec()
    spec.CopyFrom(pipe.compile().spec)
    return spec


# ---- the table ----


def _request_types() -> list[Any]:
    out = []
    for mod in pkgutil.iter_modules(plait.api.v1.__path__):
        if not mod.name.endswith("_service_pb2"):
            continue
        module = importlib.import_module(f"plait.api.v1.{mod.name}")
        for service in module.DESCRIPTOR.services_by_name.values():
            out.extend(m.input_type for m in service.methods)
    return out


def test_every_request_field_has_a_limit() -> None:
    requests = _request_types()
    assert {r.name for r in requests} >= {"CreateRunRequest", "ConnectRequest"}
    reached: set[str] = set()
    missing = []
    for request in requests:
        for field in _limits.request_fields(request):
            reached.add(field.full_name)
            text = field.type in (FieldDescriptor.TYPE_STRING, FieldDescriptor.TYPE_BYTES)
            if text and field.full_name not in _limits.LIMITS:
                missing.append(field.full_name)
            if field.is_repeated and field.full_name not in _limits.COUNTS:
                missing.append(f"{field.full_name} (count)")
    assert not missing, f"fields without a limit in engine/api/_limits.py: {missing}"
    stale = (set(_limits.LIMITS) | set(_limits.COUNTS)) - reached
    assert not stale, f"limits for fields no request has: {stale}"


def test_the_checker_names_the_field_path_and_the_limit() -> None:
    spec = _spec(scaled)
    request = pipes.RegisterPipelineRequest(spec=spec)
    _limits.check_request(request)
    request.spec.steps[0].code.qualname = "q" * 300
    with pytest.raises(PipelineValidationError) as info:
        _limits.check_request(request)
    assert str(info.value) == "spec.steps[0].code.qualname: 300 bytes; the limit is 256 bytes"
    # bytes, not characters: 100 euro signs are 300 bytes
    request = runs.CreateRunRequest(request_id="€" * 100)
    with pytest.raises(PipelineValidationError, match=r"^request_id: 300 bytes; .* 256 bytes"):
        _limits.check_request(request)
    _limits.check_request(runs.CreateRunRequest(request_id="é" * 128))
    literal = ir_pb2.Binding(literal=ir_pb2.Literal(json="1" * (1024 * 1024 + 1)))
    nested = ir_pb2.Binding(list=ir_pb2.BindingList(items=[ir_pb2.Binding(), literal]))
    with pytest.raises(PipelineValidationError) as info:
        _limits.check_request(nested)
    assert str(info.value).startswith(
        "list.items[1].literal.json: 1048577 bytes; the limit is 1 MiB"
    )
    many = runs.CreateRunRequest(parameters=[ir_pb2.NamedValue(name="p")] * 1001)
    with pytest.raises(
        PipelineValidationError, match=r"^parameters: 1001 items; the limit is 1000"
    ):
        _limits.check_request(many)


# ---- over a limit, over gRPC ----


def test_oversized_fields_are_invalid_argument_naming_field_and_limit(api: Api) -> None:
    version = api.register(counted.compile().spec)
    req = runs.CreateRunRequest(pipeline_version=version, request_id="r" * 300)
    code, details, reason = error_of(api.runs.CreateRun, req)
    assert (code, reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_PIPELINE")
    assert details == "request_id: 300 bytes; the limit is 256 bytes"
    # the run was never created, and listing runs still works for everyone
    assert api.runs.ListRuns(runs.ListRunsRequest()).runs is not None

    code, details, _ = error_of(api.runs.GetRun, runs.GetRunRequest(name="x" * 100_000))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith("name: 100000 bytes")

    spec = _spec(counted)
    spec.steps[0].code.qualname = "q" * 300
    code, details, _ = error_of(
        api.pipelines.RegisterPipeline, pipes.RegisterPipelineRequest(spec=spec)
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert details.startswith("spec.steps[0].code.qualname: 300 bytes; the limit is 256 bytes")

    component = stacks.Component(
        name="components/big", kind=1, flavor="local", config_json='"' + "x" * (1 << 20) + '"'
    )
    code, details, _ = error_of(
        api.stacks.RegisterComponent, stacks.RegisterComponentRequest(component=component)
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert details.startswith("component.config_json: 1048578 bytes; the limit is 1 MiB")


def test_stream_elements_are_checked_as_they_are_read(api: Api) -> None:
    hello = tasks.ConnectRequest(hello=tasks.WorkerHello(worker_id="w" * 1000, runner="local"))
    code, details, _ = error_of(api.tasks.Connect, iter([hello]))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert details == "hello.worker_id: 1000 bytes; the limit is 256 bytes"

    header = arts.UploadArtifactRequest(header=arts.UploadHeader(size_bytes=10, sha256="0" * 300))
    code, details, _ = error_of(api.artifacts.UploadArtifact, iter([header]))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith("header.sha256: 300")

    big = (_limits.CHUNK + 1) * b"x"
    header = arts.UploadArtifactRequest(header=arts.UploadHeader(size_bytes=len(big)))
    chunks = iter([header, arts.UploadArtifactRequest(data=big)])
    code, details, _ = error_of(api.artifacts.UploadArtifact, chunks)
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert details == f"data: {len(big)} bytes; the limit is 4 MiB"


# ---- undecodable messages ----

_GARBAGE = b"\x0a\x05ab"  # field 1, 5 bytes long, but only 2 follow

UNDECODABLE = [
    ("unary-unary", "/plait.api.v1.RunService/GetRun", "GetRunRequest"),
    ("unary-stream", "/plait.api.v1.RunService/WatchRunEvents", "WatchRunEventsRequest"),
    ("stream-unary", "/plait.api.v1.ArtifactService/UploadArtifact", "UploadArtifactRequest"),
    ("stream-stream", "/plait.api.v1.TaskService/Connect", "ConnectRequest"),
]


@pytest.mark.parametrize(
    ("kind", "method", "message"), UNDECODABLE, ids=[u[0] for u in UNDECODABLE]
)
def test_an_undecodable_message_is_invalid_argument_with_one_log_line(
    api: Api, caplog: pytest.LogCaptureFixture, kind: str, method: str, message: str
) -> None:
    make = getattr(api.channel, kind.replace("-", "_"))(method)  # no serializers: raw bytes
    payload: Any = _GARBAGE if kind.startswith("unary") else iter([_GARBAGE])
    with caplog.at_level(logging.DEBUG):
        code, details, _ = error_of(make, payload)
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert details == f"the request is not a valid {message}"
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    assert warnings[0].exc_info is None and "Traceback" not in warnings[0].getMessage()
    assert message in warnings[0].getMessage() and method in warnings[0].getMessage()
    assert not [r for r in caplog.records if r.exc_info]


def test_undecodable_strings_are_refused_too(api: Api) -> None:
    call = api.channel.unary_unary("/plait.api.v1.RunService/GetRun")
    code, details, _ = error_of(call, b"\x0a\x02\xff\xfe")  # name: not UTF-8
    assert (code, details) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "the request is not a valid GetRunRequest",
    )


# ---- non-finite numbers ----


@pytest.mark.parametrize("text", ["NaN", "Infinity", "-Infinity", "[1e400]", '{"a": NaN}'])
def test_non_finite_json_is_refused(text: str) -> None:
    with pytest.raises(ValueError, match=r"NaN|Infinity"):
        load_json(text)
    with pytest.raises(PipelineValidationError, match=r"^metadata is not JSON"):
        metadata_from_json(f'{{"x": {text}}}')
    component = stacks.Component(name="c", kind=1, flavor="local", config_json=f'{{"x": {text}}}')
    with pytest.raises(PipelineError, match=r"^component\.config_json: not JSON"):
        component_from_proto(component)


def test_non_finite_literals_defaults_and_parameters_are_refused(api: Api) -> None:
    spec = _spec(counted)
    spec.steps[0].inputs[0].binding.literal.json = "NaN"
    code, details, _ = error_of(
        api.pipelines.RegisterPipeline, pipes.RegisterPipelineRequest(spec=spec)
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert details.startswith("steps[0] ('count').inputs[0] ('n').binding.literal.json: not JSON")
    assert "NaN" in details

    spec = _spec(scaled)
    spec.parameters[0].default_value.json = "Infinity"
    code, details, _ = error_of(
        api.pipelines.RegisterPipeline, pipes.RegisterPipelineRequest(spec=spec)
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert (
        details.startswith("parameters[0].default_value.json: not JSON") and "Infinity" in details
    )

    spec = _spec(scaled)
    spec.steps[0].settings.timeout_seconds = float("nan")
    code, details, _ = error_of(
        api.pipelines.RegisterPipeline, pipes.RegisterPipelineRequest(spec=spec)
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert details.startswith("steps[0] ('scale').settings.timeout_seconds")

    version = api.register(scaled.compile().spec)
    for value in ("NaN", "-Infinity", "1e999"):
        req = runs.CreateRunRequest(
            pipeline_version=version, parameters=[ir_pb2.NamedValue(name="f", json=value)]
        )
        code, details, reason = error_of(api.runs.CreateRun, req)
        assert (code, reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_PARAMETER")
        assert details.startswith("parameter 'f': not JSON"), details


# ---- parameter types ----


@pytest.mark.parametrize(
    ("expr", "given", "expected"),
    [
        ("int", 3, 3),
        ("float", 1, 1.0),
        ("float", 2.5, 2.5),
        ("bool", True, True),
        ("str", "a", "a"),
        ("int | None", None, None),
        ("Optional[int]", 4, 4),
        ("typing.Optional[str]", None, None),
        ("int | str", "a", "a"),
        ("list[float]", [1, 2.5], [1.0, 2.5]),
        ("dict[str, float]", {"a": 1}, {"a": 1.0}),
        ("tuple[int, ...]", [1, 2], [1, 2]),
        ("tuple[int, str]", [1, "a"], [1, "a"]),
        ("list", ["anything", 1], ["anything", 1]),
        ("Any", {"x": [1]}, {"x": [1]}),
        ("pandas.DataFrame", {"x": [1]}, {"x": [1]}),
        ("typing.Literal['a', 'b']", "c", "c"),
        ("", "x", "x"),
    ],
)
def test_parameter_values_fit_their_declared_type(expr: str, given: Any, expected: Any) -> None:
    out = coerce_parameter("p", expr, given)
    assert out == expected and type(out) is type(expected)


@pytest.mark.parametrize(
    ("expr", "given", "shown"),
    [
        ("int", "abc", 'got a string "abc"'),
        ("int", 1.5, "got a float 1.5"),
        ("int", True, "got a boolean true"),
        ("float", False, "got a boolean false"),
        ("float", "1", 'got a string "1"'),
        ("bool", 0, "got an integer 0"),
        ("str", None, "got null"),
        ("int | None", "x", 'got a string "x"'),
        ("list[int]", [1, "a"], 'got a string "a" at [1]'),
        ("list[int]", {"a": 1}, "got an object"),
        ("dict[str, int]", {"a": "b"}, "got a string \"b\" at ['a']"),
        ("tuple[int, str]", [1], "got an array"),
    ],
)
def test_parameter_values_of_another_type_are_refused(expr: str, given: Any, shown: str) -> None:
    with pytest.raises(ParameterError) as info:
        coerce_parameter("p", expr, given)
    assert str(info.value) == f"parameter 'p' is declared {expr}; {shown}"


def test_create_run_checks_parameter_types_and_floats_share_the_cache(api: Api) -> None:
    version = api.register(counted.compile().spec)
    req = runs.CreateRunRequest(
        pipeline_version=version, parameters=[ir_pb2.NamedValue(name="n", json='"abc"')]
    )
    code, details, reason = error_of(api.runs.CreateRun, req)
    assert (code, reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_PARAMETER")
    assert details == "parameter 'n' is declared int; got a string \"abc\""

    version = api.register(scaled.compile().spec)
    first = api.run_to_end(version)  # the default, 1.0
    assert first.status == res.RUN_STATUS_SUCCEEDED
    second = api.run_to_end(version, f="1")
    assert [p.json for p in second.parameters] == ["1.0"]
    assert [s.status for s in second.steps] == [res.STEP_STATUS_CACHED]


# ---- names ----


@pytest.mark.parametrize(
    "name", ["doubler", "noop_2", "_private", "gpu-docker", "local-artifacts", "v1.2", "a" * 128]
)
def test_legitimate_names_are_valid(name: str) -> None:
    assert valid_name(name)


@pytest.mark.parametrize("name", ["", "a/b", "a b", ".hidden", "-x", "a" * 129, "é", "a\n"])
def test_other_names_are_not(name: str) -> None:
    assert not valid_name(name)
    with pytest.raises(PipelineError, match=r"^name: .*\(it must match"):
        strict_name(f"stacks/{name}", "stacks")


def test_every_name_the_api_accepts_it_can_resolve(api: Api) -> None:
    spec = _spec(counted)
    spec.name = "a/b"
    code, details, _ = error_of(
        api.pipelines.RegisterPipeline, pipes.RegisterPipelineRequest(spec=spec)
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert details == f"name: 'a/b' is not a valid name (it must match {NAME_PATTERN})"

    for name in ("_private_pipeline", "team.pipe-1_x"):
        spec = _spec(_private_pipeline)
        spec.name = name
        resource = api.register(spec)
        assert resource.startswith(f"pipelines/{name}/versions/")
        got = api.pipelines.GetPipelineVersion(pipes.GetPipelineVersionRequest(name=resource))
        assert got.spec.name == name
        versions = api.pipelines.ListPipelineVersions(
            pipes.ListPipelineVersionsRequest(parent=f"pipelines/{name}")
        ).versions
        assert resource in versions

    bad = stacks.Component(name="components/a b", kind=1, flavor="local")
    code, details, _ = error_of(
        api.stacks.RegisterComponent, stacks.RegisterComponentRequest(component=bad)
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert details.startswith("component.name: 'a b' is not a valid name")
    code, details, _ = error_of(
        api.stacks.RegisterStack,
        stacks.RegisterStackRequest(stack=stacks.Stack(name="stacks/x/y")),
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith("name: 'x/y'")

    good = stacks.Component(name="components/gpu-docker.2", kind=1, flavor="local")
    api.stacks.RegisterComponent(stacks.RegisterComponentRequest(component=good))
    api.stacks.DeleteComponent(stacks.DeleteComponentRequest(name="components/gpu-docker.2"))


# ---- page sizes ----


def test_page_sizes_below_zero_are_refused_and_above_the_cap_clamped(api: Api) -> None:
    run = api.run_to_end(api.register(counted.compile().spec), n="3")
    calls = [
        (api.runs.ListRuns, runs.ListRunsRequest, {}),
        (api.runs.ListRunEvents, runs.ListRunEventsRequest, {"name": run.name}),
        (api.runs.ListLogs, runs.ListLogsRequest, {"name": run.name}),
    ]
    for call, request, kw in calls:
        code, details, _ = error_of(call, request(page_size=-1, **kw))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "page_size" in details
        assert call(request(page_size=2**31 - 1, **kw)) is not None
    assert api.runs.ListRunEvents(runs.ListRunEventsRequest(name=run.name, page_size=2**31 - 1))
    assert len(api.runs.ListRuns(runs.ListRunsRequest(page_size=2**31 - 1)).runs) >= 1
    assert _page_size(2**31 - 1, DEFAULT_RUNS_PAGE, MAX_RUNS_PAGE) == MAX_RUNS_PAGE
    assert _page_size(0, DEFAULT_PAGE, MAX_PAGE) == DEFAULT_PAGE


def test_auth_comes_before_reading_the_request(tmp_path: Path) -> None:
    client = plait.Client(home=tmp_path)
    try:
        with grpc.insecure_channel(client.address) as channel:
            call = channel.unary_unary("/plait.api.v1.RunService/GetRun")
            code, _, _ = error_of(call, _GARBAGE)  # no token
    finally:
        client.shutdown()
    assert code == grpc.StatusCode.UNAUTHENTICATED
