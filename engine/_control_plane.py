"""The control plane: the store, the scheduler loop, the runners and the gRPC server."""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import secrets
import socket
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import anyio
import grpc
from anyio.abc import TaskGroup, TaskStatus

from plait._artifact_store import LocalArtifactStore
from plait._models import RunStatus, StepError, StepStatus
from plait._settings import private_dir
from plait.api.v1 import task_service_pb2 as tasks
from plait.engine._events import EventHub
from plait.engine._pools import TaskPools
from plait.engine._runners import LazyRunner, attempts_of_runner, docker_available, docker_runner
from plait.engine._validate import validate_pipeline
from plait.engine.api._convert import task_to_proto, token_from_proto, token_to_proto
from plait.engine.scheduler import (
    CancelRun,
    Command,
    CreateRun,
    Effects,
    Expire,
    Failed,
    Heartbeat,
    Lease,
    Logs,
    RunCreated,
    Scheduler,
    StoredRun,
    TaskOrder,
)
from plait.engine.scheduler._commands import Token
from plait.engine.scheduler._effects import Beat
from plait.engine.scheduler._machine import (
    DEFAULT_CRASH_RETRIES,
    DEFAULT_LEASE_SECONDS,
    DEFAULT_QUEUE_TIMEOUT,
    RUNNER_HOLDER,
)
from plait.engine.store import Store
from plait.engine.store._engine import Backoff, is_transient
from plait.engine.store._pipelines import register_pipeline
from plait.engine.store._replicas import (
    cancels_requested,
    claim_runs,
    orphans_exist,
    own_runs,
    register_replica,
    remove_replica,
    renew_replica,
    replica_application_name,
    request_cancel,
    run_owner,
)
from plait.engine.store._scheduling import (
    SqlLookups,
    load_active_runs,
    write_effects,
)
from plait.errors import PlaitError, UnavailableError
from plait.ir.builds import needs_build
from plait.ir.canonical import message_digest
from plait.ir.v1 import ir_pb2
from plait.runners import LocalRunner, Runner, RunnerContext

if TYPE_CHECKING:
    from sqlalchemy.engine import Connection

    from plait.engine.builds._service import Builds

log = logging.getLogger("plait.engine")

MAX_MESSAGE_BYTES = 64 * 1024 * 1024

DEFAULT_MAX_LOG_BYTES = 4 * 1024 * 1024
"""The stdout and stderr kept per attempt, unless PLAIT_MAX_LOG_BYTES or a setting says."""

SMALL_TICK = 16
"""Ticks of at most this many inputs run on the event loop's thread (see Store.write)."""

REAP_INTERVAL = 0.1
"""How often the reaper looks for a passed deadline (a lease, a timeout, the queue)."""
LAZY_LEASE_DELAY = 0.2
"""How long the lease of a local pool's hand-off may wait to ride along with the next batch
(see ControlPlane.note_lease)."""
GONE_HOLDER = "(lost with its control plane)"
"""Who holds, as far as anyone can tell, an attempt a lost control plane had queued for its
local pool (see _after_loss)."""
REPLICA_FILE = "replica-id"
WORKER_SECRET_FILE = "worker-secret"
"""A daemon's secret for the step processes it starts (see _worker_secret)."""
"""The file in PLAIT_HOME that keeps a daemon's replica id across restarts."""


class _Inbox:
    """The commands for the scheduler's loop, taken all at once (a batch).

    Only the loop's own thread puts and takes. A deque and a future: an anyio memory stream
    cost a tenth of the loop's time in a chain of steps (a task lookup, an event and its
    statistics per receive)."""

    def __init__(self) -> None:
        self._items: collections.deque[Command | _TakeOver] = collections.deque()
        self._wake: asyncio.Future[None] | None = None
        self._closed = False

    def put(self, item: Command | _TakeOver) -> None:
        if self._closed:
            raise anyio.ClosedResourceError("the control plane is stopping")
        self._items.append(item)
        if self._wake is not None and not self._wake.done():
            self._wake.set_result(None)

    async def take(self) -> list[Command | _TakeOver]:
        """Waits for at least one command; returns every command queued, in order."""
        while not self._items:
            self._wake = asyncio.get_running_loop().create_future()
            try:
                await self._wake
            finally:
                self._wake = None
        items = list(self._items)
        self._items.clear()
        return items

    def close(self) -> None:
        self._closed = True
        self._items.clear()


class ReplicaLostError(PlaitError):
    """This control plane's replica row is gone: another replica took it for dead and took its
    runs over. It must not write about them any more."""


class _TakeOver:
    """Tells the scheduler loop to take over the runs of replicas that are gone."""


_N = TypeVar("_N", int, float)


def _setting(
    value: str | float | None, variable: str, default: _N, kind: type[_N], low: _N, high: _N
) -> _N:
    """`value` (a flag or a config key), else the environment `variable`, else `default`; a
    number of `kind` above `low` and at most `high`, or PlaitError naming the setting."""
    raw = value if value is not None else os.environ.get(variable) or None
    if raw is None:
        return default
    try:
        number = kind(raw)
    except (TypeError, ValueError):
        number = low
    if isinstance(raw, bool) or not (low < number <= high):
        name = variable.removeprefix("PLAIT_").lower()
        raise PlaitError(f"{name}: expected a number above {low} and at most {high}, got {raw!r}")
    return number


