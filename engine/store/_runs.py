"""Runs, their steps, events and logs: the repository behind RunService's reads.

Runs are written by the scheduler's effects (:mod:`._scheduling`); this module only reads.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

from google.protobuf import json_format

from plait._explain import CacheExplanation, KeyDifference
from plait._models import (
    ArtifactInfo,
    CodeSource,
    LogEntry,
    Run,
    RunEvent,
    RunStatus,
    StepError,
    StepRun,
    StepStatus,
    from_epoch,
)
from plait.engine._cache import key_material
from plait.engine._ir import upstream_ids
from plait.engine._lazy import lazy_module
from plait.engine.store._artifacts import artifact_metadata
from plait.engine.store._engine import sqlite3_of
from plait.engine.store._ids import resolve_prefix
from plait.engine.store._pipelines import get_pipeline_version
from plait.errors import NotFoundError, PipelineError, RunNotFoundError
from plait.ir.canonical import canonical_json
from plait.ir.mapping import split_item
from plait.ir.v1 import ir_pb2

if TYPE_CHECKING:
    import sqlalchemy as sa
    from sqlalchemy.engine import Connection

    from plait.engine.store import _schema as db
else:
    sa = lazy_module("sqlalchemy")
    db = lazy_module("plait.engine.store._schema")


def resolve_run_id(conn: Connection, prefix: str) -> str:
    return resolve_prefix(conn, "runs", "id", prefix, RunNotFoundError, "run")


def _run(row: Any, steps: dict[str, StepRun] | None = None, last_sequence: int = 0) -> Run:
    return Run(
        run_id=row.id,
        pipeline=row.pipeline,
        pipeline_version=row.version,
        status=RunStatus(row.status),
        parameters=dict(row.parameters or {}),
        create_time=from_epoch(row.created_at),
        end_time=from_epoch(row.ended_at),
        steps=steps or {},
        no_cache=row.no_cache,
        stack=row.stack or "",
        request_id=row.request_id or "",
        last_sequence=last_sequence,
        code=_code(row),
        retry_of=row.retry_of or "",
    )


def _code(row: Any) -> CodeSource | None:
    """The run's code source; None for a run whose steps come from the workers' own path."""
    if not (row.code_archive or row.git_commit):
        return None
    return CodeSource(row.code_archive or "", row.git_commit or "", bool(row.git_dirty))


def get_run(conn: Connection, prefix: str, with_steps: bool = True) -> Run:
    """A run with its steps (in topological order), by id or a unique prefix of it."""
    run_id = resolve_run_id(conn, prefix)
    driver = sqlite3_of(conn)
    if driver is not None:
        row = _run_row(driver, run_id)
    else:
        row = conn.execute(sa.select(db.runs).where(db.runs.c.id == run_id)).one()
    if not with_steps:
        return _run(row)
    ups = _upstreams(conn, row.version)
    rows = _step_rows(conn, run_id)
    meta = artifact_metadata(conn, [o["artifact_id"] for s in rows for o in (s[5] or {}).values()])
    steps = {
        step_id: StepRun(
            step_id=step_id,
            status=StepStatus(status),
            attempt=attempt,
            start_time=from_epoch(started_at),
            end_time=from_epoch(ended_at),
            outputs={
                k: ArtifactInfo.from_json(o, meta.get(o["artifact_id"]))
                for k, o in (outputs or {}).items()
            },
            metadata=dict(step_metadata or {}),
            error=StepError.from_json(error) if error else None,
            cache_key=cache_key or "",
            upstream=ups.get(step_id, []),
        )
        for (
            step_id,
            status,
            attempt,
            started_at,
            ended_at,
            outputs,
            step_metadata,
            error,
            cache_key,
        ) in rows
    }
    if driver is not None:
        last = driver.execute("SELECT max(seq) FROM events WHERE run_id = ?", (run_id,)).fetchone()[
            0
        ]
    else:
        last = conn.execute(
            sa.select(sa.func.max(db.events.c.seq)).where(db.events.c.run_id == run_id)
        ).scalar()
    return _run(row, steps, last or 0)


def _run_row(driver: sqlite3.Connection, run_id: str) -> Any:
    """A run's row read by sqlite3, shaped as SQLAlchemy's (names, JSON decoded)."""
    from plait.engine.store._sqlite_schema import TABLES

    columns = TABLES["runs"][0]
    found = driver.execute(
        f"SELECT {', '.join(columns)} FROM runs WHERE id = ?", (run_id,)
    ).fetchone()
    if found is None:
        raise RunNotFoundError(f"no run {run_id!r}")
    row = SimpleNamespace(**dict(zip(columns, found, strict=True)))
    row.parameters = json.loads(row.parameters)
    row.refresh = None if row.refresh is None else json.loads(row.refresh)
    row.no_cache = bool(row.no_cache)
    return row


_UPSTREAMS: dict[str, dict[str, list[str]]] = {}
"""Each step's upstream step ids, by pipeline version (a version's spec never changes: it is
its digest); parsing a spec of a thousand steps and walking their bindings cost every GetRun
of its runs a few milliseconds. Shared lists: readers only copy them into messages."""
_UPSTREAMS_KEPT = 64
_UPSTREAMS_LOCK = threading.Lock()


def _upstreams(conn: Connection, version: str) -> dict[str, list[str]]:
    ups = _UPSTREAMS.get(version)
    if ups is None:
        spec = get_pipeline_version(conn, version)
        ups = {s.id: upstream_ids(s) for s in spec.steps}
        with _UPSTREAMS_LOCK:  # (reads run on several threads)
            if len(_UPSTREAMS) >= _UPSTREAMS_KEPT:  # a long-lived daemon sees many: the newest
                _UPSTREAMS.pop(next(iter(_UPSTREAMS)))
            _UPSTREAMS[version] = ups
    return ups


_STEP_COLUMNS = (
    "step_id",
    "status",
    "attempt",
    "started_at",
    "ended_at",
    "outputs",
    "step_metadata",
    "error",
    "cache_key",
)
_STEP_ROWS_SQL = (
    f"SELECT {', '.join(_STEP_COLUMNS)} FROM step_runs WHERE run_id = ? "
    "ORDER BY position, length(step_id), step_id"
)


def _step_rows(conn: Connection, run_id: str) -> list[tuple[Any, ...]]:
    """A run's step rows (the columns of _STEP_COLUMNS, JSON decoded), in topological order: a
    mapped step's items (leaf[0], leaf[1], ...) share its position, and follow it in the order
    of their numbers. On SQLite straight from the driver: SQLAlchemy's rows and result
    processors cost a run of a thousand steps more than the query."""
    if (driver := sqlite3_of(conn)) is not None:
        loads = json.loads
        return [
            (
                *row[:5],
                None if row[5] is None else loads(row[5]),
                None if row[6] is None else loads(row[6]),
                None if row[7] is None else loads(row[7]),
                row[8],
            )
            for row in driver.execute(_STEP_ROWS_SQL, (run_id,))
        ]
    c = db.step_runs.c
    query = (
        sa.select(*(c[name] for name in _STEP_COLUMNS))
        .where(c.run_id == run_id)
        .order_by(c.position, sa.func.length(c.step_id), c.step_id)
    )
    return [tuple(row) for row in conn.execute(query)]


def list_runs(
    conn: Connection,
    page_size: int,
    page_token: str,
    pipeline: str = "",
    status: RunStatus | None = None,
    created_after: float | None = None,
    created_before: float | None = None,
) -> tuple[list[Run], str]:
    """The newest runs first, without their steps; and the token of the next page ("" at the
    end). ``created_after`` and ``created_before`` (epoch seconds) bound their creation time:
    at or after the one, before the other."""
    q = sa.select(db.runs).order_by(db.runs.c.created_at.desc(), db.runs.c.id.desc())
    if pipeline:
        q = q.where(db.runs.c.pipeline == pipeline)
    if status is not None:
        q = q.where(db.runs.c.status == status)
    if created_after is not None:
        q = q.where(db.runs.c.created_at >= created_after)
    if created_before is not None:
        q = q.where(db.runs.c.created_at < created_before)
    if page_token:
        try:
            created, rid = json.loads(page_token)
        except (ValueError, TypeError):
            raise PipelineError(f"malformed page_token {page_token!r}") from None
        q = q.where(
            sa.or_(
                db.runs.c.created_at < created,
                sa.and_(db.runs.c.created_at == created, db.runs.c.id < rid),
            )
        )
    rows = conn.execute(q.limit(page_size + 1)).all()
    more = len(rows) > page_size
    token = json.dumps([rows[page_size - 1].created_at, rows[page_size - 1].id]) if more else ""
    return [_run(r) for r in rows[:page_size]], token


def run_status(conn: Connection, run_id: str) -> RunStatus:
    if (driver := sqlite3_of(conn)) is not None:
        found = driver.execute("SELECT status FROM runs WHERE id = ?", (run_id,)).fetchone()
        return RunStatus(str(found[0] if found else None))
    return RunStatus(
        str(conn.execute(sa.select(db.runs.c.status).where(db.runs.c.id == run_id)).scalar())
    )


def list_events(
    conn: Connection, run_id: str, after: int, limit: int, run_only: bool = False
) -> list[RunEvent]:
    """A run's events after sequence ``after``, oldest first."""
    if (driver := sqlite3_of(conn)) is not None:
        only = " AND step_id = ''" if run_only else ""
        found = driver.execute(
            "SELECT run_id, step_id, run_status, step_status, attempt, message, ts, seq "
            f"FROM events WHERE run_id = ? AND seq > ?{only} ORDER BY seq LIMIT ?",
            (run_id, after, limit),
        )
        return [
            RunEvent(
                run_id=run_id_,
                step_id=step_id,
                run_status=RunStatus(run_status) if run_status else None,
                step_status=StepStatus(step_status) if step_status else None,
                attempt=attempt,
                message=message,
                time=from_epoch(ts),  # type: ignore[arg-type]  # never NULL
                sequence=seq,
            )
            for run_id_, step_id, run_status, step_status, attempt, message, ts, seq in found
        ]
    q = (
        sa.select(db.events)
        .where(db.events.c.run_id == run_id, db.events.c.seq > after)
        .order_by(db.events.c.seq)
        .limit(limit)
    )
    if run_only:
        q = q.where(db.events.c.step_id == "")
    return [
        RunEvent(
            run_id=e.run_id,
            step_id=e.step_id,
            run_status=RunStatus(e.run_status) if e.run_status else None,
            step_status=StepStatus(e.step_status) if e.step_status else None,
            attempt=e.attempt,
            message=e.message,
            time=from_epoch(e.ts),  # type: ignore[arg-type]  # never NULL
            sequence=e.seq,
        )
        for e in conn.execute(q)
    ]


