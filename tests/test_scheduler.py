"""The scheduler on a real store, SQLite and PostgreSQL, driven directly: leases, idempotence,
grouped commits, cache hits. (tests/test_state_machine.py drives it with no database.)"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from anyio.from_thread import BlockingPortal, start_blocking_portal
from test_postgres import postgres_database

import plait
from plait._models import ArtifactInfo, StepError
from plait.engine.scheduler import (
    Completed,
    CreateRun,
    Effects,
    Failed,
    RunCreated,
    Scheduler,
    Started,
    Token,
)
from plait.engine.store import Store
from plait.engine.store._pipelines import register_pipeline
from plait.engine.store._scheduling import SqlLookups, write_effects


@plait.step
def a() -> int:
    return 1


@plait.step
def b(x: int) -> int:
    return x


@plait.pipeline
def pair() -> None:
    b(a())
    b(a(id="a2"), id="b2")


class Harness:
    """The scheduler and a store, driven through a blocking portal (one event loop for all)."""

    def __init__(self, url: str, portal: BlockingPortal) -> None:
        self.store = Store(url)
        self.portal = portal
        self.blobs: set[str] = set()
        self.scheduler = Scheduler()
        self.lookups = SqlLookups(self.blobs.__contains__)
        self.now = 1000.0

    def write(self, fn: Any, *args: Any) -> Any:
        return self.portal.call(self.store.write, fn, *args)

    def _tick(self, conn: Any, inputs: list[Any], now: float) -> Effects:
        fx = self.scheduler.apply(inputs, now, self.lookups.bind(conn))
        fx.events = write_effects(conn, fx)
        return fx

    def tick(self, *inputs: Any) -> Effects:
        self.now += 1
        result: Effects = self.write(self._tick, list(inputs), self.now)
        return result

    def read(self, sql: str) -> list[Any]:
        return self.write(lambda conn: conn.execute(sa.text(sql)).all())

    def output(self, token: Token, value: int = 1) -> ArtifactInfo:
        digest = f"{value:064x}"
        self.blobs.add(digest)
        return ArtifactInfo(
            "art-" + token.step_id + str(token.attempt),
            "output",
            digest,
            1,
            "file:///x",
            "plait.json",
            "int",
            False,
            token.run_id,
            token.step_id,
        )


@pytest.fixture(params=["sqlite", "postgres"])
def h(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Harness]:
    with start_blocking_portal("asyncio") as portal:
        if request.param == "sqlite":
            url, cleanup = f"sqlite:///{tmp_path / 'plait.db'}", None
        else:
            url, cleanup = postgres_database(request)
        harness = Harness(url, portal)
        try:
            portal.call(harness.store.open)
            spec = pair.compile().spec
            harness.write(register_pipeline, spec, pair.compile().version, 0.0)
            yield harness
        finally:
            portal.call(harness.store.aclose)
            if cleanup is not None:
                cleanup()


def start(h: Harness) -> tuple[str, dict[str, Token]]:
    cmd = CreateRun(pair.compile().version, {})
    result = h.tick(cmd)
    created = result.replies[id(cmd)]
    assert isinstance(created, RunCreated) and created.created
    tokens = {t.token.step_id: t.token for t in result.tasks}
    return created.run_id, tokens


def test_ready_steps_are_queued_in_the_run_creating_commit(h: Harness) -> None:
    run_id, tokens = start(h)
    assert sorted(tokens) == ["a", "a2"]
    rows = dict(h.read(f"select step_id, status from step_runs where run_id='{run_id}'"))
    assert rows == {"a": "QUEUED", "a2": "QUEUED", "b": "PENDING", "b2": "PENDING"}


def test_a_stale_lease_changes_nothing(h: Harness) -> None:
    run_id, tokens = start(h)
    stale = Token(run_id, "a", tokens["a"].attempt, tokens["a"].epoch + 1)
    before = h.read("select * from step_runs order by step_id")
    events = h.read("select count(*) from events")[0][0]
    result = h.tick(Completed(stale, (h.output(stale),)), Started(Token(run_id, "a", 9, 1)))
    assert result.tasks == [] and result.events == []
    assert h.read("select * from step_runs order by step_id") == before
    assert h.read("select count(*) from events")[0][0] == events


def test_completion_is_idempotent_per_attempt(h: Harness) -> None:
    _run_id, tokens = start(h)
    done = Completed(tokens["a"], (h.output(tokens["a"]),))
    first = h.tick(done)
    assert [t.token.step_id for t in first.tasks] == ["b"]
    again = h.tick(done)  # a retried report: the first one won
    assert again.tasks == [] and again.events == []
    assert h.read("select count(*) from artifacts")[0][0] == 1


def test_reports_that_arrive_together_commit_together(h: Harness) -> None:
    _run_id, tokens = start(h)
    result = h.tick(
        Completed(tokens["a"], (h.output(tokens["a"]),), start_time=h.now),
        Completed(tokens["a2"], (h.output(tokens["a2"], 2),), start_time=h.now),
    )
    assert sorted(t.token.step_id for t in result.tasks) == ["b", "b2"]
    statuses = [e.step_status for e in result.events if e.step_id == "a"]
    assert statuses == ["RUNNING", "SUCCEEDED"]
    seqs = [e.sequence for e in result.events]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs) and seqs[0] > 0


def test_a_run_ends_when_its_last_step_does(h: Harness) -> None:
    run_id, tokens = start(h)
    nxt = h.tick(
        Completed(tokens["a"], (h.output(tokens["a"]),)),
        Completed(tokens["a2"], (h.output(tokens["a2"]),)),
    )
    downstream = {t.token.step_id: t.token for t in nxt.tasks}
    h.tick(Failed(downstream["b"], StepError("builtins.ValueError", "x")))
    assert h.read(f"select status from runs where id='{run_id}'") == [("RUNNING",)]
    end = h.tick(Completed(downstream["b2"], (h.output(downstream["b2"]),)))
    assert h.read(f"select status from runs where id='{run_id}'") == [("FAILED",)]
    assert [e.run_status for e in end.events if not e.step_id] == ["FAILED"]
    assert run_id not in h.scheduler.runs  # forgotten once final


def test_cache_hits_chain_within_one_commit(h: Harness) -> None:
    _run_id, tokens = start(h)
    nxt = h.tick(
        Completed(tokens["a"], (h.output(tokens["a"]),)),
        Completed(tokens["a2"], (h.output(tokens["a2"]),)),
    )
    h.tick(*(Completed(t.token, (h.output(t.token),)) for t in nxt.tasks))
    cmd = CreateRun(pair.compile().version, {})
    rerun = h.tick(cmd)
    assert rerun.tasks == []  # every step served from the cache in the creating commit
    created = rerun.replies[id(cmd)]
    assert isinstance(created, RunCreated)
    rows = h.read(f"select status from step_runs where run_id='{created.run_id}'")
    assert {r[0] for r in rows} == {"CACHED"}
    raw = h.read("select material from cache_entries limit 1")[0][0]
    material = json.loads(raw) if isinstance(raw, str) else raw  # asyncpg decodes JSON itself
    assert material["key_scheme"] == "plait.cache.v1"


def test_a_maps_items_are_rows_of_their_own_read_back_in_order(h: Harness) -> None:
    """A map's items, made mid-run, are step rows like any (on SQLite and PostgreSQL), read
    back after their mapped step in the order of their numbers (leaf[2] before leaf[10])."""
    from dataclasses import replace

    from test_map import fan

    from plait.engine.store._runs import get_run
    from plait.engine.store._scheduling import load_active_runs
    from plait.ir.mapping import item_name

    compiled = fan.compile({"log": "l"})
    h.write(register_pipeline, compiled.spec, compiled.version, 0.0)
    cmd = CreateRun(compiled.version, {"log": '"l"', "n": "12"})
    fx = h.tick(cmd)
    created = fx.replies[id(cmd)]
    assert isinstance(created, RunCreated)
    (make,) = fx.tasks
    listed = h.output(make.token)
    items = [
        replace(
            h.output(make.token, 100 + i), artifact_id=f"item{i}", output=item_name("output", i)
        )
        for i in range(12)
    ]
    fx = h.tick(Completed(make.token, (listed, *items)))
    assert sorted(t.token.step_id for t in fx.tasks) == sorted(f"square[{i}]" for i in range(12))
    run = h.write(get_run, created.run_id)
    assert list(run.steps) == [
        "make",
        "square",
        *(f"square[{i}]" for i in range(12)),
        "add_one",
        "collect",
    ]
    assert run.steps["square"].status == "RUNNING" and run.steps["square[11]"].status == "QUEUED"
    # what a restarted control plane reads: the items with their attempts
    (stored,) = h.write(load_active_runs, [created.run_id])
    queued = {s.step_id for s in stored.steps if s.status == "QUEUED"}
    assert queued == {f"square[{i}]" for i in range(12)}
    fresh = Scheduler()
    recovered = h.write(lambda conn: fresh.recover([stored], h.now, h.lookups.bind(conn)))
    assert len(recovered.tasks) == 12  # queued, no holder: handed out again
    assert fresh.runs[created.run_id].steps["square"].open_items == 12