def heartbeat_timeout_setting(value: str | float | None = None) -> float:
    """The lease length: `value` (a flag or a config key), else ``PLAIT_HEARTBEAT_TIMEOUT``, else
    DEFAULT_LEASE_SECONDS; seconds above 0 and at most a day, or PlaitError."""
    return _setting(value, "PLAIT_HEARTBEAT_TIMEOUT", DEFAULT_LEASE_SECONDS, float, 0.0, 86400.0)


def max_log_bytes_setting(value: str | int | None = None) -> int:
    """The log limit: `value` (a flag or a config key), else ``PLAIT_MAX_LOG_BYTES``, else
    DEFAULT_MAX_LOG_BYTES; a positive number of bytes, or PlaitError."""
    return _setting(value, "PLAIT_MAX_LOG_BYTES", DEFAULT_MAX_LOG_BYTES, int, 0, 2**62)


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
    auth: bool = True
    """Require a credential on every call (health and reflection excepted). Off only for a
    daemon started with ``--no-auth`` on loopback."""
    api_tokens: bool = True
    """Accept the API tokens of the store. An embedded engine does not: it accepts only the
    secrets it holds in memory (its own process's and its workers')."""
    reflection: bool = True
    """Serve gRPC server reflection (for grpcurl and the like). An embedded engine does not:
    only its own process and workers can call it, and they know the API."""
    credential_file: Path | None = None
    """Where a daemon keeps the local admin credential (owner-only) that the CLI and SDK of
    the same account pick up; None writes none."""
    tls_cert: str = ""
    """PEM server certificate: serve TLS when set (with tls_key)."""
    tls_key: str = ""
    """PEM private key of tls_cert."""
    tls_client_ca: str = ""
    """PEM CA bundle: require client certificates signed by it (mutual TLS)."""
    resume: bool = False
    """Resume unfinished runs at start and leave them resumable at stop (a daemon that owns its
    store). Otherwise (the embedded engine) runs still active at stop are CANCELLED."""
    max_log_bytes: int = field(default_factory=max_log_bytes_setting)
    """The most bytes of stdout and stderr stored per attempt (workers cut there and say how
    much they dropped; the scheduler enforces it too)."""
    heartbeat_timeout: float = field(default_factory=heartbeat_timeout_setting)
    """How long a lease lasts without a heartbeat: a worker silent for longer loses its attempt
    (CRASHED, retried). Workers heartbeat about three times in that span."""
    queue_timeout: float | None = DEFAULT_QUEUE_TIMEOUT
    """How long a queued attempt may wait for a worker (schedule-to-start); None: forever."""
    crash_retries: int = DEFAULT_CRASH_RETRIES
    """Attempts a step may lose to its infrastructure (CRASHED: a lost worker, an expired
    lease) and still be retried; they never use up the step's own retries."""
    pool_limits: Mapping[str, int] = field(default_factory=dict)
    """The most steps running at once per pool (a runner's name, or a remote pool's); a pool
    not named has no limit beyond its workers."""

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
        private_dir(config.home)  # PLAIT_HOME and all in it: the owner's only
        self.replica_id = _replica_id(config)
        """This control plane's row in the replicas table (see store/_replicas.py)."""
        # its sessions carry its name: a replica that takes it for dead ends them
        self.store = Store(
            config.db_url(), application_name=replica_application_name(self.replica_id)
        )
        self.artifacts = LocalArtifactStore.from_uri(config.artifacts())
        if runners is None:
            runners = {"local": LocalRunner(config.max_workers)}
            if docker_available():
                runners["docker"] = docker_runner()
        self.runners: dict[str, Runner] = dict(runners)
        self.scheduler = Scheduler(
            runners=frozenset(self.runners),
            log_limit_bytes=config.max_log_bytes,
            lease_seconds=config.heartbeat_timeout,
            queue_timeout=config.queue_timeout,
            crash_retries=config.crash_retries,
            pool_limits=config.pool_limits,
        )
        self.pools = TaskPools()
        self._lookups = SqlLookups(self.artifacts.exists)
        self._missing: set[str] = set()
        """Runs rolled back out of the scheduler's view by a failed transaction, to restore
        from the store before the next one (see _commit)."""
        self.hub = EventHub()
        self._inbox = _Inbox()
        self._replies: dict[int, anyio.Event] = {}
        """Who waits for the answer to a command, by ``id(command)``."""
        self._answers: dict[int, Any] = {}
        self._lazy: list[Command] = []
        """Leases of local hand-offs that ride along with the next batch (see note_lease)."""
        self._lazy_since = 0.0
        self._expiring = False
        """An Expire is in the inbox: the reaper does not send another."""
        self.address = ""
        self.internal_address = ""
        """Where this process's own clients (its workers, its dashboard) call the API, once it
        serves: loopback (in the clear when the API serves TLS), each call with its token."""
        self._auth: Any = None
        self._valid: dict[str, None] = {}
        """Pipeline versions validated by this process (in order, the newest last)."""
        self._stop = anyio.Event()
        # secrets that live in this process's memory only: one for the local workers this
        # control plane starts, one for the process that embeds it (see engine/api/_auth.py)
        self.worker_secret = _worker_secret(config)
        self.owner_secret = secrets.token_urlsafe(32)
        self._builds: Builds | None = None
        self._tg: TaskGroup | None = None
        """The serving task group: builds run in it, apart from the scheduler loop."""
        self._renewed = 0.0
        """When (monotonic) the replica row was last renewed."""
        self._taking_over = False
        """A _TakeOver is in the inbox."""
        self.lost_replica = False
        """Another replica took this one for dead (and its runs over): it stopped."""

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

    def _auth_interceptor(self) -> Any:
        from plait.engine.api._auth import AuthInterceptor
        from plait.engine.store._tokens import Role, token_role

        async def lookup(token: str) -> Role | None:
            return await self.store.read(token_role, token)

        return AuthInterceptor(
            lookup if self.config.api_tokens else None,
            {self.worker_secret: Role.WORKER, self.owner_secret: Role.ADMIN},
        )

    async def role_of(self, token: str) -> str | None:
        """The role of an API token as this control plane's API decides it (``admin``,
        ``user``, ``worker``), None when it would refuse it; ``admin`` for anyone when it
        takes no credential (``--no-auth``)."""
        if not self.config.auth:
            return "admin"
        if self._auth is None:
            self._auth = self._auth_interceptor()
        role = await self._auth.role(token)
        return str(role) if role is not None else None

    def stop(self) -> None:
        """Asks :meth:`serve` to shut down (gracefully); call it on the serving event loop."""
        self._stop.set()

    @property
    def stopped(self) -> bool:
        """Whether :meth:`stop` was called."""
        return self._stop.is_set()

    async def stopping(self) -> None:
        """Returns once :meth:`stop` was called: the workers' streams end then, while their
        processes still live to read the end (TaskService.Connect)."""
        await self._stop.wait()

    # ---- inputs from servicers ----

    def submit(self, item: Command | _TakeOver) -> None:
        self._inbox.put(item)

    async def register_pipeline(self, spec: ir_pb2.PipelineSpec) -> tuple[str, bool]:
        try:
            version = message_digest(spec)  # (memoized by the spec's bytes)
        except ValueError:  # not canonical JSON (a NaN): validation says where
            validate_pipeline(spec)
            raise
        if version not in self._valid:
            # a version is its canonical content: one that passed, passes again
            validate_pipeline(spec)
            if len(self._valid) >= 1024:  # bounded: keep the newest
                self._valid.pop(next(iter(self._valid)))
            self._valid[version] = None
        created = await self.store.write(register_pipeline, spec, version, time.time())
        return version, created

    def note_lease(self, lease: Lease) -> None:
        """Records the hand-off of a task to a local pool's worker without a transaction of its
        own: the lease rides along with the next batch (at the latest LAZY_LEASE_DELAY later),
        ahead of any report of that worker. Only for workers that die with this process, whose
        lease needs no commit before they start."""
        if not self._lazy:
            self._lazy_since = time.monotonic()
        self._lazy.append(lease)

    async def ask(self, cmd: Command) -> Any:
        """Submits a command and waits for its answer, given once its batch is committed (a
        CreateRun's RunCreated or error, a CancelRun's found, a report's or lease command's
        applied, a Heartbeat's Beat)."""
        token = getattr(cmd, "token", None)
        if token is not None and token.run_id not in self.scheduler.runs:
            await self._check_owner(token.run_id)
        done = self._replies[id(cmd)] = anyio.Event()
        self.submit(cmd)
        try:
            await done.wait()
        except BaseException:
            self._replies.pop(id(cmd), None)
            self._answers.pop(id(cmd), None)
            raise
        return self._answers.pop(id(cmd))

    async def _check_owner(self, run_id: str) -> None:
        """A worker's call about a run this replica does not schedule: when another replica
        does (or will, once it takes over from one that is gone), the worker is told to try
        again (UNAVAILABLE) rather than that its lease is lost."""
        active, owner, alive = await self.store.read(run_owner, run_id, time.time())
        if not active or owner == self.replica_id:
            return  # ended, or ours: the scheduler answers (a stale report changes nothing)
        if alive:
            raise UnavailableError(
                f"run {run_id} is scheduled by another control-plane replica ({owner}); "
                f"report to it (list every replica in PLAIT_SERVER)"
            )
        raise UnavailableError(
            f"run {run_id} was scheduled by a control-plane replica that is gone; a live one "
            f"takes it over within the heartbeat timeout: try again"
        )

    async def create_run(
        self,
        version: str,
        parameters: dict[str, str],
        no_cache: bool,
        request_id: str,
        code: Any = None,
    ) -> RunCreated:
        """Creates a run (or finds the one ``request_id`` made). ``code``: a CodeSource record
        (archive, git_commit, git_dirty), or None."""
        answer = await self.ask(
            CreateRun(
                version,
                parameters,
                no_cache,
                request_id,
                code_archive=getattr(code, "archive", "") or "",
                git_commit=getattr(code, "git_commit", "") or "",
                git_dirty=bool(getattr(code, "git_dirty", False)),
                code_root=getattr(code, "local_root", "") or "",
            )
        )
        if isinstance(answer, Exception):
            raise answer
        assert isinstance(answer, RunCreated)
        return answer

    async def cancel_run(self, run_id: str) -> bool:
        """Cancels an active run; False when it was not active (already ended). A run another
        replica schedules is marked for it to cancel (within a third of the heartbeat
        timeout), and True is answered."""
        if run_id not in self.scheduler.runs:
            active, owner, _ = await self.store.read(run_owner, run_id, time.time())
            if active and owner != self.replica_id:
                return bool(await self.store.write(request_cancel, run_id, time.time()))
        return bool(await self.ask(CancelRun(run_id)))

    @property
    def builds(self) -> Builds:
        """Images and virtualenvs for the steps that need one (engine/builds/), made on first
        use: a control plane that builds nothing loads none of it."""
        if self._builds is None:
            from plait.engine.builds._service import Builds

            self._builds = Builds(self.store, self.config.home, self.replica_id)
        return self._builds

    def report_lost(self, token: tasks.LeaseToken, reason: str) -> None:
        self.pools.discard(token)  # a process that never claimed its task
        self.submit(
            Failed(token_from_proto(token), StepError("plait.WorkerLost", reason), crashed=True)
        )

    # ---- the loop ----

    def _tick(self, conn: Connection, batch: list[Command], now: float) -> Effects:
        """One batch in one transaction: the scheduler decides, the store writes."""
        self._fence(conn, now)
        fx = self.scheduler.apply(batch, now, self._lookups.bind(conn))
        for row in fx.run_inserts:
            row["owner"] = self.replica_id
        fx.events = write_effects(conn, fx)
        return fx

    def _fence(self, conn: Connection, now: float) -> None:
        """Refuses to write when this replica may have been taken for dead: when its row was
        last renewed more than half its lease ago (the renewing task has been held up: a
        paused process, a long stall), it is renewed here, in this transaction, or the
        transaction fails with ReplicaLostError (another replica schedules these runs now)."""
        if time.monotonic() - self._renewed < self.config.heartbeat_timeout / 2:
            return
        if not renew_replica(conn, self.replica_id, now, self.config.heartbeat_timeout):
            raise ReplicaLostError(
                f"this control plane (replica {self.replica_id}) was taken for dead by another "
                f"replica, which now schedules its runs"
            )
        self._renewed = time.monotonic()

    def _fail_runs(self, conn: Connection, run_ids: list[str], reason: str, now: float) -> Effects:
        fx = self.scheduler.abort(run_ids, now, reason, RunStatus.FAILED)
        fx.events = write_effects(conn, fx)
        return fx

    def _restore_runs(self, conn: Connection, run_ids: list[str]) -> None:
        self.scheduler.restore(load_active_runs(conn, run_ids), self._lookups.bind(conn))

    def _alive(self, runner: str, handle: str | None) -> bool | None:
        r = self.runners.get(runner)
        if r is None or handle is None:
            return None  # a remote pool's worker: its heartbeats, or their absence, will say
        return r.alive(handle)

    def _recover(self, conn: Connection, now: float) -> Effects:
        """At start: takes up this daemon's own unfinished runs (its runner can tell whether
        their workers live), then those of replicas that are gone (whose workers only their
        leases can tell about)."""
        own = own_runs(conn, self.replica_id)
        stored = [_after_loss(row, now) for row in load_active_runs(conn, own)]
        fx = self.scheduler.recover(stored, now, self._lookups.bind(conn), self._alive)
        fx.events = write_effects(conn, fx)
        more = self._take_over(conn, now)
        fx.events += more.events
        fx.tasks += more.tasks
        fx.cancels += more.cancels
        return fx

    def _take_over(self, conn: Connection, now: float) -> Effects:
        """Takes over the unfinished runs of replicas that are gone: the same attempts go on
        (a worker that still holds one may finish it here) until their leases expire."""
        run_ids = claim_runs(conn, self.replica_id, now)
        self.scheduler.forget(run_ids)  # a retried transaction claims them again
        stored = [_after_loss(row, now) for row in load_active_runs(conn, run_ids)]
        fx = self.scheduler.recover(stored, now, self._lookups.bind(conn), _unknown)
        fx.events = write_effects(conn, fx)
        if run_ids:
            log.warning("took over %d run(s) of control-plane replicas that are gone", len(run_ids))
        return fx

    def _write(self, conn: Connection, fx: Effects) -> Effects:
        fx.events = write_effects(conn, fx)
        return fx

    def _answer(self, answers: dict[int, Any]) -> None:
        for key, answer in answers.items():
            done = self._replies.pop(key, None)
            if done is not None:  # nobody waits when the asker went away
                self._answers[key] = answer
                done.set()

    async def _loop(self) -> None:
        while True:
            batch: list[Command] = []
            take_over = False
            for item in await self._inbox.take():
                if isinstance(item, _TakeOver):
                    take_over = True
                else:
                    batch.append(item)
            if take_over and not await self._take_over_now():
                return
            if not batch:
                continue
            if self._lazy:  # leases first: they precede every report of their workers
                batch[:0] = self._lazy
                self._lazy = []
            now = time.time()
            for item in batch:
                if isinstance(item, Expire):
                    self._expiring = False
            try:
                fx = await self._commit(self._tick, batch, now=now, small=len(batch) <= SMALL_TICK)
            except ReplicaLostError as exc:
                self._lost(exc)
                return
            except Exception as exc:
                await self._isolate(batch, exc)
                continue
            self._answer(fx.replies)
            await self._act(fx)

    async def _take_over_now(self) -> bool:
        """Takes over the runs of replicas that are gone (see _take_over); False when this
        replica found itself taken for dead instead (it stops)."""
        self._taking_over = False
        try:
            fx = await self._commit(self._take_over)
        except ReplicaLostError as exc:
            self._lost(exc)
            return False
        except Exception:
            log.exception("could not take over the runs of replicas that are gone")
            return True
        await self._act(fx)
        return True

    def _lost(self, exc: ReplicaLostError) -> None:
        """Another replica schedules this one's runs now: stop, writing nothing more."""
        log.critical("%s; this control plane stops", exc)
        self.lost_replica = True
        self.stop()

    async def _act(self, fx: Effects) -> None:
        """What a committed batch implies: publish its events, stop and start attempts."""
        self.hub.publish(fx.events)
        for token in fx.cancels:
            lease = token_to_proto(token)
            self.pools.discard(lease)
            for runner in self.runners.values():
                await runner.cancel(lease)
        for order in fx.tasks:
            await self._dispatch(order)

    async def _commit(
        self,
        fn: Callable[..., Effects],
        *args: Any,
        now: float | None = None,
        small: bool = False,
    ) -> Effects:
        """``fn(conn, *args, now)``: the scheduler decides and the store writes, in one write
        transaction, committed.

        A failed transaction leaves the scheduler's view ahead of the store: the runs it changed
        are rolled back out of the view (``Scheduler.rollback``) and rebuilt from the store
        before the next transaction (``_restore``). A transient error (the database busy past
        its timeout, the connection lost: ``is_transient``) is retried with backoff and jitter
        for as long as it lasts, with one warning per streak: no run fails for it. Any other
        error is raised (the view rolled back).

        A transient error once ``fn`` returned may have struck the COMMIT's answer, not the
        COMMIT (a connection lost while it was acknowledged): then the store is asked whether
        the transaction's first event (with none, the new epoch of the attempt it handed out
        again) is there. If it is, the transaction committed and its effects stand as decided:
        applying the batch again would find its commands applied and decide nothing, and the
        attempts it queued would never be handed out, nor its events (a run's last one among
        them) published.
        """
        from operator import attrgetter

        from plait.engine.store._runs import list_events
        from plait.engine.store._scheduling import attempt_outcome

        decided: list[Effects] = []  # what fn returned in the last try

        def decide(conn: Connection, *fn_args: Any) -> Effects:
            decided.append(fn(conn, *fn_args))
            return decided[-1]

        streak: Backoff | None = None
        started = 0.0
        while True:
            if self._missing:
                await self._restore()
            decided.clear()
            try:
                # after a failure, the writer thread waits for the database, not the event loop
                fx = await self.store.write(
                    decide,
                    *args,
                    time.time() if now is None else now,
                    small=small and streak is None,
                    retry=False,
                )
            except Exception as exc:
                landed = False
                tried = decided[-1] if decided else None
                try:  # (a read retries transient errors for a while on its own)
                    if tried is not None and tried.events and is_transient(exc):
                        first = tried.events[0]
                        found = await self.store.read(
                            list_events, first.run_id, first.sequence - 1, 1
                        )
                        same = attrgetter(
                            "sequence", "step_id", "step_status", "run_status", "attempt", "message"
                        )
                        landed = bool(found) and same(found[0]) == same(first)
                    elif tried is not None and tried.tasks and is_transient(exc):
                        # no event: a release, which handed the attempt out under a new epoch
                        order = tried.tasks[0]
                        stored = await self.store.read(attempt_outcome, order.token)
                        landed = stored is not None and stored[0] == order.token.epoch
                except Exception:
                    landed = False  # unknown: as if it had not committed
                if landed:
                    log.warning(
                        "a transaction failed (%s) but had committed: its effects stand",
                        _describe(exc),
                    )
                    self.scheduler.committed()
                    return decided[-1]
                self._missing |= self.scheduler.rollback()
                if not is_transient(exc):
                    raise
                if streak is None:
                    streak, started = Backoff(), time.monotonic()
                    log.warning(
                        "the store is unavailable (%s): the scheduler retries until it is back",
                        _describe(exc),
                    )
                now = None
                await anyio.sleep(streak.next())
                continue
            self.scheduler.committed()
            if streak is not None:
                log.warning(
                    "the store is back after %.1f s: the scheduler goes on",
                    time.monotonic() - started,
                )
            return fx

    async def _restore(self) -> None:
        """Rebuilds the runs failed transactions rolled back out of the scheduler's view from
        the store (a read, which SQLite serves even while another process holds the write
        lock), retrying transient errors."""
        backoff = Backoff()
        while self._missing:
            run_ids = sorted(self._missing)
            try:
                await self.store.read(self._restore_runs, run_ids)
            except Exception as exc:
                if is_transient(exc):
                    await anyio.sleep(backoff.next())
                    continue
                # a bug, not the store's state: these runs cannot be followed any further;
                # every other run goes on
                log.exception(
                    "could not restore runs %s from the store; they are left as the store has them",
                    ", ".join(run_ids),
                )
                self.scheduler.forget(run_ids)
            self._missing.difference_update(run_ids)

    async def _isolate(self, batch: list[Command], exc: Exception) -> None:
        """The batch's transaction failed for an error of its own, not the store's: it came from
        one of its commands (or a few). Parts of the batch are applied again, in order, each in
        a transaction of its own; a failing part is halved until the failing command stands
        alone (about log2 of the batch's size extra transactions for each), and that command
        fails alone (``_reject``). Every other command commits."""
        log.error(
            "a scheduler batch of %d commands failed; finding the command it failed for",
            len(batch),
            exc_info=exc,
        )
        todo: list[tuple[list[Command], Exception | None]] = [(batch, exc)]
        while todo:
            part, error = todo.pop(0)
            if error is None:
                try:
                    fx = await self._commit(self._tick, part, small=len(part) <= SMALL_TICK)
                except Exception as part_error:
                    error = part_error
                else:
                    self._answer(fx.replies)
                    await self._act(fx)
                    continue
            if len(part) == 1:
                await self._reject(part[0], error)
            else:
                half = len(part) // 2
                todo[:0] = [(part[:half], None), (part[half:], None)]

    async def _reject(self, cmd: Command, exc: Exception) -> None:
        """A command whose transaction fails on its own. A CreateRun gets the error as its
        answer; a cancellation or a report about a run ends that run FAILED with the error as
        the reason, since what it reported cannot be written (a cancellation is answered
        whether the run ended)."""
        if isinstance(cmd, CreateRun):
            log.warning("a CreateRun of version %s failed: %s", cmd.version, _describe(exc))
            error = (
                exc
                if isinstance(exc, PlaitError)
                else PlaitError(f"the control plane could not create the run: {_describe(exc)}")
            )
            self._answer({id(cmd): error})
            return
        if isinstance(cmd, Expire):
            log.error("the reaper's tick could not be committed: %s", _describe(exc))
            return
        run_id = cmd.run_id if isinstance(cmd, CancelRun) else cmd.token.run_id
        if self._missing:
            await self._restore()
        ended = False
        if run_id in self.scheduler.runs:
            reason = f"internal error in the control plane: {_describe(exc)}"
            log.error(
                "run %s is failed: its %s could not be committed: %s",
                run_id,
                type(cmd).__name__,
                reason,
            )
            try:
                fx = await self._commit(self._fail_runs, [run_id], reason, small=True)
            except Exception:
                log.exception("could not end run %s either: it is left as the store has it", run_id)
                self.scheduler.forget([run_id])
                self._missing.discard(run_id)
            else:
                ended = True
                await self._act(fx)
        if isinstance(cmd, CancelRun):
            self._answer({id(cmd): ended})
        else:  # a report or lease command that asked: its run is over, its lease lost
            self._answer({id(cmd): Beat(alive=False) if isinstance(cmd, Heartbeat) else False})

    async def _dispatch(self, order: TaskOrder) -> None:
        task = task_to_proto(order, self.artifacts.uri, self.config.max_log_bytes)
        if order.pool:  # remote workers of the pool lease it with PollTask
            self.pools.put(order.pool, task)
            return
        runner = self.runners.get(order.runner)
        if runner is None:
            known = ", ".join(self.runners)
            error = StepError(
                "plait.errors.PipelineError", f"no runner named {order.runner!r}; known: {known}"
            )
            self.submit(Failed(order.token, error))
            return
        env = order.step.settings.environment
        if order.runner == "docker" or (order.runner == "local" and needs_build(env)):
            assert self._tg is not None
            self._tg.start_soon(self._build_then_submit, order, runner, task)
            return
        await self._submit(order, runner, task)

    async def _build_then_submit(self, order: TaskOrder, runner: Runner, task: tasks.Task) -> None:
        """Makes (or finds) the build the task runs in, then hands the task to its runner. A
        build that fails fails the attempt, with the builder's message."""
        env = order.step.settings.environment
        lines = _BuildLog(self, order.token)
        options = None
        try:
            from plait.engine.builds._service import stack_build_config

            config = await self.store.read(stack_build_config, order.token.run_id)
            if order.runner == "docker":
                task.image = await self.builds.image(
                    env, run_id=order.token.run_id, config=config, log_line=lines.add
                )
                options = _container_options(config.runner or {})
            else:
                task.python = await self.builds.venv(
                    env, run_id=order.token.run_id, log_line=lines.add
                )
        except PlaitError as exc:  # a BuildError: a build that cannot be made, said why
            lines.flush()
            self.submit(Failed(order.token, StepError("plait.BuildError", str(exc))))
            return
        except Exception as exc:
            lines.flush()
            log.exception("the build of a step's environment failed")
            error = StepError("plait.BuildError", f"{type(exc).__name__}: {exc}")
            self.submit(Failed(order.token, error, crashed=True))
            return
        lines.flush()
        await self._submit(order, runner, task, options)

    async def _submit(
        self, order: TaskOrder, runner: Runner, task: tasks.Task, options: Any = None
    ) -> None:
        if task.image or task.python:
            self.pools.hold(task)  # the process started for it claims it by its lease
        try:
            if options is not None:
                handle = await runner.submit(task, options=options)  # type: ignore[call-arg]
            else:
                handle = await runner.submit(task)
        except Exception as exc:  # the runner could not take it: the attempt's infra failed
            log.exception("runner %r refused a task", order.runner)
            error = StepError(
                "plait.RunnerError",
                f"runner {order.runner!r} could not start the step: {type(exc).__name__}: {exc}",
            )
            self.submit(Failed(order.token, error, crashed=True))
            return
        if handle is not None:  # a process started for it: its handle goes on the lease
            self.submit(Lease(order.token, f"{RUNNER_HOLDER}{order.runner}", handle))

    async def _replicate(self) -> None:
        """Renews this replica's row while it lives (three times per heartbeat timeout); a
        daemon (which resumes runs) also looks for runs whose replica is gone, and takes them
        over (a _TakeOver through the scheduler loop)."""
        ttl = self.config.heartbeat_timeout
        while True:
            await anyio.sleep(ttl / 3)
            try:
                renewed = await self.store.write(renew_replica, self.replica_id, time.time(), ttl)
                if renewed:
                    self._renewed = time.monotonic()
                orphans = self.config.resume and await self.store.read(orphans_exist, time.time())
                cancels = await self.store.read(cancels_requested, self.replica_id)
            except Exception as exc:
                if not is_transient(exc):
                    raise
                continue  # the store is away: the scheduler's loop says so, and waits for it
            if not renewed:
                self._lost(ReplicaLostError(f"replica {self.replica_id}'s row is gone"))
                return
            for run_id in cancels:  # asked of another replica
                if run_id in self.scheduler.runs:
                    self.submit(CancelRun(run_id))
            if orphans and not self._taking_over:
                self._taking_over = True
                self.submit(_TakeOver())

    async def _reap(self) -> None:
        """Wakes the scheduler when a deadline of the store's queue has passed (an attempt no
        one took, a lease not renewed, a timeout), and sends along leases that waited too long
        for a batch to ride with."""
        while True:
            await anyio.sleep(REAP_INTERVAL)
            due = self.scheduler.next_deadline()
            if not self._expiring and due is not None and due <= time.time():
                self._expiring = True
                self.submit(Expire())
            elif self._lazy and time.monotonic() - self._lazy_since > LAZY_LEASE_DELAY:
                self.submit(Expire())  # a batch for the leases to ride with

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
        from plait.engine.api._limits import LimitsInterceptor

        interceptors = []
        if self.config.auth:
            self._auth = self._auth_interceptor()
            interceptors.append(self._auth)
        interceptors.append(LimitsInterceptor())  # after auth: a refused call is never read
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
        if self.config.auth and self.config.credential_file is not None:
            from plait.engine._credential import local_admin_token, write_credential

            path = self.config.credential_file
            token = await self.store.write(local_admin_token, path)
            write_credential(path, token, port)
        if host in ("0.0.0.0", "[::]", "::"):
            host = socket.gethostname()
        await self.store.write(
            register_replica,
            self.replica_id,
            f"{host}:{port}",
            time.time(),
            self.config.heartbeat_timeout,
        )
        self._renewed = time.monotonic()
        # local workers report over loopback, in the clear, with a token that lives in memory
        worker_address = self.address
        if self.address.rsplit(":", 1)[0] in ("0.0.0.0", "[::]", "::"):
            worker_address = f"127.0.0.1:{port}"
        if self.config.tls_cert:
            worker_port = server.add_insecure_port("127.0.0.1:0")
            worker_address = f"127.0.0.1:{worker_port}"
        self.internal_address = worker_address
        await server.start()
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._loop)
                tg.start_soon(self._reap)
                tg.start_soon(self._replicate)
                ctx = RunnerContext(
                    address=worker_address,
                    home=self.config.home,
                    report_lost=self.report_lost,
                    token=self.worker_secret if self.config.auth else "",
                    resume=self.config.resume,
                )
                self._tg = tg
                for name, runner in self.runners.items():
                    if isinstance(runner, LazyRunner) and self.config.resume:
                        # its containers may outlive a restart: re-attach to them at once
                        runner.eager = await self.store.read(attempts_of_runner, name)
                    await tg.start(runner.run, ctx)
                if self.config.resume:
                    await self._act(await self.store.write(self._recover, time.time()))
                task_status.started(port)
                await self._stop.wait()
                # the workers' streams end first, each with its status, while the workers live:
                # a stream whose worker the runner killed is cancelled by the server's stop
                # into a dead connection, which grpc reports with a traceback
                await server.stop(grace=0.5)
                tg.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                if self.scheduler.runs and not self.config.resume and not self.lost_replica:
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
                if self._builds is not None:
                    await self._builds.aclose()
                if not self.lost_replica:
                    try:  # another replica may take its unfinished runs over at once
                        await self.store.write(remove_replica, self.replica_id)
                    except Exception:
                        log.exception("could not remove this replica's row")
                await self.store.aclose()
                # nothing is read from the inbox any more: close it (no stream left to the GC)
                self._inbox.close()
        if self.lost_replica:
            raise ReplicaLostError(
                f"stopped: another control-plane replica took this one ({self.replica_id}) for "
                f"dead and schedules its runs"
            )