def list_logs(
    conn: Connection, run_id: str, step_id: str, after: int, limit: int
) -> list[LogEntry]:
    """A run's (or one step's) captured output after sequence ``after``, oldest first."""
    if (driver := sqlite3_of(conn)) is not None:
        one = " AND step_id = ?" if step_id else ""
        found = driver.execute(
            "SELECT step_id, attempt, stream, text, ts, seq FROM logs "
            f"WHERE run_id = ? AND seq > ?{one} ORDER BY seq LIMIT ?",
            (run_id, after, step_id, limit) if step_id else (run_id, after, limit),
        )
        return [
            LogEntry(
                step_id=step,
                attempt=attempt,
                stream=stream,
                text=text,
                time=from_epoch(ts),  # type: ignore[arg-type]  # never NULL
                sequence=seq,
            )
            for step, attempt, stream, text, ts, seq in found
        ]
    q = (
        sa.select(db.logs)
        .where(db.logs.c.run_id == run_id, db.logs.c.seq > after)
        .order_by(db.logs.c.seq)
        .limit(limit)
    )
    if step_id:
        q = q.where(db.logs.c.step_id == step_id)
    return [
        LogEntry(
            step_id=r.step_id,
            attempt=r.attempt,
            stream=r.stream,
            text=r.text,
            time=from_epoch(r.ts),  # type: ignore[arg-type]  # never NULL
            sequence=r.seq,
        )
        for r in conn.execute(q)
    ]


