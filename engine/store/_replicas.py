"""Control-plane replicas sharing one database: who is alive, and who schedules which run.

Every control plane has a row in ``replicas`` that it renews while it lives (``expires_at``),
and schedules the runs whose ``owner`` it is: the runs it created, and those it took over. A
replica whose row expired is gone; a live one that may resume runs deletes that row and takes
its unfinished runs over, in one transaction whose row locks skip what another replica holds
(``FOR UPDATE SKIP LOCKED`` on PostgreSQL; SQLite has one writer at a time anyway), so every
run gets exactly one new owner. A replica that finds its own row gone was taken for dead: it
must stop scheduling (see ``ControlPlane``), since another one schedules its runs now.

A replica taken for dead may only be paused (SIGSTOP, a stall), in the middle of a transaction
that would commit once it is back, after another replica took its runs. On PostgreSQL each
replica's connections carry its name (``replica_application_name``), and the one that takes it
for dead first ends its sessions (``pg_terminate_backend``): what it had in flight is rolled
back, or had committed before its runs are read. SQLite has one writer at a time: a paused
transaction keeps every other replica's out until it ends.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from plait.engine._lazy import lazy_module
from plait.engine.store._engine import sqlite3_of

if TYPE_CHECKING:
    import sqlalchemy as sa
    from sqlalchemy.engine import Connection

    from plait.engine.store import _schema as db
else:
    sa = lazy_module("sqlalchemy")
    db = lazy_module("plait.engine.store._schema")


_ACTIVE = ("PENDING", "RUNNING")
TERMINATE_WAIT_MS = 5000
"""How long the replica that takes another for dead waits for each of its sessions to end."""


def replica_application_name(replica_id: str) -> str:
    """The ``application_name`` of a replica's PostgreSQL sessions (ids are 32 characters: it
    fits PostgreSQL's 63)."""
    return f"plait replica {replica_id}"


def register_replica(
    conn: Connection, replica_id: str, address: str, now: float, ttl: float
) -> None:
    """Adds (or replaces: a daemon restarting under its own id) this replica's row, and drops
    the rows of replicas that expired owning no unfinished run (embedded engines killed)."""
    if (driver := sqlite3_of(conn)) is not None:
        driver.execute(
            "DELETE FROM replicas WHERE id = ? OR (expires_at < ? AND id NOT IN (SELECT owner "
            "FROM runs WHERE status IN ('PENDING', 'RUNNING') AND owner IS NOT NULL))",
            (replica_id, now),
        )
        driver.execute(
            "INSERT INTO replicas (id, address, started_at, expires_at) VALUES (?, ?, ?, ?)",
            (replica_id, address, now, now + ttl),
        )
        return
    owners = sa.select(db.runs.c.owner).where(
        db.runs.c.status.in_(_ACTIVE), db.runs.c.owner.is_not(None)
    )
    conn.execute(
        sa.delete(db.replicas).where(
            (db.replicas.c.id == replica_id)
            | ((db.replicas.c.expires_at < now) & db.replicas.c.id.not_in(owners.scalar_subquery()))
        )
    )
    conn.execute(
        sa.insert(db.replicas).values(
            id=replica_id, address=address, started_at=now, expires_at=now + ttl
        )
    )


def renew_replica(conn: Connection, replica_id: str, now: float, ttl: float) -> bool:
    """Pushes this replica's expiry on; False when its row is gone (another replica took it
    for dead and took its runs over)."""
    if (driver := sqlite3_of(conn)) is not None:
        cursor = driver.execute(
            "UPDATE replicas SET expires_at = ? WHERE id = ?", (now + ttl, replica_id)
        )
        return cursor.rowcount == 1
    done = conn.execute(
        sa.update(db.replicas).where(db.replicas.c.id == replica_id).values(expires_at=now + ttl)
    )
    return done.rowcount == 1


def remove_replica(conn: Connection, replica_id: str) -> None:
    """Deletes this replica's row (a clean stop): another replica may take its runs at once."""
    if (driver := sqlite3_of(conn)) is not None:
        driver.execute("DELETE FROM replicas WHERE id = ?", (replica_id,))
        return
    conn.execute(sa.delete(db.replicas).where(db.replicas.c.id == replica_id))


def orphans_exist(conn: Connection, now: float) -> bool:
    """Whether some replica has expired, or some unfinished run has no live owner: there is
    something to take over."""
    expired = conn.execute(
        sa.select(db.replicas.c.id).where(db.replicas.c.expires_at < now).limit(1)
    ).first()
    if expired is not None:
        return True
    orphan = conn.execute(sa.select(db.runs.c.id).where(_orphaned(now)).limit(1)).first()
    return orphan is not None


