"""The control plane: the store, the scheduler loop, the runners and the gRPC server."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import secrets
import time
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import grpc
from anyio.abc import TaskStatus
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from plait._artifact_store import LocalArtifactStore
from plait.api.v1 import resources_pb2 as res
from plait.api.v1 import task_service_pb2 as tasks
from plait.engine import _queries as q
from plait.engine._scheduler import (
    CancelRun,
    Completed,
    CreateRun,
    Event,
    Failed,
    Input,
    OutputInfo,
    Scheduler,
    Started,
    TaskOrder,
    TickResult,
    Token,
)
from plait.engine._store import Store
from plait.engine._validate import validate_pipeline
from plait.errors import PipelineValidationError, PlaitError
from plait.ir.canonical import message_digest
from plait.ir.v1 import ir_pb2
from plait.runners import LocalRunner, Runner, RunnerContext

log = logging.getLogger("plait.engine")

MAX_MESSAGE_BYTES = 64 * 1024 * 1024

SMALL_TICK = 16
"""Ticks of at most this many inputs run on the event loop's thread (see Store.write)."""


@dataclass(frozen=True)
class ControlPlaneConfig:
    """Where the control plane keeps its state."""

    home: Path
    """PLAIT_HOME."""
    database_url: str = ""
    """SQLAlchemy URL; empty means SQLite at ``home/plait.db``."""
    artifact_store_uri: str = ""
    """Empty means ``home/artifacts``."""
    max_workers: int | None = None
    """The local runner's pool size; None means the number of CPUs."""
    auth: bool = False
    """Require an API token on every call (health and reflection excepted)."""
    tls_cert: str = ""
    """PEM server certificate: serve TLS when set (with tls_key)."""
    tls_key: str = ""
    """PEM private key of tls_cert."""
    tls_client_ca: str = ""
    """PEM CA bundle: require client certificates signed by it (mutual TLS)."""
    resume: bool = False
    """Resume unfinished runs at start and leave them resumable at stop (a daemon that owns its
    store). Otherwise (the embedded engine) runs still active at stop are CANCELLED."""

    def db_url(self) -> str:
        return self.database_url or f"sqlite:///{self.home / 'plait.db'}"

    def artifacts(self) -> str:
        return self.artifact_store_uri or (self.home / "artifacts").as_uri()


class EventHub:
    """Fans committed events out to the watchers of each run."""

    def __init__(self) -> None:
        # run id -> id(receive stream) -> its send stream
        self._subs: dict[str, dict[int, MemoryObjectSendStream[list[res.RunEvent]]]] = {}

    def subscribe(self, run_id: str) -> MemoryObjectReceiveStream[list[res.RunEvent]]:
        """A stream of the run's events, in batches, from now on; pass it to unsubscribe."""
        send, recv = anyio.create_memory_object_stream[list[res.RunEvent]](math.inf)
        self._subs.setdefault(run_id, {})[id(recv)] = send
        return recv

    def unsubscribe(self, run_id: str, recv: MemoryObjectReceiveStream[Any]) -> None:
        subs = self._subs.get(run_id, {})
        send = subs.pop(id(recv), None)
        if send is not None:
            send.close()
        if not subs:
            self._subs.pop(run_id, None)

    def publish(self, events: list[Event]) -> None:
        by_run: dict[str, list[Event]] = defaultdict(list)
        for e in events:
            if e.run_id in self._subs:
                by_run[e.run_id].append(e)
        for run_id, evs in by_run.items():
            msgs = [q.event_to_proto(e) for e in evs]
            for send in list(self._subs.get(run_id, {}).values()):
                with contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError):
                    send.send_nowait(msgs)