# ---- why a step ran or was cached ----

_COMPONENTS = (
    ("key_scheme", "key_scheme"),
    ("code", "code_digest"),
    ("environment", "environment_digest"),
    ("cache_version", "cache_version"),
)


def explain_step(conn: Connection, prefix: str, step_id: str) -> CacheExplanation:
    """Why a step of a run ran or was served from the cache: its key material (computed again
    from the run's parameters and its upstream outputs, as the scheduler did) compared with that
    of the nearest earlier cache entry of the same step id in a run of the same pipeline."""
    run_id = resolve_run_id(conn, prefix)
    run = conn.execute(sa.select(db.runs).where(db.runs.c.id == run_id)).one()
    spec = get_pipeline_version(conn, run.version)
    steps = {s.id: s for s in spec.steps}
    step = steps.get(step_id)
    parent = split_item(step_id)
    item = step is None and parent is not None and parent[0] in steps
    if item and parent is not None:  # an item of a mapped step: the step, under its id
        step = ir_pb2.StepSpec()
        step.CopyFrom(steps[parent[0]])
        step.id = step_id
    s = db.step_runs
    row = conn.execute(sa.select(s).where(s.c.run_id == run_id, s.c.step_id == step_id)).first()
    if step is None or row is None:
        raise NotFoundError(
            f"run {run_id} has no step {step_id!r}; its steps are: {', '.join(steps) or 'none'}"
        )
    status = StepStatus(row.status)
    key = row.cache_key or ""
    if not item and any(i.mapped for i in step.inputs):
        return CacheExplanation(
            run_id=run_id,
            step_id=step_id,
            status=status,
            cache_key="",
            reason=(
                f"a mapped step: each of its items ({step_id}[0], {step_id}[1], ...) ran or was "
                f"served from the cache on its own item; explain one of them"
            ),
            cached_from_run="",
            earlier_run="",
            differences=[],
        )
    outputs = {
        r.step_id: r.outputs
        for r in conn.execute(
            sa.select(s.c.step_id, s.c.outputs).where(
                s.c.run_id == run_id, s.c.step_id.in_(upstream_ids(step))
            )
        )
    }
    # an item's key material is its cache entry's (its item is no binding of the IR's)
    material = None if item else _material(step, dict(run.parameters or {}), outputs)
    ce = db.cache_entries
    if material is None and key:
        stored = conn.execute(sa.select(ce.c.material).where(ce.c.key == key)).scalar()
        if stored is not None:
            material = json_format.ParseDict(stored, ir_pb2.CacheKeyMaterial())
    decided = conn.execute(
        sa.select(sa.func.min(db.attempts.c.created_at)).where(
            db.attempts.c.run_id == run_id, db.attempts.c.step_id == step_id
        )
    ).scalar()
    when = decided or row.started_at or run.created_at
    earlier = conn.execute(
        sa.select(ce.c.run_id, ce.c.material, ce.c.key)
        .select_from(ce.join(db.runs, db.runs.c.id == ce.c.run_id))
        .where(
            ce.c.step_id == step_id,
            db.runs.c.pipeline == run.pipeline,
            ce.c.run_id != run_id,
            ce.c.created_at <= when,
        )
        .order_by(ce.c.created_at.desc())
        .limit(1)
    ).first()
    cached_from = ""
    if status is StepStatus.CACHED:
        producers = {o.get("run_id", "") for o in (row.outputs or {}).values()} - {""}
        if len(producers) == 1:
            cached_from = producers.pop()
        else:
            found = conn.execute(sa.select(ce.c.run_id).where(ce.c.key == key)).scalar()
            cached_from = str(found or "")
    differences: list[KeyDifference] = []
    if earlier is not None and material is not None and status is not StepStatus.CACHED:
        before = json_format.ParseDict(earlier.material, ir_pb2.CacheKeyMaterial())
        differences = _differences(material, before)
    reason = _reason(
        conn, run, step, status, key, cached_from, earlier, differences, material, when
    )
    return CacheExplanation(
        run_id=run_id,
        step_id=step_id,
        status=status,
        cache_key=key,
        reason=reason,
        cached_from_run=cached_from,
        earlier_run=earlier.run_id if earlier is not None else "",
        differences=differences,
    )


