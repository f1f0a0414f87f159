"""The transaction runner: one per process and database URL.

Every state change is a transaction built by a plain function of a SQLAlchemy ``Connection``
(repository functions take a connection and never commit; the store owns the transaction).
How the function runs depends on the URL:

* Reads, the schema, and every transaction of an async URL (``sqlite+aiosqlite:///…``,
  ``postgresql+asyncpg://…``) go through SQLAlchemy's ``AsyncEngine``: the function runs in
  ``AsyncConnection.run_sync``.
* Writes to ``sqlite:///…`` (the default URL) take the hot path: SQLAlchemy's sync pysqlite
  driver on one writer thread, one thread hop per *transaction* (reads of the same file still
  go through aiosqlite). aiosqlite pays a thread hop per *statement*: a six-statement
  transaction measured 3.1 ms through it and 0.8 ms this way, and the per-step budget of
  DESIGN.md is 2 ms for everything.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import anyio
import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.ext.asyncio import create_async_engine

from plait.engine.store._schema import insert_defaults, metadata

P = ParamSpec("P")
T = TypeVar("T")


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    # WAL: readers (CLI, other processes) never block the writer, and commits are appends.
    cur.execute("PRAGMA journal_mode=WAL")
    # NORMAL in WAL mode: a commit survives a crash of the process; only an OS crash or power
    # loss can lose the last commits. FULL would fsync every state change.
    cur.execute("PRAGMA synchronous=NORMAL")
    # Several processes may share one database (two scripts, a CLI): wait for the lock.
    cur.execute("PRAGMA busy_timeout=10000")
    # SQLite ignores foreign keys unless told otherwise.
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()
    # pysqlite's own transaction handling would issue a deferred BEGIN; we issue our own.
    dbapi_conn.isolation_level = None


def _sqlite_begin(conn: Connection) -> None:
    if conn.get_execution_options().get("plait_read_only"):
        conn.exec_driver_sql("BEGIN")
        return
    # IMMEDIATE takes the write lock at BEGIN: a deferred transaction that reads first and
    # writes later can fail with SQLITE_BUSY when another process wrote in between.
    conn.exec_driver_sql("BEGIN IMMEDIATE")


class Store:
    """Runs transactions against the metadata database. One per process and URL."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._sync: Engine | None = None
        self._writer_conn: Connection | None = None
        self._writer = anyio.CapacityLimiter(1)
        self._readers = anyio.CapacityLimiter(4)
        u = sa.engine.make_url(url)
        self.dialect = u.get_backend_name()
        if self.dialect == "sqlite" and u.database and u.database != ":memory:":
            Path(u.database).parent.mkdir(parents=True, exist_ok=True)
        if u.drivername in ("sqlite", "sqlite+pysqlite"):
            # the hot path: SQLAlchemy's sync driver on one writer thread (see the docstring)
            self._sync = sa.create_engine(url, pool_size=1, max_overflow=0)
            event.listen(self._sync, "connect", _sqlite_pragmas)
            event.listen(self._sync, "begin", _sqlite_begin)
            u = u.set(drivername="sqlite+aiosqlite")
        # everything else, reads included: SQLAlchemy's AsyncEngine (aiosqlite, asyncpg)
        self._async = create_async_engine(u)
        if self.dialect == "sqlite":
            event.listen(self._async.sync_engine, "connect", _sqlite_pragmas)
            event.listen(self._async.sync_engine, "begin", _sqlite_begin)

    @property
    def is_sqlite(self) -> bool:
        return self.dialect == "sqlite"

    def _run_sync(self, fn: Callable[..., T], *args: Any) -> T:
        assert self._sync is not None
        # the writer thread keeps its connection: a pool checkout per transaction costs more
        # than the statements of a small one
        if self._writer_conn is None:
            self._writer_conn = self._sync.connect()
        with self._writer_conn.begin():
            return fn(self._writer_conn, *args)

    async def write(self, fn: Callable[..., T], *args: Any, small: bool = False) -> T:
        """Runs ``fn(conn, *args)`` in one write transaction and commits it.

        ``small``: the caller knows the transaction is short (a few rows); on SQLite it then
        runs on the calling thread, since the hop to the writer thread would cost as much.
        """
        if self._sync is not None:
            if small and self._writer.borrowed_tokens == 0:
                return self._run_sync(fn, *args)
            return await anyio.to_thread.run_sync(self._run_sync, fn, *args, limiter=self._writer)
        async with self._writer, self._async.begin() as conn:
            return await conn.run_sync(fn, *args)

    async def read(self, fn: Callable[..., T], *args: Any) -> T:
        """Runs ``fn(conn, *args)`` in a transaction of its own (reads run beside the writer)."""
        async with self._readers, self._async.connect() as conn:
            await conn.execution_options(plait_read_only=True)
            async with conn.begin():
                return await conn.run_sync(fn, *args)

    async def open(self) -> None:
        """Creates the schema when the database is new; refuses a newer unknown schema."""
        await self.write(_ensure_schema)

    async def aclose(self) -> None:
        if self._sync is not None:
            if self._writer_conn is not None:
                await anyio.to_thread.run_sync(self._writer_conn.close, limiter=self._writer)
                self._writer_conn = None
            await anyio.to_thread.run_sync(self._sync.dispose)
        await self._async.dispose()


