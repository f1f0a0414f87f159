"""The scheduler's side of the store: the reads it asks for (:class:`SqlLookups`), the writing
of its effects (:func:`write_effects`) and the loading of unfinished runs at start-up.

This is the hot path: a handful of statements per committed batch, each made once per shape
and, on the default URL, run straight on sqlite3 (see :func:`executemany`).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from plait._models import ArtifactInfo, RunEvent, RunStatus, StepStatus
from plait.engine._json import JsonText
from plait.engine._lazy import lazy_module
from plait.engine.scheduler import Effects, RetrySource, StoredRun, StoredStep, Token
from plait.engine.scheduler._effects import StoredOutputs
from plait.engine.store._engine import (
    Insert,
    Update,
    execute_values,
    executemany,
    sqlite3_of,
)
from plait.engine.store._pipelines import get_pipeline_version
from plait.engine.store._stacks import active_stack, stack_runner
from plait.errors import RunNotFoundError
from plait.ir.v1 import ir_pb2

if TYPE_CHECKING:
    import sqlalchemy as sa
    from sqlalchemy.engine import Connection

    from plait.engine.store import _schema as db
else:
    sa = lazy_module("sqlalchemy")
    db = lazy_module("plait.engine.store._schema")

_CACHE_LOOKUP = "SELECT outputs FROM cache_entries WHERE key = ?"
"""The cache lookup on SQLite, in the table's own terms (tests/test_scheduler.py runs the cache on
SQLite, this path, and on PostgreSQL, through SQLAlchemy)."""


class SqlLookups:
    """The scheduler's :class:`~plait.engine.scheduler.Lookups`, read in the transaction its
    effects are written in. Bind it to that transaction's connection first (:meth:`bind`)."""

    def __init__(self, blob_exists: Callable[[str], bool]) -> None:
        self._blob_exists = blob_exists
        self._specs: dict[str, ir_pb2.PipelineSpec] = {}
        self.conn: Connection | None = None

    def bind(self, conn: Connection) -> SqlLookups:
        self.conn = conn
        return self

    def _c(self) -> Connection:
        assert self.conn is not None, "SqlLookups used outside a transaction"
        return self.conn

    def run_for_request(self, request_id: str) -> str | None:
        if (driver := sqlite3_of(self._c())) is not None:
            row = driver.execute("SELECT id FROM runs WHERE request_id = ?", (request_id,))
            first = row.fetchone()
            return None if first is None else str(first[0])
        found = (
            self._c()
            .execute(sa.select(db.runs.c.id).where(db.runs.c.request_id == request_id))
            .scalar()
        )
        return None if found is None else str(found)

    def pipeline_spec(self, version: str) -> ir_pb2.PipelineSpec:
        spec = self._specs.get(version)  # versions never change: read each once
        if spec is None:
            spec = self._specs[version] = get_pipeline_version(self._c(), version)
        return spec

    def active_stack(self) -> str:
        return active_stack(self._c())

    def stack_runner(self, stack: str) -> str:
        return stack_runner(self._c(), stack)

    def cached_outputs(self, key: str) -> dict[str, ArtifactInfo] | None:
        conn = self._c()
        if (driver := sqlite3_of(conn)) is not None:
            # the hot path of a cached run: one lookup per step, straight on the DBAPI cursor
            # of this transaction (SQLAlchemy's statement machinery costs ten times the query)
            found = driver.execute(_CACHE_LOOKUP, (key,)).fetchone()
            if found is None:
                return None
            text = JsonText(found[0])  # written again, as it is, to the step's row
            outputs: dict[str, ArtifactInfo] = StoredOutputs(
                {k: ArtifactInfo.from_json(v) for k, v in json.loads(text).items()}, text
            )
        else:
            row = conn.execute(
                sa.select(db.cache_entries.c.outputs).where(db.cache_entries.c.key == key)
            ).scalar()
            if row is None:
                return None
            outputs = {k: ArtifactInfo.from_json(v) for k, v in row.items()}
        # a hit whose bytes are gone from the artifact store is a miss, not a broken run
        if not all(self._blob_exists(o.digest) for o in outputs.values()):
            return None
        return outputs

    def retry_source(self, run_id: str) -> RetrySource:
        conn = self._c()
        row = conn.execute(sa.select(db.runs).where(db.runs.c.id == run_id)).first()
        if row is None:
            raise RunNotFoundError(f"no run {run_id!r}")
        s = db.step_runs
        steps = conn.execute(
            sa.select(s.c.step_id, s.c.outputs).where(
                (s.c.run_id == run_id) & s.c.status.in_(("SUCCEEDED", "CACHED"))
            )
        ).all()
        outputs: dict[str, dict[str, ArtifactInfo]] = {}
        for step in steps:
            found = {k: ArtifactInfo.from_json(v) for k, v in (step.outputs or {}).items()}
            # outputs whose bytes are gone are made again
            if all(self._blob_exists(o.digest) for o in found.values()):
                outputs[step.step_id] = found
        return RetrySource(
            run_id=row.id,
            status=RunStatus(row.status),
            version=row.version,
            parameters=dict(row.parameters or {}),
            code_archive=row.code_archive or "",
            git_commit=row.git_commit or "",
            git_dirty=bool(row.git_dirty),
            outputs=outputs,
        )


