"""Pipelines and their versions: the repository behind PipelineService."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from plait.engine._lazy import lazy_module
from plait.engine.store._engine import sqlite3_of
from plait.errors import PipelineNotFoundError
from plait.ir.v1 import ir_pb2

if TYPE_CHECKING:
    import sqlalchemy as sa
    from sqlalchemy.engine import Connection

    from plait.engine.store import _schema as db
else:
    sa = lazy_module("sqlalchemy")
    db = lazy_module("plait.engine.store._schema")


@dataclass(frozen=True)
class PipelineSummary:
    name: str
    version_count: int
    latest_version: str


def register_pipeline(
    conn: Connection, spec: ir_pb2.PipelineSpec, version: str, now: float
) -> bool:
    """Stores a pipeline version; False when that version was there already."""
    if (driver := sqlite3_of(conn)) is not None:
        if driver.execute(
            "SELECT 1 FROM pipeline_versions WHERE version = ?", (version,)
        ).fetchone():
            return False
        driver.execute(
            "INSERT INTO pipelines (name, created_at) VALUES (?, ?) ON CONFLICT DO NOTHING",
            (spec.name, now),
        )
        driver.execute(
            "INSERT INTO pipeline_versions (version, pipeline, spec, created_at) "
            "VALUES (?, ?, ?, ?)",
            (version, spec.name, spec.SerializeToString(), now),
        )
        return True
    pv = db.pipeline_versions
    if conn.execute(sa.select(pv.c.version).where(pv.c.version == version)).first() is not None:
        return False
    if (
        conn.execute(sa.select(db.pipelines.c.name).where(db.pipelines.c.name == spec.name)).first()
        is None
    ):
        conn.execute(db.pipelines.insert().values(name=spec.name, created_at=now))
    conn.execute(
        pv.insert().values(
            version=version, pipeline=spec.name, spec=spec.SerializeToString(), created_at=now
        )
    )
    return True


def get_pipeline_version(conn: Connection, version: str) -> ir_pb2.PipelineSpec:
    if (driver := sqlite3_of(conn)) is not None:
        found = driver.execute(
            "SELECT spec FROM pipeline_versions WHERE version = ?", (version,)
        ).fetchone()
        if found is None:
            raise PipelineNotFoundError(f"no pipeline version {version!r} is registered")
        return ir_pb2.PipelineSpec.FromString(found[0])
    blob = conn.execute(
        sa.select(db.pipeline_versions.c.spec).where(db.pipeline_versions.c.version == version)
    ).scalar()
    if blob is None:
        raise PipelineNotFoundError(f"no pipeline version {version!r} is registered")
    return ir_pb2.PipelineSpec.FromString(blob)


def list_pipelines(conn: Connection) -> list[PipelineSummary]:
    """Every pipeline with its number of versions and its newest version."""
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
        out.append(PipelineSummary(str(name), int(count), str(latest)))
    return out


def list_pipeline_versions(conn: Connection, name: str) -> list[str]:
    """A pipeline's versions, newest first."""
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