class _BuildLog:
    """A build's output lines, sent to the attempt's log in batches (``plait run`` shows them
    live, ``plait runs logs`` later)."""

    EVERY = 0.5
    """Seconds between batches while lines come."""

    def __init__(self, cp: ControlPlane, token: Token) -> None:
        self._cp = cp
        self._token = token
        self._lines: list[str] = []
        self._sent = time.monotonic()

    def add(self, line: str) -> None:
        self._lines.append(f"[build] {line.rstrip()}\n")
        if len(self._lines) >= 200 or time.monotonic() - self._sent >= self.EVERY:
            self.flush()

    def flush(self) -> None:
        if self._lines:
            self._cp.submit(Logs(self._token, "stderr", "".join(self._lines)))
            self._lines = []
        self._sent = time.monotonic()


def _container_options(config: Mapping[str, Any]) -> Any:
    """The Docker runner's options from the stack's runner component (keys: network,
    keep_containers, stop_grace_seconds; see engine/_flavors.py)."""
    from plait.runners._docker import ContainerOptions

    values: dict[str, Any] = {}
    if "network" in config:
        values["network"] = str(config["network"])
    if "keep_containers" in config:
        values["keep_containers"] = str(config["keep_containers"]).lower() in ("1", "true", "yes")
    if "stop_grace_seconds" in config:
        values["stop_grace_seconds"] = float(config["stop_grace_seconds"])
    return ContainerOptions(**values)


