"""The same store and scheduler on a real PostgreSQL (asyncpg), started by scripts/test."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import create_async_engine
from test_runs import demo, fails, fan, retrying

import plait

pytestmark = pytest.mark.postgres


@pytest.fixture(scope="module")
def server_url() -> str:
    url = os.environ.get("PLAIT_TEST_POSTGRES_URL")
    if not url:
        message = "PLAIT_TEST_POSTGRES_URL is not set (scripts/test starts PostgreSQL and sets it)"
        if os.environ.get("CI"):
            pytest.fail(message)  # in CI a missing PostgreSQL is a failure, never a skip
        pytest.skip(message)
    return url


async def _admin(url: str, sql: str) -> None:
    engine = create_async_engine(url, isolation_level="AUTOCOMMIT")
    try:
        async with engine.connect() as conn:
            await conn.execute(sa.text(sql))
    finally:
        await engine.dispose()


@pytest.fixture
def pg_client(
    server_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[plait.Client]:
    name = f"plait_test_{uuid.uuid4().hex[:12]}"
    anyio.run(_admin, server_url, f'CREATE DATABASE "{name}"')
    url = sa.engine.make_url(server_url).set(database=name)
    monkeypatch.setenv("PLAIT_DATABASE_URL", url.render_as_string(hide_password=False))
    monkeypatch.setenv("PLAIT_WORKERS", "2")
    client = plait.Client(home=tmp_path / "home")
    try:
        yield client
    finally:
        client.shutdown()
        anyio.run(_admin, server_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def test_runs_and_cache_on_postgres(pg_client: plait.Client) -> None:
    first = demo.run({"n": 100}, client=pg_client)
    assert first.status == "SUCCEEDED"
    assert first.steps["stats"].output("total") == 4950
    again = demo.run({"n": 100}, client=pg_client)
    assert [s.status for s in again.steps.values()] == ["CACHED", "CACHED", "SUCCEEDED"]
    assert not (Path(str(pg_client.home)) / "plait.db").exists()  # nothing went to SQLite


def test_failures_fan_out_and_retries_on_postgres(pg_client: plait.Client, tmp_path: Path) -> None:
    r = fails.run(client=pg_client)
    assert r.status == "FAILED"
    assert r.steps["boom"].status == "FAILED" and r.steps["inc_2"].status == "SKIPPED"
    assert r.steps["other_2"].status == "SUCCEEDED"
    f = fan.run(client=pg_client)
    assert f.steps["total"].output() == sum(i * i for i in range(20))
    retried = retrying.run({"marker": str(tmp_path / "count")}, client=pg_client)
    assert retried.status == "SUCCEEDED" and retried.steps["flaky"].attempt == 3
    events = [e for batch in pg_client.watch(retried.run_id) for e in batch]
    seqs = [e.sequence for e in events]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    listed = pg_client.list_runs(limit=10)
    assert [r.run_id for r in listed][:1] == [retried.run_id]