def _material(
    step: ir_pb2.StepSpec, parameters: dict[str, Any], outputs: dict[str, Any]
) -> ir_pb2.CacheKeyMaterial | None:
    """The step's key material, as the scheduler computes it; None while an upstream step has
    no outputs (the step never became ready)."""

    def resolve(b: ir_pb2.Binding) -> tuple[str, Any]:
        kind = b.WhichOneof("kind")
        if kind == "output":
            found = outputs.get(b.output.step_id) or {}
            if b.output.output not in found:
                raise LookupError(b.output.step_id)
            return ("artifact", ArtifactInfo.from_json(found[b.output.output]))
        if kind == "parameter":
            return ("json", canonical_json(parameters.get(b.parameter)))
        if kind == "literal":
            return ("json", b.literal.json)
        if kind == "list":
            return ("list", [resolve(i) for i in b.list.items])
        return ("map", {e.key: resolve(e.value) for e in b.map.entries})

    try:
        values = {i.name: resolve(i.binding) for i in step.inputs}
    except LookupError:
        return None
    return key_material(step, values)


def _differences(
    now: ir_pb2.CacheKeyMaterial, before: ir_pb2.CacheKeyMaterial
) -> list[KeyDifference]:
    out = []
    for component, attr in _COMPONENTS:
        a, b = getattr(now, attr), getattr(before, attr)
        if a != b:
            out.append(KeyDifference(component, "", a, b))
    a_out = canonical_json([json_format.MessageToDict(o) for o in now.outputs])
    b_out = canonical_json([json_format.MessageToDict(o) for o in before.outputs])
    if a_out != b_out:
        out.append(KeyDifference("outputs", "", a_out, b_out))
    for component, field in (("parameter", "parameters"), ("input", "inputs")):
        mine = {v.name: v.json for v in getattr(now, field)}
        theirs = {v.name: v.json for v in getattr(before, field)}
        for name in sorted(mine.keys() | theirs.keys()):
            if mine.get(name) != theirs.get(name):
                out.append(KeyDifference(component, name, mine.get(name, ""), theirs.get(name, "")))
    return out


