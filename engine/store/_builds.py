"""Builds of environments: records, and the claim that makes one key build once.

A build (a container image, or a virtualenv of the local runner) is addressed by its *key*: the
sha256 of its key material (see ``plait.engine.builds``). One row per key. The control plane
that is about to build a key claims the row (status ``BUILDING``, ``holder``, ``expires_at``,
renewed while it builds); another replica or run that asks for the same key meanwhile waits for
the row to turn ``READY`` instead of building it again. A claim whose holder stopped renewing it
(``expires_at`` passed) or a ``FAILED`` build may be claimed again.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from plait.engine._lazy import lazy_module
from plait.engine.store._ids import resolve_prefix
from plait.errors import NotFoundError

if TYPE_CHECKING:
    import sqlalchemy as sa
    from sqlalchemy.engine import Connection

    from plait.engine.store import _schema as db
else:
    sa = lazy_module("sqlalchemy")
    db = lazy_module("plait.engine.store._schema")

BUILDING, READY, FAILED = "BUILDING", "READY", "FAILED"


@dataclass(frozen=True)
class BuildRecord:
    """One build as the store has it."""

    key: str
    kind: str
    """``image`` or ``venv``."""
    build_digest: str
    material: dict[str, Any]
    status: str
    holder: str
    expires_at: float
    reference: str
    image_id: str
    size_bytes: int
    duration_seconds: float
    source: str
    pushed_to: str
    error: str
    created_at: float
    last_used_at: float
    run_ids: list[str] = field(default_factory=list)


def _record(r: Any, run_ids: list[str] | None = None) -> BuildRecord:
    return BuildRecord(
        key=r.key,
        kind=r.kind,
        build_digest=r.build_digest,
        material=dict(r.material),
        status=r.status,
        holder=r.holder,
        expires_at=r.expires_at,
        reference=r.reference,
        image_id=r.image_id,
        size_bytes=int(r.size_bytes),
        duration_seconds=r.duration_seconds,
        source=r.source,
        pushed_to=r.pushed_to,
        error=r.error,
        created_at=r.created_at,
        last_used_at=r.last_used_at,
        run_ids=run_ids or [],
    )


def _insert(conn: Connection, table: sa.Table) -> Any:
    """An INSERT that can skip rows already there, in the connection's dialect (imported here:
    only a build pays for it)."""
    if conn.dialect.name == "postgresql":
        from sqlalchemy.dialects import postgresql

        return postgresql.insert(table)
    from sqlalchemy.dialects import sqlite

    return sqlite.insert(table)


Claim = tuple[Literal["ready", "mine", "wait"], BuildRecord | None]


def claim_build(
    conn: Connection,
    key: str,
    *,
    kind: str,
    build_digest: str,
    material: dict[str, Any],
    holder: str,
    now: float,
    ttl: float,
) -> Claim:
    """Asks to build ``key``: ``("ready", record)`` when it is built, ``("mine", None)`` when
    the caller now holds the claim and must build it (then :func:`finish_build` or
    :func:`fail_build`), ``("wait", record)`` while another holder builds it."""
    values = dict(
        key=key,
        kind=kind,
        build_digest=build_digest,
        material=material,
        status=BUILDING,
        holder=holder,
        expires_at=now + ttl,
        created_at=now,
        last_used_at=now,
    )
    conn.execute(
        _insert(conn, db.builds).values(**values).on_conflict_do_nothing(index_elements=["key"])
    )
    q = sa.select(db.builds).where(db.builds.c.key == key)
    if conn.dialect.name == "postgresql":
        q = q.with_for_update()
    row = conn.execute(q).one()
    if row.status == READY:
        return "ready", _record(row)
    if row.holder == holder and row.status == BUILDING:
        return "mine", None
    if row.status == BUILDING and row.expires_at > now:
        return "wait", _record(row)
    # a failed build, or a claim its holder stopped renewing: this caller builds it now
    conn.execute(
        sa.update(db.builds)
        .where(db.builds.c.key == key)
        .values(status=BUILDING, holder=holder, expires_at=now + ttl, error="", material=material)
    )
    return "mine", None


def renew_build(conn: Connection, key: str, holder: str, now: float, ttl: float) -> bool:
    """Keeps the caller's claim on ``key`` alive; False when it no longer holds it."""
    done = conn.execute(
        sa.update(db.builds)
        .where(db.builds.c.key == key, db.builds.c.holder == holder, db.builds.c.status == BUILDING)
        .values(expires_at=now + ttl)
    )
    return done.rowcount == 1


