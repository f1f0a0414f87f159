"""Processes started by tests, stopped even when the test fails.

Each child gets a session of its own, so its process group holds it and everything it spawns
(an embedded engine's workers, a daemon's workers): killing the group leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

# A hang guard, not a speed expectation: long enough for a loaded 2-core CI machine.
DEADLINE = 90.0


def kill_group(pgid: int) -> None:
    """SIGKILL every process left in the group `pgid` (nothing happens if it is empty)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def group_alive(pgid: int) -> bool:
    """Whether a process (a zombie included) is still in the group `pgid`."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def run(
    args: Sequence[str | Path], *, timeout: float = DEADLINE, **kwargs: Any
) -> subprocess.CompletedProcess[str]:
    """`subprocess.run(args, capture_output=True, text=True)` whose whole group is killed after.

    On a timeout `subprocess.run` kills the child but not its children; this kills them all.
    """
    proc = subprocess.Popen(
        [str(a) for a in args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        **kwargs,
    )
    with proc:  # closes the pipes however this ends (else a later test sees them collected)
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_group(proc.pid)
            try:
                stdout, stderr = proc.communicate(timeout=DEADLINE)
            except subprocess.TimeoutExpired:  # a process outside the group holds the pipes
                stdout, stderr = "(unread)", ""
            raise AssertionError(
                f"{' '.join(map(str, args))} did not end within {timeout:g} s; it printed:\n"
                f"{stdout}\n{stderr}"
            ) from None
        finally:
            kill_group(proc.pid)
            proc.kill()
            proc.wait()
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


@contextlib.contextmanager
def spawned(args: Sequence[str | Path], **kwargs: Any) -> Iterator[subprocess.Popen[bytes]]:
    """A `Popen` in its own process group, which is killed on exit, whatever happened, and
    whose pipes are closed (else a test that failed leaves them to be collected in a later one,
    which pytest then fails for their ResourceWarning)."""
    proc = subprocess.Popen([str(a) for a in args], start_new_session=True, **kwargs)
    try:
        yield proc
    finally:
        kill_group(proc.pid)
        proc.kill()
        proc.wait()
        for pipe in (proc.stdin, proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()


def wait_for(
    condition: Callable[[], bool], what: str, *, deadline: float = DEADLINE, every: float = 0.05
) -> None:
    """Poll until `condition()` holds; fail saying `what` never happened (a hang guard)."""
    end = time.monotonic() + deadline
    while not condition():
        if time.monotonic() > end:
            raise AssertionError(f"{what} did not happen within {deadline:g} s")
        time.sleep(every)
