"""The transaction runner: one per process and database URL.

Every state change is a transaction built by a plain function of a SQLAlchemy ``Connection``
(repository functions take a connection and never commit; the store owns the transaction).
How the function runs depends on the URL:

* Every transaction of an async URL (``sqlite+aiosqlite:///…``, ``postgresql+asyncpg://…``)
  goes through SQLAlchemy's ``AsyncEngine``: the function runs in ``AsyncConnection.run_sync``.
* On ``sqlite:///path`` (the default URL), sqlite3 itself: writes on one writer thread, each
  read on a reader thread of its own connection, one thread hop per *transaction* (aiosqlite
  pays one per *statement*: a six-statement transaction measured 3.1 ms through it and 0.8 ms
  this way). The store begins and ends each transaction and hands the function a
  :class:`RawConnection`: the functions on a run's path use sqlite3 through it, so a pipeline
  runs without importing SQLAlchemy (a third of a one-step pipeline's process); any other
  function gets SQLAlchemy's Connection over the same sqlite3 connection, in the same
  transaction, made on first use. Other SQLite URLs (in memory, with options) use
  SQLAlchemy's sync pysqlite driver the same way.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import logging
import operator
import os
import random
import sqlite3
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar

import anyio

from plait.engine._json import JsonText, plain
from plait.engine._lazy import lazy_module

if TYPE_CHECKING:
    import sqlalchemy as sa
    from sqlalchemy.engine import Connection, Engine
    from sqlalchemy.ext.asyncio import AsyncEngine

    from plait.engine.store import _schema as db
else:
    sa = lazy_module("sqlalchemy")
    db = lazy_module("plait.engine.store._schema")

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
    # (the default URL's RawConnection begins its transactions itself: this is for the others)
    sql = "BEGIN" if conn.get_execution_options().get("plait_read_only") else "BEGIN IMMEDIATE"
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
        sa_exc = sys.modules.get("sqlalchemy.exc")  # (none of its errors without it)
        if sa_exc is not None and isinstance(e, sa_exc.DBAPIError) and e.connection_invalidated:
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

    def __init__(self, url: str, *, application_name: str | None = None) -> None:
        """``application_name``: on PostgreSQL (asyncpg), the name every connection of this
        store shows in ``pg_stat_activity`` (a replica's, see ``replica_application_name``)."""
        self.url = url
        self._sync: Engine | None = None
        self._async: AsyncEngine | None = None
        self._writer_conn: Any = None
        """The writer's connection, kept (a RawConnection on the default URL)."""
        self._checkpointer: _Checkpointer | None = None
        self._writer = anyio.CapacityLimiter(1)
        self._readers = anyio.CapacityLimiter(READERS)
        self._fault = CommitThenError.from_env()  # a test fake; None unless a test asks
        self._raw = _sqlite_file(url)
        """The database file of the default URL, whose transactions go to sqlite3 itself."""
        self._idle_readers: list[RawConnection] = []
        self._idle_lock = threading.Lock()
        if self._raw is not None:
            self.dialect = "sqlite"
            self._database: str | None = self._raw
            _private_database(Path(self._raw))
            return
        u = sa.engine.make_url(url)
        self.dialect = u.get_backend_name()
        self._database = u.database if u.database and u.database != ":memory:" else None
        if self.dialect == "sqlite" and u.database and u.database != ":memory:":
            _private_database(Path(u.database))
        if u.drivername in ("sqlite", "sqlite+pysqlite"):
            # an in-memory database (or a URL with options): SQLAlchemy's sync driver, the
            # writer's connection on one thread and each read's on a reader thread
            self._sync = sa.create_engine(url, pool_size=1 + READERS, max_overflow=0)
            sa.event.listen(self._sync, "connect", _sqlite_pragmas)
            sa.event.listen(self._sync, "begin", _sqlite_begin)
        else:
            # SQLAlchemy's AsyncEngine (aiosqlite, asyncpg), imported only then: it brings
            # SQLAlchemy's ORM, a tenth of a short run's process on the default URL
            from sqlalchemy.ext.asyncio import create_async_engine

            options: dict[str, Any] = {}
            if application_name is not None and u.drivername == "postgresql+asyncpg":
                options["server_settings"] = {"application_name": application_name}
            self._async = create_async_engine(u, connect_args=options)
            if self.dialect == "sqlite":
                sa.event.listen(self._async.sync_engine, "connect", _sqlite_pragmas)
                sa.event.listen(self._async.sync_engine, "begin", _sqlite_begin)

    @property
    def is_sqlite(self) -> bool:
        return self.dialect == "sqlite"

    def _read_sync(self, fn: Callable[..., T], *args: Any) -> T:
        if self._raw is not None:
            with self._idle_lock:
                conn = self._idle_readers.pop() if self._idle_readers else None
            if conn is None:
                conn = RawConnection(self._raw)
            try:
                return conn.transaction(fn, args, "BEGIN")
            finally:
                with self._idle_lock:
                    self._idle_readers.append(conn)
        assert self._sync is not None
        with self._sync.connect() as sa_conn:
            sa_conn.execution_options(plait_read_only=True)
            with sa_conn.begin():
                return fn(sa_conn, *args)

    def _run_sync(self, fn: Callable[..., T], *args: Any) -> T:
        # the writer thread keeps its connection: a pool checkout per transaction costs more
        # than the statements of a small one
        if self._writer_conn is None:
            if self._raw is not None:
                self._writer_conn = RawConnection(self._raw)
            else:
                assert self._sync is not None
                self._writer_conn = self._sync.connect()
            if self._database is not None:
                # its checkpoints run on a thread of their own (see _Checkpointer)
                self._checkpointer = _Checkpointer(self._database)
                self._pragma(self._writer_conn, "PRAGMA wal_autocheckpoint=0")
        result: T
        if self._raw is not None:
            # IMMEDIATE takes the write lock at BEGIN: a deferred transaction that reads first
            # and writes later can fail with SQLITE_BUSY when another process wrote in between
            result = self._writer_conn.transaction(fn, args, "BEGIN IMMEDIATE")
        else:
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
    def _pragma(conn: Any, sql: str) -> None:
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
                if self._sync is not None or self._raw is not None:
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
                if self._sync is not None or self._raw is not None:
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
        if self._sync is not None or self._raw is not None:
            if self._writer_conn is not None:
                await anyio.to_thread.run_sync(self._writer_conn.close, limiter=self._writer)
                self._writer_conn = None
            with self._idle_lock:
                readers, self._idle_readers = self._idle_readers, []
            for reader in readers:
                reader.close()
            if self._sync is not None:
                await anyio.to_thread.run_sync(self._sync.dispose)
        if self._async is not None:
            await self._async.dispose()


MIGRATIONS = Path(__file__).resolve().parent.parent / "migrations"
SCHEMA_HEAD = "0011"
"""The newest migration in migrations/versions (a test keeps the two in step)."""


@functools.cache
def _alembic_version() -> sa.Table:
    """Alembic's own bookkeeping table, as Alembic creates it (made on first use: SQLAlchemy is
    imported then)."""
    return sa.Table(
        "alembic_version",
        sa.MetaData(),
        sa.Column("version_num", sa.String(32), primary_key=True),
    )


def __getattr__(name: str) -> Any:
    if name == "alembic_version":  # (for tests)
        return _alembic_version()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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
        if (driver := sqlite3_of(conn)) is not None:
            # the same statements, compiled when the schema changed (scripts/gen_sqlite_schema.py):
            # SQLAlchemy's DDL compiler costs a first run more than SQLite takes to run them
            from plait.engine.store._sqlite_schema import HEAD, STATEMENTS

            if HEAD == SCHEMA_HEAD:
                for sql, params in STATEMENTS:
                    driver.execute(sql, params)
                return
        conn = sqlalchemy_connection(conn)
        db.metadata.create_all(conn)
        db.insert_defaults(conn)
        _alembic_version().create(conn)
        conn.execute(_alembic_version().insert().values(version_num=SCHEMA_HEAD))
        return
    _migrate(sqlalchemy_connection(conn), current)


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
        metadata,
        settings,
        stacks,
    )

    dialect = sqlite.dialect()
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

    alembic_version = _alembic_version()
    for table in [*metadata.sorted_tables, alembic_version]:
        ddl(CreateTable(table))
        for index in sorted(table.indexes, key=lambda i: i.name or ""):
            ddl(CreateIndex(index))
    rows(components, list(DEFAULT_COMPONENTS))
    rows(stacks, [DEFAULT_STACK])
    rows(settings, [{"key": "active_stack", "value": "default"}])
    rows(alembic_version, [{"version_num": SCHEMA_HEAD}])
    return script


