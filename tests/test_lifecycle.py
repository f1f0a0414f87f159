"""The embedded engine's life: an interrupted process cancels its runs instead of losing them."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

SCRIPT = """
import time
import plait

@plait.step
def slow() -> int:
    time.sleep(60)
    return 1

@plait.pipeline
def sleepy():
    slow()

if __name__ == "__main__":
    sleepy()
"""


def _status(db: Path) -> tuple[str | None, str | None]:
    if not db.exists():
        return None, None
    con = sqlite3.connect(db)
    try:
        run = con.execute("select status from runs").fetchone()
        step = con.execute("select status from step_runs where step_id='slow'").fetchone()
    except sqlite3.OperationalError:  # the schema is not there yet
        return None, None
    finally:
        con.close()
    return (run[0] if run else None), (step[0] if step else None)


def test_ctrl_c_cancels_the_run_and_stops_the_workers(tmp_path: Path) -> None:
    script = tmp_path / "sleepy.py"
    script.write_text(SCRIPT)
    home = tmp_path / "home"
    env = {**os.environ, "PLAIT_HOME": str(home)}
    proc = subprocess.Popen([sys.executable, str(script)], env=env, stderr=subprocess.PIPE)
    db = home / "plait.db"
    deadline = time.monotonic() + 30
    while _status(db)[1] != "RUNNING":
        assert time.monotonic() < deadline, "the step never started"
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=20)
    assert proc.returncode != 0
    assert b"KeyboardInterrupt" in stderr
    assert _status(db) == ("CANCELLED", "CANCELLED")
    # no worker process of that engine is left behind
    out = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert f"local-{proc.pid}-" not in out
