"""The control plane: the store, the scheduler loop, the runners and the gRPC server."""

from __future__ import annotations

import logging
import math
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import grpc
from anyio.abc import TaskStatus
from sqlalchemy.engine import Connection

from plait._artifact_store import LocalArtifactStore
from plait._models import RunStatus, StepError
from plait.api.v1 import task_service_pb2 as tasks
from plait.engine._events import EventHub
from plait.engine._validate import validate_pipeline
from plait.engine.api._convert import task_to_proto, token_from_proto, token_to_proto
from plait.engine.scheduler import (
    CancelRun,
    Command,
    Completed,
    CreateRun,
    Effects,
    Failed,
    RunCreated,
    Scheduler,
    Started,
    TaskOrder,
    Token,
)
from plait.engine.store import Store
from plait.engine.store._pipelines import register_pipeline
from plait.engine.store._scheduling import SqlLookups, load_unfinished_runs, write_effects
from plait.errors import PlaitError
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
        self.scheduler = Scheduler(runners=frozenset(self.runners))
        self._lookups = SqlLookups(self.artifacts.exists)
        self.hub = EventHub()
        self._inbox_send, self._inbox = anyio.create_memory_object_stream[Command](math.inf)
        self._replies: dict[int, anyio.Event] = {}
        """Who waits for the answer to a CreateRun or CancelRun, by ``id(command)``."""
        self._answers: dict[int, RunCreated | bool | Exception] = {}
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

    def submit(self, item: Command) -> None:
        self._inbox_send.send_nowait(item)

    async def register_pipeline(self, spec: ir_pb2.PipelineSpec) -> tuple[str, bool]:
        validate_pipeline(spec)
        version = message_digest(spec)
        created = await self.store.write(register_pipeline, spec, version, time.time())
        return version, created

    async def _ask(self, cmd: CreateRun | CancelRun) -> RunCreated | bool | Exception:
        done = self._replies[id(cmd)] = anyio.Event()
        self.submit(cmd)
        await done.wait()
        return self._answers.pop(id(cmd))

    async def create_run(
        self, version: str, parameters: dict[str, str], no_cache: bool, request_id: str
    ) -> RunCreated:
        answer = await self._ask(CreateRun(version, parameters, no_cache, request_id))
        if isinstance(answer, Exception):
            raise answer
        assert isinstance(answer, RunCreated)
        return answer

    async def cancel_run(self, run_id: str) -> bool:
        """Cancels an active run; False when it was not active (already ended)."""
        return bool(await self._ask(CancelRun(run_id)))

    def report_lost(self, token: tasks.LeaseToken, reason: str) -> None:
        self.submit(
            Failed(token_from_proto(token), StepError("plait.WorkerLost", reason), crashed=True)
        )

    # ---- the loop ----

    def _tick(self, conn: Connection, batch: list[Command], now: float) -> Effects:
        """One batch in one transaction: the scheduler decides, the store writes."""
        fx = self.scheduler.apply(batch, now, self._lookups.bind(conn))
        fx.events = write_effects(conn, fx)
        return fx

    def _recover(self, conn: Connection, now: float) -> Effects:
        fx = self.scheduler.recover(load_unfinished_runs(conn), now, self._lookups.bind(conn))
        fx.events = write_effects(conn, fx)
        return fx

    def _write(self, conn: Connection, fx: Effects) -> Effects:
        fx.events = write_effects(conn, fx)
        return fx

    def _answer(self, answers: dict[int, RunCreated | bool | Exception]) -> None:
        for key, answer in answers.items():
            self._answers[key] = answer
            self._replies.pop(key).set()

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
                fx = await self.store.write(self._tick, batch, now, small=len(batch) <= SMALL_TICK)
            except Exception as exc:
                await self._tick_failed(batch, exc)
                continue
            self._answer(fx.replies)
            await self._act(fx)

    async def _act(self, fx: Effects) -> None:
        """What a committed batch implies: publish its events, stop and start attempts."""
        self.hub.publish(fx.events)
        for token in fx.cancels:
            for runner in self.runners.values():
                await runner.cancel(token_to_proto(token))
        for order in fx.tasks:
            await self._dispatch(order)

    async def _tick_failed(self, batch: list[Command], exc: Exception) -> None:
        """A batch's transaction failed and rolled back: nothing of it was committed, but the
        scheduler's view may be ahead of the store. The runs it touched are ended FAILED (with
        the error as the reason) so that nobody waits for them forever."""
        log.error("the scheduler tick failed", exc_info=exc)
        self._answer(
            {
                id(item): PlaitError(f"the control plane failed to create the run: {exc}")
                if isinstance(item, CreateRun)
                else False
                for item in batch
                if isinstance(item, CreateRun | CancelRun)
            }
        )
        run_ids = sorted(
            {item.token.run_id for item in batch if not isinstance(item, CreateRun | CancelRun)}
        )
        if not run_ids:
            return
        fx = self.scheduler.abort(
            run_ids,
            time.time(),
            f"internal error in the control plane: {type(exc).__name__}: {exc}",
            RunStatus.FAILED,
        )
        await self.store.write(self._write, fx)
        await self._act(fx)

    async def _dispatch(self, order: TaskOrder) -> None:
        runner = self.runners.get(order.runner)
        task = task_to_proto(order, self.artifacts.uri)
        if runner is None:
            known = ", ".join(self.runners)
            error = StepError(
                "plait.errors.PipelineError", f"no runner named {order.runner!r}; known: {known}"
            )
            self.submit(Failed(order.token, error))
            return
        if order.timeout is not None:
            self._timeouts[order.token] = (order.timeout, order.runner)
        try:
            await runner.submit(task)
        except Exception as exc:  # the runner could not take it: the attempt's infra failed
            log.exception("runner %r refused a task", order.runner)
            error = StepError(
                "plait.RunnerError",
                f"runner {order.runner!r} could not start the step: {type(exc).__name__}: {exc}",
            )
            self.submit(Failed(order.token, error, crashed=True))

    async def _watch_deadlines(self) -> None:
        while True:
            await anyio.sleep(0.1)
            now = time.time()
            for token, (deadline, runner) in list(self._deadlines.items()):
                if deadline < now:
                    del self._deadlines[token]
                    error = StepError(
                        "builtins.TimeoutError", "the attempt ran longer than its timeout"
                    )
                    self.submit(Failed(token, error))
                    r = self.runners.get(runner)
                    if r is not None:
                        await r.cancel(token_to_proto(token))

    # ---- serving ----

    async def serve(
        self,
        address: str = "127.0.0.1:0",
        *,
        task_status: TaskStatus[int] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """Opens the store, starts the runners and serves gRPC until cancelled."""
        from plait.engine.api import add_servicers

        await self.store.open()
        interceptors = []
        if self.config.auth:
            from plait.engine.api._auth import AuthInterceptor
            from plait.engine.store._tokens import token_is_valid

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
                    await self._act(await self.store.write(self._recover, time.time()))
                task_status.started(port)
                await self._stop.wait()
                tg.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                if self.scheduler.runs and not self.config.resume:
                    # nothing resumes an embedded engine's runs: say so rather than leave
                    # them RUNNING forever
                    try:
                        fx = self.scheduler.cancel_all(
                            time.time(), "the control plane stopped before the run ended"
                        )
                        await self.store.write(self._write, fx)
                        self.hub.publish(fx.events)
                    except Exception:
                        log.exception("could not cancel the active runs at shutdown")
                await server.stop(grace=0.5)
                await self.store.aclose()