class ControlPlane:
    """The engine: owns the store, the scheduler loop, the runners and the gRPC server."""

    def __init__(
        self, config: ControlPlaneConfig, runners: Mapping[str, Runner] | None = None
    ) -> None:
        self.config = config
        self.store = Store(config.db_url())
        self.artifacts = LocalArtifactStore.from_uri(config.artifacts())
        self.runners: dict[str, Runner] = dict(
            runners or {"local": LocalRunner(config.max_workers)}
        )
        self.scheduler = Scheduler(
            runners=frozenset(self.runners),
            dialect=self.store.dialect,
            blob_exists=self.artifacts.exists,
        )
        self.hub = EventHub()
        self._inbox_send, self._inbox = anyio.create_memory_object_stream[Input](math.inf)
        self._replies: dict[int, anyio.Event] = {}
        self._timeouts: dict[Token, tuple[float, str]] = {}
        """Attempts with a timeout that have not started yet: (seconds, runner)."""
        self._deadlines: dict[Token, tuple[float, str]] = {}
        """Started attempts with a timeout: (deadline, runner)."""
        self.address = ""
        self._stop = anyio.Event()
        self._internal_token = secrets.token_urlsafe(32)

    def _listen(self, server: Any, address: str) -> int:
        if self.config.tls_cert or self.config.tls_key:
            try:
                key = Path(self.config.tls_key).read_bytes()
                cert = Path(self.config.tls_cert).read_bytes()
                ca = (
                    Path(self.config.tls_client_ca).read_bytes()
                    if self.config.tls_client_ca
                    else None
                )
            except OSError as exc:
                raise PlaitError(f"cannot read the TLS files: {exc}") from None
            credentials = grpc.ssl_server_credentials(
                [(key, cert)], root_certificates=ca, require_client_auth=ca is not None
            )
            port = server.add_secure_port(address, credentials)
        else:
            port = server.add_insecure_port(address)
        if port == 0:
            raise PlaitError(f"cannot listen on {address} (in use, or not an address here)")
        return int(port)

    def stop(self) -> None:
        """Asks :meth:`serve` to shut down (gracefully); call it on the serving event loop."""
        self._stop.set()

    # ---- inputs from servicers ----

    def submit(self, item: Input) -> None:
        self._inbox_send.send_nowait(item)

    async def register_pipeline(self, spec: ir_pb2.PipelineSpec) -> tuple[str, bool]:
        validate_pipeline(spec)
        version = message_digest(spec)
        created = await self.store.write(q.register_pipeline, spec, version, time.time())
        return version, created

    async def create_run(
        self, version: str, parameters: dict[str, str], no_cache: bool, request_id: str
    ) -> tuple[str, bool]:
        cmd = CreateRun(version, parameters, no_cache, request_id)
        done = self._replies[id(cmd)] = anyio.Event()
        self.submit(cmd)
        await done.wait()
        if cmd.error is not None:
            raise cmd.error
        assert cmd.result is not None
        return cmd.result

    async def cancel_run(self, run_id: str) -> bool:
        """Cancels an active run; False when it was not active (already ended)."""
        cmd = CancelRun(run_id)
        done = self._replies[id(cmd)] = anyio.Event()
        self.submit(cmd)
        await done.wait()
        return cmd.found

    def report_lost(self, token: tasks.LeaseToken, reason: str) -> None:
        self.submit(
            Failed(
                _token(token),
                {"type": "plait.WorkerLost", "message": reason, "traceback": ""},
                crashed=True,
            )
        )

    # ---- the loop ----

    async def _loop(self) -> None:
        async for first in self._inbox:
            batch = [first]
            while True:
                try:
                    batch.append(self._inbox.receive_nowait())
                except anyio.WouldBlock:
                    break
            now = time.time()
            for item in batch:
                if isinstance(item, Started):
                    timeout = self._timeouts.pop(item.token, None)
                    if timeout is not None:
                        self._deadlines[item.token] = (now + timeout[0], timeout[1])
                elif isinstance(item, Completed | Failed):
                    self._timeouts.pop(item.token, None)
                    self._deadlines.pop(item.token, None)
            try:
                result = await self.store.write(
                    self.scheduler.run_tick, batch, now, small=len(batch) <= SMALL_TICK
                )
            except Exception as exc:
                await self._tick_failed(batch, exc)
                continue
            for item in batch:
                if isinstance(item, CreateRun | CancelRun):
                    self._replies.pop(id(item)).set()
            await self._act(result)

    async def _act(self, result: TickResult) -> None:
        """What a committed tick implies: publish its events, stop and start attempts."""
        self.hub.publish(result.events)
        for token in result.cancel:
            for runner in self.runners.values():
                await runner.cancel(token_to_proto(token))
        for order in result.tasks:
            await self._dispatch(order)

    async def _tick_failed(self, batch: list[Input], exc: Exception) -> None:
        """A tick's transaction failed and rolled back: nothing of it was committed, but its
        in-memory view may be ahead of the store. The runs it touched are ended FAILED (with
        the error as the reason) so that nobody waits for them forever."""
        log.error("the scheduler tick failed", exc_info=exc)
        for item in batch:
            if isinstance(item, CreateRun):
                item.error = PlaitError(f"the control plane failed to create the run: {exc}")
            if isinstance(item, CreateRun | CancelRun):
                self._replies.pop(id(item)).set()
        run_ids = sorted(
            {item.token.run_id for item in batch if not isinstance(item, CreateRun | CancelRun)}
        )
        if not run_ids:
            return
        events, leases = await self.store.write(
            self.scheduler.abort_runs,
            run_ids,
            time.time(),
            f"internal error in the control plane: {type(exc).__name__}: {exc}",
            "FAILED",
        )
        self.hub.publish(events)
        for token in leases:
            for runner in self.runners.values():
                await runner.cancel(token_to_proto(token))

    async def _dispatch(self, order: TaskOrder) -> None:
        runner = self.runners.get(order.runner)
        task = _task_proto(order, self.artifacts.uri)
        if runner is None:
            self.submit(
                Failed(
                    order.token,
                    {
                        "type": "plait.errors.PipelineError",
                        "message": f"no runner named {order.runner!r}; known: "
                        f"{', '.join(self.runners)}",
                        "traceback": "",
                    },
                )
            )
            return
        if order.timeout is not None:
            self._timeouts[order.token] = (order.timeout, order.runner)
        try:
            await runner.submit(task)
        except Exception as exc:  # the runner could not take it: the attempt's infra failed
            log.exception("runner %r refused a task", order.runner)
            self.submit(
                Failed(
                    order.token,
                    {
                        "type": "plait.RunnerError",
                        "message": f"runner {order.runner!r} could "
                        f"not start the step: {type(exc).__name__}: {exc}",
                        "traceback": "",
                    },
                    crashed=True,
                )
            )

    async def _watch_deadlines(self) -> None:
        while True:
            await anyio.sleep(0.1)
            now = time.time()
            for token, (deadline, runner) in list(self._deadlines.items()):
                if deadline < now:
                    del self._deadlines[token]
                    self.submit(
                        Failed(
                            token,
                            {
                                "type": "builtins.TimeoutError",
                                "message": "the attempt ran longer than its timeout",
                                "traceback": "",
                            },
                        )
                    )
                    r = self.runners.get(runner)
                    if r is not None:
                        await r.cancel(
                            tasks.LeaseToken(
                                run_id=token.run_id,
                                step_id=token.step_id,
                                attempt=token.attempt,
                                epoch=token.epoch,
                            )
                        )

    # ---- serving ----

    async def serve(
        self,
        address: str = "127.0.0.1:0",
        *,
        task_status: TaskStatus[int] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """Opens the store, starts the runners and serves gRPC until cancelled."""
        from plait.engine._servicers import add_servicers

        await self.store.open()
        interceptors = []
        if self.config.auth:
            from plait.engine._auth import AuthInterceptor, token_is_valid

            async def check(token: str) -> bool:
                return await self.store.read(token_is_valid, token)

            interceptors.append(AuthInterceptor(check, self._internal_token))
        server = grpc.aio.server(
            interceptors=interceptors,
            options=[
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                ("grpc.so_reuseport", 0),
            ],
        )
        await add_servicers(server, self)
        port = self._listen(server, address)
        host = address.rsplit(":", 1)[0]
        self.address = f"{host}:{port}"
        # local workers report over loopback, in the clear, with a token that lives in memory
        worker_address = self.address
        if self.config.tls_cert:
            worker_port = server.add_insecure_port("127.0.0.1:0")
            worker_address = f"127.0.0.1:{worker_port}"
        await server.start()
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._loop)
                tg.start_soon(self._watch_deadlines)
                ctx = RunnerContext(
                    address=worker_address,
                    home=self.config.home,
                    report_lost=self.report_lost,
                    token=self._internal_token if self.config.auth else "",
                )
                for runner in self.runners.values():
                    await tg.start(runner.run, ctx)
                if self.config.resume:
                    await self._act(await self.store.write(self.scheduler.recover, time.time()))
                task_status.started(port)
                await self._stop.wait()
                tg.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                if self.scheduler.runs and not self.config.resume:
                    # nothing resumes an embedded engine's runs: say so rather than leave
                    # them RUNNING forever
                    try:
                        events = await self.store.write(
                            self.scheduler.cancel_all,
                            time.time(),
                            "the control plane stopped before the run ended",
                        )
                        self.hub.publish(events)
                    except Exception:
                        log.exception("could not cancel the active runs at shutdown")
                await server.stop(grace=0.5)
                await self.store.aclose()


