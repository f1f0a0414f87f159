"""The default SQLite URL runs its transactions on sqlite3 itself (engine/store/_engine.py,
RawConnection): a pipeline runs without importing SQLAlchemy, and a repository function that
does use SQLAlchemy shares the store's transaction, committed or rolled back as one."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import anyio
import pytest
import sqlalchemy as sa

from plait.engine.store import Store, _schema
from plait.engine.store._engine import Insert, RawConnection, executemany, sqlite3_of


def _keys(path: Path) -> set[str]:
    with sqlite3.connect(path) as db:
        return {k for (k,) in db.execute("SELECT key FROM settings WHERE key LIKE 'k%'")}


def _both(conn: RawConnection, prefix: str, fail: bool) -> None:
    # sqlite3 first, then SQLAlchemy made on first use (its first connect rolls back what it
    # sees, which must not be the store's transaction), then sqlite3 again
    driver = sqlite3_of(conn)
    assert driver is not None
    driver.execute("INSERT INTO settings (key, value) VALUES (?, 'v')", (f"{prefix}-raw",))
    conn.execute(_schema.settings.insert(), {"key": f"{prefix}-sa", "value": "v"})
    executemany(conn, Insert("settings"), [{"key": f"{prefix}-many", "value": "v"}])
    if fail:
        raise RuntimeError("the function failed")


def test_sqlite3_and_sqlalchemy_statements_commit_and_roll_back_as_one(tmp_path: Path) -> None:
    path = tmp_path / "plait.db"
    store = Store(f"sqlite:///{path}")

    async def main() -> None:
        await store.open()
        try:
            await store.write(_both, "k1", False)
            with pytest.raises(RuntimeError, match="failed"):
                await store.write(_both, "k2", True)
            await store.write(_both, "k3", False, small=True)
            # a read through SQLAlchemy on a reader's connection
            rows = await store.read(
                lambda conn: conn.execute(sa.select(_schema.settings.c.key)).scalars().all()
            )
            assert {"k1-raw", "k1-sa", "k1-many"} <= set(rows)
        finally:
            await store.aclose()

    anyio.run(main)
    assert _keys(path) == {f"k{i}-{how}" for i in (1, 3) for how in ("raw", "sa", "many")}


PIPELINE = textwrap.dedent(
    """
    import sys

    import plait


    @plait.step
    def noop() -> int:
        print("said once")
        return 0


    @plait.step
    def link(x: int) -> int:
        return x + 1


    @plait.step
    def join(xs: list[int]) -> int:
        return sum(xs)


    @plait.pipeline
    def shapes(n: int = 5):
        x = noop()
        for _ in range(n):
            x = link(x)
        join([link.with_options(cache_version=str(i))(x) for i in range(4)])


    if __name__ == "__main__":
        run = shapes()
        assert run.status == "SUCCEEDED", run.status
        print("LOGS", repr(run.logs("noop")))
        loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("sqlalchemy", "alembic"))
        print("LOADED", loaded)
        print("STATUSES", sorted(s.status.value for s in run.steps.values()))
    """
)


def test_a_pipeline_runs_on_the_default_url_without_sqlalchemy(tmp_path: Path) -> None:
    script = tmp_path / "shapes.py"
    script.write_text(PIPELINE)
    env = {**os.environ, "PLAIT_HOME": str(tmp_path / "home")}
    env.pop("PLAIT_DATABASE_URL", None)
    for statuses in ("SUCCEEDED", "CACHED"):  # a new database, then every step cached
        out = subprocess.run(
            [sys.executable, str(script)],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert out.returncode == 0, out.stderr
        assert "LOADED []" in out.stdout, out.stdout
        assert f"STATUSES {[statuses] * 11}" in out.stdout, out.stdout
        # its captured output, read back (by the run that ran it; the cached run has none)
        said = "said once\\n" if statuses == "SUCCEEDED" else ""
        assert f"LOGS '{said}'" in out.stdout, out.stdout