MIGRATIONS = Path(__file__).resolve().parent.parent / "migrations"
SCHEMA_HEAD = "0004"
"""The newest migration in migrations/versions (a test keeps the two in step)."""

# Alembic's own bookkeeping table, as Alembic creates it
alembic_version = sa.Table(
    "alembic_version",
    sa.MetaData(),
    sa.Column("version_num", sa.String(32), primary_key=True),
)


def _ensure_schema(conn: Connection) -> None:
    """Brings the schema to the newest revision (Alembic); refuses a database written by a newer
    Plait, whose revision this one does not know."""
    current = _current_revision(conn)
    if current == SCHEMA_HEAD:
        return
    if current is None and not sa.inspect(conn).has_table("runs"):
        # a new database: create the newest schema and stamp it, as `alembic stamp head` would,
        # without paying Alembic's import on every first run (a test checks both agree)
        metadata.create_all(conn)
        insert_defaults(conn)
        alembic_version.create(conn)
        conn.execute(alembic_version.insert().values(version_num=SCHEMA_HEAD))
        return
    _migrate(conn, current)


def _current_revision(conn: Connection) -> str | None:
    if not sa.inspect(conn).has_table("alembic_version"):
        return None
    return conn.execute(sa.select(alembic_version.c.version_num)).scalar()


def _migrate(conn: Connection, current: str | None) -> None:
    from alembic import command
    from alembic.config import Config
    from alembic.script import ScriptDirectory
    from alembic.util import CommandError

    from plait.errors import PlaitError

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.attributes["connection"] = conn
    script = ScriptDirectory.from_config(cfg)
    if current is None:
        # tables from before migrations existed (0001's schema, unstamped): stamp, then upgrade
        command.stamp(cfg, "0001")
    else:
        try:
            script.get_revision(current)
        except CommandError:
            raise PlaitError(
                f"the database has schema revision {current!r}, which this version of Plait "
                f"does not know: a newer Plait wrote it. Upgrade Plait, or point PLAIT_HOME "
                f"or the database URL elsewhere"
            ) from None
    command.upgrade(cfg, "head")


_COMPILED: dict[tuple[int, tuple[str, ...]], tuple[str, list[tuple[str, Any]], Any]] = {}


def is_fast_sqlite(conn: Connection) -> bool:
    return conn.dialect.name == "sqlite" and conn.dialect.driver == "pysqlite"


def executemany(conn: Connection, stmt: Any, rows: list[dict[str, Any]]) -> None:
    """``conn.execute(stmt, rows)``; on pysqlite, without SQLAlchemy's per-statement work.

    The hot path runs a handful of small statements per step. SQLAlchemy's execution context
    costs ~80 us a statement, sqlite3 itself ~10 us: so the statement is compiled by SQLAlchemy
    once (per shape), its parameters go through the same bind processors SQLAlchemy would apply
    (JSON, booleans), and the DBAPI cursor of the connection's open transaction runs it.
    """
    if not rows:
        return
    if not is_fast_sqlite(conn):
        conn.execute(stmt, rows)
        return
    keys = tuple(rows[0])
    entry = _COMPILED.get((id(stmt), keys))
    if entry is None:
        compiled = stmt.compile(dialect=conn.dialect, column_keys=list(keys))
        params = []
        for name in compiled.positiontup or ():
            bind = compiled.binds[name]
            params.append((name, bind.type.dialect_impl(conn.dialect).bind_processor(conn.dialect)))
        entry = (str(compiled), params, stmt)  # holding stmt keeps its id() unique
        _COMPILED[(id(stmt), keys)] = entry
    sql, params, _ = entry
    data = [tuple(p(row[n]) if p else row[n] for n, p in params) for row in rows]
    driver = conn.connection.driver_connection
    assert driver is not None
    driver.executemany(sql, data)
