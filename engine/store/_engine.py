"""The transaction runner: one per process and database URL.

Every state change is a transaction built by a plain function of a SQLAlchemy ``Connection``
(repository functions take a connection and never commit; the store owns the transaction).
How the function runs depends on the URL:

* Every transaction of an async URL (``sqlite+aiosqlite:///…``, ``postgresql+asyncpg://…``)
  goes through SQLAlchemy's ``AsyncEngine``: the function runs in ``AsyncConnection.run_sync``.
* On ``sqlite:///…`` (the default URL), SQLAlchemy's sync pysqlite driver: writes on one
  writer thread, each read on a reader thread of its own connection, one thread hop per
  *transaction*. aiosqlite pays a thread hop per *statement*: a six-statement transaction
  measured 3.1 ms through it and 0.8 ms this way, and the per-step budget of DESIGN.md is
  2 ms for everything. Nor does the default URL import SQLAlchemy's asyncio extension (and
  with it the ORM): a tenth of a one-step pipeline's process.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import operator
import os
import random
import sqlite3
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar

import anyio
import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncEngine

from plait.engine._json import JsonText, plain
from plait.engine.store._schema import insert_defaults, metadata

log = logging.getLogger("plait.engine")

P = ParamSpec("P")
T = TypeVar("T")

READERS = 4
"""Reads at once, beside the one writer."""


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
    # IMMEDIATE takes the write lock at BEGIN: a deferred transaction that reads first and
    # writes later can fail with SQLITE_BUSY when another process wrote in between.
    sql = "BEGIN" if conn.get_execution_options().get("plait_read_only") else "BEGIN IMMEDIATE"
    if is_fast_sqlite(conn):
        # straight to sqlite3: SQLAlchemy's execution context would cost ten times the BEGIN
        driver = conn.connection.driver_connection
        assert driver is not None
        driver.execute(sql)
    else:
        conn.exec_driver_sql(sql)


def _private_database(path: Path) -> None:
    """Creates the SQLite file owner-only (0600) before SQLite opens it: SQLite gives its WAL
    and shared-memory files the database's permissions, so they are owner-only too."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.fchmod(fd, 0o600)
    finally:
        os.close(fd)
    for extra in ("-wal", "-shm"):
        with contextlib.suppress(FileNotFoundError):
            path.with_name(path.name + extra).chmod(0o600)


_SQLITE_BUSY_CODES = frozenset({5, 6, 13})
"""SQLITE_BUSY, SQLITE_LOCKED, SQLITE_FULL (primary result codes)."""
_PG_TRANSIENT_STATES = frozenset({"40001", "40P01", "53100", "53300", "57P01", "57P02", "57P03"})
"""serialization failure, deadlock, disk full, too many connections, admin or crash shutdown,
starting up; and every state of class 08 (connection exception)."""
_NETWORK_ERRNOS = frozenset(
    {
        errno.ECONNREFUSED,
        errno.ECONNRESET,
        errno.ECONNABORTED,
        errno.EPIPE,
        errno.ETIMEDOUT,
        errno.EHOSTUNREACH,
        errno.ENETUNREACH,
        errno.ENETDOWN,
        errno.EADDRNOTAVAIL,
    }
)


