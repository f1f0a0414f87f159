"""Several control-plane replicas on one PostgreSQL: they share the runs, a SIGKILLed one's runs
are finished by the others once its leases expire (each taken over by exactly one), clients
reconnect to another replica, and a replica taken for dead stops instead of writing on."""

from __future__ import annotations

import contextlib
import importlib
import os
import signal
import sys
import textwrap
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import anyio
import pytest
import sqlalchemy as sa
from processes import DEADLINE, run, spawned, wait_for
from sqlalchemy.ext.asyncio import create_async_engine
from test_postgres import postgres_database
from test_security import PLAIT, Daemon

import plait
from plait.engine.store import Store
from plait.engine.store._engine import is_transient
from plait.engine.store._replicas import claim_runs, register_replica, replica_application_name

pytestmark = pytest.mark.postgres

STEPS = """
import os
import time
from pathlib import Path

import plait
from plait import step, pipeline


def record_then_wait(d: str) -> None:
    # says this attempt executed (one O_APPEND write), then waits for the file go
    ctx = plait.get_step_context()
    line = f"{ctx.run_id} {ctx.step_id} {ctx.attempt}\\n"
    fd = os.open(Path(d) / "executions", os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    os.write(fd, line.encode())
    os.close(fd)
    while not (Path(d) / "go").exists():
        time.sleep(0.05)


@step
def work(d: str, i: int, k: int) -> int:
    record_then_wait(d)
    return i * i


@step
def total(xs: list[int], k: int) -> int:
    return sum(xs)


@step(pool="p")
def remote(d: str, k: int) -> int:
    record_then_wait(d)
    return k + 1


@pipeline
def away(d: str, k: int) -> int:
    return total([remote(d, k)], k)


@pipeline
def spread(d: str, k: int) -> int:
    return total([work(d, i, k) for i in range(3)], k)
"""


@pytest.fixture(scope="module")
def steps(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ModuleType]:
    folder = tmp_path_factory.mktemp("replica_steps")
    (folder / "replica_steps.py").write_text(textwrap.dedent(STEPS))
    sys.path.insert(0, str(folder))
    try:
        yield importlib.import_module("replica_steps")
    finally:
        sys.path.remove(str(folder))
        sys.modules.pop("replica_steps", None)


class Replicas:
    """Daemons sharing one fresh PostgreSQL database and one artifact store, 2-second leases."""

    def __init__(self, request: pytest.FixtureRequest, tmp: Path) -> None:
        self.tmp = tmp
        self.url, self._drop = postgres_database(request)
        self.flags = (
            "--database-url",
            self.url,
            "--artifact-store",
            (tmp / "artifacts").as_uri(),
            "--heartbeat-timeout",
            "2",
        )
        self.daemons: list[Daemon] = []
        self.token = ""

    def start(self, name: str) -> Daemon:
        daemon = Daemon(self.tmp / name, *self.flags)
        self.daemons.append(daemon)
        if not self.token:  # an API token of the shared store: good on every replica
            self.token = daemon.token("create", "replicas-test")
        return daemon

    def client(self, *daemons: Daemon) -> plait.Client:
        return plait.Client(",".join(d.address for d in daemons), token=self.token)

    def replica_id(self, daemon: Daemon) -> str:
        return (daemon.home / "replica-id").read_text().strip()

    def query(self, sql: str) -> list[Any]:
        async def go() -> list[Any]:
            engine = create_async_engine(self.url)
            try:
                async with engine.connect() as conn:
                    return list((await conn.execute(sa.text(sql))).all())
            finally:
                await engine.dispose()

        return anyio.run(go)

    def close(self) -> None:
        try:
            for daemon in self.daemons:
                daemon.stop()
        finally:
            self._drop()


@pytest.fixture
def replicas(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Replicas]:
    r = Replicas(request, tmp_path)
    try:
        yield r
    finally:
        r.close()


def _executions(d: Path) -> Counter[tuple[str, str, int]]:
    path = d / "executions"
    lines = path.read_text().split() if path.exists() else []
    return Counter((lines[i], lines[i + 1], int(lines[i + 2])) for i in range(0, len(lines), 3))