def sqlite_tables() -> tuple[
    dict[str, tuple[tuple[str, ...], tuple[str, ...]]],
    dict[str, tuple[str, ...]],
    dict[str, dict[str, Any]],
]:
    """What :func:`executemany` needs to know of the tables on the default URL, without
    SQLAlchemy (scripts/gen_sqlite_schema.py writes it to ``_sqlite_schema.py``): each table's
    columns and primary key, its JSON columns, and the Python-side defaults of its columns."""
    tables, json_columns, defaults = {}, {}, {}
    for table in db.metadata.sorted_tables:
        tables[table.name] = (
            tuple(c.name for c in table.columns),
            tuple(c.name for c in table.primary_key.columns),
        )
        found = tuple(c.name for c in table.columns if isinstance(c.type, sa.JSON))
        if found:
            json_columns[table.name] = found
        scalars = {}
        for c in table.columns:
            if c.default is not None:
                assert c.default.is_scalar, f"{table.name}.{c.name}: a default that is not a value"
                scalars[c.name] = c.default.arg  # type: ignore[attr-defined]
        if scalars:
            defaults[table.name] = scalars
    return tables, json_columns, defaults


def _has_table(conn: Connection, name: str) -> bool:
    if (driver := sqlite3_of(conn)) is not None:
        found = driver.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (name,)
        ).fetchone()
        return found is not None
    return bool(sa.inspect(conn).has_table(name))


