"""Schema migrations (Alembic): models and migrations agree, old databases upgrade, newer ones
are refused with a message a person can act on."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import anyio
import processes
import pytest
import sqlalchemy as sa
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory

from plait.engine.store import MIGRATIONS, SCHEMA_HEAD, Store, _engine
from plait.engine.store._schema import metadata
from plait.errors import PlaitError

ROOT = Path(__file__).resolve().parent.parent


def _config(conn: sa.Connection) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.attributes["connection"] = conn
    return cfg


def test_the_newest_migration_is_the_schema_head() -> None:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    assert ScriptDirectory.from_config(cfg).get_current_head() == SCHEMA_HEAD


def test_migrations_build_exactly_the_models(tmp_path: Path) -> None:
    migrated = sa.create_engine(f"sqlite:///{tmp_path / 'migrated.db'}")
    with migrated.begin() as conn:
        command.upgrade(_config(conn), "head")
    with migrated.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), metadata)
        migrated_stacks = conn.execute(sa.text("select name, components from stacks")).all()
    assert diff == []
    # and a new database made the fast way is stamped at the head
    fresh = tmp_path / "fresh.db"
    anyio.run(_open, f"sqlite:///{fresh}")
    with sa.create_engine(f"sqlite:///{fresh}").connect() as conn:
        assert MigrationContext.configure(conn).get_current_revision() == SCHEMA_HEAD
        assert compare_metadata(MigrationContext.configure(conn), metadata) == []
        # the same default stack, whichever way the database was made
        assert conn.execute(sa.text("select name, components from stacks")).all() == (
            migrated_stacks
        )
        assert migrated_stacks[0][0] == "default"


def test_the_sqlite_schema_script_is_what_the_tables_make() -> None:
    # a new database on the default URL runs engine/store/_sqlite_schema.py (the test above
    # compares what it makes with the migrations' schema): it must be regenerated with the tables
    out = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen_sqlite_schema.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stdout + out.stderr


async def _open(url: str) -> None:
    store = Store(url)
    try:
        await store.open()
    finally:
        await store.aclose()


def test_a_database_of_an_earlier_schema_is_upgraded(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'old.db'}"
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        command.upgrade(_config(conn), "0001")
        conn.execute(sa.text("insert into pipelines values ('p', 1.0)"))
        conn.execute(sa.text("insert into pipeline_versions values ('v', 'p', x'00', 1.0)"))
        conn.execute(
            sa.text(
                "insert into runs (id, pipeline, version, status, parameters, no_cache, created_at)"
                " values ('r1', 'p', 'v', 'SUCCEEDED', '{}', 0, 1.0)"
            )
        )
        assert "stack" not in {c["name"] for c in sa.inspect(conn).get_columns("runs")}
    anyio.run(_open, url)
    with engine.connect() as conn:
        assert MigrationContext.configure(conn).get_current_revision() == SCHEMA_HEAD
        assert "stack" in {c["name"] for c in sa.inspect(conn).get_columns("runs")}
        assert conn.execute(sa.text("select id, status, stack from runs")).all() == [
            ("r1", "SUCCEEDED", "default")
        ]


def test_a_newer_unknown_schema_is_refused(tmp_path: Path) -> None:
    home = tmp_path / "home"
    url = f"sqlite:///{home / 'plait.db'}"
    anyio.run(_open, url)
    with sa.create_engine(url).begin() as conn:
        conn.execute(_engine.alembic_version.update().values(version_num="9999"))
    with pytest.raises(PlaitError, match=r"revision '9999'.*newer Plait"):
        anyio.run(_open, url)
    env = {**os.environ, "PLAIT_HOME": str(home)}
    # a group of its own, killed after: a server that wrongly starts does not outlive the test
    out = processes.run(
        [sys.executable, "-m", "plait", "server", "start", "--foreground", "--port", "0"],
        env=env,
    )
    assert out.returncode == 2
    assert "newer Plait" in out.stderr and "Traceback" not in out.stderr
