"""Runs, their steps, events and logs: the repository behind RunService's reads.

Runs are written by the scheduler's effects (:mod:`._scheduling`); this module only reads.
"""

from __future__ import annotations

import json
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

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
from plait.engine._ir import upstream_ids
from plait.engine.store import _schema as db
from plait.engine.store._artifacts import artifact_metadata
from plait.engine.store._ids import resolve_prefix
from plait.engine.store._pipelines import get_pipeline_version
from plait.errors import PipelineError, RunNotFoundError


def resolve_run_id(conn: Connection, prefix: str) -> str:
    return resolve_prefix(conn, db.runs.c.id, prefix, RunNotFoundError, "run")


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
    )


def _code(row: Any) -> CodeSource | None:
    """The run's code source; None for a run whose steps come from the workers' own path."""
    if not (row.code_archive or row.git_commit):
        return None
    return CodeSource(row.code_archive or "", row.git_commit or "", bool(row.git_dirty))


def get_run(conn: Connection, prefix: str, with_steps: bool = True) -> Run:
    """A run with its steps (in topological order), by id or a unique prefix of it."""
    run_id = resolve_run_id(conn, prefix)
    row = conn.execute(sa.select(db.runs).where(db.runs.c.id == run_id)).one()
    if not with_steps:
        return _run(row)
    spec = get_pipeline_version(conn, row.version)
    ups = {s.id: upstream_ids(s) for s in spec.steps}
    rows = conn.execute(
        sa.select(db.step_runs)
        .where(db.step_runs.c.run_id == run_id)
        .order_by(db.step_runs.c.position)
    ).all()
    meta = artifact_metadata(
        conn, [o["artifact_id"] for s in rows for o in (s.outputs or {}).values()]
    )
    steps = {
        s.step_id: StepRun(
            step_id=s.step_id,
            status=StepStatus(s.status),
            attempt=s.attempt,
            start_time=from_epoch(s.started_at),
            end_time=from_epoch(s.ended_at),
            outputs={
                k: ArtifactInfo.from_json(o, meta.get(o["artifact_id"]))
                for k, o in (s.outputs or {}).items()
            },
            metadata=dict(s.step_metadata or {}),
            error=StepError.from_json(s.error) if s.error else None,
            cache_key=s.cache_key or "",
            upstream=ups.get(s.step_id, []),
        )
        for s in rows
    }
    last = conn.execute(
        sa.select(sa.func.max(db.events.c.seq)).where(db.events.c.run_id == run_id)
    ).scalar()
    return _run(row, steps, last or 0)


def list_runs(
    conn: Connection,
    page_size: int,
    page_token: str,
    pipeline: str = "",
    status: RunStatus | None = None,
) -> tuple[list[Run], str]:
    """The newest runs first, without their steps; and the token of the next page ("" at the
    end)."""
    q = sa.select(db.runs).order_by(db.runs.c.created_at.desc(), db.runs.c.id.desc())
    if pipeline:
        q = q.where(db.runs.c.pipeline == pipeline)
    if status is not None:
        q = q.where(db.runs.c.status == status)
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
    return RunStatus(
        str(conn.execute(sa.select(db.runs.c.status).where(db.runs.c.id == run_id)).scalar())
    )


def list_events(
    conn: Connection, run_id: str, after: int, limit: int, run_only: bool = False
) -> list[RunEvent]:
    """A run's events after sequence ``after``, oldest first."""
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
