"""Leases, deadlines and the durable queue, against real daemons, with real signals.

A step here proves what it did through files it writes (marks with timestamps, pids), and the
tests kill, stop and restart processes the way an operator's machine would.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_status import rpc_status
from processes import kill_group, wait_for
from test_security import PLAIT, Daemon
from test_workers import running

import plait
from plait.api.v1 import task_service_pb2 as tasks
from plait.api.v1 import worker_service_pb2 as workers
from plait.api.v1 import worker_service_pb2_grpc
from plait.errors import LeaseLostError

PIPELINES = '''
import os
import re
import time

import plait


@plait.step
def slow(marks: str) -> int:
    """Attempt 1 writes a mark every 20 ms until it is killed; a later attempt writes marks
    for a while and returns."""
    ctx = plait.get_step_context()
    path = os.path.join(marks, f"{ctx.attempt}-{os.getpid()}")
    for i in range(100_000 if ctx.attempt == 1 else 25):
        with open(path, "a") as f:
            f.write(f"{time.time()}\\n")
        time.sleep(0.02)
    return ctx.attempt


@plait.pipeline
def killed(marks: str) -> None:
    slow(marks)


@plait.step
def stoppable(marks: str) -> int:
    """Attempt 1 says its pid and waits to be stopped; a later attempt returns at once."""
    ctx = plait.get_step_context()
    if ctx.attempt == 1:
        with open(os.path.join(marks, "pid"), "w") as f:
            f.write(str(os.getpid()))
        time.sleep(300)
    return ctx.attempt


@plait.pipeline
def stopped(marks: str) -> None:
    stoppable(marks)


@plait.step(timeout=1)
def backtracks(marks: str) -> None:
    """Stuck in C code (the regex engine holds the GIL) for far longer than its timeout."""
    with open(os.path.join(marks, "started"), "w"):
        pass
    re.match(r"(a+)+$", "a" * 32 + "b")
    with open(os.path.join(marks, "after"), "w"):
        pass


@plait.pipeline
def stuck(marks: str) -> None:
    backtracks(marks)


@plait.step(pool="q")
def remote(x: int) -> None:
    pass


@plait.pipeline
def queued(x: int = 1) -> None:
    remote(x)
'''


def make_project(tmp_path: Path, name: str, pipes: str) -> Path:
    """A source root (tmp_path/project) whose pipes.py holds `pipes`, and tmp_path/marks."""
    root = tmp_path / "project"
    root.mkdir()
    (root / "pyproject.toml").write_text(f'[project]\nname = "{name}"\n')
    (root / "pipes.py").write_text(pipes)
    (tmp_path / "marks").mkdir()
    return root


@pytest.fixture
def project(tmp_path: Path) -> Path:
    return make_project(tmp_path, "leases-test", PIPELINES)


@contextlib.contextmanager
def daemons(home: Path, *flags: str) -> Iterator[list[Daemon]]:
    """Daemons started one after another on one home (restarts); every one is stopped, with
    whatever it started, whatever happens."""
    started = [Daemon(home, *flags)]
    try:
        yield started
    finally:
        for d in started:
            d.stop()


def restart(started: list[Daemon], *flags: str) -> Daemon:
    old = started[-1]
    new = Daemon(old.home, *flags, port=old.port)
    started.append(new)
    return new


def submit(d: Daemon, project: Path, target: str, *params: str) -> str:
    """Starts a run with `plait run --detach` from the project's folder; returns its id."""
    args = [PLAIT, "run", f"pipes.py:{target}", "--detach", "--quiet"]
    for p in params:
        args += ["-p", p]
    out = subprocess.run(
        args,
        cwd=project,
        env={**d.env, "PLAIT_SERVER": d.address, "PLAIT_TOKEN": d.credential},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.strip().split()[-1]


def client(d: Daemon) -> plait.Client:
    return plait.Client(d.address, token=d.credential)


def finished(d: Daemon, run_id: str) -> plait.Run:
    c = client(d)
    wait_for(lambda: c.get_run(run_id).status.is_final, f"run {run_id} ending")
    return c.get_run(run_id)


def attempts(run: plait.Run, step: str) -> int:
    return run.steps[step].attempt


def test_a_killed_daemons_step_stops_before_its_retry_starts(tmp_path: Path, project: Path) -> None:
    marks = tmp_path / "marks"
    with daemons(tmp_path / "home") as started:
        run_id = submit(started[0], project, "killed", f"marks={marks}")
        wait_for(lambda: any(marks.iterdir()), "attempt 1 writing marks")
        (first,) = marks.iterdir()
        pid = int(first.name.split("-")[1])
        started[0].kill()
        # the step's process dies with its control plane (it does not wait for a lease)
        wait_for(lambda: not running(pid), "the orphaned step process stopping")
        d = restart(started)
        run = finished(d, run_id)
        assert run.status == "SUCCEEDED", run
        (second,) = [m for m in marks.iterdir() if m != first]
        assert second.name.startswith("2-")
        last_of_first = max(map(float, first.read_text().split()))
        first_of_second = min(map(float, second.read_text().split()))
        assert last_of_first < first_of_second  # never both at once
        assert run.steps["slow"].output() == 2


def test_a_stopped_worker_loses_its_lease_and_the_step_is_retried(
    tmp_path: Path, project: Path
) -> None:
    marks = tmp_path / "marks"
    with daemons(tmp_path / "home", "--heartbeat-timeout", "2") as started:
        d = started[0]
        run_id = submit(d, project, "stopped", f"marks={marks}")
        wait_for(lambda: (marks / "pid").exists() and (marks / "pid").read_text() != "", "pid")
        pid = int((marks / "pid").read_text())
        os.kill(pid, signal.SIGSTOP)  # hung: no heartbeat, no report, no exit
        try:
            run = finished(d, run_id)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        assert run.status == "SUCCEEDED", run
        assert run.steps["stoppable"].output() == 2
        events = [e for batch in client(d).watch(run_id) for e in batch]
        retried = [e for e in events if e.step_status == "RETRYING"]
        assert len(retried) == 1 and "lease expired" in retried[0].message
        wait_for(lambda: not running(pid), "the stopped worker being killed")


def test_a_timeout_is_enforced_on_a_step_stuck_in_c_code(tmp_path: Path, project: Path) -> None:
    marks = tmp_path / "marks"
    with daemons(tmp_path / "home") as started:
        d = started[0]
        run_id = submit(d, project, "stuck", f"marks={marks}")
        run = finished(d, run_id)
        assert run.status == "FAILED"
        error = run.steps["backtracks"].error
        assert error is not None and error.type == "builtins.TimeoutError", error
        assert "timeout of 1 s" in error.message
        assert (marks / "started").exists() and not (marks / "after").exists()


def _worker_stub(d: Daemon, token: str) -> Any:
    channel = grpc.insecure_channel(d.address)
    return worker_service_pb2_grpc.WorkerServiceStub(channel), [
        ("authorization", f"Bearer {token}")
    ]


def _reason(exc: grpc.RpcError) -> str:
    status = rpc_status.from_call(exc)  # type: ignore[arg-type]
    assert status is not None
    from google.rpc import error_details_pb2

    info = error_details_pb2.ErrorInfo()
    status.details[0].Unpack(info)
    return str(info.reason)


def test_the_queue_survives_a_restart_and_stale_tokens_are_fenced(
    tmp_path: Path, project: Path
) -> None:
    with daemons(tmp_path / "home") as started:
        d = started[0]
        worker_token = d.token("create", "pool-q", "--role", "worker")
        user_token = d.token("create", "someone", "--role", "user")
        run_id = submit(d, project, "queued")
        stub, auth = _worker_stub(d, worker_token)
        poll = workers.PollTaskRequest(pool="q", worker_id="w1", wait_seconds=30)
        # the doors: no token, and a token of another role
        with pytest.raises(grpc.RpcError) as refused:
            stub.PollTask(poll, timeout=30)
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as refused:
            stub.PollTask(poll, timeout=30, metadata=[("authorization", f"Bearer {user_token}")])
        assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
        # a restart before any worker took it: the same attempt is still queued
        d.kill()
        d = restart(started)
        stub, auth = _worker_stub(d, worker_token)
        task = stub.PollTask(poll, timeout=60, metadata=auth).task
        assert (task.token.run_id, task.token.attempt, task.token.epoch) == (run_id, 1, 1)
        assert task.pool == "q" and task.lease_seconds > 0
        # a restart while w1 holds it: the lease is re-attached, not crashed
        d.kill()
        d = restart(started)
        stub, auth = _worker_stub(d, worker_token)
        beat = stub.Heartbeat(workers.HeartbeatRequest(token=task.token), timeout=60, metadata=auth)
        assert not beat.cancel_requested and beat.lease_seconds > 0
        # handed back: w1's token is fenced off by the next epoch
        stub.ReleaseTask(workers.ReleaseTaskRequest(token=task.token), timeout=60, metadata=auth)
        started_report = tasks.TaskStarted(token=task.token)
        with pytest.raises(grpc.RpcError) as lost:
            stub.StartTask(
                workers.StartTaskRequest(started=started_report), timeout=60, metadata=auth
            )
        assert lost.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert _reason(lost.value) == LeaseLostError.reason == "LEASE_LOST"
        poll2 = workers.PollTaskRequest(pool="q", worker_id="w2", wait_seconds=30)
        again = stub.PollTask(poll2, timeout=60, metadata=auth).task
        assert (again.token.attempt, again.token.epoch) == (1, 2)
        done = workers.CompleteTaskRequest(completed=tasks.TaskCompleted(token=again.token))
        stub.CompleteTask(done, timeout=60, metadata=auth)
        stub.CompleteTask(done, timeout=60, metadata=auth)  # a retry: answered the same
        failed = workers.FailTaskRequest(failed=tasks.TaskFailed(token=again.token))
        with pytest.raises(grpc.RpcError) as lost:
            stub.FailTask(failed, timeout=60, metadata=auth)
        assert _reason(lost.value) == "LEASE_LOST"
        run = finished(d, run_id)
        assert run.status == "SUCCEEDED"
        assert run.steps["remote"].attempt == 1


def test_exit_statuses_are_true_even_when_sigchld_was_ignored(tmp_path: Path) -> None:
    script = tmp_path / "crash.py"
    script.write_text(
        textwrap.dedent(
            """
            import os
            import plait

            @plait.step
            def crash() -> None:
                os._exit(3)

            @plait.pipeline
            def crashing() -> None:
                crash()

            if __name__ == "__main__":
                run = crashing.run()
                print(run.status, run.steps["crash"].attempt, run.steps["crash"].error.message)
            """
        )
    )
    launcher = (
        "import os, signal, sys; signal.signal(signal.SIGCHLD, signal.SIG_IGN); "
        "os.execv(sys.executable, [sys.executable, sys.argv[1]])"
    )
    env = {**os.environ, "PLAIT_HOME": str(tmp_path / "home")}
    env.pop("PLAIT_SERVER", None)
    proc = subprocess.Popen(
        [sys.executable, "-c", launcher, str(script)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=120)
    finally:
        kill_group(proc.pid)
    assert "Unknown child process" not in err
    status, attempts_made, message = out.split(" ", 2)
    assert status == "FAILED"
    assert int(attempts_made) == 4  # the first attempt and the crash budget's three
    assert "exited with code 3" in message
