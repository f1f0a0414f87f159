"""The scheduler: turns reports and requests into state transitions, one transaction per tick.

The control plane feeds :meth:`Scheduler.tick` a batch of inputs (a new run, a worker's reports,
a lost worker, a timeout). The tick applies them to the in-memory view of the active runs,
follows every consequence (steps become ready, cache hits propagate, failures skip their
downstream, runs end), writes all of it in the one transaction it runs in, and returns what to
act on after the commit: tasks to hand to runners and events to publish. Nothing is acted on
before it is committed. The tick runs on the store's writer thread: it is plain, synchronous code.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from plait.engine import _stacks
from plait.engine import _store as db
from plait.engine._cache import cache_key, key_material, material_to_json
from plait.errors import ParameterError, PipelineError, PipelineNotFoundError, PlaitError
from plait.ir.canonical import canonical_json
from plait.ir.v1 import ir_pb2

TERMINAL = frozenset({"SUCCEEDED", "FAILED", "CACHED", "SKIPPED", "CANCELLED", "CRASHED"})
TERMINAL_RUN = frozenset({"SUCCEEDED", "FAILED", "CANCELLED"})


# ---- inputs -------------------------------------------------------------------------------


@dataclass
class CreateRun:
    version: str
    parameters: dict[str, str]
    """Canonical JSON by name, as sent."""
    no_cache: bool
    request_id: str
    result: tuple[str, bool] | None = None
    """Filled by the tick: (run id, created)."""
    error: Exception | None = None


@dataclass(frozen=True)
class Token:
    run_id: str
    step_id: str
    attempt: int
    epoch: int


@dataclass(frozen=True)
class Started:
    token: Token
    start_time: float | None = None


@dataclass(frozen=True)
class Completed:
    token: Token
    outputs: tuple[OutputInfo, ...]
    start_time: float | None = None


@dataclass(frozen=True)
class Failed:
    token: Token
    error: dict[str, str]
    crashed: bool = False
    """True when the infrastructure died (worker lost), not the user's code."""
    start_time: float | None = None


@dataclass(frozen=True)
class Logs:
    token: Token
    stream: str
    text: str


@dataclass(frozen=True)
class Metadata:
    token: Token
    output: str
    values: dict[str, Any]


@dataclass
class CancelRun:
    run_id: str
    found: bool = False
    """Filled by the tick: False when the run was not active (unknown or already final)."""


Input = CreateRun | CancelRun | Started | Completed | Failed | Logs | Metadata


# ---- state --------------------------------------------------------------------------------


