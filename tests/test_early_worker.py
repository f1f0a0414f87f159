"""The embedded engine's first worker starts before the engine (runners/_early.py): it imports
Plait while the engine does, waits for the engine's address on its standard input, and runs the
first step; a worker the engine never takes exits; one started off the main thread is not."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import processes

from plait.runners import _early

SCRIPT = """\
import os
import sys
import threading

import plait


@plait.step
def where() -> str:
    return os.environ["PLAIT_WORKER_ID"]


@plait.pipeline
def which():
    where()


if __name__ == "__main__":
    if sys.argv[1] == "thread":  # the engine starts on another thread: no early worker
        out = []
        t = threading.Thread(target=lambda: out.append(which()))
        t.start()
        t.join()
        run = out[0]
    else:
        run = which()
    assert run.status == "SUCCEEDED", run.status
    print(run.steps["where"].output())
"""


def _run(tmp_path: Path, how: str) -> str:
    script = tmp_path / "which.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "PLAIT_HOME": str(tmp_path / f"home-{how}")}
    env.pop("PLAIT_SERVER", None)
    out = processes.run([sys.executable, script, how], env=env, cwd=tmp_path, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout.strip().splitlines()[-1]


def test_the_first_step_runs_in_the_worker_started_before_the_engine(tmp_path: Path) -> None:
    worker = _run(tmp_path, "main")
    assert worker.startswith("local-") and worker.endswith("-0"), worker  # the early one
    # an engine started on another thread starts its workers itself, from its event loop
    assert _run(tmp_path, "thread").endswith("-1")


def test_an_early_worker_no_engine_takes_exits() -> None:
    _early.discard_early_workers()  # none is left by other tests, but be sure
    _early.start_early_worker()  # pytest runs tests on the main thread
    (early,) = _early._waiting
    _early.discard_early_workers()
    assert early.process.returncode == 0
    assert _early.take_early_worker() is None


def test_a_worker_given_no_address_line_says_so() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "plait.runners.worker", "--address", "-", "--worker-id", "w"],
        input=b"not json\n",
        capture_output=True,
        timeout=60,
    )
    assert proc.returncode != 0
    assert b"standard input is not an address line" in proc.stderr


def test_a_short_run_exits_quietly(tmp_path: Path) -> None:
    """A process that ran a pipeline stops its engine at exit with a worker still connected:
    the worker's stream ends before the worker is killed, so gRPC has no dead stream to
    answer (it printed ExecuteBatchError tracebacks, in some runs out of ten)."""
    script = tmp_path / "which.py"
    script.write_text(SCRIPT)
    for i in range(4):
        env = {**os.environ, "PLAIT_HOME": str(tmp_path / f"home-quiet-{i}")}
        env.pop("PLAIT_SERVER", None)
        out = processes.run([sys.executable, script, "main"], env=env, cwd=tmp_path, timeout=120)
        assert out.returncode == 0, out.stdout + out.stderr
        assert "Traceback" not in out.stderr and "Error" not in out.stderr, out.stderr


EXPECT = """\
import sys

from plait._embedded import expect_runs
from plait.runners import _early

expect_runs()
# the worker is on its way before the client (gRPC) and the engine are imported
print(len(_early._waiting), "plait._client" in sys.modules, "plait.engine" in sys.modules)
_early.discard_early_workers()
"""


def test_a_pipeline_call_starts_its_worker_before_the_client_is_imported(tmp_path: Path) -> None:
    env = {**os.environ, "PLAIT_HOME": str(tmp_path / "home")}
    env.pop("PLAIT_WORKERS", None)
    env["PLAIT_SERVER"] = ""  # the embedded engine
    out = processes.run([sys.executable, "-c", EXPECT], env=env, cwd=tmp_path, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["1", "False", "False"], out.stdout
    # with a server configured, the run goes there: no local worker is started
    env["PLAIT_SERVER"] = "127.0.0.1:1"
    out = processes.run([sys.executable, "-c", EXPECT], env=env, cwd=tmp_path, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["0", "False", "False"], out.stdout
