"""Read and register functions of the store, returning API messages (the servicers' boundary)."""

from __future__ import annotations

import json
from typing import Any

import sqlalchemy as sa
from google.protobuf.timestamp_pb2 import Timestamp
from sqlalchemy.engine import Connection

from plait.api.v1 import resources_pb2 as res
from plait.engine import _store as db
from plait.engine._scheduler import upstream_ids
from plait.errors import ArtifactNotFoundError, PipelineNotFoundError, RunNotFoundError
from plait.ir.canonical import canonical_json
from plait.ir.v1 import ir_pb2

RUN_STATUS = {
    n: res.RunStatus.Value(f"RUN_STATUS_{n}")
    for n in ("PENDING", "RUNNING", "SUCCEEDED", "FAILED", "CANCELLED")
}
STEP_STATUS = {
    n: res.StepStatus.Value(f"STEP_STATUS_{n}")
    for n in (
        "PENDING",
        "QUEUED",
        "RUNNING",
        "SUCCEEDED",
        "FAILED",
        "CACHED",
        "SKIPPED",
        "CANCELLED",
        "RETRYING",
        "CRASHED",
    )
}


def _ts(t: float) -> Timestamp:
    ts = Timestamp()
    ts.FromNanoseconds(int(t * 1e9))
    return ts


def register_pipeline(
    conn: Connection, spec: ir_pb2.PipelineSpec, version: str, now: float
) -> bool:
    """Stores a pipeline version; False when that version was there already."""
    if (
        conn.execute(
            sa.select(db.pipeline_versions.c.version).where(
                db.pipeline_versions.c.version == version
            )
        ).first()
        is not None
    ):
        return False
    if (
        conn.execute(sa.select(db.pipelines.c.name).where(db.pipelines.c.name == spec.name)).first()
        is None
    ):
        conn.execute(db.pipelines.insert().values(name=spec.name, created_at=now))
    conn.execute(
        db.pipeline_versions.insert().values(
            version=version, pipeline=spec.name, spec=spec.SerializeToString(), created_at=now
        )
    )
    return True


def get_pipeline_version(conn: Connection, version: str) -> ir_pb2.PipelineSpec:
    blob = conn.execute(
        sa.select(db.pipeline_versions.c.spec).where(db.pipeline_versions.c.version == version)
    ).scalar()
    if blob is None:
        raise PipelineNotFoundError(f"no pipeline version {version!r}")
    return ir_pb2.PipelineSpec.FromString(blob)


def _resolve_prefix(
    conn: Connection,
    table: sa.Table,
    col: sa.Column[Any],
    prefix: str,
    error: type[Exception],
    what: str,
) -> str:
    if not prefix:
        raise error(f"no {what} id given")
    exact = conn.execute(sa.select(col).where(col == prefix)).scalar()
    if exact is not None:
        return str(exact)
    escaped = prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    found = (
        conn.execute(sa.select(col).where(col.like(f"{escaped}%", escape="\\")).limit(2))
        .scalars()
        .all()
    )
    if not found:
        raise error(f"no {what} with id {prefix!r}")
    if len(found) > 1:
        raise error(f"{what} id prefix {prefix!r} is ambiguous; give more characters")
    return str(found[0])


def resolve_run_id(conn: Connection, prefix: str) -> str:
    return _resolve_prefix(conn, db.runs, db.runs.c.id, prefix, RunNotFoundError, "run")


def _artifact_msg(a: dict[str, Any], metadata: Any = None) -> res.Artifact:
    msg = res.Artifact(
        name=f"artifacts/{a['artifact_id']}",
        artifact_id=a["artifact_id"],
        output=a["output"],
        digest=a["digest"],
        size_bytes=a["size"],
        uri=a["uri"],
        materializer=a["materializer"],
        data_type=a["data_type"],
        unsafe=a["unsafe"],
        run_id=a["run_id"],
        step_id=a["step_id"],
        metadata_json=canonical_json(metadata) if metadata else "",
    )
    if a.get("created_at") is not None:
        msg.create_time.CopyFrom(_ts(a["created_at"]))
    return msg


