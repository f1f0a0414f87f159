"""The client: talks gRPC to a control plane, the embedded one by default."""

from __future__ import annotations

import logging
import os
import random
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import grpc

from plait import errors
from plait._channel import ChannelConfig, open_channel
from plait._explain import CacheExplanation
from plait._file import files_to_json
from plait._models import (
    ArtifactInfo,
    BuildInfo,
    CodeSource,
    LogEntry,
    PrunedBuilds,
    Run,
    RunEvent,
    RunStatus,
)
from plait._settings import plait_home, server_address
from plait.api.v1 import (
    artifact_service_pb2,
    artifact_service_pb2_grpc,
    build_service_pb2,
    build_service_pb2_grpc,
    pipeline_service_pb2,
    pipeline_service_pb2_grpc,
    resources_pb2,
    run_service_pb2,
    run_service_pb2_grpc,
    stack_service_pb2_grpc,
    token_service_pb2_grpc,
)
from plait.ir.canonical import canonical_json
from plait.ir.v1 import ir_pb2

if TYPE_CHECKING:
    from plait._archive import SourceArchive
    from plait._pipeline import Pipeline

_log = logging.getLogger(__name__)

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


RECONNECT_TIMEOUT = 300.0
"""How long, in seconds, a client following a run (`Client.watch`, `Client.wait`,
`Client.stream_logs`) keeps trying to reach a control plane that went away, unless
``$PLAIT_RECONNECT_TIMEOUT`` or `Client.reconnect_timeout` says otherwise."""
RECONNECT_DELAYS = (0.1, 2.0)
"""The first and the longest pause between two tries to reconnect (doubling, with jitter)."""
_LOST = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
_REGISTERED_KEPT = 1024
"""Registered versions a client remembers (`Client._registered`)."""


def _lost(exc: grpc.RpcError) -> bool:
    """Whether a failed call means the control plane went away (restarting, stopping,
    unreachable), so that following a run should reconnect rather than fail."""
    return isinstance(exc, grpc.Call) and exc.code() in _LOST


def _reconnect_timeout() -> float:
    raw = os.environ.get("PLAIT_RECONNECT_TIMEOUT", "")
    if not raw:
        return RECONNECT_TIMEOUT
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value >= 0:  # NaN too
        raise errors.PlaitError(
            f"PLAIT_RECONNECT_TIMEOUT must be a number of seconds, 0 or more, not {raw!r}"
        )
    return value


class _Sequenced(Protocol):
    @property
    def sequence(self) -> int: ...


