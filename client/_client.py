"""The client: talks gRPC to a control plane, the embedded one by default."""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import threading
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlparse

import grpc

from plait import errors
from plait._settings import plait_home, server_address
from plait.api.v1 import (
    artifact_service_pb2,
    artifact_service_pb2_grpc,
    pipeline_service_pb2,
    pipeline_service_pb2_grpc,
    resources_pb2,
    run_service_pb2,
    run_service_pb2_grpc,
    stack_service_pb2_grpc,
)
from plait.ir.canonical import canonical_json
from plait.ir.v1 import ir_pb2

if TYPE_CHECKING:
    from plait._pipeline import Pipeline


class Status(StrEnum):
    """A run's or a step's state; compares equal to its name (``run.status == "SUCCEEDED"``)."""

    UNSPECIFIED = "UNSPECIFIED"
    PENDING = "PENDING"
    QUEUED = "QUEUED"
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    CACHED = "CACHED"
    SKIPPED = "SKIPPED"
    CANCELLED = "CANCELLED"
    RETRYING = "RETRYING"
    CRASHED = "CRASHED"

    @property
    def is_final(self) -> bool:
        return self in _FINAL


_FINAL = {
    Status.SUCCEEDED,
    Status.FAILED,
    Status.CACHED,
    Status.SKIPPED,
    Status.CANCELLED,
    Status.CRASHED,
}


def _run_status(value: int) -> Status:
    return Status(resources_pb2.RunStatus.Name(value).removeprefix("RUN_STATUS_"))  # type: ignore[arg-type]


def _step_status(value: int) -> Status:
    return Status(resources_pb2.StepStatus.Name(value).removeprefix("STEP_STATUS_"))  # type: ignore[arg-type]


def _time(ts: Any, present: bool) -> datetime | None:
    return ts.ToDatetime().astimezone() if present else None


@dataclass(frozen=True)
class ArtifactInfo:
    """A stored output: where its bytes are and how to read them."""

    artifact_id: str
    output: str
    digest: str
    size: int
    uri: str
    materializer: str
    data_type: str
    unsafe: bool
    """True when loading it runs code (pickle)."""
    run_id: str
    step_id: str
    metadata: dict[str, Any]
    _client: Client | None = field(default=None, repr=False, compare=False)

    @classmethod
    def from_proto(cls, a: resources_pb2.Artifact, client: Client | None = None) -> ArtifactInfo:
        return cls(
            a.artifact_id,
            a.output,
            a.digest,
            a.size_bytes,
            a.uri,
            a.materializer,
            a.data_type,
            a.unsafe,
            a.run_id,
            a.step_id,
            json.loads(a.metadata_json) if a.metadata_json else {},
            client,
        )

    def read_bytes(self) -> bytes:
        """The stored bytes, checked against the digest: from the store when this machine
        reaches it, else streamed from the control plane."""
        from plait._artifact_store import LocalArtifactStore

        parsed = urlparse(self.uri)
        path = Path(unquote(parsed.path))
        local = parsed.scheme in ("", "file") and path.is_file()
        if not local and self._client is not None and not self._client.embedded:
            return self._client.download_artifact(self.artifact_id)
        if parsed.scheme not in ("", "file"):
            raise errors.ArtifactError(f"cannot read artifact at {self.uri}: not a local file")
        try:
            return LocalArtifactStore(path.parents[2]).get(self.digest)
        except FileNotFoundError as exc:
            raise errors.ArtifactNotFoundError(
                f"artifact {self.artifact_id}: its bytes are gone from the store ({exc})"
            ) from None
        except ValueError as exc:
            raise errors.ArtifactError(f"artifact {self.artifact_id}: {exc}") from None

    def load(self) -> Any:
        """The value, read with the materializer that wrote it."""
        from plait._materializers import get_materializer

        data = self.read_bytes()
        try:
            materializer = get_materializer(self.materializer)
        except LookupError as exc:
            raise errors.ArtifactError(str(exc)) from None
        return materializer.load(data)


@dataclass(frozen=True)
class StepError:
    """What a failed step raised."""

    type: str
    message: str
    traceback: str