def _reused(conn: Connection, run: Any, step_id: str) -> bool:
    """Whether a retry's CACHED step holds the outputs its step had in the run it retries."""
    s = db.step_runs
    mine, theirs = (
        conn.execute(
            sa.select(s.c.outputs).where(s.c.run_id == run_id, s.c.step_id == step_id)
        ).scalar()
        for run_id in (run.id, run.retry_of)
    )
    return bool(mine) and mine == theirs


def _reason(
    conn: Connection,
    run: Any,
    step: ir_pb2.StepSpec,
    status: StepStatus,
    key: str,
    cached_from: str,
    earlier: Any,
    differences: list[KeyDifference],
    material: ir_pb2.CacheKeyMaterial | None,
    when: float,
) -> str:
    if status is StepStatus.CACHED:
        if run.retry_of and _reused(conn, run, step.id):
            return (
                f"cached: reused from run {run.retry_of}, which this run retries "
                f"(its outputs come from run {cached_from or '(unknown)'})"
            )
        return f"cached: its key matched the cache entry of run {cached_from or '(unknown)'}"
    if not key:
        if status is StepStatus.SKIPPED:
            return "not run: an upstream step did not succeed"
        return f"not decided yet: it is {status} and has no cache key"
    if step.settings.HasField("cache") and not step.settings.cache:
        return "ran: the step's cache is off (cache=False)"
    if run.no_cache:
        return "ran: the run ignored the cache (no_cache)"
    refresh = set(run.refresh or ())
    if step.id in refresh or step.id.split("[", 1)[0] in refresh:
        return "ran: the run refreshed it (--refresh)"
    ce = db.cache_entries
    same = conn.execute(
        sa.select(ce.c.run_id).where(
            ce.c.key == key, ce.c.run_id != run.id, ce.c.created_at <= when
        )
    ).scalar()
    if same is not None:
        return (
            f"ran: the cache entry with its key (from run {same}) had lost its outputs' bytes "
            f"from the artifact store"
        )
    if earlier is None:
        return (
            f"ran: no earlier cache entry of step {step.id!r} in pipeline {run.pipeline!r} "
            f"(it never succeeded before)"
        )
    if material is None:
        return f"ran: no cache entry had its key (earlier entry: run {earlier.run_id})"
    if not differences:
        return f"ran: no cache entry had its key when it was scheduled (run {earlier.run_id})"
    named = ", ".join(f"{d.component} {d.name!r}" if d.name else d.component for d in differences)
    return f"ran: its key differs from the entry of run {earlier.run_id} in: {named}"
