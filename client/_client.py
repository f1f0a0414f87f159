"""The client: talks gRPC to a control plane, the embedded one by default."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc

from plait import errors
from plait._channel import ChannelConfig, open_channel
from plait._models import ArtifactInfo, LogEntry, Run, RunEvent, RunStatus
from plait._settings import plait_home, server_address
from plait.api.v1 import (
    artifact_service_pb2,
    artifact_service_pb2_grpc,
    pipeline_service_pb2,
    pipeline_service_pb2_grpc,
    run_service_pb2,
    run_service_pb2_grpc,
    stack_service_pb2_grpc,
    token_service_pb2_grpc,
)
from plait.ir.canonical import canonical_json
from plait.ir.v1 import ir_pb2

if TYPE_CHECKING:
    from plait._pipeline import Pipeline


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


_default: Client | None = None
_lock = threading.Lock()


class Client:
    """A connection to a control plane.

    With no address, ``$PLAIT_SERVER`` is used when set; otherwise an embedded control plane
    starts in this process (one per home, shared by the clients that use it), with its store
    under ``home`` (default ``$PLAIT_HOME``).

    Every call carries a token: ``token``, else ``$PLAIT_TOKEN``, else the one ``plait login``
    saved for the address, else, for the daemon of this ``PLAIT_HOME`` on loopback, the
    credential it wrote there. An embedded engine gets its own secret. TLS is used when
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
        self.embedded = address is None
        if address is None:
            from plait._embedded import embedded_address

            self.home = Path(home).resolve() if home is not None else plait_home()
            address, token = embedded_address(self.home)
            # the embedded engine serves loopback in the clear; TLS is for remote servers
            tls_ca = ""
        self.address = address
        self._config = ChannelConfig.from_env(address, token=token, tls_ca=tls_ca)
        self._metadata = self._config.metadata
        self._channel = open_channel(self._config)
        self._pipelines = pipeline_service_pb2_grpc.PipelineServiceStub(self._channel)
        self._runs = run_service_pb2_grpc.RunServiceStub(self._channel)
        self._artifacts = artifact_service_pb2_grpc.ArtifactServiceStub(self._channel)
        self._stacks = stack_service_pb2_grpc.StackServiceStub(self._channel)
        self._tokens = token_service_pb2_grpc.TokenServiceStub(self._channel)

    @property
    def token(self) -> str:
        """The token this client sends (the embedded engine's secret for an embedded one)."""
        return self._config.token

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
            from plait._embedded import stop_embedded

            stop_embedded(self.home)

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
        on_events: Callable[[list[RunEvent]], None] | None = None,
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
        on_events: Callable[[list[RunEvent]], None] | None = None,
    ) -> Run:
        """Follows a run until it ends, then returns it."""
        for events in self.watch(run_id, run_events_only=on_events is None):
            if on_events is not None:
                on_events(events)
        return self.get_run(run_id)

    def watch(
        self, run_id: str, *, after_sequence: int = 0, run_events_only: bool = False
    ) -> Iterator[list[RunEvent]]:
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
                yield [RunEvent.from_proto(e) for e in resp.events]
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
                    **({"status": RunStatus(status).to_proto()} if status else {}),
                ),
            )
            out.extend(Run.from_proto(r, self) for r in resp.runs)
            token = resp.next_page_token
            if not token:
                break
        return out

    def logs(self, run_id: str, step: str | None = None) -> list[LogEntry]:
        """The captured stdout and stderr of a run's steps, in order."""
        out: list[LogEntry] = []
        after = 0
        while True:
            resp = self._call(
                self._runs.ListLogs,
                run_service_pb2.ListLogsRequest(
                    name=f"runs/{run_id}", step_id=step or "", after_sequence=after
                ),
            )
            out.extend(LogEntry.from_proto(e) for e in resp.entries)
            after = resp.next_after_sequence
            if not after:
                return out

    def stacks(self, method: str, request: Any) -> Any:
        """Calls a StackService method (``"ListStacks"``, ...) with this client's credentials."""
        return self._call(getattr(self._stacks, method), request)

    def tokens(self, method: str, request: Any) -> Any:
        """Calls a TokenService method (``"CreateToken"``, ...); it needs an admin token."""
        return self._call(getattr(self._tokens, method), request)

    def cancel_run(self, run_id: str) -> Run:
        """Cancels a run (a no-op for one that already ended) and returns it."""
        resp = self._call(
            self._runs.CancelRun, run_service_pb2.CancelRunRequest(name=f"runs/{run_id}")
        )
        return Run.from_proto(resp.run, self)

    def stream_logs(
        self, run_id: str, step: str | None = None, *, after_sequence: int = 0
    ) -> Iterator[LogEntry]:
        """Yields a run's captured output live, as steps produce it, until the run ends."""
        stream = self._runs.StreamLogs(
            run_service_pb2.StreamLogsRequest(
                name=f"runs/{run_id}", step_id=step or "", after_sequence=after_sequence
            ),
            metadata=self._metadata,
        )
        try:
            for resp in stream:
                yield from (LogEntry.from_proto(e) for e in resp.entries)
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