def _run_msg(row: Any) -> res.Run:
    run = res.Run(
        name=f"runs/{row.id}",
        run_id=row.id,
        pipeline=row.pipeline,
        pipeline_version=row.version,
        status=RUN_STATUS[row.status],
        no_cache=row.no_cache,
        request_id=row.request_id or "",
        stack=f"stacks/{row.stack}" if row.stack else "",
    )
    for k, v in (row.parameters or {}).items():
        run.parameters.add(name=k, json=canonical_json(v))
    run.create_time.CopyFrom(_ts(row.created_at))
    if row.ended_at is not None:
        run.end_time.CopyFrom(_ts(row.ended_at))
    return run


def get_run(conn: Connection, prefix: str, with_steps: bool = True) -> res.Run:
    run_id = resolve_run_id(conn, prefix)
    row = conn.execute(sa.select(db.runs).where(db.runs.c.id == run_id)).one()
    run = _run_msg(row)
    if not with_steps:
        return run
    spec = get_pipeline_version(conn, row.version)
    ups = {s.id: upstream_ids(s) for s in spec.steps}
    output_ids: list[str] = []
    steps = conn.execute(
        sa.select(db.step_runs)
        .where(db.step_runs.c.run_id == run_id)
        .order_by(db.step_runs.c.position)
    ).all()
    for s in steps:
        output_ids.extend(o["artifact_id"] for o in (s.outputs or {}).values())
    art_meta = {}
    if output_ids:
        for chunk_start in range(0, len(output_ids), 500):
            chunk = output_ids[chunk_start : chunk_start + 500]
            art_meta.update(
                dict(
                    conn.execute(
                        sa.select(db.artifacts.c.id, db.artifacts.c.artifact_metadata).where(
                            db.artifacts.c.id.in_(chunk)
                        )
                    ).all()
                )
            )
    for s in steps:
        sr = run.steps.add(
            step_id=s.step_id,
            status=STEP_STATUS[s.status],
            attempt=s.attempt,
            cache_key=s.cache_key or "",
            upstream=ups.get(s.step_id, []),
            metadata_json=canonical_json(s.step_metadata) if s.step_metadata else "",
        )
        if s.started_at is not None:
            sr.start_time.CopyFrom(_ts(s.started_at))
        if s.ended_at is not None:
            sr.end_time.CopyFrom(_ts(s.ended_at))
        if s.error:
            sr.error.type = s.error.get("type", "")
            sr.error.message = s.error.get("message", "")
            sr.error.traceback = s.error.get("traceback", "")
        for o in (s.outputs or {}).values():
            sr.outputs.append(_artifact_msg(o, art_meta.get(o["artifact_id"])))
    run.last_sequence = (
        conn.execute(
            sa.select(sa.func.max(db.events.c.seq)).where(db.events.c.run_id == run_id)
        ).scalar()
        or 0
    )
    return run


def list_runs(
    conn: Connection, page_size: int, page_token: str, pipeline: str, status: int = 0
) -> tuple[list[res.Run], str]:
    size = min(page_size or 50, 1000)
    q = sa.select(db.runs).order_by(db.runs.c.created_at.desc(), db.runs.c.id.desc())
    if pipeline:
        q = q.where(db.runs.c.pipeline == pipeline)
    if status:
        wanted = [k for k, v in RUN_STATUS.items() if v == status]
        q = q.where(db.runs.c.status.in_(wanted))
    if page_token:
        try:
            created, rid = json.loads(page_token)
        except (ValueError, TypeError):
            from plait.errors import PipelineError

            raise PipelineError(f"malformed page_token {page_token!r}") from None
        q = q.where(
            sa.or_(
                db.runs.c.created_at < created,
                sa.and_(db.runs.c.created_at == created, db.runs.c.id < rid),
            )
        )
    rows = conn.execute(q.limit(size + 1)).all()
    token = json.dumps([rows[size - 1].created_at, rows[size - 1].id]) if len(rows) > size else ""
    return [_run_msg(r) for r in rows[:size]], token