def attempt_outcome(conn: Connection, token: Token) -> tuple[int, str] | None:
    """The stored (epoch, status) of the attempt a token names; None when there is none."""
    a = db.attempts
    row = conn.execute(
        sa.select(a.c.epoch, a.c.status).where(
            (a.c.run_id == token.run_id)
            & (a.c.step_id == token.step_id)
            & (a.c.attempt == token.attempt)
        )
    ).first()
    return None if row is None else (int(row.epoch), str(row.status))


def load_unfinished_runs(conn: Connection) -> list[StoredRun]:
    """Runs left PENDING or RUNNING, oldest first, with their steps."""
    return _load_runs(conn, None)


def load_active_runs(conn: Connection, run_ids: Iterable[str]) -> list[StoredRun]:
    """The runs among ``run_ids`` that the store has PENDING or RUNNING, with their steps and
    the lease epochs of their current attempts (what :meth:`Scheduler.restore` rebuilds)."""
    ids = sorted(set(run_ids))
    return _load_runs(conn, ids) if ids else []


def _load_runs(conn: Connection, run_ids: list[str] | None) -> list[StoredRun]:
    active = db.runs.c.status.in_(("PENDING", "RUNNING"))
    query = sa.select(db.runs).where(active).order_by(db.runs.c.created_at)
    if run_ids is not None:
        query = query.where(db.runs.c.id.in_(run_ids))
    rows = conn.execute(query).all()
    if not rows:
        return []
    # the steps of those runs, each with the lease of its current attempt (if it has one) and
    # the number of its attempts that crashed
    s, a = db.step_runs, db.attempts
    crashed = db.attempts.alias("crashed")
    crashes = (
        sa.select(sa.func.count())
        .where(
            (crashed.c.run_id == s.c.run_id)
            & (crashed.c.step_id == s.c.step_id)
            & (crashed.c.status == "CRASHED")
        )
        .scalar_subquery()
    )
    steps_query = (
        sa.select(
            s,
            a.c.epoch,
            a.c.runner,
            a.c.pool,
            a.c.holder,
            a.c.handle,
            a.c.lease_expires_at,
            a.c.queue_deadline,
            a.c.close_deadline,
            a.c.log_batch,
            crashes.label("crashes"),
        )
        .select_from(
            s.outerjoin(
                a,
                (a.c.run_id == s.c.run_id)
                & (a.c.step_id == s.c.step_id)
                & (a.c.attempt == s.c.attempt),
            )
        )
        .order_by(s.c.run_id, s.c.position)
    )
    if run_ids is not None:
        steps_query = steps_query.where(s.c.run_id.in_(run_ids))
    else:
        steps_query = steps_query.where(
            s.c.run_id.in_(sa.select(db.runs.c.id).where(active).scalar_subquery())
        )
    steps: dict[str, list[StoredStep]] = {}
    for r in conn.execute(steps_query):
        steps.setdefault(r.run_id, []).append(
            StoredStep(
                step_id=r.step_id,
                status=StepStatus(r.status),
                attempt=r.attempt,
                cache_key=r.cache_key,
                outputs={k: ArtifactInfo.from_json(v) for k, v in r.outputs.items()}
                if r.outputs is not None
                else None,
                metadata=dict(r.step_metadata or {}),
                epoch=r.epoch or 0,
                crashes=r.crashes or 0,
                runner=r.runner or "",
                pool=r.pool or "",
                holder=r.holder,
                handle=r.handle,
                lease_expires=r.lease_expires_at,
                queue_deadline=r.queue_deadline,
                close_deadline=r.close_deadline,
                log_batch=r.log_batch or 0,
                retry_at=r.retry_at,
            )
        )
    return [
        StoredRun(
            run_id=row.id,
            version=row.version,
            parameters=dict(row.parameters or {}),
            no_cache=row.no_cache,
            stack=row.stack or "default",
            steps=steps.get(row.id, []),
            code_archive=row.code_archive or "",
            refresh=tuple(row.refresh or ()),
        )
        for row in rows
    ]