def finish_build(
    conn: Connection,
    key: str,
    holder: str,
    *,
    reference: str,
    image_id: str,
    size_bytes: int,
    duration_seconds: float,
    source: str,
    pushed_to: str,
    now: float,
) -> None:
    """Marks the caller's build of ``key`` READY with what it made (or found)."""
    conn.execute(
        sa.update(db.builds)
        .where(db.builds.c.key == key, db.builds.c.holder == holder)
        .values(
            status=READY,
            holder="",
            expires_at=0.0,
            reference=reference,
            image_id=image_id,
            size_bytes=size_bytes,
            duration_seconds=duration_seconds,
            source=source,
            pushed_to=pushed_to,
            error="",
            last_used_at=now,
        )
    )


def fail_build(conn: Connection, key: str, holder: str, error: str, now: float) -> None:
    """Marks the caller's build of ``key`` FAILED (the next request tries again)."""
    conn.execute(
        sa.update(db.builds)
        .where(db.builds.c.key == key, db.builds.c.holder == holder)
        .values(status=FAILED, holder="", expires_at=0.0, error=error[:4000], last_used_at=now)
    )


def mark_used(conn: Connection, key: str, run_id: str, now: float, source: str = "") -> None:
    """Records that ``run_id`` used the build (once per run), and when; ``source`` (how the
    build came to be usable this time: built, local, pulled) when given."""
    values: dict[str, Any] = {"last_used_at": now}
    if source:
        values["source"] = source
    conn.execute(sa.update(db.builds).where(db.builds.c.key == key).values(**values))
    conn.execute(
        _insert(conn, db.build_runs)
        .values(key=key, run_id=run_id, used_at=now)
        .on_conflict_do_nothing(index_elements=["key", "run_id"])
    )


def _runs_of(conn: Connection, key: str, limit: int = 100) -> list[str]:
    return list(
        conn.execute(
            sa.select(db.build_runs.c.run_id)
            .where(db.build_runs.c.key == key)
            .order_by(db.build_runs.c.used_at.desc(), db.build_runs.c.run_id)
            .limit(limit)
        ).scalars()
    )


def list_builds(conn: Connection, limit: int = 100, kind: str = "") -> list[BuildRecord]:
    """Builds, the most recently used first, each with the runs that used it."""
    q = sa.select(db.builds).order_by(db.builds.c.last_used_at.desc(), db.builds.c.key)
    if kind:
        q = q.where(db.builds.c.kind == kind)
    return [_record(r, _runs_of(conn, r.key)) for r in conn.execute(q.limit(limit))]


def get_build(conn: Connection, prefix: str) -> BuildRecord:
    """The build whose key is ``prefix`` or the one key starting with it."""
    key = resolve_prefix(conn, "builds", "key", prefix, NotFoundError, "build")
    row = conn.execute(sa.select(db.builds).where(db.builds.c.key == key)).one()
    return _record(row, _runs_of(conn, key))


def find_build(conn: Connection, key: str) -> BuildRecord | None:
    """The build of exactly ``key``, if there is one."""
    row = conn.execute(sa.select(db.builds).where(db.builds.c.key == key)).first()
    return None if row is None else _record(row)


def prunable_builds(
    conn: Connection, *, unused_before: float, keys: list[str]
) -> list[BuildRecord]:
    """The builds ``plait builds prune`` would remove: those named (by key or prefix), or every
    build last used before ``unused_before``; never one being built."""
    if keys:
        found = [get_build(conn, k) for k in keys]
    else:
        q = sa.select(db.builds).where(db.builds.c.last_used_at < unused_before)
        found = [_record(r, _runs_of(conn, r.key)) for r in conn.execute(q)]
    return [b for b in found if b.status != BUILDING]


def delete_builds(conn: Connection, keys: list[str]) -> None:
    """Forgets builds (their images or folders are removed by the caller)."""
    if keys:
        conn.execute(sa.delete(db.build_runs).where(db.build_runs.c.key.in_(keys)))
        conn.execute(sa.delete(db.builds).where(db.builds.c.key.in_(keys)))