def _check_once(replicas: Replicas, d: Path, run_ids: list[str], steps_per_run: int = 4) -> None:
    """Every step of every run succeeded, with one SUCCEEDED attempt; no attempt ran twice;
    a step ran again only after an attempt of it CRASHED."""
    executions = _executions(d)
    assert max(executions.values()) == 1, executions  # no attempt dispatched twice
    ids = ",".join(f"'{r}'" for r in run_ids)
    rows = replicas.query(
        f"SELECT run_id, step_id, attempt, status FROM attempts WHERE run_id IN ({ids})"
    )
    succeeded = Counter((r, s) for r, s, _, status in rows if status == "SUCCEEDED")
    assert set(succeeded.values()) == {1}, succeeded
    assert len(succeeded) == len(run_ids) * steps_per_run
    for run_id, step_id, attempt in executions:
        status = {(r, s, a): st for r, s, a, st in rows}[(run_id, step_id, attempt)]
        assert status in ("SUCCEEDED", "CRASHED"), (run_id, step_id, attempt, status)


def test_replicas_share_runs_and_finish_a_killed_ones_runs(
    replicas: Replicas, steps: ModuleType, tmp_path: Path
) -> None:
    a, b, c = replicas.start("a"), replicas.start("b"), replicas.start("c")
    d = tmp_path / "marks"
    d.mkdir()
    via_a = replicas.client(a, b, c)  # a first; the others when a is gone
    via_b, via_c = replicas.client(b), replicas.client(c)
    try:
        runs = {
            name: [
                client.run_pipeline(steps.spread, {"d": str(d), "k": 10 * n + k}, wait=False).run_id
                for k in range(3)
            ]
            for n, (name, client) in enumerate((("a", via_a), ("b", via_b), ("c", via_c)))
        }
        owners = dict(replicas.query("SELECT id, owner FROM runs"))
        for name, daemon in (("a", a), ("b", b), ("c", c)):
            assert {owners[r] for r in runs[name]} == {replicas.replica_id(daemon)}

        def started_on_every_replica() -> bool:
            seen = {r for r, _, _ in _executions(d)}
            return all(seen & set(ids) for ids in runs.values())

        wait_for(started_on_every_replica, "a step running on every replica")
        a.kill()  # its local workers die with it, mid-step
        (d / "go").touch()

        # a client of the killed replica reconnects to another and follows its runs to the end
        ended = {run_id: via_a.wait(run_id) for run_id in runs["a"]}
        assert {r.status for r in ended.values()} == {plait.RunStatus.SUCCEEDED}
        assert {r.steps["total"].output() for r in ended.values()} == {0 + 1 + 4}
        for run_id in runs["b"] + runs["c"]:
            assert via_b.wait(run_id).status is plait.RunStatus.SUCCEEDED
        # and a new run, through the same client, goes to a live replica
        late = via_a.run_pipeline(steps.spread, {"d": str(d), "k": 99})
        assert late.status is plait.RunStatus.SUCCEEDED
        runs["late"] = [late.run_id]
    finally:
        for client in (via_a, via_b, via_c):
            client.close()
    all_runs = [r for ids in runs.values() for r in ids]
    _check_once(replicas, d, all_runs)
    # a's runs were taken over by b or c, each by one of them; a's row is gone
    owners = dict(replicas.query("SELECT id, owner FROM runs"))
    survivors = {replicas.replica_id(b), replicas.replica_id(c)}
    assert {owners[r] for r in runs["a"]} <= survivors
    live = {row[0] for row in replicas.query("SELECT id FROM replicas")}
    assert replicas.replica_id(a) not in live
    # the attempt a's worker held when a died CRASHED (its lease expired) and ran again
    crashed = replicas.query(
        "SELECT run_id FROM attempts WHERE status = 'CRASHED' AND run_id IN ("
        + ",".join(f"'{r}'" for r in runs["a"])
        + ")"
    )
    assert crashed


@contextlib.contextmanager
def _running_on_a(
    replicas: Replicas, steps: ModuleType, d: Path
) -> Iterator[tuple[Daemon, Daemon, plait.Client, plait.Client, str]]:
    """Replicas a and b, a client of each, and a run created through a with a step running."""
    a, b = replicas.start("a"), replicas.start("b")
    d.mkdir()
    via_a, via_b = replicas.client(a), replicas.client(b)
    try:
        run_id = via_a.run_pipeline(steps.spread, {"d": str(d), "k": 0}, wait=False).run_id
        wait_for(lambda: bool(_executions(d)), "a step of the run running")
        yield a, b, via_a, via_b, run_id
    finally:
        via_a.close()
        via_b.close()


