"""Fault injection: real daemons, real `plait worker` processes, real signals, a TCP proxy that
cuts a worker's line, a PostgreSQL server stopped mid-run, and one fake (a transaction that
commits while its caller sees an error, injected at the store boundary).

Each case runs several runs of one small pipeline (`invariants.PIPELINE`: a local step, a
fan-out of three remote steps in the pool `p`, a local fan-in), injects its fault at a moment it
observes (a step started executing: the steps' executions log says so, and a `hold-*` file keeps
the step there), lets every run end and checks the same invariants (`invariants.check`).
Deadlines are hang guards only; docs/faults.md describes the suite.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import subprocess
import tempfile
import time
import types
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from invariants import Pipeline, Submitted, check, fault_pipeline
from processes import DEADLINE, wait_for
from tcp_proxy import TcpProxy
from test_leases import _reason, _worker_stub
from test_postgres import postgres_database
from test_security import Daemon, free_port
from test_workers import Fixture, Worker, worker

from plait.api.v1 import task_service_pb2 as tasks
from plait.api.v1 import worker_service_pb2 as workers
from plait.engine.store._engine import FAULT_COMMIT_THEN_ERROR

pytestmark = pytest.mark.slow

LEASE = "2"
"""Seconds a lease lasts without a heartbeat (``--heartbeat-timeout``): short, to be quick."""


@pytest.fixture
def pipeline(tmp_path: Path) -> Iterator[Pipeline]:
    yield from fault_pipeline(tmp_path)


class Cluster(Fixture):
    """`test_workers.Fixture` (a daemon with short leases, a client, a worker token) whose
    daemon is restartable the hard way (SIGKILL, then a new one on the same port and store),
    on SQLite or on PostgreSQL, with remote workers of the pool `p` and the runs it submitted.
    Everything it started is stopped by `close`, whatever happened."""

    def __init__(self, tmp: Path, pipeline: Pipeline, database_url: str = "") -> None:
        self.pipeline = pipeline
        self.database_url = database_url or f"sqlite:///{tmp / 'home' / 'plait.db'}"
        self._daemon_env = {"PLAIT_DATABASE_URL": database_url} if database_url else {}
        with self._env_of_daemons():
            super().__init__(tmp, (pipeline.module, pipeline.root), lease=LEASE)
        self.daemons = [self.daemon]
        self._workers = contextlib.ExitStack()
        self.workers: dict[str, Worker] = {}
        self.submitted: list[Submitted] = []

    @contextlib.contextmanager
    def _env_of_daemons(self) -> Iterator[None]:
        """A daemon (and `plait token`) takes its store from PLAIT_DATABASE_URL."""
        with pytest.MonkeyPatch.context() as mp:
            for key, value in self._daemon_env.items():
                mp.setenv(key, value)
            yield

    @property
    def address(self) -> str:
        return self.daemon.address

    def kill_daemon(self) -> None:
        """SIGKILL to the daemon (its local workers die with it)."""
        self.daemon.kill()

    def start_daemon(self) -> None:
        """A daemon again, on the same port and store (it resumes the unfinished runs)."""
        with self._env_of_daemons():
            self.daemon = Daemon(self.daemon.home, *self.flags, port=self.daemon.port)
        self.daemons.append(self.daemon)

    def start_worker(self, name: str, *flags: str, via: str = "") -> Worker:
        """``plait worker --pool p`` named `name`, connected to the daemon or to `via` (a
        proxy's address); stopped (SIGKILL to its group) by `close` or `kill_worker`."""
        fx: Any = self
        if via:  # the fixture as `test_workers.worker` sees it, with the proxy's address
            fx = types.SimpleNamespace(
                tmp=self.tmp, daemon=types.SimpleNamespace(address=via), env=self.env,
                steps_dir=self.steps_dir,
            )  # fmt: skip
        self.workers[name] = self._workers.enter_context(worker(fx, name, *flags))
        return self.workers[name]

    def kill_worker(self, name: str) -> None:
        """SIGKILL to the worker and its step processes, as a machine that dies."""
        w = self.workers.pop(name)
        w.signal_all(signal.SIGKILL)
        w.proc.wait(timeout=DEADLINE)

    def submit(self, n: int, *, pause: float = 0.0, request_id: str | None = None) -> str:
        params = self.pipeline.params(n, pause)
        run = self.client.run_pipeline(
            self.pipeline.module.fan, params, wait=False, request_id=request_id
        )
        self.submitted.append(Submitted(run.run_id, n))
        return run.run_id

    def check(self, **kwargs: Any) -> Any:
        return check(self.client, self.database_url, self.submitted, self.pipeline, **kwargs)

    def close(self) -> None:
        try:
            self.client.close()
            self._workers.close()
        finally:
            for d in self.daemons:
                d.stop()


@contextlib.contextmanager
def cluster(tmp: Path, pipeline: Pipeline, database_url: str = "") -> Iterator[Cluster]:
    c = Cluster(tmp, pipeline, database_url)
    try:
        yield c
    finally:
        c.close()


def test_kill_9_of_workers_mid_step(tmp_path: Path, pipeline: Pipeline) -> None:
    with cluster(tmp_path, pipeline) as c:
        c.start_worker("A")
        pipeline.hold("source")
        pipeline.hold("square")
        for n in (3, 4, 5):
            c.submit(n)
        # the daemon's local pool worker, mid-step
        wait_for(lambda: pipeline.executing("source"), "a local step executing")
        local = pipeline.pid_of("source")
        os.kill(local, signal.SIGKILL)
        pipeline.release("source")
        # a remote worker and its step process, mid-step
        wait_for(lambda: pipeline.executing("square"), "a remote step executing")
        c.kill_worker("A")
        c.start_worker("B")
        pipeline.release("square")
        c.check()
    assert any(a > 1 for _, s, a in pipeline.executions() if s == "source")
    assert any(a > 1 for _, s, a in pipeline.executions() if s.startswith("square"))


def test_a_stopped_worker_past_its_lease(tmp_path: Path, pipeline: Pipeline) -> None:
    with cluster(tmp_path, pipeline) as c:
        a = c.start_worker("A")
        pipeline.hold("square")
        for n in (3, 4, 5):
            c.submit(n)
        wait_for(lambda: pipeline.executing("square"), "a remote step executing")
        a.signal_all(signal.SIGSTOP)  # frozen: no heartbeat, no report, no exit
        try:
            pipeline.release("square")
            c.start_worker("B")
            c.check()
        finally:
            a.signal_all(signal.SIGCONT)
        # its late reports change nothing; it learns the attempt is not its own any more
        wait_for(
            lambda: any(t in a.log() for t in ("lost lease", "LeaseLost", "cancelled")),
            "worker A giving up",
        )
        c.submit(6)
        c.check()


@pytest.mark.parametrize("store", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def test_kill_9_of_the_daemon_mid_run(
    tmp_path: Path, pipeline: Pipeline, request: pytest.FixtureRequest, store: str
) -> None:
    url, drop = postgres_database(request) if store == "postgres" else ("", lambda: None)
    try:
        with cluster(tmp_path, pipeline, url) as c:
            c.start_worker("A")
            pipeline.hold("square")
            c.submit(3)
            wait_for(lambda: pipeline.executing("square"), "a remote step executing")
            pipeline.hold("source")
            c.submit(4)
            c.submit(5)
            second = c.submitted[1].run_id
            wait_for(lambda: pipeline.executing("source", run_id=second), "a local step executing")
            c.kill_daemon()  # a remote and a local step mid-step, attempts queued
            pipeline.release("source")
            pipeline.release("square")
            c.start_daemon()
            c.submit(6)
            c.check()
    finally:
        drop()


def test_kill_9_of_the_daemon_right_after_a_local_hand_off(
    tmp_path: Path, pipeline: Pipeline
) -> None:
    # the moment between the hand-off of a task to the daemon's own pool and the next commit
    # (the lease rides along with it, ControlPlane.note_lease): the step stops its daemon there
    with cluster(tmp_path, pipeline) as c:
        c.start_worker("A")
        c.client.wait(c.submit(2))  # the pool's worker has the code: the next step starts at once
        pipeline.freeze_daemon("total")  # (a step with no client call waiting on its hand-off)
        run_id = c.submit(3)
        wait_for(lambda: pipeline.executing("total", run_id=run_id), "the local step started")
        wait_for(lambda: _stopped(c.daemon.proc.pid), "the step stopping the daemon")
        c.kill_daemon()
        c.start_daemon()
        c.check()


def _stopped(pid: int) -> bool:
    return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] == "T"


def test_a_workers_connection_cut_past_its_lease_then_restored(
    tmp_path: Path, pipeline: Pipeline
) -> None:
    with cluster(tmp_path, pipeline) as c, TcpProxy(c.address) as proxy:
        a = c.start_worker("A", via=proxy.address)
        pipeline.hold("square")
        first = c.submit(3)
        wait_for(lambda: pipeline.executing("square", run_id=first), "a remote step on A")
        (step,) = {s for r, s, _ in pipeline.executions() if r == first and s.startswith("sq")}
        proxy.stall()  # no FIN, no RST: A's calls hang, its heartbeats never arrive
        c.submit(4)
        pipeline.release("square")
        c.start_worker("B")
        # the lease expired; the step's next attempt ran on B
        wait_for(lambda: pipeline.executing(step, run_id=first, attempt=2), "attempt 2 on B")
        proxy.restore()  # A's late reports arrive now: refused, they change nothing
        # A gave the attempt up: by its own clock (its lease could not be renewed) or when a
        # late report was refused
        wait_for(lambda: "LeaseLost" in a.log() or "lost lease" in a.log(), "A giving up")
        c.check()
        # A serves the pool again
        c.kill_worker("B")
        c.submit(5)
        c.check()


def test_a_worker_that_sends_garbage_and_stale_tokens(tmp_path: Path, pipeline: Pipeline) -> None:
    with cluster(tmp_path, pipeline) as c:
        for n in (3, 4):
            c.submit(n)
        stub, auth = _worker_stub(c.daemon, c.worker_token)
        poll = workers.PollTaskRequest(pool="p", worker_id="rogue", wait_seconds=30)
        task = stub.PollTask(poll, timeout=DEADLINE, metadata=auth).task
        token = task.token
        assert token.run_id and token.attempt == 1
        rng = random.Random(9)
        # garbage: bytes that are not a request, for every method
        channel = grpc.insecure_channel(c.address)
        for method in ("PollTask", "StartTask", "Heartbeat", "CompleteTask", "FailTask"):
            call = channel.unary_unary(f"/plait.api.v1.WorkerService/{method}")
            for _ in range(5):
                junk = rng.randbytes(rng.randrange(1, 200))
                with pytest.raises(grpc.RpcError) as refused:
                    call(junk, timeout=DEADLINE, metadata=auth)
                assert refused.value.code() in (
                    grpc.StatusCode.INVALID_ARGUMENT,
                    grpc.StatusCode.UNIMPLEMENTED,
                ), refused.value
        channel.close()
        # stale and made-up tokens: another epoch, another attempt, another run
        for wrong in (
            tasks.LeaseToken(run_id=token.run_id, step_id=token.step_id, attempt=1, epoch=2),
            tasks.LeaseToken(run_id=token.run_id, step_id=token.step_id, attempt=2, epoch=1),
            tasks.LeaseToken(run_id=uuid.uuid4().hex, step_id=token.step_id, attempt=1, epoch=1),
        ):
            bogus = tasks.TaskCompleted(token=wrong)
            with pytest.raises(grpc.RpcError) as lost:
                stub.CompleteTask(
                    workers.CompleteTaskRequest(completed=bogus), timeout=DEADLINE, metadata=auth
                )
            assert _reason(lost.value) == "LEASE_LOST"
        # the rogue goes silent holding a lease: it expires, a real worker does the step
        c.start_worker("A")
        wait_for(
            lambda: pipeline.executing(token.step_id, run_id=token.run_id, attempt=2),
            "the rogue's step retried",
        )
        # its late completion changes nothing
        late = tasks.TaskCompleted(token=token)
        with pytest.raises(grpc.RpcError) as lost:
            stub.CompleteTask(
                workers.CompleteTaskRequest(completed=late), timeout=DEADLINE, metadata=auth
            )
        assert _reason(lost.value) == "LEASE_LOST"
        c.check()


def _pg_ctl(data: Path, *args: str) -> None:
    bins = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"))
    assert bins, "PostgreSQL's pg_ctl is not installed (scripts/postgres.sh installs it)"
    cmd = [str(bins[-1]), "-D", str(data), *args]
    subprocess.run(
        ["runuser", "-u", "postgres", "--", *cmd], check=True, capture_output=True, timeout=120
    )


@contextlib.contextmanager
def private_postgres() -> Iterator[tuple[str, Callable[[], None], Callable[[], None]]]:
    """A PostgreSQL server of this test's own (the shared test server is left running for
    other tests): its URL, how to stop it, how to start it again. Removed at the end."""
    base = Path(tempfile.mkdtemp(prefix="plait-pg-outage-", dir="/tmp"))
    data = base / "data"
    try:
        shutil.chown(base, "postgres")
        initdb = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))[-1]
        subprocess.run(
            ["runuser", "-u", "postgres", "--", str(initdb), "-D", str(data), "-A", "trust",
             "-U", "postgres"],
            check=True, capture_output=True, timeout=120,
        )  # fmt: skip
        port = free_port()
        options = f"-p {port} -k {base} -c listen_addresses=127.0.0.1 -c fsync=off"

        def start() -> None:
            _pg_ctl(data, "-l", str(base / "log"), "-w", "-t", "60", "-o", options, "start")

        def stop() -> None:
            _pg_ctl(data, "-m", "fast", "-w", "stop")

        start()
        try:
            yield f"postgresql+asyncpg://postgres@127.0.0.1:{port}/postgres", stop, start
        finally:
            with contextlib.suppress(subprocess.CalledProcessError):
                _pg_ctl(data, "-m", "immediate", "-w", "stop")
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.mark.postgres
def test_postgres_stopped_for_5_seconds_mid_run(
    tmp_path: Path, pipeline: Pipeline, server_url: str
) -> None:
    # server_url: PostgreSQL is installed and running for the tests (a skip, or in CI a
    # failure, when it is not); this test stops a server of its own, not that one
    with private_postgres() as (url, stop, start), cluster(tmp_path, pipeline, url) as c:
        c.start_worker("A")
        pipeline.hold("square")
        for n in (3, 4, 5):
            c.submit(n)
        wait_for(lambda: pipeline.executing("square"), "a remote step executing")
        stop()
        pipeline.release("square")  # completions, heartbeats, polls: all during the outage
        time.sleep(5)  # the outage (not a wait for anything)
        start()
        c.submit(6)
        c.check()


def test_a_transaction_that_commits_while_its_caller_sees_an_error(
    tmp_path: Path, pipeline: Pipeline, monkeypatch: pytest.MonkeyPatch
) -> None:
    # FAULT INJECTION (a fake, named as such): every 3rd transaction of the daemon's scheduler
    # commits, then raises a transient error, as a connection lost during COMMIT would
    monkeypatch.setenv(FAULT_COMMIT_THEN_ERROR, "3")
    with cluster(tmp_path, pipeline) as c:
        c.start_worker("A")  # (a worker's environment has no PLAIT_ variable of ours)
        for n in (3, 4, 5, 6):
            c.submit(n)
        # a CreateRun retried with its request id (its answer lost) gives the same run
        request_id = uuid.uuid4().hex
        again = c.submit(7, request_id=request_id)
        assert c.submit(7, request_id=request_id) == again
        c.submitted.pop()
        c.check()
        assert "the transaction committed, then the connection was lost" in c.daemon.log.read_text()