def is_transient(exc: BaseException) -> bool:
    """Whether a failed transaction may well succeed if simply tried again: the database was
    busy (SQLite's write lock held by another process past the busy timeout) or the connection
    to it was lost or refused (a PostgreSQL server restarting). Not an error of the data."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, sa.exc.DBAPIError) and e.connection_invalidated:
            return True
        if isinstance(e, ConnectionError | TimeoutError):
            return True
        if isinstance(e, OSError) and e.errno in _NETWORK_ERRNOS:
            return True
        if type(e) is OSError and str(e).startswith("Multiple exceptions: "):
            return True  # asyncio's connect to every address of a host failed
        code = getattr(e, "sqlite_errorcode", None)
        if isinstance(code, int) and code & 0xFF in _SQLITE_BUSY_CODES:
            return True
        state = getattr(e, "sqlstate", None) or getattr(e, "pgcode", None)
        if isinstance(state, str) and (state.startswith("08") or state in _PG_TRANSIENT_STATES):
            return True
        names = {c.__name__ for c in type(e).__mro__}
        if type(e).__module__.startswith("asyncpg") and "InterfaceError" in names:
            # "connection is closed", "another operation is in progress"; not a bad DSN
            return "ClientConfigurationError" not in names
        todo += [e.__cause__, e.__context__, getattr(e, "orig", None)]
    return False


class Backoff:
    """Delays between retries: exponential, capped, with full jitter (a random delay between
    zero and the current bound), so that many waiters do not come back in step."""

    def __init__(self, first: float = 0.05, cap: float = 2.0) -> None:
        self._bound = first
        self._cap = cap

    def next(self) -> float:
        delay = random.uniform(0, self._bound)
        self._bound = min(self._cap, self._bound * 2)
        return delay


RETRY_SECONDS = 30.0
"""How long :meth:`Store.read` and :meth:`Store.write` retry transient errors before they fail
(the scheduler's own transactions retry for as long as the control plane runs)."""


class _Retries:
    """Transient errors retried, with backoff, for up to RETRY_SECONDS."""

    def __init__(self) -> None:
        self.backoff: Backoff | None = None
        self._deadline = 0.0

    def delay(self, exc: Exception) -> float | None:
        """How long to wait before trying again after ``exc``; None: give up (raise it)."""
        if not is_transient(exc):
            return None
        if self.backoff is None:
            self.backoff, self._deadline = Backoff(), anyio.current_time() + RETRY_SECONDS
        elif anyio.current_time() >= self._deadline:
            return None
        return self.backoff.next()


FAULT_COMMIT_THEN_ERROR = "PLAIT_TEST_FAULT_COMMIT_THEN_ERROR"
"""The environment variable that turns on :class:`CommitThenError`, a test fake."""


class CommitThenError:
    """TEST FAKE, for fault-injection tests only (``tests/test_fault_injection.py``): makes some
    of the scheduler's write transactions commit and then fail as if the connection had been
    lost while the COMMIT was acknowledged, so that the caller cannot tell whether its changes
    were written. A real database does this rarely and at random; the tests need it often.

    On only when ``$PLAIT_TEST_FAULT_COMMIT_THEN_ERROR`` is set: ``N`` (an integer, 2 or more)
    strikes every Nth transaction, ``P`` (a number with a dot, below 1) each with probability
    P. Only the transactions run with ``retry=False`` are hit: the scheduler's, which carry
    every state change of a run. The error raised is transient (:func:`is_transient`).
    """

    def __init__(self, spec: str) -> None:
        self.every = 0
        self.probability = 0.0
        try:
            if "." in spec:
                self.probability = float(spec)
                valid = 0 < self.probability < 1
            else:
                self.every = int(spec)
                valid = self.every >= 2
        except ValueError:
            valid = False
        if not valid:
            raise ValueError(
                f"{FAULT_COMMIT_THEN_ERROR} must be an integer N >= 2 (every Nth transaction) "
                f"or a probability between 0 and 1 with a dot, not {spec!r}"
            )
        self._count = 0
        self.struck = 0
        """How many committed transactions it made fail so far."""

    @classmethod
    def from_env(cls) -> CommitThenError | None:
        spec = os.environ.get(FAULT_COMMIT_THEN_ERROR, "")
        return cls(spec) if spec else None

    def after_commit(self) -> None:
        """Called once a transaction committed; raises when this one is to look failed."""
        self._count += 1
        if self._count % self.every == 0 if self.every else random.random() < self.probability:
            self.struck += 1
            raise ConnectionResetError(
                errno.ECONNRESET,
                f"{FAULT_COMMIT_THEN_ERROR}: the transaction committed, then the connection "
                f"was lost (a test fake, strike {self.struck})",
            )


CHECKPOINT_EVERY = 64
"""Commits of the writer between two checkpoints (a step's transaction writes 10-15 pages: about
SQLite's own 1,000-page threshold)."""


class _Checkpointer:
    """Copies the WAL back into the database file (a PASSIVE checkpoint: it waits for no reader
    or writer) on a thread of its own, every CHECKPOINT_EVERY commits of the writer.

    SQLite would run that checkpoint inside the COMMIT that crosses its threshold, on the
    scheduler's thread, with two fsyncs (the WAL's, then the database's): a few milliseconds
    every seventy-odd steps, a third of a step's commit on average. Here the writer's
    connection has ``wal_autocheckpoint`` off, and this thread, which holds no GIL while SQLite
    works, takes the fsyncs. Durability is SQLite's: with ``synchronous=NORMAL`` a commit is in
    the WAL (safe from a crash of the process) and the checkpoint syncs before and after it
    copies. Should the thread fail, the writer turns SQLite's own checkpoints back on."""

    def __init__(self, path: str) -> None:
        self._path = path
        self._cond = threading.Condition()
        self._due = False
        """A checkpoint is asked for (several asked before it starts make one)."""
        self._busy = True
        """The thread is opening its connection or checkpointing."""
        self._stop = False
        self._commits = 0
        self.failed = False
        self.checkpoints = 0
        """Checkpoints run so far (for tests)."""
        self._thread = threading.Thread(target=self._run, name="plait-checkpoint", daemon=True)
        self._thread.start()

    def committed(self) -> None:
        """Called by the writer after each commit."""
        self._commits += 1
        if self._commits >= CHECKPOINT_EVERY:
            self._commits = 0
            with self._cond:
                self._due = True
                self._cond.notify_all()

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Waits until no checkpoint is due or running (for tests)."""
        with self._cond:
            return self._cond.wait_for(lambda: not (self._due or self._busy), timeout)

    def close(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        try:
            conn = sqlite3.connect(self._path, isolation_level=None, check_same_thread=False)
        except sqlite3.Error:
            log.warning("the WAL checkpoint thread could not open %s", self._path, exc_info=True)
            self.failed = True
            self._idle()
            return
        try:
            conn.execute("PRAGMA busy_timeout=10000")
            conn.execute("PRAGMA synchronous=NORMAL")  # the checkpoint still syncs, as SQLite's
            while True:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()
                    self._cond.wait_for(lambda: self._due or self._stop)
                    if self._stop:
                        return
                    self._due, self._busy = False, True
                try:
                    conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
                    self.checkpoints += 1
                except sqlite3.Error:  # the next one copies what this one could not
                    log.warning("a WAL checkpoint failed", exc_info=True)
        except Exception:
            log.exception("the WAL checkpoint thread stopped")
            self.failed = True
        finally:
            conn.close()
            self._idle()

    def _idle(self) -> None:
        """The thread ended: nothing is due or running any more (wait_idle returns)."""
        with self._cond:
            self._due = self._busy = False
            self._cond.notify_all()


class Store:
    """Runs transactions against the metadata database. One per process and URL."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._sync: Engine | None = None
        self._async: AsyncEngine | None = None
        self._writer_conn: Connection | None = None
        self._checkpointer: _Checkpointer | None = None
        self._writer = anyio.CapacityLimiter(1)
        self._readers = anyio.CapacityLimiter(READERS)
        u = sa.engine.make_url(url)
        self.dialect = u.get_backend_name()
        self._database = u.database if u.database and u.database != ":memory:" else None
        if self.dialect == "sqlite" and u.database and u.database != ":memory:":
            _private_database(Path(u.database))
        if u.drivername in ("sqlite", "sqlite+pysqlite"):
            # the hot path: SQLAlchemy's sync driver, the writer's connection on one thread and
            # each read's on a reader thread (see the docstring)
            self._sync = sa.create_engine(url, pool_size=1 + READERS, max_overflow=0)
            event.listen(self._sync, "connect", _sqlite_pragmas)
            event.listen(self._sync, "begin", _sqlite_begin)
        else:
            # SQLAlchemy's AsyncEngine (aiosqlite, asyncpg), imported only then: it brings
            # SQLAlchemy's ORM, a tenth of a short run's process on the default URL
            from sqlalchemy.ext.asyncio import create_async_engine

            self._async = create_async_engine(u)
            if self.dialect == "sqlite":
                event.listen(self._async.sync_engine, "connect", _sqlite_pragmas)
                event.listen(self._async.sync_engine, "begin", _sqlite_begin)
        self._fault = CommitThenError.from_env()  # a test fake; None unless a test asks

    @property
    def is_sqlite(self) -> bool:
        return self.dialect == "sqlite"

    def _read_sync(self, fn: Callable[..., T], *args: Any) -> T:
        assert self._sync is not None
        with self._sync.connect() as conn:
            conn.execution_options(plait_read_only=True)
            with conn.begin():
                return fn(conn, *args)

    def _run_sync(self, fn: Callable[..., T], *args: Any) -> T:
        assert self._sync is not None
        # the writer thread keeps its connection: a pool checkout per transaction costs more
        # than the statements of a small one
        if self._writer_conn is None:
            self._writer_conn = self._sync.connect()
            if self._database is not None:
                # its checkpoints run on a thread of their own (see _Checkpointer)
                self._checkpointer = _Checkpointer(self._database)
                self._pragma(self._writer_conn, "PRAGMA wal_autocheckpoint=0")
        with self._writer_conn.begin():
            result = fn(self._writer_conn, *args)
        checkpointer = self._checkpointer
        if checkpointer is not None:
            if checkpointer.failed:  # SQLite's own checkpoints again
                self._checkpointer = None
                self._pragma(self._writer_conn, "PRAGMA wal_autocheckpoint=1000")
            else:
                checkpointer.committed()
        return result

    @staticmethod
    def _pragma(conn: Connection, sql: str) -> None:
        """A PRAGMA on the driver's connection, outside any transaction (SQLAlchemy's execute
        would begin one)."""
        driver = conn.connection.driver_connection
        assert driver is not None
        driver.execute(sql)

    async def write(
        self, fn: Callable[..., T], *args: Any, small: bool = False, retry: bool = True
    ) -> T:
        """Runs ``fn(conn, *args)`` in one write transaction and commits it.

        ``small``: the caller knows the transaction is short (a few rows); on SQLite it then
        runs on the calling thread, since the hop to the writer thread would cost as much.

        ``retry``: a transient error (:func:`is_transient`: the database busy past its timeout,
        the connection lost) is retried with backoff for up to ``RETRY_SECONDS``, ``fn`` run
        again from the start (what it changed outside the transaction, it must change again
        the same way). The scheduler passes False: it restores its view between its tries.
        """
        retries = _Retries()
        while True:
            try:
                if self._sync is not None:
                    # once the database was busy, wait for it on the writer thread, not here
                    if small and retries.backoff is None and self._writer.borrowed_tokens == 0:
                        result = self._run_sync(fn, *args)
                    else:
                        result = await anyio.to_thread.run_sync(
                            self._run_sync, fn, *args, limiter=self._writer
                        )
                else:
                    assert self._async is not None
                    async with self._writer, self._async.begin() as conn:
                        result = await conn.run_sync(fn, *args)
                if self._fault is not None and not retry:
                    self._fault.after_commit()
                return result
            except Exception as exc:
                delay = retries.delay(exc) if retry else None
                if delay is None:
                    raise
            await anyio.sleep(delay)

    async def read(self, fn: Callable[..., T], *args: Any) -> T:
        """Runs ``fn(conn, *args)`` in a transaction of its own (reads run beside the writer).

        A transient error (:func:`is_transient`: the database busy, the connection lost) is
        retried with backoff for up to ``RETRY_SECONDS``; then it is raised.
        """
        retries = _Retries()
        while True:
            try:
                if self._sync is not None:
                    return await anyio.to_thread.run_sync(
                        self._read_sync, fn, *args, limiter=self._readers
                    )
                assert self._async is not None
                async with self._readers, self._async.connect() as conn:
                    await conn.execution_options(plait_read_only=True)
                    async with conn.begin():
                        return await conn.run_sync(fn, *args)
            except Exception as exc:
                delay = retries.delay(exc)
                if delay is None:
                    raise
            await anyio.sleep(delay)

    async def open(self) -> None:
        """Creates the schema when the database is new; refuses a newer unknown schema."""
        await self.write(_ensure_schema)

    async def aclose(self) -> None:
        if self._checkpointer is not None:
            # first: the writer's connection, closed last, then checkpoints what is left and
            # removes the WAL
            await anyio.to_thread.run_sync(self._checkpointer.close)
            self._checkpointer = None
        if self._sync is not None:
            if self._writer_conn is not None:
                await anyio.to_thread.run_sync(self._writer_conn.close, limiter=self._writer)
                self._writer_conn = None
            await anyio.to_thread.run_sync(self._sync.dispose)
        if self._async is not None:
            await self._async.dispose()


MIGRATIONS = Path(__file__).resolve().parent.parent / "migrations"
SCHEMA_HEAD = "0011"
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
    if conn.dialect.name == "postgresql":
        # replicas started together on one database: one creates or migrates the schema, the
        # others wait here (the lock is the transaction's) and then find it current
        conn.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": _SCHEMA_LOCK})
        current = _current_revision(conn)
        if current == SCHEMA_HEAD:
            return
    if current is None and not _has_table(conn, "runs"):
        # a new database: create the newest schema and stamp it, as `alembic stamp head` would,
        # without paying Alembic's import on every first run (a test checks both agree)
        if is_fast_sqlite(conn):
            # the same statements, compiled when the schema changed (scripts/gen_sqlite_schema.py):
            # SQLAlchemy's DDL compiler costs a first run more than SQLite takes to run them
            from plait.engine.store._sqlite_schema import HEAD, STATEMENTS

            if HEAD == SCHEMA_HEAD:
                driver = conn.connection.driver_connection
                assert driver is not None
                for sql, params in STATEMENTS:
                    driver.execute(sql, params)
                return
        metadata.create_all(conn)
        insert_defaults(conn)
        alembic_version.create(conn)
        conn.execute(alembic_version.insert().values(version_num=SCHEMA_HEAD))
        return
    _migrate(conn, current)


def sqlite_schema_script() -> list[tuple[str, tuple[Any, ...]]]:
    """What a new SQLite database at SCHEMA_HEAD is made of: the tables and indexes of
    ``metadata`` as ``create_all`` makes them, the default rows, the Alembic stamp; each a
    statement and its parameters as SQLite's driver takes them. scripts/gen_sqlite_schema.py
    writes them to ``_sqlite_schema.py``, which a new database on the default URL runs."""
    from sqlalchemy.dialects import sqlite
    from sqlalchemy.schema import CreateIndex, CreateTable

    from plait.engine.store._schema import (
        DEFAULT_COMPONENTS,
        DEFAULT_STACK,
        components,
        settings,
        stacks,
    )

    dialect = sqlite.dialect()  # type: ignore[no-untyped-call]
    script: list[tuple[str, tuple[Any, ...]]] = []

    def ddl(element: Any) -> None:
        script.append((str(element.compile(dialect=dialect)).strip(), ()))

    def rows(table: sa.Table, values: list[dict[str, Any]]) -> None:
        for row in values:
            compiled = table.insert().values(row).compile(dialect=dialect)
            params = compiled.construct_params()
            bound = []
            for name in compiled.positiontup or ():
                value = params[name]
                process = compiled.binds[name].type.dialect_impl(dialect).bind_processor(dialect)
                bound.append(process(value) if process is not None else value)
            script.append((str(compiled), tuple(bound)))

    for table in [*metadata.sorted_tables, alembic_version]:
        ddl(CreateTable(table))
        for index in sorted(table.indexes, key=lambda i: i.name or ""):
            ddl(CreateIndex(index))
    rows(components, list(DEFAULT_COMPONENTS))
    rows(stacks, [DEFAULT_STACK])
    rows(settings, [{"key": "active_stack", "value": "default"}])
    rows(alembic_version, [{"version_num": SCHEMA_HEAD}])
    return script


def _has_table(conn: Connection, name: str) -> bool:
    if is_fast_sqlite(conn):
        driver = conn.connection.driver_connection
        assert driver is not None
        found = driver.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (name,)
        ).fetchone()
        return found is not None
    return bool(sa.inspect(conn).has_table(name))