_SCHEMA_LOCK = 0x706C616974  # "plait": the advisory lock key of schema changes


def _current_revision(conn: Connection) -> str | None:
    if not _has_table(conn, "alembic_version"):
        return None
    if (driver := sqlite3_of(conn)) is not None:
        found = driver.execute("SELECT version_num FROM alembic_version").fetchone()
        return None if found is None else str(found[0])
    return conn.execute(sa.select(_alembic_version().c.version_num)).scalar()


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


def sqlite3_of(conn: Any) -> sqlite3.Connection | None:
    """The sqlite3 connection of a RawConnection (the default URL); None for SQLAlchemy's."""
    return conn.driver_connection if type(conn) is RawConnection else None


def sqlalchemy_connection(conn: Any) -> Connection:
    """SQLAlchemy's Connection for ``conn`` (a RawConnection's, in its transaction)."""
    return conn.sqlalchemy() if type(conn) is RawConnection else conn


def _sqlite_file(url: str) -> str | None:
    """The database file a plain ``sqlite:///path`` URL names; None for any other URL (an
    in-memory database, options, another driver: SQLAlchemy handles those)."""
    for prefix in ("sqlite:///", "sqlite+pysqlite:///"):
        if url.startswith(prefix):
            path = url[len(prefix) :]
            if (
                path
                and path != ":memory:"
                and not any(c in path for c in "?%#")
                and (not path.startswith("file:"))
            ):
                return path
    return None


class _SqliteDialect:
    """What repository functions read of a connection's dialect."""

    name = "sqlite"
    driver = "pysqlite"