def _token(t: tasks.LeaseToken) -> Token:
    return Token(t.run_id, t.step_id, t.attempt, t.epoch)


def token_to_proto(t: Token) -> tasks.LeaseToken:
    return tasks.LeaseToken(run_id=t.run_id, step_id=t.step_id, attempt=t.attempt, epoch=t.epoch)


def _value_proto(kind: str, value: Any) -> tasks.Value:
    if kind == "json":
        return tasks.Value(json=value)
    if kind == "artifact":
        o: OutputInfo = value
        return tasks.Value(
            artifact=res.Artifact(
                artifact_id=o.artifact_id,
                name=f"artifacts/{o.artifact_id}",
                output=o.output,
                digest=o.digest,
                size_bytes=o.size,
                uri=o.uri,
                materializer=o.materializer,
                data_type=o.data_type,
                unsafe=o.unsafe,
                run_id=o.run_id,
                step_id=o.step_id,
            )
        )
    if kind == "list":
        return tasks.Value(list=tasks.ValueList(items=[_value_proto(k, v) for k, v in value]))
    return tasks.Value(
        map=tasks.ValueMap(
            entries=[
                tasks.ValueMapEntry(key=key, value=_value_proto(k, v))
                for key, (k, v) in sorted(value.items())
            ]
        )
    )


def _task_proto(order: TaskOrder, store_uri: str) -> tasks.Task:
    return tasks.Task(
        token=token_to_proto(order.token),
        pipeline=order.pipeline,
        step=order.step,
        inputs=[tasks.TaskInput(name=n, value=_value_proto(k, v)) for n, (k, v) in order.inputs],
        outputs=[tasks.OutputLocation(name=n, artifact_id=a) for n, a in order.outputs],
        artifact_store_uri=store_uri,
    )


def output_from_proto(a: res.Artifact) -> OutputInfo:
    return OutputInfo(
        artifact_id=a.artifact_id,
        output=a.output,
        digest=a.digest,
        size=a.size_bytes,
        uri=a.uri,
        materializer=a.materializer,
        data_type=a.data_type,
        unsafe=a.unsafe,
        run_id=a.run_id,
        step_id=a.step_id,
        created_at=a.create_time.ToNanoseconds() / 1e9,
    )


def metadata_from_json(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise PipelineValidationError(f"metadata is not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise PipelineValidationError("metadata must be a JSON object")
    return value