_S = TypeVar("_S", bound=_Sequenced)
_T = TypeVar("_T")

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

    Following a run (`watch`, `wait`, `stream_logs`, and so a pipeline call that waits) survives
    a restart of the control plane: when it goes away, the client tries again, with backoff, for
    up to ``reconnect_timeout`` seconds (default ``$PLAIT_RECONNECT_TIMEOUT``, else
    `RECONNECT_TIMEOUT`), and goes on after the last event or log entry it saw; nothing is lost
    or repeated. `on_reconnect`, when set, is called with a one-line notice each time the
    control plane is lost (else the notice is logged as a warning on the ``plait._client``
    logger).
    """

    def __init__(
        self,
        address: str | None = None,
        *,
        home: str | Path | None = None,
        token: str | None = None,
        tls_ca: str | None = None,
        reconnect_timeout: float | None = None,
    ) -> None:
        self.reconnect_timeout = (
            reconnect_timeout if reconnect_timeout is not None else _reconnect_timeout()
        )
        """Seconds to keep trying to reach a control plane that went away while following."""
        self.on_reconnect: Callable[[str], None] | None = None
        """Called with a one-line notice when following a run lost the control plane."""
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
        self._packer: ThreadPoolExecutor | None = None
        """Packs the source root while the pipeline registers (one thread, made on first use)."""
        self._uploaded: set[str] = set()
        """Archive digests this client uploaded or found remembered (saves reading the record)."""
        self._registered: dict[str, str] = {}
        """The resource names of the versions this client registered, by digest: a run of one
        of them skips RegisterPipeline (sending and validating a large pipeline again costs
        more than a cached run of it); a server that lacks it answers NOT_FOUND to CreateRun,
        and it is registered again."""
        self._channel = open_channel(self._config)
        self._pipelines = pipeline_service_pb2_grpc.PipelineServiceStub(self._channel)
        self._runs = run_service_pb2_grpc.RunServiceStub(self._channel)
        self._artifacts = artifact_service_pb2_grpc.ArtifactServiceStub(self._channel)
        self._stacks = stack_service_pb2_grpc.StackServiceStub(self._channel)
        self._tokens = token_service_pb2_grpc.TokenServiceStub(self._channel)
        self._builds = build_service_pb2_grpc.BuildServiceStub(self._channel)

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
        if self._packer is not None:
            self._packer.shutdown(wait=False)

    def shutdown(self) -> None:
        """Closes the connection and stops the embedded control plane of this client's home."""
        self.close()
        if self.home is not None:
            from plait._embedded import stop_embedded

            stop_embedded(self.home)

    def _call(self, fn: Callable[..., Any], request: Any, **kw: Any) -> Any:
        try:
            return fn(request, metadata=self._metadata, **kw)
        except grpc.RpcError as exc:
            raise _map_rpc_error(exc) from None

    def _call_again(self, fn: Callable[..., Any], request: Any, what: str) -> Any:
        """An idempotent call (registering a version, creating a run under its request id),
        tried again, with backoff and jitter, while the control plane is away (restarting, or a
        replica gone and the channel moving to another) for up to `reconnect_timeout`."""
        delay, longest = RECONNECT_DELAYS
        lost_since: float | None = None
        while True:
            try:
                return fn(request, metadata=self._metadata)
            except grpc.RpcError as exc:
                if not _lost(exc):
                    raise _map_rpc_error(exc) from None
                now = time.monotonic()
                if lost_since is None:
                    lost_since = now
                    self._notify(f"lost the control plane at {self.address} ({what}); retrying")
                if now - lost_since >= self.reconnect_timeout:
                    raise _map_rpc_error(exc) from None
                time.sleep(random.uniform(delay / 2, delay))
                delay = min(delay * 2, longest)

    # ---- pipelines and runs ----

    def register(self, pipeline: Pipeline[Any], parameters: Mapping[str, Any] | None = None) -> str:
        """Registers a pipeline's current version; returns its resource name.

        Args:
            pipeline: the pipeline.
            parameters: the values of its structural parameters (those its function uses as
                values) to compile it with; defaults for the rest (see
                :meth:`plait.Pipeline.compile`).
        """
        compiled = pipeline.compile(parameters)
        resp = self._call_again(
            self._pipelines.RegisterPipeline,
            pipeline_service_pb2.RegisterPipelineRequest(spec=compiled.spec),
            f"registering {compiled.spec.name}",
        )
        if len(self._registered) >= _REGISTERED_KEPT:  # keep the newest
            self._registered.pop(next(iter(self._registered)), None)
        self._registered[compiled.version] = str(resp.name)
        return str(resp.name)

    def _code_home(self) -> Path:
        return self.home if self.home is not None else plait_home()

    def _server_key(self) -> str:
        """Whom uploads are remembered for: this server, or the embedded engine of the home."""
        return "embedded" if self.embedded else self.address

    def _pack(self, pipeline: Pipeline[Any]) -> SourceArchive | None:
        """The archive of the pipeline's source root; None for a pipeline defined in an
        interactive session (its steps come from the workers' own path)."""
        from plait._archive import pack_source, pipeline_root

        root = pipeline_root(pipeline.fn)
        if root is None:
            return None
        return pack_source(root, home=self._code_home())

    def _upload_code(self, archive: SourceArchive, *, force: bool = False) -> SourceArchive:
        """Uploads a code archive unless this home remembers this server has it; returns the
        archive the server has (another one when the root changed since it was packed)."""
        from plait._archive import remember_upload, was_uploaded

        home, server = self._code_home(), self._server_key()
        if not force and (
            archive.digest in self._uploaded or was_uploaded(home, server, archive.digest)
        ):
            self._uploaded.add(archive.digest)
            return archive
        self._uploaded.discard(archive.digest)
        archive = archive.with_content()
        assert archive.content is not None
        digest = self.upload_artifact(archive.content)
        if digest != archive.digest:  # cannot happen: the server hashes what it stores
            raise errors.ArtifactError(
                f"the control plane stored the code archive as {digest}, not {archive.digest}"
            )
        remember_upload(home, server, archive.digest)
        self._uploaded.add(archive.digest)
        _log.info(
            "uploaded code archive %s (%d files, %d bytes) of %s to %s",
            archive.digest,
            archive.files,
            archive.size,
            archive.root,
            server,
        )
        return archive

    def _run_code(self, pipeline: Pipeline[Any]) -> tuple[CodeSource | None, SourceArchive | None]:
        """What a run records of its code, and the archive it ships (uploaded).

        The embedded engine runs in this very process, on this machine: its workers import the
        code in place from the source root (no archive to pack, upload and unpack); a run
        records the root's git commit and dirty flag. A control plane elsewhere gets the
        archive.
        """
        from plait._archive import git_state, pipeline_root

        if self.embedded:
            root = pipeline_root(pipeline.fn)
            if root is None:
                return None, None
            commit, dirty = git_state(root)
            return CodeSource("", commit, dirty, local_root=str(root)), None
        archive = self._pack(pipeline)
        if archive is None:
            return None, None
        archive = self._upload_code(archive)
        return CodeSource(archive.digest, archive.git_commit, archive.git_dirty), archive

    def push_code(self, pipeline: Pipeline[Any]) -> CodeSource | None:
        """Packs the pipeline's source root and uploads the archive once per digest.

        The source root is the nearest folder above the pipeline's file that holds
        ``pyproject.toml`` or ``.git`` (else the file's folder; ``$PLAIT_SOURCE_ROOT`` overrides
        it). Runs do this themselves; call it to ship the code ahead of them.

        Returns:
            What a run of this code records; None when the pipeline has no source file.

        Raises:
            PipelineDefinitionError: the source root is too large to ship.
        """
        archive = self._pack(pipeline)
        if archive is None:
            return None
        archive = self._upload_code(archive)
        return CodeSource(archive.digest, archive.git_commit, archive.git_dirty)

    def run_pipeline(
        self,
        pipeline: Pipeline[Any],
        parameters: Mapping[str, Any],
        *,
        no_cache: bool = False,
        wait: bool = True,
        request_id: str | None = None,
        on_events: Callable[[list[RunEvent]], None] | None = None,
        refresh: Sequence[str] = (),
    ) -> Run:
        """Registers the pipeline, starts a run and (with ``wait``) follows it to its end.

        The parameters are checked against the pipeline's annotations first (nothing starts
        when one is wrong), and the pipeline is compiled with them (see
        :meth:`plait.Pipeline.compile`: its structural parameters' values are part of its
        version). A :class:`plait.File` or :class:`pathlib.Path` value (or a string, for a
        parameter annotated with one of them) is read now: its content digest is part of the
        cache key of the steps that take it.

        Args:
            refresh: ids of steps that run even when the cache holds their outputs (a mapped
                step's id names all its items); their downstream runs again only where the
                new outputs differ.

        Raises:
            ParameterError: a parameter is unknown, not JSON or does not fit its type.
            FileNotFoundError: a file given as a parameter does not exist.
        """
        parameters = {
            name: files_to_json(value, _declared(pipeline, name))
            for name, value in parameters.items()
        }
        return self._start(pipeline, parameters, no_cache, wait, request_id, on_events, refresh)

    def retry_run(
        self,
        run_id: str,
        pipeline: Pipeline[Any] | None = None,
        *,
        wait: bool = True,
        request_id: str | None = None,
        on_events: Callable[[list[RunEvent]], None] | None = None,
    ) -> Run:
        """Starts a new run that retries an ended run: the same parameters, every step that
        succeeded (or was cached) there reused, the others and their downstream run.

        A reused step is CACHED in the new run, its outputs those of the old run, whatever the
        cache holds (a ``cache=False`` step that succeeded is reused too) as long as their
        bytes are still stored. The steps that failed, were skipped or were cancelled run, and
        so does everything downstream of them. The new run records the run it retries
        (``Run.retry_of``).

        Args:
            run_id: the run to retry (a unique prefix of its id is enough).
            pipeline: the pipeline as the code is now: it is compiled with the old run's
                parameters (the same structural values) and registered, and the new run runs
                this code. A step that is not in it any more is ignored; a new step runs.
                Without it, the old run's version and code run again (the embedded engine does
                not record where a run's code came from: its workers import it from their own
                path, so pass the pipeline there).

        Raises:
            RunNotFoundError: no such run.
            InUseError: the run has not ended yet.
        """
        if pipeline is None:
            request = run_service_pb2.CreateRunRequest(
                retry_of=f"runs/{run_id}", request_id=request_id or uuid.uuid4().hex
            )
            what = f"retrying run {run_id}"
            resp = self._call_again(self._runs.CreateRun, request, what)
            if not wait:
                return Run.from_proto(resp.run, self)
            return self.wait(resp.run.run_id, on_events=on_events)
        old = self.get_run(run_id)
        if not old.status.is_final:
            raise errors.InUseError(
                f"run {old.run_id} has not ended (it is {old.status.lower()}): a run can be "
                f"retried once it has ended (wait for it, or cancel it)"
            )
        return self._start(
            pipeline, old.parameters, False, wait, request_id, on_events, (), old.run_id
        )

    def _start(
        self,
        pipeline: Pipeline[Any],
        parameters: Mapping[str, Any],
        no_cache: bool,
        wait: bool,
        request_id: str | None,
        on_events: Callable[[list[RunEvent]], None] | None,
        refresh: Sequence[str],
        retry_of: str = "",
    ) -> Run:
        """Compiles, registers and runs ``pipeline`` (parameters as JSON values)."""
        values = pipeline.check_parameters(parameters)
        if self._packer is None:
            self._packer = ThreadPoolExecutor(1, thread_name_prefix="plait-pack")
        packing = self._packer.submit(self._run_code, pipeline)  # while the pipeline registers
        try:
            digest = pipeline.compile(values).version
            version = self._registered.get(digest)
            remembered = version is not None
            if version is None:
                version = self.register(pipeline, values)
        finally:
            code, archive = packing.result()
        params = [
            ir_pb2.NamedValue(name=name, json=canonical_json(value))
            for name, value in values.items()
        ]
        request = run_service_pb2.CreateRunRequest(
            pipeline_version=version,
            parameters=params,
            no_cache=no_cache,
            request_id=request_id or uuid.uuid4().hex,
            refresh=list(refresh),
            retry_of=f"runs/{retry_of}" if retry_of else "",
        )
        if code is not None:
            request.code.CopyFrom(code.to_proto())
        try:
            resp = self._create_run(request, archive, pipeline.name)
        except errors.PipelineNotFoundError:
            if not remembered:
                raise
            # the server lost the version (its store was replaced) or is another one
            self._registered.pop(digest, None)
            request.pipeline_version = self.register(pipeline, values)
            resp = self._create_run(request, archive, pipeline.name)
        run_id = resp.run.run_id
        if not wait:
            return Run.from_proto(resp.run, self)
        return self.wait(run_id, on_events=on_events)

    def _create_run(
        self, request: run_service_pb2.CreateRunRequest, archive: SourceArchive | None, name: str
    ) -> Any:
        """CreateRun, with the code archive uploaded again when the server lacks it."""
        what = f"creating a run of {name}"
        try:
            return self._call_again(self._runs.CreateRun, request, what)
        except errors.ArtifactNotFoundError:
            if archive is None:
                raise
            # the server lost the archive, or is not the one this home remembers uploading to
            archive = self._upload_code(archive, force=True)
            request.code.CopyFrom(
                CodeSource(archive.digest, archive.git_commit, archive.git_dirty).to_proto()
            )
            return self._call_again(self._runs.CreateRun, request, what)

    def wait(
        self,
        run_id: str,
        *,
        on_events: Callable[[list[RunEvent]], None] | None = None,
    ) -> Run:
        """Follows a run until it ends, then returns it.

        A restart of the control plane meanwhile is waited out (see `Client`): a run that goes
        on is never reported as failed.

        Args:
            run_id: the run's id (a unique prefix of it is enough).
            on_events: called with each batch of the run's events, steps' included.

        Raises:
            RpcError: the control plane did not come back within `reconnect_timeout`.
        """
        for events in self.watch(run_id, run_events_only=on_events is None):
            if on_events is not None:
                on_events(events)
        return self._retrying(run_id, lambda: self.get_run(run_id))

    def watch(
        self, run_id: str, *, after_sequence: int = 0, run_events_only: bool = False
    ) -> Iterator[list[RunEvent]]:
        """Yields a run's events after ``after_sequence`` in batches, live, until the run ends.

        Each event comes once, in order (`RunEvent.sequence` grows). When the control plane
        goes away, the stream is opened again after the last event yielded (see `Client`).

        Args:
            run_id: the run's id (a unique prefix of it is enough).
            after_sequence: only events after this one (0: from the start).
            run_events_only: only the run's own events, not its steps'.

        Raises:
            RunNotFoundError: there is no such run.
            RpcError: the control plane did not come back within `reconnect_timeout`.
        """

        def open_stream(after: int) -> Any:
            return self._runs.WatchRunEvents(
                run_service_pb2.WatchRunEventsRequest(
                    name=f"runs/{run_id}", after_sequence=after, run_events_only=run_events_only
                ),
                metadata=self._metadata,
            )

        def ends_run(events: list[RunEvent]) -> bool:
            return any(e.run_status is not None and e.run_status.is_final for e in events)

        yield from self._resumable(
            run_id,
            open_stream,
            after_sequence,
            lambda resp: [RunEvent.from_proto(e) for e in resp.events],
            ends_run,
        )

    def _resumable(
        self,
        run_id: str,
        open_stream: Callable[[int], Any],
        after: int,
        unpack: Callable[[Any], list[_S]],
        ends: Callable[[list[_S]], bool] | None,
    ) -> Iterator[list[_S]]:
        """The batches of a resumable server stream of sequenced items (after ``after``), until
        it ends; when the control plane goes away, waits for it (`_reconnect`) and opens the
        stream again after the last item yielded, dropping any item seen before.

        Args:
            run_id: the run followed (named in the notices and errors).
            open_stream: opens the stream after a sequence number.
            after: the sequence number to start after.
            unpack: a response's items.
            ends: whether a batch holds the run's end; the stream ending before such a batch
                means the control plane went away (it stopped). None: the stream's end is the
                end.
        """
        while True:
            stream = open_stream(after)
            try:
                for resp in stream:
                    batch = [item for item in unpack(resp) if item.sequence > after]
                    if not batch:
                        continue
                    after = batch[-1].sequence
                    yield batch
                    if ends is not None and ends(batch):
                        return
                if ends is None:
                    return
                detail = "the stream ended before the run did"
            except grpc.RpcError as exc:
                # a stream raises itself, from its own frame: it and its traceback are a cycle
                # that only the garbage collector would free, at a moment of its choosing (the
                # interpreter's exit, where its finalizer can hang on a lock of gRPC's); cut it
                exc.__traceback__ = None
                if not _lost(exc):
                    raise _map_rpc_error(exc) from None
                detail = str(exc.details()) if isinstance(exc, grpc.Call) else str(exc)
            finally:
                stream.cancel()  # a no-op once the stream ended; stops one left early
            # one notice per loss; once it answers, a later loss is a new one, timed anew
            self._notify(f"lost the control plane at {self.address} ({detail}); reconnecting")
            self._reconnect(run_id, time.monotonic())

    def _notify(self, notice: str) -> None:
        if self.on_reconnect is not None:
            self.on_reconnect(notice)
        else:
            _log.warning("%s", notice)

    def _reconnect(self, run_id: str, lost_since: float) -> None:
        """Waits, with backoff and jitter, until the control plane answers about the run again.

        Raises:
            RpcError: it did not answer within `reconnect_timeout` seconds of ``lost_since``.
            PlaitError: it answered with an error (the run is gone, the token is refused ...).
        """
        delay, longest = RECONNECT_DELAYS
        while True:
            left = lost_since + self.reconnect_timeout - time.monotonic()
            if left <= 0:
                raise errors.RpcError(
                    f"the control plane at {self.address} has not answered for "
                    f"{self.reconnect_timeout:g} s; run {run_id} may still be going: follow it "
                    f"again with `plait runs watch {run_id}` once the server is back",
                    grpc.StatusCode.UNAVAILABLE.name,
                )
            time.sleep(min(left, random.uniform(delay / 2, delay)))
            delay = min(delay * 2, longest)
            try:
                self._runs.GetRun(
                    run_service_pb2.GetRunRequest(name=f"runs/{run_id}"),
                    metadata=self._metadata,
                    timeout=max(0.1, min(left, 10.0)),
                )
                return
            except grpc.RpcError as exc:
                if not _lost(exc):
                    raise _map_rpc_error(exc) from None

    def _retrying(self, run_id: str, call: Callable[[], _T]) -> _T:
        """``call()`` (a read about the run), waiting out a restart of the control plane."""
        while True:
            try:
                return call()
            except errors.RpcError as exc:
                if exc.code not in {code.name for code in _LOST}:
                    raise
                self._notify(f"lost the control plane at {self.address}; reconnecting")
            self._reconnect(run_id, time.monotonic())

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
                    status=RunStatus(status).to_proto()
                    if status
                    else resources_pb2.RUN_STATUS_UNSPECIFIED,
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

    # ---- builds ----

    def list_builds(self, *, limit: int = 100, kind: str = "") -> list[BuildInfo]:
        """Builds of environments, the most recently used first.

        Args:
            limit: the most to return (the server caps it at 1000).
            kind: only ``image`` or only ``venv`` builds; empty: both.
        """
        resp = self._call(
            self._builds.ListBuilds, build_service_pb2.ListBuildsRequest(limit=limit, kind=kind)
        )
        return [BuildInfo.from_proto(b) for b in resp.builds]

    def get_build(self, key: str) -> BuildInfo:
        """One build, by its key or a unique prefix of at least 6 hex digits.

        Raises:
            NotFoundError: no build has that key, or the prefix is ambiguous.
        """
        resp = self._call(self._builds.GetBuild, build_service_pb2.GetBuildRequest(key=key))
        return BuildInfo.from_proto(resp.build)

    def prune_builds(
        self,
        *,
        unused_for_seconds: float = 0.0,
        keys: Sequence[str] = (),
        dry_run: bool = False,
    ) -> PrunedBuilds:
        """Removes builds (their images or virtualenvs, and their records).

        Never one being built, nor one a run that has not ended used.

        Args:
            unused_for_seconds: only builds not used for at least this long (0: any age).
            keys: only these builds (keys or unique prefixes); empty: every build the age
                allows.
            dry_run: only say what would be removed.

        Raises:
            NotFoundError: a key names no build.
            InUseError: a build named is being built, or used by a run that has not ended.
        """
        resp = self._call(
            self._builds.PruneBuilds,
            build_service_pb2.PruneBuildsRequest(
                unused_for_seconds=unused_for_seconds, keys=list(keys), dry_run=dry_run
            ),
        )
        return PrunedBuilds(
            tuple(BuildInfo.from_proto(b) for b in resp.builds), resp.freed_bytes, dry_run
        )

    def explain_step(self, run_id: str, step_id: str) -> CacheExplanation:
        """Why a step of a run ran or was served from the cache: its cache key compared with
        the nearest earlier cache entry of the same step (same pipeline, same step id),
        component by component (code, outputs, each parameter and input, environment,
        cache_version); for a CACHED step, the run whose outputs it reuses.

        Raises:
            RunNotFoundError: no run has this id (or a unique prefix of it).
            NotFoundError: the run has no such step.
        """
        resp = self._call(
            self._runs.ExplainStep,
            run_service_pb2.ExplainStepRequest(name=f"runs/{run_id}", step_id=step_id),
        )
        return CacheExplanation.from_proto(resp)

    def cancel_run(self, run_id: str) -> Run:
        """Cancels a run (a no-op for one that already ended) and returns it."""
        resp = self._call(
            self._runs.CancelRun, run_service_pb2.CancelRunRequest(name=f"runs/{run_id}")
        )
        return Run.from_proto(resp.run, self)

    def stream_logs(
        self, run_id: str, step: str | None = None, *, after_sequence: int = 0
    ) -> Iterator[LogEntry]:
        """Yields a run's (or one step's) captured stdout and stderr live, as the steps write
        it, until the run ends; for a run that ended, all of it.

        Steps send their output while they run, every quarter of a second, in pieces that end
        at line ends where they can (a long or unfinished line may come in several entries).
        Each entry comes once, in order (`LogEntry.sequence` grows); when the control plane
        goes away, the stream is opened again after the last entry yielded (see `Client`).
        Start after the ``sequence`` of an entry already seen to resume.

        Args:
            run_id: the run's id (a unique prefix of it is enough).
            step: only this step's output.
            after_sequence: only entries after this one (0: from the start).

        Raises:
            RunNotFoundError: there is no such run.
            RpcError: the control plane did not come back within `reconnect_timeout`.
        """

        def open_stream(after: int) -> Any:
            return self._runs.StreamLogs(
                run_service_pb2.StreamLogsRequest(
                    name=f"runs/{run_id}", step_id=step or "", after_sequence=after
                ),
                metadata=self._metadata,
            )

        for entries in self._resumable(
            run_id,
            open_stream,
            after_sequence,
            lambda resp: [LogEntry.from_proto(e) for e in resp.entries],
            None,
        ):
            yield from entries

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


def _declared(pipeline: Pipeline[Any], name: str) -> str:
    """A pipeline parameter's declared type expression ("" for a name it does not have)."""
    return pipeline.parameter_type(name) if name in pipeline.signature.parameters else ""