class RawConnection:
    """A connection of the default SQLite URL: sqlite3's own, whose transactions the store
    begins and ends (:meth:`transaction`).

    Repository functions on a run's path use sqlite3 through :func:`sqlite3_of` and
    :func:`executemany`; so a pipeline runs without
    importing SQLAlchemy, a third of a short run's process. Whatever else a function asks of
    it (``execute`` with a SQLAlchemy statement, ...) goes to a SQLAlchemy Connection made on
    first use over the same sqlite3 connection, in the same transaction.
    """

    dialect = _SqliteDialect()

    def __init__(self, path: str) -> None:
        driver = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        _sqlite_pragmas(driver, None)
        self.driver_connection = driver
        self.connection = self  # conn.connection.driver_connection, as on SQLAlchemy's (_pragma)
        self._engine: Engine | None = None
        self._sa: Connection | None = None

    def transaction(self, fn: Callable[..., T], args: tuple[Any, ...], begin: str) -> T:
        """``fn(self, *args)`` in a transaction begun with ``begin``: committed when it
        returns, rolled back when it raises."""
        driver = self.driver_connection
        driver.execute(begin)
        try:
            result = fn(self, *args)
            driver.execute("COMMIT")
        except BaseException:
            if driver.in_transaction:
                driver.execute("ROLLBACK")
            raise
        finally:
            if self._sa is not None:  # its transaction ended with sqlite3's: nothing to undo
                self._sa.close()
                self._sa = None
        return result

    def sqlalchemy(self) -> Connection:
        """SQLAlchemy's Connection over this one, in the open transaction."""
        if self._sa is None:
            if self._engine is None:
                shared = _Shared(self.driver_connection)
                self._engine = sa.create_engine(
                    "sqlite://",
                    creator=lambda: shared,
                    poolclass=sa.pool.StaticPool,
                    pool_reset_on_return=None,
                )
            self._sa = self._engine.connect()
            self._sa.begin()  # (emits nothing on pysqlite: the store began the transaction)
        return self._sa

    def execute(self, *args: Any, **kwargs: Any) -> Any:
        return self.sqlalchemy().execute(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.sqlalchemy(), name)

    def close(self) -> None:
        if self._engine is not None:
            self._engine.dispose()
            self._engine = None
        self.driver_connection.close()


class _Shared:
    """A RawConnection's sqlite3 connection as SQLAlchemy sees it: the store begins and ends
    its transactions, so SQLAlchemy's commits, rollbacks (its first connect rolls back, a
    Connection's close too) and closes do nothing to it."""

    def __init__(self, driver: sqlite3.Connection) -> None:
        self._driver = driver

    def commit(self) -> None:
        pass

    def rollback(self) -> None:
        pass

    def close(self) -> None:
        pass

    def __getattr__(self, name: str) -> Any:
        return getattr(self._driver, name)


@dataclass(frozen=True)
class Insert:
    """``INSERT INTO table``, for :func:`executemany`. ``on_conflict``: "" (fail), "ignore"
    (keep the row there), "replace" (every column but the primary key's, from the new row)."""

    table: str
    on_conflict: str = ""


@dataclass(frozen=True)
class Update:
    """``UPDATE table SET cols WHERE keys``, for :func:`execute_values`: each row gives the
    columns' values, then the keys'."""

    table: str
    keys: tuple[str, ...]
    cols: tuple[str, ...]


def _quote(name: str) -> str:
    return f'"{name}"'


def _encode_json(value: Any) -> str:
    """A JSON column's value as SQLAlchemy's JSON type writes it (None as JSON null); a
    `JsonText` as it is."""
    if type(value) is JsonText:
        return str.__str__(value)
    if value is None:  # (most steps' error)
        return "null"
    return json.dumps(value)


_SqlEntry = tuple[str, list[int], tuple[Any, ...], Callable[[Any], tuple[Any, ...]], Any]
_SQL: dict[tuple[int, tuple[str, ...]], _SqlEntry] = {}


def _sqlite_sql(op: Insert | Update, keys: tuple[str, ...]) -> _SqlEntry:
    """The SQLite statement of ``op`` for rows of these keys; the positions of its JSON values;
    the Python-side defaults of the columns the rows lack; a getter of a dict row's values in
    the statement's order: made once per statement (by identity: each is made once) and shape,
    from the tables of ``_sqlite_schema.py`` (no SQLAlchemy)."""
    entry = _SQL.get((id(op), keys))
    if entry is None:
        from plait.engine.store._sqlite_schema import DEFAULTS, JSON_COLUMNS, TABLES

        json_cols = JSON_COLUMNS.get(op.table, ())
        if isinstance(op, Update):
            sets = ", ".join(f"{_quote(c)} = ?" for c in op.cols)
            where = " AND ".join(f"{_quote(k)} = ?" for k in op.keys)
            sql = f"UPDATE {_quote(op.table)} SET {sets} WHERE {where}"
            names: tuple[str, ...] = (*op.cols, *op.keys)
            missing: tuple[str, ...] = ()
        else:
            defaults = DEFAULTS.get(op.table, {})
            missing = tuple(c for c in defaults if c not in keys)
            names = (*keys, *missing)
            sql = (
                f"INSERT INTO {_quote(op.table)} ({', '.join(map(_quote, names))}) "
                f"VALUES ({', '.join('?' * len(names))})"
            )
            if op.on_conflict == "ignore":
                sql += " ON CONFLICT DO NOTHING"
            elif op.on_conflict == "replace":
                columns, primary = TABLES[op.table]
                sql += (
                    f" ON CONFLICT ({', '.join(map(_quote, primary))}) DO UPDATE SET "
                    + ", ".join(
                        f"{_quote(c)} = excluded.{_quote(c)}" for c in columns if c not in primary
                    )
                )
        get = operator.itemgetter(*keys) if len(keys) > 1 else (lambda row: (row[keys[0]],))
        entry = (
            sql,
            [i for i, name in enumerate(names) if name in json_cols],
            tuple(DEFAULTS.get(op.table, {})[c] for c in missing),
            get,
            op,  # holding it keeps its id() unique
        )
        _SQL[(id(op), keys)] = entry
    return entry