def _event_msg(e: Any) -> res.RunEvent:
    msg = res.RunEvent(
        sequence=e.seq, run_id=e.run_id, step_id=e.step_id, attempt=e.attempt, message=e.message
    )
    if e.run_status:
        msg.run_status = RUN_STATUS[e.run_status]
    if e.step_status:
        msg.step_status = STEP_STATUS[e.step_status]
    msg.time.CopyFrom(_ts(e.ts))
    return msg


def event_to_proto(e: Any) -> res.RunEvent:
    return _event_msg(e)


def list_events(
    conn: Connection, run_id: str, after: int, limit: int, run_only: bool = False
) -> list[res.RunEvent]:
    q = (
        sa.select(db.events)
        .where(db.events.c.run_id == run_id, db.events.c.seq > after)
        .order_by(db.events.c.seq)
        .limit(limit)
    )
    if run_only:
        q = q.where(db.events.c.step_id == "")
    return [_event_msg(e) for e in conn.execute(q)]


def list_logs(
    conn: Connection, run_id: str, step_id: str, after: int, limit: int
) -> list[res.LogEntry]:
    q = (
        sa.select(db.logs)
        .where(db.logs.c.run_id == run_id, db.logs.c.seq > after)
        .order_by(db.logs.c.seq)
        .limit(limit)
    )
    if step_id:
        q = q.where(db.logs.c.step_id == step_id)
    out = []
    for r in conn.execute(q):
        entry = res.LogEntry(
            sequence=r.seq, step_id=r.step_id, attempt=r.attempt, stream=r.stream, text=r.text
        )
        entry.time.CopyFrom(_ts(r.ts))
        out.append(entry)
    return out


def get_artifact(conn: Connection, prefix: str) -> res.Artifact:
    aid = _resolve_prefix(
        conn, db.artifacts, db.artifacts.c.id, prefix, ArtifactNotFoundError, "artifact"
    )
    r = conn.execute(sa.select(db.artifacts).where(db.artifacts.c.id == aid)).one()
    return _artifact_msg(
        {
            "artifact_id": r.id,
            "output": r.output,
            "digest": r.digest,
            "size": r.size,
            "uri": r.uri,
            "materializer": r.materializer,
            "data_type": r.data_type,
            "unsafe": r.unsafe,
            "run_id": r.run_id,
            "step_id": r.step_id,
            "created_at": r.created_at,
        },
        r.artifact_metadata,
    )


def list_pipelines(conn: Connection) -> list[tuple[str, int, str]]:
    """(name, number of versions, newest version) of every pipeline."""
    pv = db.pipeline_versions
    out = []
    for name, count in conn.execute(
        sa.select(pv.c.pipeline, sa.func.count()).group_by(pv.c.pipeline).order_by(pv.c.pipeline)
    ):
        latest = conn.execute(
            sa.select(pv.c.version)
            .where(pv.c.pipeline == name)
            .order_by(pv.c.created_at.desc())
            .limit(1)
        ).scalar()
        out.append((str(name), int(count), str(latest)))
    return out


def list_pipeline_versions(conn: Connection, name: str) -> list[str]:
    pv = db.pipeline_versions
    versions = (
        conn.execute(
            sa.select(pv.c.version).where(pv.c.pipeline == name).order_by(pv.c.created_at.desc())
        )
        .scalars()
        .all()
    )
    if not versions:
        raise PipelineNotFoundError(f"no pipeline named {name!r}")
    return [str(v) for v in versions]


def run_status(conn: Connection, run_id: str) -> str:
    return str(conn.execute(sa.select(db.runs.c.status).where(db.runs.c.id == run_id)).scalar())