_SCHEMA_LOCK = 0x706C616974  # "plait": the advisory lock key of schema changes


def _current_revision(conn: Connection) -> str | None:
    if not _has_table(conn, "alembic_version"):
        return None
    if is_fast_sqlite(conn):
        driver = conn.connection.driver_connection
        assert driver is not None
        found = driver.execute("SELECT version_num FROM alembic_version").fetchone()
        return None if found is None else str(found[0])
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


_COMPILED: dict[tuple[int, tuple[str, ...], bool], tuple[str, Any, list[tuple[int, Any]], Any]] = {}


def _json_processor(process: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """A JSON column's bind processor that writes a `JsonText` as it is."""

    def encode(value: Any) -> Any:
        if type(value) is JsonText:
            return str.__str__(value)
        return process(value)

    return encode


def is_fast_sqlite(conn: Connection) -> bool:
    return conn.dialect.name == "sqlite" and conn.dialect.driver == "pysqlite"


def _one(names: list[str]) -> Callable[[Any], tuple[Any, ...]]:
    """``itemgetter`` for one name or none, which gives a tuple as it does for several."""
    return lambda row: tuple(row[n] for n in names)


def _compiled(
    conn: Connection, stmt: Any, keys: tuple[str, ...], by_position: bool
) -> tuple[str, Any, list[tuple[int, Any]], Any]:
    """The SQL of ``stmt`` for rows of these keys, a getter of a row's values in the SQL's
    order (from a dict row, or from a tuple in ``keys`` order), and the bind processors of the
    values that need one (JSON, booleans): made once per statement and shape."""
    entry = _COMPILED.get((id(stmt), keys, by_position))
    if entry is None:
        compiled = stmt.compile(dialect=conn.dialect, column_keys=list(keys))
        names = list(compiled.positiontup or ())
        processors = []
        for i, name in enumerate(names):
            bind = compiled.binds[name]
            p = bind.type.dialect_impl(conn.dialect).bind_processor(conn.dialect)
            if p is not None:
                if isinstance(bind.type, sa.JSON):
                    p = _json_processor(p)
                processors.append((i, p))
        # the row's values in the statement's order, in C; then the few that need converting
        fields: list[Any] = [keys.index(n) for n in names] if by_position else names
        get = operator.itemgetter(*fields) if len(fields) > 1 else _one(fields)
        entry = (str(compiled), get, processors, stmt)  # holding stmt keeps its id() unique
        _COMPILED[(id(stmt), keys, by_position)] = entry
    return entry


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
        conn.execute(stmt, [{k: plain(v) for k, v in row.items()} for row in rows])
        return
    _run(conn, _compiled(conn, stmt, tuple(rows[0]), False), rows)


def execute_values(
    conn: Connection, stmt: Any, keys: tuple[str, ...], rows: list[tuple[Any, ...]]
) -> None:
    """`executemany` with each row given as a tuple of the values of ``keys``, in that order
    (a dict per row costs more than the statement's own work for a one-row update)."""
    if not rows:
        return
    if not is_fast_sqlite(conn):
        conn.execute(stmt, [{k: plain(v) for k, v in zip(keys, row, strict=True)} for row in rows])
        return
    _run(conn, _compiled(conn, stmt, keys, True), rows)


def _run(
    conn: Connection, entry: tuple[str, Any, list[tuple[int, Any]], Any], rows: list[Any]
) -> None:
    sql, get, processors, _ = entry
    data: list[Any] = []
    for row in rows:
        values = get(row)
        if processors:
            values = list(values)
            for i, p in processors:
                values[i] = p(values[i])
        data.append(values)
    driver = conn.connection.driver_connection
    assert driver is not None
    driver.executemany(sql, data)