_STATEMENTS: dict[tuple[Any, str], Any] = {}


def _sa_statement(op: Insert | Update, dialect: str) -> Any:
    """``op`` as a SQLAlchemy statement, for the other URLs (made once per dialect)."""
    stmt = _STATEMENTS.get((op, dialect))
    if stmt is None:
        table = db.metadata.tables[op.table]
        if isinstance(op, Update):
            stmt = (
                table.update()
                .where(*(table.c[k] == sa.bindparam(f"k_{k}") for k in op.keys))
                .values({c: sa.bindparam(c) for c in op.cols})
            )
        elif not op.on_conflict:
            stmt = table.insert()
        else:
            from sqlalchemy.dialects import postgresql, sqlite

            stmt = (sqlite.insert if dialect == "sqlite" else postgresql.insert)(table)
            if op.on_conflict == "ignore":
                stmt = stmt.on_conflict_do_nothing()
            else:
                primary = [c.name for c in table.primary_key.columns]
                others = [c.name for c in table.columns if c.name not in primary]
                stmt = stmt.on_conflict_do_update(
                    index_elements=primary, set_={c: stmt.excluded[c] for c in others}
                )
        _STATEMENTS[(op, dialect)] = stmt
    return stmt


def executemany(conn: Any, op: Insert, rows: list[dict[str, Any]]) -> None:
    """Runs ``op`` once per row, in the connection's transaction.

    The hot path runs a handful of small statements per step. On the default URL they go
    straight to sqlite3 (SQLAlchemy's execution context would cost ~80 us a statement, sqlite3
    itself ~10 us), the values as SQLAlchemy's types would write them (JSON); elsewhere as
    SQLAlchemy statements.
    """
    if not rows:
        return
    if type(conn) is not RawConnection:
        stmt = _sa_statement(op, conn.dialect.name)
        conn.execute(stmt, [{k: plain(v) for k, v in row.items()} for row in rows])
        return
    sql, json_at, defaults, get, _ = _sqlite_sql(op, tuple(rows[0]))
    if json_at or defaults:
        data: list[Any] = []
        for row in rows:
            values = [*get(row), *defaults]
            for i in json_at:
                values[i] = _encode_json(values[i])
            data.append(values)
    else:
        data = [get(row) for row in rows]
    conn.driver_connection.executemany(sql, data)


def execute_values(
    conn: Any, op: Update, keys: tuple[str, ...], rows: list[tuple[Any, ...]]
) -> None:
    """Runs ``op`` once per row, each row a tuple of the values of ``keys``: the columns' and
    then the keys' (``k_`` and the key's name), in that order. See :func:`executemany`."""
    if not rows:
        return
    if type(conn) is not RawConnection:
        stmt = _sa_statement(op, conn.dialect.name)
        conn.execute(stmt, [{k: plain(v) for k, v in zip(keys, row, strict=True)} for row in rows])
        return
    sql, json_at, _, _, _ = _sqlite_sql(op, keys)
    if json_at:
        data: list[Any] = []
        for row in rows:
            values = list(row)
            for i in json_at:
                values[i] = _encode_json(values[i])
            data.append(values)
    else:
        data = rows
    conn.driver_connection.executemany(sql, data)