def test_a_replica_taken_for_dead_stops_and_writes_nothing_more(
    replicas: Replicas, steps: ModuleType, tmp_path: Path
) -> None:
    d = tmp_path / "marks"
    with _running_on_a(replicas, steps, d) as (a, b, _, via_b, run_id):
        os.kill(a.proc.pid, signal.SIGSTOP)  # paused past its lease: b takes its run over
        try:
            me = replicas.replica_id(b)

            def taken() -> bool:
                return replicas.query(f"SELECT owner FROM runs WHERE id = '{run_id}'")[0][0] == me

            wait_for(taken, "b taking the paused replica's run over")
        finally:
            os.kill(a.proc.pid, signal.SIGCONT)
        # back, a finds itself taken for dead, and stops rather than write about the run
        a.proc.wait(timeout=DEADLINE)
        assert a.proc.returncode != 0
        assert "for dead" in a.log.read_text()
        (d / "go").touch()
        result: dict[str, plait.Run] = {}
        waiter = threading.Thread(target=lambda: result.setdefault("run", via_b.wait(run_id)))
        waiter.start()
        waiter.join(DEADLINE)
        assert result["run"].status is plait.RunStatus.SUCCEEDED
        assert result["run"].steps["total"].output() == 5
    _check_once(replicas, d, [run_id])


def _add_run(conn: Any, run_id: str, owner: str) -> None:
    """A bare unfinished run of ``owner`` (and the rows its foreign keys need)."""
    conn.execute(sa.text("INSERT INTO pipelines VALUES ('p', 0)"))
    conn.execute(sa.text("INSERT INTO pipeline_versions VALUES ('v', 'p', '', 0)"))
    conn.execute(
        sa.text(
            "INSERT INTO runs (id, pipeline, version, status, parameters, no_cache, created_at, "
            "owner) VALUES (:id, 'p', 'v', 'RUNNING', '{}', false, 0, :owner)"
        ),
        {"id": run_id, "owner": owner},
    )


def test_what_a_replica_taken_for_dead_had_in_flight_never_commits(
    request: pytest.FixtureRequest,
) -> None:
    # replica a, paused in the middle of a transaction past its lease (seen once: its write of
    # an attempt landed after b had taken the run over and retried that attempt)
    url, drop = postgres_database(request)
    a, b = "a" * 32, "b" * 32

    async def go() -> None:
        store = Store(url, application_name=replica_application_name(b))
        as_a = {"server_settings": {"application_name": replica_application_name(a)}}
        in_flight = create_async_engine(url, connect_args=as_a)
        try:
            await store.open()
            await store.write(register_replica, a, "a:1", time.time(), 2.0)
            await store.write(_add_run, "run-a", a)
            later = time.time() + 60  # a's row has long expired
            await store.write(register_replica, b, "b:1", later, 2.0)
            async with in_flight.connect() as conn:
                await conn.begin()
                await conn.execute(
                    sa.text(
                        "INSERT INTO events (run_id, step_id, attempt, message, ts) "
                        "VALUES ('run-a', 's', 1, 'in flight', 0)"
                    )
                )
                # b takes a for dead: a's session ends, and its transaction with it
                assert await store.write(claim_runs, b, later) == ["run-a"]
                with pytest.raises(Exception) as ended:
                    await conn.commit()
                assert is_transient(ended.value), ended.value  # a retries: its fence stops it

            def rows(conn: Any, sql: str) -> list[Any]:
                return list(conn.execute(sa.text(sql)).all())

            assert await store.read(rows, "SELECT * FROM events") == []
            assert await store.read(rows, "SELECT owner FROM runs") == [(b,)]
        finally:
            await in_flight.dispose()
            await store.aclose()

    try:
        anyio.run(go)
    finally:
        drop()


def test_a_run_is_cancelled_through_a_replica_that_does_not_schedule_it(
    replicas: Replicas, steps: ModuleType, tmp_path: Path
) -> None:
    with _running_on_a(replicas, steps, tmp_path / "marks") as (_, _, via_a, via_b, run_id):
        via_b.cancel_run(run_id)  # b marks it; a, its owner, cancels it
        assert via_b.wait(run_id).status is plait.RunStatus.CANCELLED
        statuses = {s.status for s in via_a.get_run(run_id).steps.values()}
        assert statuses == {plait.StepStatus.CANCELLED}


