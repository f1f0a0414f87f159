"""Remote workers against a real daemon: `plait worker` processes sharing a pool, killed,
stopped, drained; a step stuck in C code past its timeout; the one-shot step entrypoint; tokens.

Every test runs a daemon whose leases last 2 s (``--heartbeat-timeout 2``), real worker
processes and real signals. Steps and tests meet through files in a folder the run gets as a
parameter, never through sleeps.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from processes import DEADLINE, kill_group, run, wait_for
from test_security import PLAIT, Daemon

import plait

pytestmark = pytest.mark.slow

STEPS = '''
"""Steps of the worker tests (imported by the tests and by the workers)."""

import os
import re
import time
from pathlib import Path

import plait


def _wait_for(path: Path) -> None:
    while not path.exists():
        time.sleep(0.02)


def _meet(d: str, name: str) -> str:
    """Waits until both meeting steps started: they must run at the same time."""
    Path(d, f"meet-{name}").write_text(os.environ["PLAIT_WORKER_ID"])
    while len(list(Path(d).glob("meet-*"))) < 2:
        time.sleep(0.02)
    return os.environ["PLAIT_WORKER_ID"]


@plait.step(cache=False)
def meet_a(d: str) -> str:
    return _meet(d, "a")


@plait.step(cache=False)
def meet_b(d: str) -> str:
    return _meet(d, "b")


@plait.pipeline(pool="p")
def shared(d: str) -> None:
    meet_a(d)
    meet_b(d)


@plait.step(pool="p", cache=False)
def hold(d: str) -> str:
    """Attempt 1 waits for the file `go`; later attempts return at once."""
    ctx = plait.get_step_context()
    Path(d, f"started-{ctx.attempt}").write_text(str(os.getpid()))
    if ctx.attempt == 1:
        _wait_for(Path(d, "go"))
    Path(d, f"finished-{ctx.attempt}").write_text("")
    return f"{os.environ['PLAIT_WORKER_ID']}:{ctx.attempt}"


@plait.pipeline
def holding(d: str) -> None:
    hold(d)


@plait.step(pool="p", cache=False, timeout=1)
def stuck(d: str) -> bool:
    """Backtracks for ages in the regex engine, which holds the GIL all along."""
    Path(d, "stuck-pid").write_text(str(os.getpid()))
    return re.match(r"(a+)+$", "a" * 40 + "b") is not None


@plait.pipeline
def stuck_in_c(d: str) -> None:
    stuck(d)


@plait.step(pool="p", cache=False)
def chatty(d: str) -> None:
    """Prints a line, then waits until the test has seen it through a follower."""
    print("hello from a remote step", flush=False)
    _wait_for(Path(d, "seen"))
    print("bye")


@plait.pipeline
def chatting(d: str) -> None:
    chatty(d)


@plait.step(pool="p", cache=False)
def quick(n: int) -> str:
    print(f"quick {n}")
    return f"{os.environ.get('PLAIT_WORKER_ID', 'one-shot')}:{n}"


@plait.pipeline
def quickly(n: int = 1) -> None:
    quick(n)
'''


@pytest.fixture(scope="module")
def steps(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ModuleType, Path]]:
    """The steps module, in a folder of its own (its source root, shipped as the code
    archive), imported here as the workers import it."""
    folder = tmp_path_factory.mktemp("worker_steps")
    (folder / "worker_steps.py").write_text(textwrap.dedent(STEPS))
    sys.path.insert(0, str(folder))
    try:
        yield importlib.import_module("worker_steps"), folder
    finally:
        sys.path.remove(str(folder))
        sys.modules.pop("worker_steps", None)


class Fixture:
    """A daemon with 2-second leases, a client, a worker token, and a folder for markers."""

    def __init__(self, tmp: Path, steps: tuple[ModuleType, Path], lease: str = "2") -> None:
        self.tmp = tmp
        self.steps, self.steps_dir = steps
        self.marks = tmp / "marks"
        self.marks.mkdir()
        self.flags = ("--heartbeat-timeout", lease)
        self.daemon = Daemon(tmp / "home", *self.flags)
        try:
            self.client = plait.Client(self.daemon.address, token=self.daemon.credential)
            self.worker_token = self.daemon.token("create", "workers", "--role", "worker")
        except BaseException:
            self.daemon.stop()
            raise

    def env(self, token: str | None = None, name: str = "") -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PLAIT_")}
        env["PLAIT_HOME"] = str(self.tmp / f"worker-home-{name}")
        env["XDG_CONFIG_HOME"] = str(self.tmp / "xdg")
        if token is None:
            token = self.worker_token
        if token:
            env["PLAIT_TOKEN"] = token
        return env

    def start(self, pipeline: Any, **params: Any) -> str:
        """Starts a run without waiting; its id."""
        return self.client.run_pipeline(pipeline, params, wait=False).run_id

    def restart(self) -> None:
        """Stops the daemon (SIGTERM) and starts it again on the same port and store."""
        d = self.daemon
        self.client.close()
        d.stop()
        (d.home / "server.pid").unlink(missing_ok=True)
        with open(d.log, "ab") as log:
            d.proc = subprocess.Popen(
                [PLAIT, "server", "start", "--foreground", "--port", str(d.port), *self.flags],
                env=d.env,
                stdout=log,
                stderr=log,
                start_new_session=True,
            )

        def started() -> bool:
            if d.proc.poll() is not None:
                raise AssertionError(d.log.read_text())
            return (d.home / "server.pid").exists()

        wait_for(started, "the daemon writing server.pid again")
        self.client = plait.Client(d.address, token=d.credential)

    def close(self) -> None:
        self.client.close()
        self.daemon.stop()


@pytest.fixture
def fx(tmp_path: Path, steps: tuple[ModuleType, Path]) -> Iterator[Fixture]:
    f = Fixture(tmp_path, steps)
    try:
        yield f
    finally:
        f.close()


class Worker:
    """A `plait worker` process (its own process group: the worker and its children)."""

    def __init__(self, proc: subprocess.Popen[bytes], log: Path) -> None:
        self.proc = proc
        self.pid = proc.pid
        self.log_path = log

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_log(self, text: str) -> None:
        def seen() -> bool:
            return text in self.log()

        try:
            wait_for(seen, f"the worker logging {text!r}")
        except AssertionError:
            raise AssertionError(f"{text!r} not in the worker's log:\n{self.log()}") from None

    def signal_all(self, signum: int) -> None:
        """Signals the worker and its children (a machine that stops or dies)."""
        os.killpg(self.pid, signum)


@contextlib.contextmanager
def worker(fx: Fixture, name: str, *flags: str, token: str | None = None) -> Iterator[Worker]:
    """Runs ``plait worker --pool p`` named `name`; on exit SIGKILLs its whole group."""
    log = fx.tmp / f"worker-{name}.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [
                PLAIT,
                "worker",
                "--server",
                fx.daemon.address,
                "--pool",
                "p",
                "--worker-id",
                name,
                *flags,
            ],
            env=fx.env(token, name),
            cwd=fx.steps_dir,
            stdout=out,
            stderr=out,
            start_new_session=True,
        )
    try:
        yield Worker(proc, log)
    finally:
        kill_group(proc.pid)
        proc.kill()
        proc.wait()


def running(pid: int) -> bool:
    """Whether the process runs (a zombie, dead but not reaped, does not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True
    return stat.rpartition(")")[2].split()[0] != "Z"


def statuses(fx: Fixture, run_id: str, step: str) -> list[tuple[int, str]]:
    """The (attempt, status) of each of the step's events, in order."""
    return [(attempt, status) for attempt, status, _ in events(fx, run_id, step)]


def events(fx: Fixture, run_id: str, step: str) -> list[tuple[int, str, str]]:
    """The (attempt, status, message) of each of the step's events, in order."""
    out = []
    for batch in fx.client.watch(run_id):
        out += [(e.attempt, str(e.step_status), e.message) for e in batch if e.step_id == step]
    return out


def crashed_by_lease(fx: Fixture, run_id: str, step: str, attempt: int) -> bool:
    """Whether the attempt ended CRASHED because its lease expired (then the step was
    retried: its event is RETRYING, with the crash's error)."""
    return any(
        a == attempt and status == "RETRYING" and "lease expired" in message
        for a, status, message in events(fx, run_id, step)
    )


# ---- the tests ----


def test_two_workers_share_a_pool(fx: Fixture) -> None:
    # two steps that can only finish together: each waits for the other to start
    with worker(fx, "A") as a, worker(fx, "B") as b:
        run_id = fx.start(fx.steps.shared, d=str(fx.marks))
        done = fx.client.wait(run_id)
        assert done.status == "SUCCEEDED", (a.log(), b.log())
        ran_on = {done.steps["meet_a"].output(), done.steps["meet_b"].output()}
        assert ran_on == {"A", "B"}
        for w in (a, b):
            w.wait_log("task finished")  # logged once the completion got through
            assert "connected to" in w.log() and "task started" in w.log()


def test_sigkilled_worker_its_attempt_crashes_and_is_retried_on_another(fx: Fixture) -> None:
    with worker(fx, "A") as a:
        run_id = fx.start(fx.steps.holding, d=str(fx.marks))
        wait_for((fx.marks / "started-1").exists, "attempt 1 starting on worker A")
        child = int((fx.marks / "started-1").read_text())
        # only the supervisor: its child must not outlive it (no orphan keeps the lease)
        os.kill(a.pid, signal.SIGKILL)
        wait_for(lambda: not running(child), "worker A's step process dying with it")
        with worker(fx, "B") as b:
            done = fx.client.wait(run_id)
            assert done.status == "SUCCEEDED", b.log()
    step = done.steps["hold"]
    assert step.attempt == 2 and step.output() == "B:2"
    assert crashed_by_lease(fx, run_id, "hold", 1), events(fx, run_id, "hold")
    assert not (fx.marks / "finished-1").exists()


def test_stopped_worker_loses_its_lease_and_its_late_reports_change_nothing(
    fx: Fixture,
) -> None:
    with worker(fx, "A") as a:
        run_id = fx.start(fx.steps.holding, d=str(fx.marks))
        wait_for((fx.marks / "started-1").exists, "attempt 1 starting on worker A")
        a.signal_all(signal.SIGSTOP)  # a machine that froze: no heartbeat, no exit
        try:
            with worker(fx, "B") as b:
                done = fx.client.wait(run_id)
                assert done.status == "SUCCEEDED", b.log()
            assert done.steps["hold"].attempt == 2 and done.steps["hold"].output() == "B:2"
            (fx.marks / "go").touch()  # attempt 1 may now finish, if it still runs
        finally:
            a.signal_all(signal.SIGCONT)
        # it learns that the attempt is not its own any more: from its clock or its supervisor
        # ("lost lease"), from a refused report ("lost lease"), or from a heartbeat that got
        # in first, answered stop ("cancelled")
        wait_for(
            lambda: "lost lease" in a.log() or "cancelled" in a.log(),
            "worker A giving up attempt 1",
        )
        # a fresh step process took the slot: the worker goes on serving the pool
        again = fx.client.wait(fx.start(fx.steps.quickly, n=5))
        assert again.steps["quick"].output() == "A:5"
    after = fx.client.get_run(run_id)
    assert after.status == "SUCCEEDED"
    assert after.steps["hold"].attempt == 2 and after.steps["hold"].output() == "B:2"
    assert crashed_by_lease(fx, run_id, "hold", 1), events(fx, run_id, "hold")
    assert [e for e in statuses(fx, run_id, "hold") if e[1] == "SUCCEEDED"] == [(2, "SUCCEEDED")]


def test_sigterm_drains_the_running_step_and_exits_0(fx: Fixture) -> None:
    with worker(fx, "A") as a:
        run_id = fx.start(fx.steps.holding, d=str(fx.marks))
        wait_for((fx.marks / "started-1").exists, "attempt 1 starting on worker A")
        a.proc.send_signal(signal.SIGTERM)
        a.wait_log("draining")
        (fx.marks / "go").touch()
        assert a.proc.wait(timeout=DEADLINE) == 0, a.log()
        done = fx.client.wait(run_id)
    assert done.status == "SUCCEEDED"
    assert done.steps["hold"].attempt == 1 and done.steps["hold"].output() == "A:1"
    log = a.log()
    assert "task finished" in log and "drained; exiting" in log


def test_a_step_stuck_in_c_code_is_failed_at_its_timeout_and_its_process_killed(
    fx: Fixture,
) -> None:
    with worker(fx, "A") as a:
        run_id = fx.start(fx.steps.stuck_in_c, d=str(fx.marks))
        done = fx.client.wait(run_id)
        assert done.status == "FAILED"
        error = done.steps["stuck"].error
        assert error is not None and "timeout" in (error.type + error.message).lower(), error
        child = int((fx.marks / "stuck-pid").read_text())
        wait_for(lambda: not running(child), "the stuck step's process being killed")
        a.wait_log("killed process")
        # a fresh process took the slot: the worker still runs steps
        again = fx.client.wait(fx.start(fx.steps.quickly, n=7))
        assert again.status == "SUCCEEDED" and again.steps["quick"].output() == "A:7"


def _one_shot(
    fx: Fixture, *args: str, token: str | None = None
) -> subprocess.CompletedProcess[str]:
    return run(
        [sys.executable, "-m", "plait.runners.step", "--server", fx.daemon.address, *args],
        env=fx.env(token, "one-shot"),
        cwd=fx.steps_dir,
    )


def test_the_one_shot_entrypoint_runs_one_claimed_task(fx: Fixture) -> None:
    # the next task of a pool
    run_id = fx.start(fx.steps.quickly, n=3)
    out = _one_shot(fx, "--pool", "p", "--wait", "30")
    assert out.returncode == 0, out.stderr
    done = fx.client.wait(run_id)
    assert done.status == "SUCCEEDED" and done.steps["quick"].output() == "one-shot:3"
    assert [e.text for e in fx.client.logs(run_id, "quick")] == ["quick 3\n"]
    # the task a runner was started for, by its lease
    run_id = fx.start(fx.steps.quickly, n=4)
    wait_for(lambda: fx.client.get_run(run_id).steps["quick"].status == "QUEUED", "the step queued")
    out = _one_shot(fx, "--lease", f"{run_id}/quick/1/1")
    assert out.returncode == 0, out.stderr
    assert fx.client.wait(run_id).steps["quick"].output() == "one-shot:4"
    # that task again: its attempt ended, the lease is not ours
    out = _one_shot(fx, "--lease", f"{run_id}/quick/1/1")
    assert out.returncode == 4 and "lease lost" in out.stderr, out.stderr
    # an empty pool
    out = _one_shot(fx, "--pool", "p", "--wait", "0.5")
    assert out.returncode == 3 and "no task" in out.stderr, out.stderr
    # usage
    out = _one_shot(fx, "--lease", "not-a-token")
    assert out.returncode == 2 and "RUN/STEP/ATTEMPT/EPOCH" in out.stderr


def test_a_worker_without_a_worker_token_is_refused(fx: Fixture) -> None:
    for token, code, hint in (
        ("", "UNAUTHENTICATED", "PLAIT_TOKEN"),
        (fx.daemon.token("create", "alice"), "PERMISSION_DENIED", "--role worker"),
    ):
        with worker(fx, f"refused-{code}", token=token) as w:
            assert w.proc.wait(timeout=DEADLINE) == 1, w.log()
            log = w.log()
            assert "refused this worker" in log and code in log and hint in log, log
            assert "Traceback" not in log
    out = _one_shot(fx, "--pool", "p", token="")
    assert out.returncode == 1 and "UNAUTHENTICATED" in out.stderr, out.stderr


@pytest.mark.parametrize(
    "module",
    ["plait.runners.worker._remote", "plait.runners.step.__main__", "plait.cli._worker"],
)
def test_a_worker_loads_neither_the_engine_nor_sqlalchemy(module: str) -> None:
    code = (
        f"import sys, {module}, plait.runners.worker._execute\n"
        "bad = [m for m in sys.modules if m.startswith(('plait.engine', 'sqlalchemy'))]\n"
        "assert not bad, bad\n"
    )
    out = run([sys.executable, "-c", code])
    assert out.returncode == 0, out.stderr


def test_a_running_step_reports_to_its_restarted_control_plane(
    tmp_path: Path, steps: tuple[ModuleType, Path]
) -> None:
    fx = Fixture(tmp_path, steps, lease="30")  # long enough to outlive the restart
    try:
        with worker(fx, "A") as a:
            run_id = fx.start(fx.steps.holding, d=str(fx.marks))
            wait_for((fx.marks / "started-1").exists, "attempt 1 starting on worker A")
            fx.restart()
            (fx.marks / "go").touch()
            done = fx.client.wait(run_id)
            assert done.status == "SUCCEEDED", a.log()
            assert done.steps["hold"].attempt == 1 and done.steps["hold"].output() == "A:1"
            # and the worker polls the restarted control plane for more
            again = fx.client.wait(fx.start(fx.steps.quickly, n=8))
            assert again.steps["quick"].output() == "A:8", a.log()
    finally:
        fx.close()


def test_a_remote_steps_output_reaches_a_follower_while_it_runs(fx: Fixture) -> None:
    with worker(fx, "a", "--artifacts", "remote"):
        run_id = fx.start(fx.steps.chatting, d=str(fx.marks))
        texts = []
        for entry in fx.client.stream_logs(run_id, "chatty"):
            texts.append(entry.text)
            if "hello from a remote step" in entry.text:
                # the step cannot end before this file exists: it was running
                (fx.marks / "seen").touch()
        assert (fx.marks / "seen").exists(), texts
        assert "".join(texts) == "hello from a remote step\nbye\n"
        assert fx.client.wait(run_id).status == "SUCCEEDED"


def _lease_row(fx: Fixture, run_id: str, step: str) -> tuple[float, float]:
    """(leased_at, lease_expires_at) of attempt 1, as the store has them."""
    import sqlite3

    con = sqlite3.connect(fx.daemon.home / "plait.db")
    try:
        row = con.execute(
            "SELECT leased_at, lease_expires_at FROM attempts "
            "WHERE run_id = ? AND step_id = ? AND attempt = 1",
            (run_id, step),
        ).fetchone()
    finally:
        con.close()
    assert row is not None and row[0] is not None, row
    return float(row[0]), float(row[1])


def test_heartbeats_extend_a_running_steps_lease_and_a_short_step_sends_none(
    fx: Fixture,
) -> None:
    with worker(fx, "A"):
        # a short step: its lease is as PollTask granted it, never extended
        quick = fx.client.wait(fx.start(fx.steps.quickly, n=7))
        assert quick.status == "SUCCEEDED"
        leased_at, expires = _lease_row(fx, quick.run_id, "quick")
        assert abs(expires - leased_at - 2.0) < 1e-3  # --heartbeat-timeout 2, no heartbeat
        # a step that runs past a third of its lease: heartbeats push its lease on
        run_id = fx.start(fx.steps.holding, d=str(fx.marks))
        wait_for((fx.marks / "started-1").exists, "the step starting")

        def extended() -> bool:
            leased, until = _lease_row(fx, run_id, "hold")
            return until - leased > 2.1

        wait_for(extended, "a heartbeat extending the lease")
        (fx.marks / "go").touch()
        done = fx.client.wait(run_id)
        assert done.status == "SUCCEEDED" and done.steps["hold"].attempt == 1


def test_a_task_handed_to_a_cancelled_wait_goes_back_first_in_line() -> None:
    """The local pool's queue: a worker's wait cancelled after it was handed a task (its stream
    ended at that moment) must not lose the task; the next worker gets it, before later ones."""
    import asyncio

    import anyio

    from plait.api.v1 import task_service_pb2 as tasks
    from plait.runners._local import _Tasks

    def task(step: str) -> tasks.Task:
        return tasks.Task(token=tasks.LeaseToken(run_id="r", step_id=step, attempt=1, epoch=1))

    async def main() -> None:
        queue = _Tasks()
        waiting = asyncio.ensure_future(queue.get())
        await asyncio.sleep(0)  # it waits now
        queue.put(task("a"))  # handed to the wait...
        waiting.cancel()  # ...which is cancelled before it runs again
        with pytest.raises(asyncio.CancelledError):
            await waiting
        queue.put(task("b"))
        assert len(queue) == 2
        assert (await queue.get()).token.step_id == "a"
        assert (await queue.get()).token.step_id == "b"
        late = asyncio.ensure_future(queue.get())
        await asyncio.sleep(0)
        queue.close()
        with pytest.raises(anyio.EndOfStream):
            await late
        with pytest.raises(anyio.ClosedResourceError):
            queue.put(task("c"))

    asyncio.run(main())