def write_effects(conn: Connection, fx: Effects) -> list[RunEvent]:
    """Writes the effects' rows (in the caller's transaction); returns their events, numbered."""
    executemany(conn, _RUNS, fx.run_inserts)
    executemany(conn, _STEP_RUNS, fx.step_inserts)
    executemany(conn, _ATTEMPTS, fx.attempt_inserts)
    _update_many(conn, "step_runs", ("run_id", "step_id"), fx.step_updates)
    _update_many(conn, "attempts", ("run_id", "step_id", "attempt"), fx.attempt_updates)
    _update_many(conn, "runs", ("id",), {(k,): v for k, v in fx.run_updates.items()})
    executemany(conn, _ARTIFACTS, fx.artifacts)
    executemany(conn, _CACHE_ENTRIES, fx.cache_entries)
    executemany(conn, _CACHE_REPLACEMENTS, fx.cache_replacements)
    executemany(conn, _LOGS, fx.logs)
    if not fx.events:
        return []
    rows = [
        {
            "run_id": e.run_id,
            "step_id": e.step_id,
            "run_status": e.run_status,
            "step_status": e.step_status,
            "attempt": e.attempt,
            "message": e.message,
            "ts": e.time.timestamp(),
        }
        for e in fx.events
    ]
    if (driver := sqlite3_of(conn)) is not None:
        # this transaction holds SQLite's write lock (BEGIN IMMEDIATE): nobody else can take
        # sequence numbers until it commits
        found = driver.execute("SELECT seq FROM sqlite_sequence WHERE name = 'events'").fetchone()
        last = found[0] if found else None
        seqs: Any = range((last or 0) + 1, (last or 0) + 1 + len(rows))
        for seq, row in zip(seqs, rows, strict=True):
            row["seq"] = seq
        executemany(conn, _EVENTS, rows)
    else:
        result = conn.execute(
            db.events.insert().returning(db.events.c.seq, sort_by_parameter_order=True), rows
        )
        seqs = result.scalars().all()
    # the events were made for this write and nobody holds them yet: number them in place
    # (frozen records; a new record per event would cost more than the event's row)
    for e, seq in zip(fx.events, seqs, strict=True):
        object.__setattr__(e, "sequence", seq)
    return fx.events


_RUNS, _STEP_RUNS, _ATTEMPTS = Insert("runs"), Insert("step_runs"), Insert("attempts")
_ARTIFACTS, _LOGS, _EVENTS = Insert("artifacts"), Insert("logs"), Insert("events")
_CACHE_ENTRIES = Insert("cache_entries", on_conflict="ignore")
_CACHE_REPLACEMENTS = Insert("cache_entries", on_conflict="replace")
"""A refreshed step's cache entry replaces the one under its key (rare)."""


def _update_many(
    conn: Connection, table: str, keys: tuple[str, ...], updates: dict[Any, dict[str, Any]]
) -> None:
    groups: dict[tuple[str, ...], list[tuple[Any, ...]]] = {}
    for key, values in updates.items():
        groups.setdefault(tuple(values), []).append((*values.values(), *key))
    for cols, rows in groups.items():
        names = (*cols, *(f"k_{k}" for k in keys))  # the update binds its keys so
        execute_values(conn, _update(table, keys, cols), names, rows)


_UPDATES: dict[tuple[str, tuple[str, ...], tuple[str, ...]], Update] = {}


def _update(table: str, keys: tuple[str, ...], cols: tuple[str, ...]) -> Update:
    """UPDATE table SET cols WHERE keys, one per shape (what executes it keeps its SQL by it)."""
    op = _UPDATES.get((table, keys, cols))
    if op is None:
        op = _UPDATES[(table, keys, cols)] = Update(table, keys, cols)
    return op