@dataclass(frozen=True)
class StepRun:
    """One step of a run."""

    step_id: str
    status: Status
    attempt: int
    start_time: datetime | None
    end_time: datetime | None
    outputs: dict[str, ArtifactInfo]
    metadata: dict[str, Any]
    error: StepError | None
    cache_key: str
    upstream: list[str]

    @property
    def cached(self) -> bool:
        return self.status == Status.CACHED

    @property
    def duration(self) -> float | None:
        """Seconds from start to end, when both are known."""
        if self.start_time is None or self.end_time is None:
            return None
        return (self.end_time - self.start_time).total_seconds()

    def output(self, name: str | None = None) -> Any:
        """Loads an output's value; ``name`` may be left out when the step has one output."""
        if name is None:
            if len(self.outputs) != 1:
                raise errors.PlaitError(
                    f"step {self.step_id!r} has {len(self.outputs)} outputs "
                    f"({', '.join(self.outputs) or 'none'}): name one"
                )
            return next(iter(self.outputs.values())).load()
        if name not in self.outputs:
            if self.status not in (Status.SUCCEEDED, Status.CACHED):
                raise errors.PlaitError(
                    f"step {self.step_id!r} is {self.status}: it has no outputs"
                )
            raise errors.PlaitError(
                f"step {self.step_id!r} has no output {name!r}; outputs: "
                f"{', '.join(self.outputs) or 'none'}"
            )
        return self.outputs[name].load()

    @classmethod
    def from_proto(cls, s: resources_pb2.StepRun, client: Client | None = None) -> StepRun:
        return cls(
            step_id=s.step_id,
            status=_step_status(s.status),
            attempt=s.attempt,
            start_time=_time(s.start_time, s.HasField("start_time")),
            end_time=_time(s.end_time, s.HasField("end_time")),
            outputs={a.output: ArtifactInfo.from_proto(a, client) for a in s.outputs},
            metadata=json.loads(s.metadata_json) if s.metadata_json else {},
            error=StepError(s.error.type, s.error.message, s.error.traceback)
            if s.HasField("error")
            else None,
            cache_key=s.cache_key,
            upstream=list(s.upstream),
        )


@dataclass
class Run:
    """A run of a pipeline: its state, its steps, their outputs."""

    run_id: str
    pipeline: str
    pipeline_version: str
    status: Status
    parameters: dict[str, Any]
    create_time: datetime | None
    end_time: datetime | None
    steps: dict[str, StepRun]
    """Step runs by step id, in topological order."""
    no_cache: bool = False
    stack: str = ""
    """The stack the run used."""
    _client: Client | None = field(default=None, repr=False, compare=False)

    @classmethod
    def from_proto(cls, r: resources_pb2.Run, client: Client | None = None) -> Run:
        return cls(
            run_id=r.run_id,
            pipeline=r.pipeline,
            pipeline_version=r.pipeline_version,
            status=_run_status(r.status),
            parameters={p.name: json.loads(p.json) for p in r.parameters},
            create_time=_time(r.create_time, r.HasField("create_time")),
            end_time=_time(r.end_time, r.HasField("end_time")),
            steps={s.step_id: StepRun.from_proto(s, client) for s in r.steps},
            no_cache=r.no_cache,
            stack=r.stack.removeprefix("stacks/"),
            _client=client,
        )

    def raise_for_status(self) -> Run:
        """Raises StepFailedError naming the first failed step when the run did not succeed."""
        if self.status == Status.SUCCEEDED:
            return self
        for s in self.steps.values():
            if s.status in (Status.FAILED, Status.CRASHED):
                err = s.error or StepError("", "", "")
                raise errors.StepFailedError(s.step_id, err.type, err.message, err.traceback)
        raise errors.PlaitError(f"run {self.run_id} is {self.status}")

    def refresh(self) -> Run:
        """A fresh copy of this run from the control plane."""
        return self._client_or_default().get_run(self.run_id)

    def wait(self) -> Run:
        """Blocks until the run ends; returns the final state."""
        return self._client_or_default().wait(self.run_id)

    def logs(self, step: str | None = None) -> str:
        """The captured output of the run's steps (or one step), as text."""
        return "".join(e.text for e in self._client_or_default().logs(self.run_id, step))

    def _client_or_default(self) -> Client:
        return self._client or Client.default()


_REASONS: dict[str, type[errors.PlaitError]] = {}


def _collect(cls: type[errors.PlaitError]) -> None:
    _REASONS.setdefault(cls.reason, cls)
    for sub in cls.__subclasses__():
        _collect(sub)


_collect(errors.PlaitError)