def _orphaned(now: float) -> sa.ColumnElement[bool]:
    live = sa.select(db.replicas.c.id).where(db.replicas.c.expires_at >= now)
    return sa.and_(
        db.runs.c.status.in_(_ACTIVE),
        sa.or_(db.runs.c.owner.is_(None), db.runs.c.owner.not_in(live.scalar_subquery())),
    )


def own_runs(conn: Connection, replica_id: str) -> list[str]:
    """The unfinished runs ``replica_id`` owns (a daemon restarting under its id), oldest
    first."""
    query = sa.select(db.runs.c.id).where(
        db.runs.c.status.in_(_ACTIVE), db.runs.c.owner == replica_id
    )
    return list(conn.execute(query.order_by(db.runs.c.created_at)).scalars())


def claim_runs(conn: Connection, replica_id: str, now: float) -> list[str]:
    """Takes over the unfinished runs of replicas that expired (their rows are deleted) and of
    none (an owner that stopped, or runs from before replicas): their owner becomes
    ``replica_id``. Rows another replica is claiming right now are skipped (it takes them).
    Returns the ids of the runs taken, oldest first."""
    dead = (
        sa.select(db.replicas.c.id)
        .where(db.replicas.c.expires_at < now, db.replicas.c.id != replica_id)
        .with_for_update(skip_locked=True)
    )
    dead_ids = list(conn.execute(dead).scalars())
    if dead_ids:
        if conn.dialect.name == "postgresql":
            _end_sessions(conn, dead_ids)
        conn.execute(sa.delete(db.replicas).where(db.replicas.c.id.in_(dead_ids)))
    mine = conn.execute(
        sa.select(db.runs.c.id)
        .where(_orphaned(now))
        .order_by(db.runs.c.created_at)
        .with_for_update(skip_locked=True)
    )
    run_ids = list(mine.scalars())
    if run_ids:
        conn.execute(sa.update(db.runs).where(db.runs.c.id.in_(run_ids)).values(owner=replica_id))
    return run_ids


def _end_sessions(conn: Connection, replica_ids: list[str]) -> None:
    """Ends the PostgreSQL sessions of replicas taken for dead (those of this database and
    role, the ones this role may end), waiting for each to be gone: a transaction one of them
    had in flight is rolled back, or had committed, before their runs are read."""
    activity = sa.table(
        "pg_stat_activity",
        sa.column("pid"),
        sa.column("datname"),
        sa.column("usename"),
        sa.column("application_name"),
    )
    if (conn.dialect.server_version_info or (0,)) >= (14,):
        terminate = sa.func.pg_terminate_backend(activity.c.pid, TERMINATE_WAIT_MS)
    else:  # no timeout before PostgreSQL 14: the session ends soon after, not before
        terminate = sa.func.pg_terminate_backend(activity.c.pid)
    conn.execute(
        sa.select(terminate).where(
            activity.c.datname == sa.func.current_database(),
            activity.c.usename == sa.func.current_user(),
            activity.c.application_name.in_([replica_application_name(i) for i in replica_ids]),
            activity.c.pid != sa.func.pg_backend_pid(),
        )
    ).all()


def request_cancel(conn: Connection, run_id: str, now: float) -> bool:
    """Asks the owner of an unfinished run to cancel it (see :func:`cancels_requested`);
    False when the run is not unfinished."""
    done = conn.execute(
        sa.update(db.runs)
        .where(db.runs.c.id == run_id, db.runs.c.status.in_(_ACTIVE))
        .values(cancel_requested_at=now)
    )
    return done.rowcount == 1


def cancels_requested(conn: Connection, replica_id: str) -> list[str]:
    """The unfinished runs of ``replica_id`` whose cancellation another replica was asked."""
    if (driver := sqlite3_of(conn)) is not None:
        found = driver.execute(
            "SELECT id FROM runs WHERE owner = ? AND status IN ('PENDING', 'RUNNING') "
            "AND cancel_requested_at IS NOT NULL",
            (replica_id,),
        )
        return [row[0] for row in found]
    query = sa.select(db.runs.c.id).where(
        db.runs.c.owner == replica_id,
        db.runs.c.status.in_(_ACTIVE),
        db.runs.c.cancel_requested_at.is_not(None),
    )
    return list(conn.execute(query).scalars())


def run_owner(conn: Connection, run_id: str, now: float) -> tuple[bool, str | None, bool]:
    """About a run this replica does not hold: (whether the store has it unfinished, its
    owner, whether that owner is alive)."""
    row = conn.execute(
        sa.select(db.runs.c.status, db.runs.c.owner).where(db.runs.c.id == run_id)
    ).first()
    if row is None or row.status not in _ACTIVE:
        return False, None, False
    alive = (
        row.owner is not None
        and conn.execute(
            sa.select(db.replicas.c.id).where(
                db.replicas.c.id == row.owner, db.replicas.c.expires_at >= now
            )
        ).first()
        is not None
    )
    return True, row.owner, alive
