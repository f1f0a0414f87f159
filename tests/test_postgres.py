"""The same store and scheduler on a real PostgreSQL (asyncpg), started by scripts/test."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import create_async_engine
from test_runs import demo, fails, fan, retrying

import plait
from plait.engine.store import SCHEMA_HEAD, Store

pytestmark = pytest.mark.postgres


async def _admin(url: str, sql: str) -> None:
    engine = create_async_engine(url, isolation_level="AUTOCOMMIT")
    try:
        async with engine.connect() as conn:
            await conn.execute(sa.text(sql))
    finally:
        await engine.dispose()


def postgres_database(request: pytest.FixtureRequest) -> tuple[str, Callable[[], None]]:
    """A fresh, empty database on the test server: its URL, and how to drop it."""
    server = request.getfixturevalue("server_url")
    name = f"plait_test_{uuid.uuid4().hex[:12]}"
    anyio.run(_admin, server, f'CREATE DATABASE "{name}"')
    url = sa.engine.make_url(server).set(database=name).render_as_string(hide_password=False)
    return url, lambda: anyio.run(_admin, server, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def pg_client(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[plait.Client]:
    url, drop = postgres_database(request)
    monkeypatch.setenv("PLAIT_DATABASE_URL", url)
    monkeypatch.setenv("PLAIT_WORKERS", "2")
    client = plait.Client(home=tmp_path / "home")
    try:
        yield client
    finally:
        client.shutdown()
        drop()


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


def test_replicas_starting_together_on_a_new_database_create_one_schema(
    request: pytest.FixtureRequest,
) -> None:
    """Control planes started at once on an empty database: one creates the schema, the others
    wait for it and find it current (no "relation already exists" for the losers)."""
    url, drop = postgres_database(request)

    async def main() -> None:
        stores = [Store(url) for _ in range(4)]
        try:
            async with anyio.create_task_group() as tg:
                for store in stores:
                    tg.start_soon(store.open)
        finally:
            for store in stores:
                await store.aclose()

    try:
        anyio.run(main)
        revisions = anyio.run(_scalar, url, "SELECT version_num FROM alembic_version")
        assert revisions == [SCHEMA_HEAD]
    finally:
        drop()


async def _scalar(url: str, sql: str) -> list[object]:
    engine = create_async_engine(url)
    try:
        async with engine.connect() as conn:
            return list((await conn.execute(sa.text(sql))).scalars())
    finally:
        await engine.dispose()


def test_replicas_asking_for_one_build_at_once_build_it_once(
    request: pytest.FixtureRequest,
) -> None:
    """Two replicas (two stores on one database) ask for one build key at the same moment:
    exactly one holds the claim and builds; the other waits, and takes the claim over only once
    the first stopped renewing it; a finished build is ready for everyone."""
    from plait.engine.store import _builds

    url, drop = postgres_database(request)

    def claim(holder: str, now: float) -> Any:
        def fn(conn: Any) -> Any:
            return _builds.claim_build(
                conn,
                "k" * 64,
                kind="image",
                build_digest="d" * 64,
                material={"key_scheme": "test"},
                holder=holder,
                now=now,
                ttl=60.0,
            )

        return fn

    async def main() -> None:
        a, b = Store(url), Store(url)
        try:
            await a.open()
            await b.open()
            answers: dict[str, str] = {}

            async def ask(store: Store, holder: str) -> None:
                state, _ = await store.write(claim(holder, 1000.0))
                answers[holder] = state

            async with anyio.create_task_group() as tg:
                tg.start_soon(ask, a, "replica-a")
                tg.start_soon(ask, b, "replica-b")
            assert sorted(answers.values()) == ["mine", "wait"], answers
            (holder,) = [h for h, s in answers.items() if s == "mine"]
            other = "replica-b" if holder == "replica-a" else "replica-a"
            # while the holder renews, the other waits; once it stopped, the other takes over
            assert (await b.write(claim(other, 1059.0)))[0] == "wait"
            assert (await b.write(claim(other, 1061.0)))[0] == "mine"

            def finish(conn: Any) -> None:
                _builds.finish_build(
                    conn,
                    "k" * 64,
                    other,
                    reference="plait-env:x",
                    image_id="sha256:" + "0" * 64,
                    size_bytes=1,
                    duration_seconds=1.0,
                    source="built",
                    pushed_to="",
                    now=1062.0,
                )

            await b.write(finish)
            state, record = await a.write(claim(holder, 1063.0))
            assert state == "ready" and record is not None and record.reference == "plait-env:x"
        finally:
            await a.aclose()
            await b.aclose()

    try:
        anyio.run(main)
    finally:
        drop()