@dataclass(frozen=True)
class OutputInfo:
    """A stored output artifact."""

    artifact_id: str
    output: str
    digest: str
    size: int
    uri: str
    materializer: str
    data_type: str
    unsafe: bool
    run_id: str
    step_id: str
    created_at: float

    def to_json(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> OutputInfo:
        return cls(**d)


@dataclass
class StepState:
    spec: ir_pb2.StepSpec
    position: int
    status: str = "PENDING"
    attempt: int = 0
    epoch: int = 0
    waiting: int = 0
    upstream: list[str] = field(default_factory=list)
    downstream: list[str] = field(default_factory=list)
    outputs: dict[str, OutputInfo] | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    output_metadata: dict[str, dict[str, Any]] = field(default_factory=dict)
    material: ir_pb2.CacheKeyMaterial | None = None
    key: str | None = None


@dataclass
class RunState:
    run_id: str
    pipeline: str
    version: str
    parameters: dict[str, str]
    no_cache: bool
    steps: dict[str, StepState]
    open_steps: int
    status: str = "PENDING"
    default_runner: str = "local"
    """The runner of the run's stack, for steps that name none."""


@dataclass(frozen=True)
class TaskOrder:
    """A task to hand to a runner once the tick has committed."""

    runner: str
    token: Token
    pipeline: str
    step: ir_pb2.StepSpec
    inputs: list[tuple[str, tuple[str, Any]]]
    outputs: list[tuple[str, str]]
    """(output name, artifact id)."""
    timeout: float | None


@dataclass
class Event:
    run_id: str
    step_id: str
    run_status: str | None
    step_status: str | None
    attempt: int
    message: str
    ts: float
    seq: int = 0


@dataclass
class TickResult:
    tasks: list[TaskOrder] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    cancel: list[Token] = field(default_factory=list)


def artifact_id_for(token: Token, output: str) -> str:
    raw = f"{token.run_id}/{token.step_id}/{token.attempt}/{output}".encode()
    return hashlib.sha256(raw).hexdigest()[:32]


class _Writes:
    """Writes collected during a tick, flushed as a few executemany statements."""

    def __init__(self) -> None:
        self.step_updates: dict[tuple[str, str], dict[str, Any]] = {}
        self.attempt_updates: dict[tuple[str, str, int], dict[str, Any]] = {}
        self.attempt_inserts: list[dict[str, Any]] = []
        self.step_inserts: list[dict[str, Any]] = []
        self.artifacts: list[dict[str, Any]] = []
        self.cache: list[dict[str, Any]] = []
        self.logs: list[dict[str, Any]] = []
        self.run_updates: dict[str, dict[str, Any]] = {}
        self.events: list[Event] = []

    def step(self, run_id: str, step_id: str, **values: Any) -> None:
        self.step_updates.setdefault((run_id, step_id), {}).update(values)

    def attempt(self, run_id: str, step_id: str, attempt: int, **values: Any) -> None:
        self.attempt_updates.setdefault((run_id, step_id, attempt), {}).update(values)

    def flush(self, conn: Connection, dialect: str) -> None:
        db.executemany(conn, _INSERTS["step_runs"], self.step_inserts)
        db.executemany(conn, _INSERTS["attempts"], self.attempt_inserts)
        _update_many(conn, db.step_runs, ("run_id", "step_id"), self.step_updates)
        _update_many(conn, db.attempts, ("run_id", "step_id", "attempt"), self.attempt_updates)
        _update_many(conn, db.runs, ("id",), {(k,): v for k, v in self.run_updates.items()})
        db.executemany(conn, _INSERTS["artifacts"], self.artifacts)
        db.executemany(conn, _insert_ignore(db.cache_entries, dialect), self.cache)
        db.executemany(conn, _INSERTS["logs"], self.logs)
        if not self.events:
            return
        rows = [
            {
                "run_id": e.run_id,
                "step_id": e.step_id,
                "run_status": e.run_status,
                "step_status": e.step_status,
                "attempt": e.attempt,
                "message": e.message,
                "ts": e.ts,
            }
            for e in self.events
        ]
        if db.is_fast_sqlite(conn):
            # this transaction holds SQLite's write lock (BEGIN IMMEDIATE): nobody else can
            # take sequence numbers until it commits
            last = conn.exec_driver_sql(
                "SELECT seq FROM sqlite_sequence WHERE name = 'events'"
            ).scalar()
            for seq, (ev, row) in enumerate(zip(self.events, rows, strict=True), (last or 0) + 1):
                ev.seq = row["seq"] = seq
            db.executemany(conn, _INSERTS["events"], rows)
        else:
            result = conn.execute(
                db.events.insert().returning(db.events.c.seq, sort_by_parameter_order=True), rows
            )
            for ev, seq in zip(self.events, result.scalars(), strict=True):
                ev.seq = seq


_INSERTS = {
    t.name: t.insert() for t in (db.step_runs, db.attempts, db.artifacts, db.logs, db.events)
}
_INSERT_IGNORE: dict[tuple[str, str], Any] = {}


def _insert_ignore(table: sa.Table, dialect: str) -> Any:
    stmt = _INSERT_IGNORE.get((table.name, dialect))
    if stmt is None:
        if dialect == "sqlite":
            from sqlalchemy.dialects.sqlite import insert as sqlite_insert

            stmt = sqlite_insert(table).on_conflict_do_nothing()
        else:
            from sqlalchemy.dialects.postgresql import insert as pg_insert

            stmt = pg_insert(table).on_conflict_do_nothing()
        _INSERT_IGNORE[(table.name, dialect)] = stmt
    return stmt


_UPDATES: dict[tuple[str, tuple[str, ...], tuple[str, ...]], Any] = {}


def _update_stmt(table: sa.Table, keys: tuple[str, ...], cols: tuple[str, ...]) -> Any:
    """UPDATE table SET cols WHERE keys, built once per shape (building costs more than running)."""
    stmt = _UPDATES.get((table.name, keys, cols))
    if stmt is None:
        stmt = (
            table.update()
            .where(*(table.c[k] == sa.bindparam(f"k_{k}") for k in keys))
            .values({c: sa.bindparam(c) for c in cols})
        )
        _UPDATES[(table.name, keys, cols)] = stmt
    return stmt


def _update_many(
    conn: Connection, table: sa.Table, keys: tuple[str, ...], updates: dict[Any, dict[str, Any]]
) -> None:
    groups: dict[tuple[str, ...], list[dict[str, Any]]] = {}
    for key, values in updates.items():
        cols = tuple(sorted(values))
        row = {f"k_{k}": v for k, v in zip(keys, key, strict=True)}
        row.update(values)
        groups.setdefault(cols, []).append(row)
    for cols, rows in groups.items():
        db.executemany(conn, _update_stmt(table, keys, cols), rows)


# ---- the scheduler --------------------------------------------------------------------------


class Scheduler:
    """The in-memory view of active runs and the transition logic. Used from one thread."""

    def __init__(
        self,
        *,
        dialect: str,
        blob_exists: Any,
        runners: frozenset[str] = frozenset({"local"}),
        default_runner: str = "local",
    ) -> None:
        self._runners = runners
        self.dialect = dialect
        self.runs: dict[str, RunState] = {}
        self._blob_exists = blob_exists
        self._default_runner = default_runner
        self._specs: dict[str, ir_pb2.PipelineSpec] = {}

    def tick(self, conn: Connection, inputs: Iterable[Input], now: float) -> TickResult:
        w = _Writes()
        result = TickResult()
        ready: list[tuple[RunState, StepState]] = []
        for item in inputs:
            if isinstance(item, CancelRun):
                if item.run_id in self.runs:
                    item.found = True
                    result.cancel.extend(
                        self._abort(w, [item.run_id], now, "cancelled on request", "CANCELLED")
                    )
                continue
            if isinstance(item, CreateRun):
                try:
                    self._create_run(conn, item, w, now, ready)
                except PlaitError as exc:
                    item.error = exc
                continue
            run = self.runs.get(item.token.run_id)
            st = run.steps.get(item.token.step_id) if run else None
            if run is None or st is None or not self._current(st, item.token):
                continue  # a stale report (lease lost): it changes nothing
            if isinstance(item, Started):
                self._mark_running(run, st, w, item.start_time or now)
            elif isinstance(item, Logs):
                w.logs.append(
                    {
                        "run_id": run.run_id,
                        "step_id": st.spec.id,
                        "attempt": st.attempt,
                        "stream": item.stream,
                        "text": item.text,
                        "ts": now,
                    }
                )
            elif isinstance(item, Metadata):
                if item.output:
                    st.output_metadata.setdefault(item.output, {}).update(item.values)
                else:
                    st.metadata.update(item.values)
                    w.step(run.run_id, st.spec.id, step_metadata=dict(st.metadata))
            elif isinstance(item, Completed):
                # a short step's completion implies its start: both transitions commit together
                self._mark_running(run, st, w, item.start_time or now)
                self._complete(run, st, item, w, now, ready)
            elif isinstance(item, Failed):
                if item.start_time is not None:
                    self._mark_running(run, st, w, item.start_time)
                self._fail(run, st, item, w, now, ready, result)
        self._schedule(ready, w, now, result)
        w.flush(conn, self.dialect)
        result.events = w.events
        for run_id in [r for r, run in self.runs.items() if run.status in TERMINAL_RUN]:
            del self.runs[run_id]
        return result

    # ---- helpers ----

    def _mark_running(self, run: RunState, st: StepState, w: _Writes, start: float) -> None:
        if st.status != "QUEUED":
            return
        st.status = "RUNNING"
        w.step(run.run_id, st.spec.id, status="RUNNING", started_at=start)
        w.attempt(run.run_id, st.spec.id, st.attempt, status="RUNNING", started_at=start)
        self._event(w, run, st, start)

    @staticmethod
    def _current(st: StepState, token: Token) -> bool:
        return (
            st.status in ("QUEUED", "RUNNING")
            and st.attempt == token.attempt
            and st.epoch == token.epoch
        )

    @staticmethod
    def _event(
        w: _Writes, run: RunState, st: StepState | None, now: float, message: str = ""
    ) -> None:
        if st is None:
            w.events.append(Event(run.run_id, "", run.status, None, 0, message, now))
        else:
            w.events.append(
                Event(run.run_id, st.spec.id, None, st.status, st.attempt, message, now)
            )

    def _spec(self, conn: Connection, version: str) -> ir_pb2.PipelineSpec:
        spec = self._specs.get(version)
        if spec is None:
            blob = conn.execute(
                sa.select(db.pipeline_versions.c.spec).where(
                    db.pipeline_versions.c.version == version
                )
            ).scalar()
            if blob is None:
                raise PipelineNotFoundError(f"no pipeline version {version!r} is registered")
            spec = ir_pb2.PipelineSpec.FromString(blob)
            self._specs[version] = spec
        return spec

    def _create_run(
        self,
        conn: Connection,
        cmd: CreateRun,
        w: _Writes,
        now: float,
        ready: list[tuple[RunState, StepState]],
    ) -> None:
        if cmd.request_id:
            existing = conn.execute(
                sa.select(db.runs.c.id).where(db.runs.c.request_id == cmd.request_id)
            ).scalar()
            if existing is not None:
                cmd.result = (existing, False)
                return
        spec = self._spec(conn, cmd.version)
        params = resolve_parameters(spec, cmd.parameters)
        stack = _stacks.active_stack(conn)
        stack_runner = _stacks.stack_runner(conn, stack)
        for s in spec.steps:
            runner = s.settings.runner or stack_runner
            if runner not in self._runners:
                raise PipelineError(
                    f"step {s.id!r} asks for runner {runner!r}, which this control plane does "
                    f"not have (it has: {', '.join(sorted(self._runners))})"
                )
        run_id = uuid.uuid4().hex
        steps: dict[str, StepState] = {}
        for pos, s in enumerate(spec.steps):
            st = StepState(spec=s, position=pos)
            for up in upstream_ids(s):
                st.upstream.append(up)
                steps[up].downstream.append(s.id)
            st.waiting = len(st.upstream)
            steps[s.id] = st
        run = RunState(
            run_id,
            spec.name,
            cmd.version,
            params,
            cmd.no_cache,
            steps,
            open_steps=len(steps),
            status="RUNNING",
            default_runner=stack_runner,
        )
        conn.execute(
            db.runs.insert().values(
                id=run_id,
                pipeline=spec.name,
                version=cmd.version,
                status="RUNNING",
                parameters={k: json.loads(v) for k, v in params.items()},
                no_cache=cmd.no_cache,
                request_id=cmd.request_id or None,
                created_at=now,
                stack=stack,
            )
        )
        w.step_inserts.extend(
            {
                "run_id": run_id,
                "step_id": st.spec.id,
                "position": st.position,
                "status": "PENDING",
                "attempt": 0,
            }
            for st in steps.values()
        )
        self.runs[run_id] = run
        w.events.append(Event(run_id, "", "RUNNING", None, 0, "", now))
        ready.extend((run, st) for st in steps.values() if st.waiting == 0)
        cmd.result = (run_id, True)

    def _resolve(self, run: RunState, b: ir_pb2.Binding) -> tuple[str, Any]:
        kind = b.WhichOneof("kind")
        if kind == "output":
            up = run.steps[b.output.step_id]
            assert up.outputs is not None
            return ("artifact", up.outputs[b.output.output])
        if kind == "parameter":
            return ("json", run.parameters[b.parameter])
        if kind == "literal":
            return ("json", b.literal.json)
        if kind == "list":
            return ("list", [self._resolve(run, i) for i in b.list.items])
        return ("map", {e.key: self._resolve(run, e.value) for e in b.map.entries})

    def _schedule(
        self, ready: list[tuple[RunState, StepState]], w: _Writes, now: float, result: TickResult
    ) -> None:
        """Serves ready steps from the cache (following hits downstream) or queues them."""
        while ready:
            run, st = ready.pop()
            if run.status in TERMINAL_RUN or st.status != "PENDING":
                continue
            values = {i.name: self._resolve(run, i.binding) for i in st.spec.inputs}
            st.material = key_material(st.spec, values)
            st.key = cache_key(st.material)
            cacheable = st.spec.settings.cache if st.spec.settings.HasField("cache") else True
            if cacheable and not run.no_cache:
                outputs = self._cache_lookup(w, st.key)
                if outputs is not None:
                    st.status, st.outputs = "CACHED", outputs
                    w.step(
                        run.run_id,
                        st.spec.id,
                        status="CACHED",
                        cache_key=st.key,
                        outputs={k: v.to_json() for k, v in outputs.items()},
                        started_at=now,
                        ended_at=now,
                    )
                    self._event(w, run, st, now)
                    self._close_step(run, st, w, now, ready)
                    continue
            w.step(run.run_id, st.spec.id, cache_key=st.key)
            self._queue(run, st, w, now, result, values)

    def _cache_lookup(self, w: _Writes, key: str) -> dict[str, OutputInfo] | None:
        for entry in w.cache:  # written earlier in this very tick
            if entry["key"] == key:
                return {k: OutputInfo.from_json(v) for k, v in entry["outputs"].items()}
        row = self._conn.execute(
            sa.select(db.cache_entries.c.outputs).where(db.cache_entries.c.key == key)
        ).scalar()
        if row is None:
            return None
        outputs = {k: OutputInfo.from_json(v) for k, v in row.items()}
        # a hit whose bytes are gone from the artifact store is a miss, not a broken run
        if not all(self._blob_exists(o.digest) for o in outputs.values()):
            return None
        return outputs

    def _queue(
        self,
        run: RunState,
        st: StepState,
        w: _Writes,
        now: float,
        result: TickResult,
        values: dict[str, tuple[str, Any]],
    ) -> None:
        st.attempt += 1
        st.epoch = 1
        st.status = "QUEUED"
        token = Token(run.run_id, st.spec.id, st.attempt, st.epoch)
        runner = st.spec.settings.runner or run.default_runner
        w.step(run.run_id, st.spec.id, status="QUEUED", attempt=st.attempt)
        w.attempt_inserts.append(
            {
                "run_id": run.run_id,
                "step_id": st.spec.id,
                "attempt": st.attempt,
                "epoch": st.epoch,
                "status": "QUEUED",
                "runner": runner,
                "created_at": now,
            }
        )
        self._event(w, run, st, now)
        timeout = (
            st.spec.settings.timeout_seconds
            if st.spec.settings.HasField("timeout_seconds")
            else None
        )
        result.tasks.append(
            TaskOrder(
                runner=runner,
                token=token,
                pipeline=run.pipeline,
                step=st.spec,
                inputs=[(i.name, values[i.name]) for i in st.spec.inputs],
                outputs=[(o.name, artifact_id_for(token, o.name)) for o in st.spec.outputs],
                timeout=timeout,
            )
        )

    def _complete(
        self,
        run: RunState,
        st: StepState,
        item: Completed,
        w: _Writes,
        now: float,
        ready: list[tuple[RunState, StepState]],
    ) -> None:
        declared = [o.name for o in st.spec.outputs]
        got = {o.output: o for o in item.outputs}
        if sorted(got) != sorted(declared):
            self._fail(
                run,
                st,
                Failed(
                    item.token,
                    {
                        "type": "plait.errors.ArtifactError",
                        "message": f"the worker reported outputs {sorted(got)}, not {declared}",
                        "traceback": "",
                    },
                ),
                w,
                now,
                ready,
                TickResult(),
            )
            return
        st.status, st.outputs = "SUCCEEDED", got
        for o in item.outputs:
            w.artifacts.append(
                {
                    "id": o.artifact_id,
                    "run_id": o.run_id,
                    "step_id": o.step_id,
                    "output": o.output,
                    "digest": o.digest,
                    "size": o.size,
                    "uri": o.uri,
                    "materializer": o.materializer,
                    "data_type": o.data_type,
                    "unsafe": o.unsafe,
                    "artifact_metadata": st.output_metadata.get(o.output) or None,
                    "created_at": o.created_at,
                }
            )
        outputs_json = {k: v.to_json() for k, v in got.items()}
        w.step(run.run_id, st.spec.id, status="SUCCEEDED", outputs=outputs_json, ended_at=now)
        w.attempt(run.run_id, st.spec.id, st.attempt, status="SUCCEEDED", ended_at=now)
        cacheable = st.spec.settings.cache if st.spec.settings.HasField("cache") else True
        if cacheable and st.key is not None and st.material is not None:
            w.cache.append(
                {
                    "key": st.key,
                    "material": material_to_json(st.material),
                    "outputs": outputs_json,
                    "run_id": run.run_id,
                    "step_id": st.spec.id,
                    "created_at": now,
                }
            )
        self._event(w, run, st, now)
        self._close_step(run, st, w, now, ready)

    def _fail(
        self,
        run: RunState,
        st: StepState,
        item: Failed,
        w: _Writes,
        now: float,
        ready: list[tuple[RunState, StepState]],
        result: TickResult,
    ) -> None:
        attempt_status = "CRASHED" if item.crashed else "FAILED"
        w.attempt(run.run_id, st.spec.id, st.attempt, status=attempt_status, ended_at=now)
        message = f"{item.error.get('type', '')}: {item.error.get('message', '')}"
        if st.attempt <= st.spec.settings.retries:
            st.status = "RETRYING"
            self._event(w, run, st, now, message)
            st.status = "PENDING"
            w.step(run.run_id, st.spec.id, status="RETRYING", error=item.error)
            ready.append((run, st))
            return
        st.status = attempt_status
        w.step(run.run_id, st.spec.id, status=attempt_status, error=item.error, ended_at=now)
        self._event(w, run, st, now, message)
        self._close_step(run, st, w, now, ready)

    def _close_step(
        self,
        run: RunState,
        st: StepState,
        w: _Writes,
        now: float,
        ready: list[tuple[RunState, StepState]],
    ) -> None:
        run.open_steps -= 1
        if st.status in ("SUCCEEDED", "CACHED"):
            for d in st.downstream:
                ds = run.steps[d]
                ds.waiting -= 1
                if ds.waiting == 0:
                    ready.append((run, ds))
        else:
            self._skip_downstream(run, st, w, now)
        if run.open_steps == 0:
            failed = any(s.status not in ("SUCCEEDED", "CACHED") for s in run.steps.values())
            run.status = "FAILED" if failed else "SUCCEEDED"
            w.run_updates[run.run_id] = {"status": run.status, "ended_at": now}
            self._event(w, run, None, now)

    def _skip_downstream(self, run: RunState, st: StepState, w: _Writes, now: float) -> None:
        stack = list(st.downstream)
        while stack:
            ds = run.steps[stack.pop()]
            if ds.status != "PENDING":
                continue
            ds.status = "SKIPPED"
            run.open_steps -= 1
            w.step(run.run_id, ds.spec.id, status="SKIPPED", ended_at=now)
            self._event(w, run, ds, now, f"upstream step {st.spec.id!r} {st.status.lower()}")
            stack.extend(ds.downstream)

    # the connection of the tick in progress, for lookups from helpers
    _conn: Connection

    def cancel_all(self, conn: Connection, now: float, reason: str) -> list[Event]:
        """Cancels every active run (the control plane stops and will not resume them)."""
        events, _ = self.abort_runs(conn, list(self.runs), now, reason, "CANCELLED")
        return events

    def abort_runs(
        self, conn: Connection, run_ids: list[str], now: float, reason: str, status: str
    ) -> tuple[list[Event], list[Token]]:
        """Ends runs at once with ``status`` (their open steps CANCELLED) and forgets them.

        Returns the events written and the leases of attempts that were queued or running,
        which the caller stops.
        """
        w = _Writes()
        leases = self._abort(w, run_ids, now, reason, status)
        w.flush(conn, self.dialect)
        return w.events, leases

    def _abort(
        self, w: _Writes, run_ids: list[str], now: float, reason: str, status: str
    ) -> list[Token]:
        leases = []
        for run_id in run_ids:
            run = self.runs.pop(run_id, None)
            if run is None:
                continue
            for st in run.steps.values():
                if st.status in TERMINAL:
                    continue
                if st.status in ("QUEUED", "RUNNING"):
                    leases.append(Token(run.run_id, st.spec.id, st.attempt, st.epoch))
                    w.attempt(run.run_id, st.spec.id, st.attempt, status="CANCELLED", ended_at=now)
                st.status = "CANCELLED"
                w.step(run.run_id, st.spec.id, status="CANCELLED", ended_at=now)
                self._event(w, run, st, now, reason)
            run.status = status
            w.run_updates[run.run_id] = {"status": status, "ended_at": now}
            self._event(w, run, None, now, reason)
        return leases

    def recover(self, conn: Connection, now: float) -> TickResult:
        """Rebuilds the view of the runs a previous control plane left unfinished, and goes on.

        Attempts that were queued or running died with that control plane: they are marked
        CRASHED and their steps queued again as new attempts, whatever their retry budget.
        Outputs already stored stay; nothing that succeeded runs again.
        """
        w = _Writes()
        result = TickResult()
        ready: list[tuple[RunState, StepState]] = []
        rows = conn.execute(
            sa.select(db.runs)
            .where(db.runs.c.status.in_(("PENDING", "RUNNING")))
            .order_by(db.runs.c.created_at)
        ).all()
        for row in rows:
            spec = self._spec(conn, row.version)
            steps: dict[str, StepState] = {}
            for pos, s in enumerate(spec.steps):
                st = StepState(spec=s, position=pos)
                for up in upstream_ids(s):
                    st.upstream.append(up)
                    steps[up].downstream.append(s.id)
                steps[s.id] = st
            stored = conn.execute(
                sa.select(db.step_runs).where(db.step_runs.c.run_id == row.id)
            ).all()
            for r in stored:
                st = steps[r.step_id]
                st.status, st.attempt, st.epoch = r.status, r.attempt, 1
                st.key = r.cache_key
                if r.outputs:
                    st.outputs = {k: OutputInfo.from_json(v) for k, v in r.outputs.items()}
                st.metadata = dict(r.step_metadata or {})
            params = {k: canonical_json(v) for k, v in (row.parameters or {}).items()}
            run = RunState(
                row.id,
                spec.name,
                row.version,
                params,
                row.no_cache,
                steps,
                open_steps=sum(1 for s in steps.values() if s.status not in TERMINAL),
                status="RUNNING",
                default_runner=_stacks.stack_runner(conn, row.stack or "default"),
            )
            self.runs[run.run_id] = run
            for st in steps.values():
                st.waiting = sum(
                    1 for u in st.upstream if steps[u].status not in ("SUCCEEDED", "CACHED")
                )
                if st.status in ("QUEUED", "RUNNING", "RETRYING"):
                    if st.status != "RETRYING":
                        w.attempt(
                            run.run_id, st.spec.id, st.attempt, status="CRASHED", ended_at=now
                        )
                    st.status = "PENDING"
                    self._event(w, run, st, now, "the control plane restarted")
                    w.step(run.run_id, st.spec.id, status="PENDING")
                if st.status == "PENDING" and st.waiting == 0:
                    ready.append((run, st))
            if run.open_steps == 0:  # everything ended, but the run's end was not written
                failed = any(s.status not in ("SUCCEEDED", "CACHED") for s in steps.values())
                run.status = "FAILED" if failed else "SUCCEEDED"
                w.run_updates[run.run_id] = {"status": run.status, "ended_at": now}
                self._event(w, run, None, now)
        self._conn = conn
        try:
            self._schedule(ready, w, now, result)
        finally:
            del self._conn
        w.flush(conn, self.dialect)
        result.events = w.events
        for run_id in [r for r, run in self.runs.items() if run.status in TERMINAL_RUN]:
            del self.runs[run_id]
        return result

    def run_tick(self, conn: Connection, inputs: list[Input], now: float) -> TickResult:
        self._conn = conn
        try:
            return self.tick(conn, inputs, now)
        finally:
            del self._conn


def upstream_ids(step: ir_pb2.StepSpec) -> list[str]:
    """The ids of the steps whose outputs ``step`` reads, in first-use order."""
    out: list[str] = []

    def walk(b: ir_pb2.Binding) -> None:
        kind = b.WhichOneof("kind")
        if kind == "output" and b.output.step_id not in out:
            out.append(b.output.step_id)
        elif kind == "list":
            for i in b.list.items:
                walk(i)
        elif kind == "map":
            for e in b.map.entries:
                walk(e.value)

    for i in step.inputs:
        walk(i.binding)
    return out


def resolve_parameters(spec: ir_pb2.PipelineSpec, given: dict[str, str]) -> dict[str, str]:
    """Parameter values as canonical JSON: the given ones, defaults for the rest."""
    declared = {p.name: p for p in spec.parameters}
    unknown = sorted(set(given) - set(declared))
    if unknown:
        raise ParameterError(
            f"pipeline {spec.name!r} has no parameter {unknown[0]!r}; "
            f"its parameters are: {', '.join(declared) or 'none'}"
        )
    out: dict[str, str] = {}
    for name, p in declared.items():
        if name in given:
            try:
                out[name] = canonical_json(json.loads(given[name]))
            except ValueError as exc:
                raise ParameterError(f"parameter {name!r}: not JSON: {exc}") from None
        elif p.HasField("default_value"):
            out[name] = p.default_value.json
        else:
            raise ParameterError(f"pipeline {spec.name!r}: parameter {name!r} is required")
    return out
