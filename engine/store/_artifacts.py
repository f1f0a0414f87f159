"""Artifacts: the repository behind ArtifactService."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from plait._models import ArtifactInfo, from_epoch
from plait.engine._lazy import lazy_module
from plait.engine.store._engine import sqlite3_of
from plait.engine.store._ids import resolve_prefix
from plait.errors import ArtifactNotFoundError

if TYPE_CHECKING:
    import sqlalchemy as sa
    from sqlalchemy.engine import Connection

    from plait.engine.store import _schema as db
else:
    sa = lazy_module("sqlalchemy")
    db = lazy_module("plait.engine.store._schema")


def artifact_from_row(r: Any) -> ArtifactInfo:
    return ArtifactInfo(
        artifact_id=r.id,
        output=r.output,
        digest=r.digest,
        size=r.size,
        uri=r.uri,
        materializer=r.materializer,
        data_type=r.data_type,
        unsafe=r.unsafe,
        run_id=r.run_id,
        step_id=r.step_id,
        created_at=from_epoch(r.created_at),
        metadata=dict(r.artifact_metadata or {}),
    )


def get_artifact(conn: Connection, prefix: str) -> ArtifactInfo:
    """An artifact by id, or by a unique prefix of it."""
    aid = resolve_prefix(conn, "artifacts", "id", prefix, ArtifactNotFoundError, "artifact")
    return artifact_from_row(
        conn.execute(sa.select(db.artifacts).where(db.artifacts.c.id == aid)).one()
    )


def artifact_metadata(conn: Connection, ids: list[str]) -> dict[str, dict[str, Any]]:
    """The metadata logged for each of these artifacts (those with any)."""
    out: dict[str, dict[str, Any]] = {}
    driver = sqlite3_of(conn)
    for start in range(0, len(ids), 500):  # bounded IN lists
        part = ids[start : start + 500]
        if driver is not None:  # most have none (JSON null): only those with some are read
            found = driver.execute(
                "SELECT id, artifact_metadata FROM artifacts WHERE id IN "
                f"({', '.join('?' * len(part))}) AND artifact_metadata IS NOT NULL "
                "AND artifact_metadata != 'null'",
                part,
            )
            out.update({aid: meta for aid, text in found if (meta := json.loads(text))})
            continue
        rows = conn.execute(
            sa.select(db.artifacts.c.id, db.artifacts.c.artifact_metadata).where(
                db.artifacts.c.id.in_(part)
            )
        )
        out.update({r.id: r.artifact_metadata for r in rows if r.artifact_metadata})
    return out