def _map_rpc_error(exc: grpc.RpcError) -> errors.PlaitError:
    from google.rpc import error_details_pb2
    from grpc_status import rpc_status

    code = exc.code() if isinstance(exc, grpc.Call) else grpc.StatusCode.UNKNOWN
    details = exc.details() if isinstance(exc, grpc.Call) else str(exc)
    status = rpc_status.from_call(exc) if isinstance(exc, grpc.Call) else None
    if status is not None:
        for d in status.details:
            info = error_details_pb2.ErrorInfo()
            if d.Unpack(info) and info.reason in _REASONS:
                cls = _REASONS[info.reason]
                if cls is errors.StepFailedError or cls is errors.RpcError:
                    break
                return cls(details or "")
    if code == grpc.StatusCode.UNAVAILABLE:
        return errors.RpcError(f"the control plane is unavailable: {details}", code.name)
    return errors.RpcError(f"{code.name}: {details}", code.name)


class _Embedded:
    """The in-process control plane: its own thread and event loop, for the process's life."""

    def __init__(self, home: Path) -> None:
        from anyio.from_thread import start_blocking_portal

        from plait.engine import ControlPlane, ControlPlaneConfig

        workers = os.environ.get("PLAIT_WORKERS")
        self.control_plane = ControlPlane(
            ControlPlaneConfig(
                home=home,
                database_url=os.environ.get("PLAIT_DATABASE_URL", ""),
                max_workers=int(workers) if workers else None,
            )
        )
        self._portal_cm = start_blocking_portal("asyncio", name="plait-engine")
        self.portal = self._portal_cm.__enter__()
        try:
            self._future, port = self.portal.start_task(
                self.control_plane.serve, "127.0.0.1:0", name="plait-control-plane"
            )
        except BaseException:
            self._portal_cm.__exit__(None, None, None)
            raise
        self.address = f"127.0.0.1:{port}"
        self._closed = False
        atexit.register(self.close)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(BaseException):
            self.portal.call(self.control_plane.stop)
            self._future.result(timeout=30)
        # shutting down at exit: there is nobody left to report a failure to
        with contextlib.suppress(BaseException):
            self._portal_cm.__exit__(None, None, None)


_embedded: dict[Path, _Embedded] = {}
_default: Client | None = None
_lock = threading.Lock()