def _after_loss(row: StoredRun, now: float) -> StoredRun:
    """A run of a control plane that is gone (this daemon before a restart, or a replica that
    died), as the one taking it up sees it.

    A queued attempt of a runner (the lost control plane's local pool) may have been handed to
    a worker whose lease was not written yet (those ride along with the next batch, see
    ``note_lease``), and that worker may have run it, or be running it still (a replica that
    was paused rather than killed): it is taken as held by the control plane that is gone,
    with a lease that has run out, so it is CRASHED at once and retried as a new attempt, and
    no attempt runs twice. A remote pool's queued attempt was never handed out (its leases are
    committed first): it is handed out again, the same attempt. An attempt a worker holds
    keeps its lease (or its runner's handle, which says whether it lives).
    """
    steps = [
        replace(st, holder=GONE_HOLDER, lease_expires=now)
        if st.status is StepStatus.QUEUED and st.holder is None and not st.pool
        else st
        for st in row.steps
    ]
    return replace(row, steps=steps)


def _unknown(runner: str, handle: str | None) -> None:
    """Whether a worker of another replica lives: this one cannot tell (its lease will)."""
    return None


def _worker_secret(config: ControlPlaneConfig) -> str:
    """The secret the processes this control plane starts report with (role worker). A
    daemon's is kept owner-only in PLAIT_HOME: a container it started before a restart reports
    to it after the restart; an embedded engine's lives in its memory only."""
    if not config.resume:
        return secrets.token_urlsafe(32)
    path = config.home / WORKER_SECRET_FILE
    try:
        found = path.read_text().strip()
    except FileNotFoundError:
        found = ""
    if len(found) >= 32:
        return found
    new = secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(new + "\n")
    return new


def _replica_id(config: ControlPlaneConfig) -> str:
    """A daemon's replica id, kept in PLAIT_HOME so that after a restart it takes up its own
    runs at once (and its runner can tell which of their workers live); an embedded engine's,
    new each time (several processes may embed one over the same PLAIT_HOME)."""
    if not config.resume:
        return uuid.uuid4().hex
    path = config.home / REPLICA_FILE
    try:
        found = path.read_text().strip()
    except FileNotFoundError:
        found = ""
    if len(found) == 32 and found.isalnum():
        return found
    new = uuid.uuid4().hex
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(new + "\n")
    return new


def _describe(exc: BaseException) -> str:
    """An error on one line, without the statement and parameters SQLAlchemy adds to it."""
    orig = getattr(exc, "orig", None)
    err = orig if isinstance(orig, BaseException) else exc
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text[:500]}"