@contextlib.contextmanager
def _worker(steps: ModuleType, tmp_path: Path, *servers: Daemon) -> Iterator[Path]:
    """`plait worker --pool p --worker-id w1` listing `servers`; yields its log file."""
    token = servers[0].token("create", "w", "--role", "worker")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PLAIT_")}
    env |= {"PLAIT_HOME": str(tmp_path / "worker-home"), "PLAIT_TOKEN": token}
    addresses = ",".join(d.address for d in servers)
    log = tmp_path / "worker.log"
    with (
        open(log, "wb") as out,
        spawned(
            [PLAIT, "worker", "--server", addresses, "--pool", "p", "--worker-id", "w1"],
            env=env,
            cwd=Path(steps.__file__).parent,
            stdout=out,
            stderr=out,
        ),
    ):
        yield log


def test_one_worker_serves_every_replica_it_lists(
    replicas: Replicas, steps: ModuleType, tmp_path: Path
) -> None:
    a, b = replicas.start("a"), replicas.start("b")
    d = tmp_path / "marks"
    d.mkdir()
    (d / "go").touch()
    via_a, via_b = replicas.client(a), replicas.client(b)
    try:
        with _worker(steps, tmp_path, a, b) as log:
            # one run scheduled by each replica, each with a step in pool p: the one worker
            # (one step at a time) polls both replicas in turn and runs both
            on_a = via_a.run_pipeline(steps.away, {"d": str(d), "k": 1}, wait=False).run_id
            on_b = via_b.run_pipeline(steps.away, {"d": str(d), "k": 2}, wait=False).run_id
            assert via_a.wait(on_a).steps["total"].output() == 2, log.read_text()
            assert via_b.wait(on_b).steps["total"].output() == 3, log.read_text()
    finally:
        via_a.close()
        via_b.close()
    holders = replicas.query("SELECT run_id, holder FROM attempts WHERE step_id = 'remote'")
    assert sorted(holders) == sorted([(on_a, "w1"), (on_b, "w1")])
    _check_once(replicas, d, [on_a, on_b], steps_per_run=2)


def test_a_remote_worker_moves_on_to_another_replica(
    replicas: Replicas, steps: ModuleType, tmp_path: Path
) -> None:
    a, b = replicas.start("a"), replicas.start("b")
    d = tmp_path / "marks"
    d.mkdir()
    via_a = replicas.client(a, b)
    try:
        with _worker(steps, tmp_path, a, b) as log:
            run_id = via_a.run_pipeline(steps.away, {"d": str(d), "k": 41}, wait=False).run_id
            wait_for(lambda: bool(_executions(d)), "the worker running the step")
            a.kill()
            (d / "go").touch()  # the step ends while its replica is gone
            ended = via_a.wait(run_id)  # reconnects to b, which takes the run over
            assert ended.status is plait.RunStatus.SUCCEEDED, log.read_text()
            assert ended.steps["total"].output() == 42
    finally:
        via_a.close()
    _check_once(replicas, d, [run_id], steps_per_run=2)
    # a race between the dead replica's row and the worker's lease, which run out together:
    # either b took the run over first and the worker, moved on to b, ended the attempt it
    # held, or the lease ran out first, the attempt was lost with a, and the same worker,
    # moved on to b, ran the retry
    attempts = replicas.query(
        f"SELECT attempt, status, holder FROM attempts "
        f"WHERE run_id = '{run_id}' AND step_id = 'remote' ORDER BY attempt"
    )
    assert attempts in (
        [(1, "SUCCEEDED", "w1")],
        [(1, "CRASHED", "w1"), (2, "SUCCEEDED", "w1")],
    ), attempts


@pytest.mark.timeout(DEADLINE * 3)
def test_the_replicas_example_runs(server_url: str, tmp_path: Path) -> None:
    """examples/replicas/run.sh, as documented: a run outlives the replica it started on."""
    script = Path(__file__).resolve().parent.parent / "examples" / "replicas" / "run.sh"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PLAIT_")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["XDG_CONFIG_HOME"] = str(tmp_path / "xdg")
    out = run(["bash", script, server_url], env=env, cwd=tmp_path, timeout=DEADLINE * 2)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCEEDED" in out.stdout and "took over 1 run(s)" in out.stdout, out.stdout