class Client:
    """A connection to a control plane.

    With no address, ``$PLAIT_SERVER`` is used when set; otherwise an embedded control plane
    starts in this process (one per home, shared by the clients that use it), with its store
    under ``home`` (default ``$PLAIT_HOME``).

    A server that requires a token gets ``token`` (default ``$PLAIT_TOKEN``). TLS is used when
    ``tls_ca`` (default ``$PLAIT_TLS_CA``) names the CA bundle that signed the server's
    certificate; ``$PLAIT_TLS_CERT`` and ``$PLAIT_TLS_KEY`` add a client certificate for mutual
    TLS.
    """

    def __init__(
        self,
        address: str | None = None,
        *,
        home: str | Path | None = None,
        token: str | None = None,
        tls_ca: str | None = None,
    ) -> None:
        address = address or (None if home is not None else server_address())
        self.home: Path | None = None
        if address is None:
            home = Path(home).resolve() if home is not None else plait_home()
            self.home = home
            with _lock:
                if home not in _embedded:
                    _embedded[home] = _Embedded(home)
                address = _embedded[home].address
            self.embedded = True
        else:
            self.embedded = False
        self.address = address
        options = [
            ("grpc.max_receive_message_length", 64 * 1024 * 1024),
            ("grpc.max_send_message_length", 64 * 1024 * 1024),
        ]
        token = token if token is not None else os.environ.get("PLAIT_TOKEN", "")
        self._metadata = (("authorization", f"Bearer {token}"),) if token else None
        tls_ca = tls_ca if tls_ca is not None else os.environ.get("PLAIT_TLS_CA", "")
        if tls_ca and not self.embedded:
            cert, key = os.environ.get("PLAIT_TLS_CERT"), os.environ.get("PLAIT_TLS_KEY")
            try:
                credentials = grpc.ssl_channel_credentials(
                    root_certificates=Path(tls_ca).read_bytes(),
                    private_key=Path(key).read_bytes() if key else None,
                    certificate_chain=Path(cert).read_bytes() if cert else None,
                )
            except OSError as exc:
                raise errors.PlaitError(f"cannot read the TLS files: {exc}") from None
            self._channel = grpc.secure_channel(address, credentials, options=options)
        else:
            self._channel = grpc.insecure_channel(address, options=options)
        self._pipelines = pipeline_service_pb2_grpc.PipelineServiceStub(self._channel)
        self._runs = run_service_pb2_grpc.RunServiceStub(self._channel)
        self._artifacts = artifact_service_pb2_grpc.ArtifactServiceStub(self._channel)
        self._stacks = stack_service_pb2_grpc.StackServiceStub(self._channel)

    @classmethod
    def default(cls) -> Client:
        """The process-wide client that pipelines use unless given another."""
        global _default
        with _lock:
            client = _default
        if client is None:
            client = cls()
            with _lock:
                _default = _default or client
                client = _default
        return client

    def close(self) -> None:
        """Closes this client's connection (an embedded control plane keeps running)."""
        self._channel.close()

    def shutdown(self) -> None:
        """Closes the connection and stops the embedded control plane of this client's home."""
        self._channel.close()
        if self.home is not None:
            with _lock:
                embedded = _embedded.pop(self.home, None)
            if embedded is not None:
                embedded.close()

    def _call(self, fn: Callable[..., Any], request: Any, **kw: Any) -> Any:
        try:
            return fn(request, metadata=self._metadata, **kw)
        except grpc.RpcError as exc:
            raise _map_rpc_error(exc) from None

    # ---- pipelines and runs ----

    def register(self, pipeline: Pipeline[Any]) -> str:
        """Registers a pipeline's current version; returns its resource name."""
        compiled = pipeline.compile()
        resp = self._call(
            self._pipelines.RegisterPipeline,
            pipeline_service_pb2.RegisterPipelineRequest(spec=compiled.spec),
        )
        return str(resp.name)

    def run_pipeline(
        self,
        pipeline: Pipeline[Any],
        parameters: Mapping[str, Any],
        *,
        no_cache: bool = False,
        wait: bool = True,
        request_id: str | None = None,
        on_events: Callable[[list[resources_pb2.RunEvent]], None] | None = None,
    ) -> Run:
        """Registers the pipeline, starts a run and (with ``wait``) follows it to its end."""
        version = self.register(pipeline)
        params = []
        for name, value in parameters.items():
            try:
                params.append(ir_pb2.NamedValue(name=name, json=canonical_json(value)))
            except (TypeError, ValueError):
                raise errors.ParameterError(
                    f"parameter {name!r}: {type(value).__name__} is not JSON"
                ) from None
        resp = self._call(
            self._runs.CreateRun,
            run_service_pb2.CreateRunRequest(
                pipeline_version=version,
                parameters=params,
                no_cache=no_cache,
                request_id=request_id or uuid.uuid4().hex,
            ),
        )
        run_id = resp.run.run_id
        if not wait:
            return Run.from_proto(resp.run, self)
        return self.wait(run_id, on_events=on_events)

    def wait(
        self,
        run_id: str,
        *,
        on_events: Callable[[list[resources_pb2.RunEvent]], None] | None = None,
    ) -> Run:
        """Follows a run until it ends, then returns it."""
        for events in self.watch(run_id, run_events_only=on_events is None):
            if on_events is not None:
                on_events(events)
        return self.get_run(run_id)

    def watch(
        self, run_id: str, *, after_sequence: int = 0, run_events_only: bool = False
    ) -> Iterator[list[resources_pb2.RunEvent]]:
        """Yields a run's events in batches, live, until the run ends."""
        stream = self._runs.WatchRunEvents(
            run_service_pb2.WatchRunEventsRequest(
                name=f"runs/{run_id}",
                after_sequence=after_sequence,
                run_events_only=run_events_only,
            ),
            metadata=self._metadata,
        )
        try:
            for resp in stream:
                yield list(resp.events)
        except grpc.RpcError as exc:
            raise _map_rpc_error(exc) from None

    def get_run(self, run_id: str) -> Run:
        """A run with its steps. A unique prefix of the id is enough."""
        resp = self._call(self._runs.GetRun, run_service_pb2.GetRunRequest(name=f"runs/{run_id}"))
        return Run.from_proto(resp.run, self)

    def list_runs(self, *, limit: int = 50, pipeline: str = "", status: str = "") -> list[Run]:
        """The newest runs first, without their steps."""
        out: list[Run] = []
        token = ""
        while len(out) < limit:
            resp = self._call(
                self._runs.ListRuns,
                run_service_pb2.ListRunsRequest(
                    page_size=min(limit - len(out), 1000),
                    page_token=token,
                    pipeline=pipeline,
                    status=resources_pb2.RunStatus.Value(f"RUN_STATUS_{status or 'UNSPECIFIED'}"),
                ),
            )
            out.extend(Run.from_proto(r, self) for r in resp.runs)
            token = resp.next_page_token
            if not token:
                break
        return out

    def logs(self, run_id: str, step: str | None = None) -> list[resources_pb2.LogEntry]:
        """The captured stdout and stderr of a run's steps, in order."""
        out: list[resources_pb2.LogEntry] = []
        after = 0
        while True:
            resp = self._call(
                self._runs.ListLogs,
                run_service_pb2.ListLogsRequest(
                    name=f"runs/{run_id}", step_id=step or "", after_sequence=after
                ),
            )
            out.extend(resp.entries)
            after = resp.next_after_sequence
            if not after:
                return out

    def stacks(self, method: str, request: Any) -> Any:
        """Calls a StackService method (``"ListStacks"``, ...) with this client's credentials."""
        return self._call(getattr(self._stacks, method), request)

    def cancel_run(self, run_id: str) -> Run:
        """Cancels a run (a no-op for one that already ended) and returns it."""
        resp = self._call(
            self._runs.CancelRun, run_service_pb2.CancelRunRequest(name=f"runs/{run_id}")
        )
        return Run.from_proto(resp.run, self)

    def stream_logs(
        self, run_id: str, step: str | None = None, *, after_sequence: int = 0
    ) -> Iterator[resources_pb2.LogEntry]:
        """Yields a run's captured output live, as steps produce it, until the run ends."""
        stream = self._runs.StreamLogs(
            run_service_pb2.StreamLogsRequest(
                name=f"runs/{run_id}", step_id=step or "", after_sequence=after_sequence
            ),
            metadata=self._metadata,
        )
        try:
            for resp in stream:
                yield from resp.entries
        except grpc.RpcError as exc:
            raise _map_rpc_error(exc) from None

    def list_pipelines(self) -> list[tuple[str, int, str]]:
        """(name, number of versions, newest version's resource name) of every pipeline."""
        resp = self._call(
            self._pipelines.ListPipelines, pipeline_service_pb2.ListPipelinesRequest()
        )
        return [
            (p.name.removeprefix("pipelines/"), p.version_count, p.latest_version)
            for p in resp.pipelines
        ]

    def get_artifact(self, artifact_id: str) -> ArtifactInfo:
        """An artifact's metadata. A unique prefix of the id is enough."""
        resp = self._call(
            self._artifacts.GetArtifact,
            artifact_service_pb2.GetArtifactRequest(name=f"artifacts/{artifact_id}"),
        )
        return ArtifactInfo.from_proto(resp.artifact, self)

    def download_artifact(self, artifact_id: str) -> bytes:
        """An artifact's bytes, streamed from the control plane and checked against the digest."""
        import hashlib

        chunks: list[bytes] = []
        digest = ""
        try:
            for msg in self._artifacts.DownloadArtifact(
                artifact_service_pb2.DownloadArtifactRequest(name=f"artifacts/{artifact_id}"),
                metadata=self._metadata,
            ):
                if msg.HasField("artifact"):
                    digest = msg.artifact.digest
                chunks.append(msg.data)
        except grpc.RpcError as exc:
            raise _map_rpc_error(exc) from None
        data = b"".join(chunks)
        if hashlib.sha256(data).hexdigest() != digest:
            raise errors.ArtifactError(
                f"artifact {artifact_id}: the bytes received do not match its digest"
            )
        return data

    def upload_artifact(self, data: bytes, chunk_size: int = 1024 * 1024) -> str:
        """Stores bytes in the control plane's artifact store; returns their sha256."""
        import hashlib

        def requests() -> Iterator[artifact_service_pb2.UploadArtifactRequest]:
            yield artifact_service_pb2.UploadArtifactRequest(
                header=artifact_service_pb2.UploadHeader(
                    size_bytes=len(data), sha256=hashlib.sha256(data).hexdigest()
                )
            )
            for i in range(0, len(data), chunk_size):
                yield artifact_service_pb2.UploadArtifactRequest(data=data[i : i + chunk_size])

        resp = self._call(self._artifacts.UploadArtifact, requests())
        return str(resp.digest)
