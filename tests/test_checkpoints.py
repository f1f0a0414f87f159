"""The SQLite store's WAL checkpoints run on a thread of their own (engine/store/_engine.py,
_Checkpointer), not inside the scheduler's commits: what is committed reaches the database file,
and the writer's own connection never checkpoints."""

from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path

import anyio
import sqlalchemy as sa

from plait.engine.store import Store, _engine, _schema


def _insert(conn: sa.Connection, key: str) -> None:
    conn.execute(_schema.settings.insert(), {"key": key, "value": "v"})


def test_commits_reach_the_database_file_through_the_checkpoint_thread(tmp_path: Path) -> None:
    path = tmp_path / "plait.db"
    store = Store(f"sqlite:///{path}")

    async def main() -> None:
        await store.open()
        try:
            n = 3 * _engine.CHECKPOINT_EVERY
            for i in range(n):
                await store.write(_insert, f"k{i}", small=True)
            checkpointer = store._checkpointer
            assert checkpointer is not None and not checkpointer.failed
            assert checkpointer.wait_idle(timeout=60)
            assert checkpointer.checkpoints >= 1  # (asks made while one runs make one more)
            writer = store._writer_conn
            assert writer is not None
            driver = writer.connection.driver_connection
            assert driver.execute("PRAGMA wal_autocheckpoint").fetchone() == (0,)
            # the database file alone (no WAL beside it) holds what the checkpoints copied
            alone = tmp_path / "alone.db"
            shutil.copyfile(path, alone)
            with sqlite3.connect(alone) as copy:
                keys = {k for (k,) in copy.execute("SELECT key FROM settings")}
            # every row committed before the last checkpoint was asked for (which the last
            # CHECKPOINT_EVERY commits may follow)
            assert {f"k{i}" for i in range(n - _engine.CHECKPOINT_EVERY)} <= keys
        finally:
            await store.aclose()

    anyio.run(main)
    # closed: the writer's connection, the last, checkpointed the rest and removed the WAL
    assert not (tmp_path / "plait.db-wal").exists()
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT count(*) FROM settings WHERE key LIKE 'k%'").fetchone() == (
            3 * _engine.CHECKPOINT_EVERY,
        )
