"""The fuzz suite: generated and byte-mutated requests against every RPC of every service of a real
daemon, with the right token, none, a bogus one and one of the wrong role.

Every RPC of every ``plait.api.v1.*_service`` is found from the descriptors, so a new RPC is
fuzzed without editing this file. For each one, hypothesis sends a few hundred requests
(thousands with ``--long``), each a message built from the request's descriptor
(:func:`strategies.messages`) or its encoding broken (:func:`strategies.mutated`), sent as raw
bytes so that undecodable ones reach the server. No answer may be UNKNOWN or INTERNAL (nor may a
unary call hang); calls without a valid token must be UNAUTHENTICATED and calls with a token of
the wrong role PERMISSION_DENIED. After each RPC's batch the daemon must answer its health check
SERVING and a ListRuns, and its log must hold no traceback.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf.descriptor import Descriptor, MethodDescriptor
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from strategies import messages, mutated
from test_builds_cli import material, put_build
from test_security import Daemon

import plait
import plait.api.v1
from plait.api.v1 import pipeline_service_pb2 as pipes
from plait.api.v1 import pipeline_service_pb2_grpc, run_service_pb2_grpc
from plait.api.v1 import run_service_pb2 as runs
from plait.api.v1 import task_service_pb2 as tasks
from plait.engine.api._auth import roles_for
from plait.engine.api._limits import COUNTS, LIMITS

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

EXAMPLES, LONG_EXAMPLES = 300, 3000
"""Requests per RPC: in CI (the whole file in about two minutes on a busy 2-core machine), and
with ``--long``."""
UNARY_DEADLINE = 30.0
"""A hang guard: a unary call that takes this long is reported."""
STREAM_DEADLINE = 1.0
"""Calls whose responses stream (watching a run, following logs, a worker's stream) may last
until this deadline; DEADLINE_EXCEEDED is fine for them."""
MAX_READ = 3
"""Responses read from a stream before it is cancelled."""
BAD = (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL)
MAX_MESSAGE = 64 * 1024 * 1024


def _methods() -> list[MethodDescriptor]:
    out = []
    for mod in pkgutil.iter_modules(plait.api.v1.__path__):
        if not mod.name.endswith("_service_pb2"):
            continue
        module = importlib.import_module(f"plait.api.v1.{mod.name}")
        for service in module.DESCRIPTOR.services_by_name.values():
            out.extend(service.methods)
    return sorted(out, key=lambda m: m.full_name)


METHODS = _methods()


def _path(method: MethodDescriptor) -> str:
    return f"/{method.containing_service.full_name}/{method.name}"


# ---- a little real state, so that some fuzzed names hit real rows ----


@plait.step
def fuzz_total(n: int) -> int:
    print(f"summing {n}")
    return sum(range(n))


@plait.pipeline
def fuzz_seed(n: int = 3) -> None:
    fuzz_total(n)


@dataclass
class Problem:
    method: str
    code: str
    details: str
    request: str

    def __str__(self) -> str:
        return f"{self.method}: {self.code} {self.details[:300]!r}\n    request: {self.request}"


@dataclass
class Target:
    daemon: Daemon
    tokens: dict[str, str]
    """role (admin, user, worker) -> secret"""
    known: tuple[str, ...]
    hints: dict[str, tuple[str, ...]]
    """values for fields by name (see strategies.messages)"""
    seeds: dict[str, tuple[Message, ...]]
    """real requests by type (see strategies.messages)"""
    channels: dict[str, grpc.Channel] = field(default_factory=dict)
    log_offset: int = 0

    def channel(self, who: str) -> grpc.Channel:
        if who not in self.channels:
            options = [
                ("grpc.max_receive_message_length", MAX_MESSAGE),
                ("grpc.max_send_message_length", MAX_MESSAGE),
            ]
            if who == "none":
                self.channels[who] = grpc.insecure_channel(self.daemon.address, options)
            else:
                token = self.tokens.get(who, "plait_000000000000_not-a-secret")
                credentials = grpc.composite_channel_credentials(
                    grpc.local_channel_credentials(grpc.LocalConnectionType.LOCAL_TCP),
                    grpc.access_token_call_credentials(token),
                )
                self.channels[who] = grpc.secure_channel(self.daemon.address, credentials, options)
        return self.channels[who]

    def new_log(self) -> str:
        data = self.daemon.log.read_bytes()
        text = data[self.log_offset :].decode("utf-8", "replace")
        self.log_offset = len(data)
        return text

    def healthy(self) -> list[str]:
        """What is wrong with the daemon now: not serving, ListRuns failing, tracebacks."""
        wrong = []
        if self.daemon.proc.poll() is not None:
            wrong.append(f"the daemon exited with {self.daemon.proc.returncode}")
        try:
            health = health_pb2_grpc.HealthStub(self.channel("none"))
            status = health.Check(health_pb2.HealthCheckRequest(), timeout=UNARY_DEADLINE).status
            if status != health_pb2.HealthCheckResponse.SERVING:
                wrong.append(f"health check: {status}")
            stub = run_service_pb2_grpc.RunServiceStub(self.channel("user"))
            stub.ListRuns(runs.ListRunsRequest(page_size=1), timeout=UNARY_DEADLINE)
        except grpc.RpcError as exc:
            wrong.append(f"the daemon does not serve: {exc.code()} {exc.details()}")
        log = self.new_log()
        if "Traceback" in log:
            start = max(0, log.index("Traceback") - 2000)
            wrong.append(f"a traceback in the daemon's log:\n{log[start : start + 8000]}")
        return wrong


def _seed(daemon: Daemon) -> Target:
    tokens = {
        "admin": daemon.credential,
        "user": daemon.token("create", "fuzz-user", "--role", "user"),
        "worker": daemon.token("create", "fuzz-worker", "--role", "worker"),
    }
    # a token the fuzzer may revoke (never one it needs)
    victim = daemon.token("create", "fuzz-victim", "--role", "user").split("_")[1]
    client = plait.Client(daemon.address, token=tokens["user"])
    run = fuzz_seed.run({"n": 4}, client=client)
    assert run.status == "SUCCEEDED", run
    target = Target(daemon, tokens, (), {}, {})
    # builds: a ready one and a failed one (no image or folder behind them: pruning them for
    # real removes records only)
    db_url = f"sqlite:///{daemon.home / 'plait.db'}"
    build_keys = [
        put_build(db_url, material(["fuzz==1"]), runs=[run.run_id]),
        put_build(db_url, material(["fuzz==2"]), status="FAILED"),
    ]
    stub = run_service_pb2_grpc.RunServiceStub(target.channel("user"))
    proto = stub.GetRun(runs.GetRunRequest(name=f"runs/{run.run_id}"), timeout=30).run
    known = {
        proto.name,
        proto.run_id,
        proto.run_id[:8],
        proto.pipeline,
        f"pipelines/{proto.pipeline}",
        proto.pipeline_version,
        proto.pipeline_version.rsplit("/", 1)[-1],
        f"tokens/{victim}",
        victim,
        "local",
        "default",
        "stacks/default",
        f"{fuzz_total.__module__}:fuzz_total",
        *build_keys,
        *(k[:8] for k in build_keys),
    }
    for step in proto.steps:
        known.add(step.step_id)
        for art in step.outputs:
            known.update({art.name, art.artifact_id, art.digest, art.output})
    target.known = tuple(sorted(k for k in known if k))
    runs_ = (proto.name, proto.run_id, proto.run_id[:8])
    artifacts = tuple(a.name for s in proto.steps for a in s.outputs)
    target.hints = {
        "name": (*runs_, *artifacts, proto.pipeline_version, f"tokens/{victim}", "stacks/default"),
        "pipeline_version": (proto.pipeline_version,),
        "parent": (f"pipelines/{proto.pipeline}",),
        "pipeline": (proto.pipeline,),
        "run_id": (proto.run_id,),
        "retry_of": runs_,
        "step_id": tuple(s.step_id for s in proto.steps),
        "runner": ("local",),
        "plait.ir.v1.NamedValue.name": ("n",),
        "plait.api.v1.Component.name": ("components/local",),
        "plait.api.v1.GetBuildRequest.key": (*build_keys, build_keys[0][:6]),
        "plait.api.v1.PruneBuildsRequest.keys": (*build_keys, build_keys[1][:10]),
        "plait.api.v1.ListBuildsRequest.kind": ("image", "venv"),
    }
    version = proto.pipeline_version
    spec = pipeline_service_pb2_grpc.PipelineServiceStub(target.channel("user"))
    real = spec.GetPipelineVersion(pipes.GetPipelineVersionRequest(name=version), timeout=30)
    target.seeds = {
        "plait.api.v1.CreateRunRequest": (runs.CreateRunRequest(pipeline_version=version),),
        "plait.api.v1.RegisterPipelineRequest": (pipes.RegisterPipelineRequest(spec=real.spec),),
        "plait.api.v1.WorkerHello": (tasks.WorkerHello(worker_id="fuzz", runner="local"),),
        "plait.api.v1.LeaseToken": tuple(
            tasks.LeaseToken(run_id=proto.run_id, step_id=s.step_id, attempt=s.attempt)
            for s in proto.steps
        ),
    }
    target.new_log()
    return target


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    with pytest.MonkeyPatch.context() as mp:
        # the daemon's worker imports this module by its file, and it imports its neighbours
        mp.setenv("PYTHONPATH", str(Path(__file__).parent))
        daemon = Daemon(Path(tmp_path_factory.mktemp("fuzz")) / "home")
    try:
        target = _seed(daemon)
        yield target
        for channel in target.channels.values():
            channel.close()
    finally:
        daemon.stop()


# ---- the calls ----


@dataclass
class Call:
    who: str
    """right, none, bogus or wrong"""
    payloads: list[tuple[bytes, str]]
    """the serialized requests, with a short description of each"""

    def __repr__(self) -> str:
        return f"Call({self.who}, {[d for _, d in self.payloads]})"


def _shown(value: Any, limit: int = 600) -> str:
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def calls(descriptor: Descriptor, streaming: bool, target: Target) -> Any:
    generated = messages(descriptor, target.known, LIMITS, COUNTS, target.hints, target.seeds)
    raw_message = generated.map(lambda m: (m.SerializeToString(), f"message {_shown(m)}"))
    broken = mutated(generated.map(lambda m: m.SerializeToString())).map(
        lambda b: (b, f"bytes {_shown(b)}")
    )
    payload = st.one_of(raw_message, raw_message, broken)
    payloads = st.lists(payload, max_size=4) if streaming else payload.map(lambda p: [p])
    who = st.sampled_from(["right"] * 7 + ["none", "bogus", "wrong"])
    return st.builds(Call, who, payloads)


def _roles(method: MethodDescriptor) -> tuple[str, str | None]:
    """The token to call ``method`` with, and one of a role that may not call it (None when
    every role may: ArtifactService)."""
    allowed = {str(r) for r in roles_for(_path(method))}
    right = next(r for r in ("user", "worker", "admin") if r in allowed)
    wrong = next((r for r in ("worker", "user", "admin") if r not in allowed), None)
    return right, wrong


def _invoke(channel: grpc.Channel, method: MethodDescriptor, payloads: list[bytes]) -> None:
    path = _path(method)
    streaming_out = method.server_streaming
    timeout = STREAM_DEADLINE if streaming_out else UNARY_DEADLINE
    if method.client_streaming:
        requests = iter(payloads)
        if streaming_out:
            responses = channel.stream_stream(path)(requests, timeout=timeout)
        else:
            channel.stream_unary(path)(requests, timeout=timeout)
            return
    else:
        if streaming_out:
            responses = channel.unary_stream(path)(payloads[0], timeout=timeout)
        else:
            channel.unary_unary(path)(payloads[0], timeout=timeout)
            return
    for i, _ in enumerate(responses):
        if i + 1 >= MAX_READ:
            responses.cancel()
            break


def _send(target: Target, method: MethodDescriptor, call: Call) -> Problem | None:
    right, wrong = _roles(method)
    who = "right" if call.who == "wrong" and wrong is None else call.who
    channel = target.channel({"right": right, "wrong": wrong or right}.get(who, who))
    expected = {
        "none": grpc.StatusCode.UNAUTHENTICATED,
        "bogus": grpc.StatusCode.UNAUTHENTICATED,
        "wrong": grpc.StatusCode.PERMISSION_DENIED,
    }.get(who)
    try:
        _invoke(channel, method, [p for p, _ in call.payloads])
        code, details = grpc.StatusCode.OK, ""
    except grpc.RpcError as exc:
        code, details = exc.code(), exc.details() or ""
    if code == grpc.StatusCode.CANCELLED and method.server_streaming:
        return None  # we cancelled it after MAX_READ responses
    if expected is not None:
        ok = code == expected
    elif code == grpc.StatusCode.DEADLINE_EXCEEDED:
        ok = method.server_streaming
    else:
        ok = code not in BAD
    if ok:
        return None
    shown = "; ".join(d for _, d in call.payloads) or "(no messages)"
    return Problem(method.full_name, f"{code.name} ({call.who} token)", details, shown[:3000])


@pytest.mark.parametrize("method", METHODS, ids=lambda m: m.full_name.removeprefix("plait.api.v1."))
def test_fuzzed_requests_get_proper_errors_and_the_daemon_keeps_serving(
    target: Target, method: MethodDescriptor, long_fuzz: bool
) -> None:
    problems: list[Problem] = []
    strategy = calls(method.input_type, method.client_streaming, target)

    @settings(
        max_examples=LONG_EXAMPLES if long_fuzz else EXAMPLES,
        derandomize=False,
        deadline=None,
        database=None,
        phases=[Phase.explicit, Phase.generate],  # problems are collected, never shrunk
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.large_base_example,
            HealthCheck.filter_too_much,
        ],
    )
    @given(strategy)
    def fuzz(call: Call) -> None:
        problem = _send(target, method, call)
        if problem is not None:
            problems.append(problem)

    fuzz()
    wrong = target.healthy()
    report = [str(p) for p in problems[:40]] + wrong
    assert not report, f"{len(problems)} bad answers; " + "\n".join(report)


def test_the_daemon_log_has_no_traceback(target: Target) -> None:
    log = target.daemon.log.read_text(errors="replace")
    assert "Traceback" not in log, log[log.index("Traceback") - 2000 :][:10000]


def test_json_nested_deeper_than_the_parser_goes_is_refused(target: Target) -> None:
    """Found by the fuzzer: artifact metadata nested deeper than Python's JSON parser recurses
    made CompleteTask fail with UNKNOWN (a RecursionError) instead of refusing the request."""
    from plait.api.v1 import resources_pb2, worker_service_pb2, worker_service_pb2_grpc

    deep = "[" * 5000 + "]" * 5000
    completed = tasks.TaskCompleted(
        token=tasks.LeaseToken(run_id="r", step_id="s", attempt=1, epoch=1),
        outputs=[resources_pb2.Artifact(output="output", metadata_json=deep)],
    )
    stub = worker_service_pb2_grpc.WorkerServiceStub(target.channel("worker"))
    with pytest.raises(grpc.RpcError) as refused:
        stub.CompleteTask(
            worker_service_pb2.CompleteTaskRequest(completed=completed), timeout=UNARY_DEADLINE
        )
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT, refused.value.details()
    assert "nested too deeply" in (refused.value.details() or "")
    assert not target.healthy()


def test_every_service_is_fuzzed() -> None:
    services = {m.containing_service.name for m in METHODS}
    assert services >= {"PipelineService", "RunService", "ArtifactService", "StackService"}
    assert services >= {"TaskService", "TokenService", "BuildService"}
