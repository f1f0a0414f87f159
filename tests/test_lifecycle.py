"""The embedded engine's life: an interrupted process cancels its runs instead of losing them."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from processes import DEADLINE, spawned, wait_for

SCRIPT = """
import time
import plait

@plait.step
def slow() -> int:
    time.sleep(3600)  # only the interrupt ends it
    return 1

@plait.pipeline
def sleepy():
    slow()

if __name__ == "__main__":
    sleepy()
"""


# Puts SIGINT back to its default, then execs the script. A shell that starts a job in the
# background (as CI runners may) leaves SIGINT ignored in every process below it, an ignored
# signal stays ignored across exec, and Python installs no KeyboardInterrupt handler for it; a
# Ctrl-C at a terminal reaches a process whose SIGINT is the default. (Not Popen's preexec_fn:
# forking a process with gRPC threads and running Python in the child can crash it.)
AS_AT_A_TERMINAL = (
    "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); "
    "os.execv(sys.executable, [sys.executable, *sys.argv[1:]])"
)


def _status(db: Path) -> tuple[str | None, str | None]:
    if not db.exists():
        return None, None
    con = sqlite3.connect(db)
    try:
        run = con.execute("select status from runs").fetchone()
        step = con.execute("select status from step_runs where step_id='slow'").fetchone()
    except sqlite3.OperationalError:  # the schema is not there yet, or a writer holds the lock
        return None, None
    finally:
        con.close()
    return (run[0] if run else None), (step[0] if step else None)


# generous: under load the engine, its migrations and a worker all start before the step runs
@pytest.mark.timeout(4 * DEADLINE)
def test_ctrl_c_cancels_the_run_and_stops_the_workers(tmp_path: Path) -> None:
    script = tmp_path / "sleepy.py"
    script.write_text(SCRIPT)
    home = tmp_path / "home"
    env = {**os.environ, "PLAIT_HOME": str(home)}
    db = home / "plait.db"
    stderr_file = tmp_path / "stderr.txt"
    # stderr to a file, not a pipe nobody reads while waiting: a full pipe would block the engine
    with (
        open(stderr_file, "wb") as err,
        spawned([sys.executable, "-c", AS_AT_A_TERMINAL, script], env=env, stderr=err) as p,
    ):

        def step_running() -> bool:
            assert p.poll() is None, f"the script exited early:\n{stderr_file.read_text()}"
            return _status(db)[1] == "RUNNING"

        wait_for(step_running, "the step reaching RUNNING")
        p.send_signal(signal.SIGINT)  # only to the engine: it must stop its workers itself
        try:
            p.wait(timeout=DEADLINE)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"the engine did not exit after SIGINT:\n{stderr_file.read_text()}"
            ) from None
        stderr = stderr_file.read_text()
        assert p.returncode != 0
        assert "KeyboardInterrupt" in stderr
        assert _status(db) == ("CANCELLED", "CANCELLED"), stderr
        # no worker process of that engine is left behind (the engine reaps them before exiting)
        out = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
        assert f"local-{p.pid}-" not in out
