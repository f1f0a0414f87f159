"""A randomised chaos run: runs are submitted all along while a driver SIGKILLs and restarts the
daemon, SIGKILLs and replaces remote workers, and freezes them (SIGSTOP) past their lease, at
random moments; then everything is let finish and the invariants of `invariants.check` are
checked over every run that was submitted.

The seed is printed; ``PLAIT_CHAOS_SEED=<seed>`` replays the same choices (not the same
timings). ``PLAIT_CHAOS_SECONDS`` (default 60) says for how long faults are injected; set it
higher for a longer run (docs/faults.md). ``-m chaos`` selects this test, ``-m "not chaos"``
leaves it out.
"""

from __future__ import annotations

import os
import random
import signal
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from invariants import Pipeline, fault_pipeline
from processes import DEADLINE, wait_for
from test_fault_injection import Cluster, cluster

import plait

SECONDS = float(os.environ.get("PLAIT_CHAOS_SECONDS") or 60)
"""How long the driver injects faults."""

pytestmark = [pytest.mark.slow, pytest.mark.chaos, pytest.mark.timeout(2 * SECONDS + 240)]


@pytest.fixture
def pipeline(tmp_path: Path) -> Iterator[Pipeline]:
    yield from fault_pipeline(tmp_path)


def _submit_until_accepted(c: Cluster, n: int, pause: float) -> None:
    """Submits one run, as a client that outlives restarts does: a call that found no control
    plane is sent again, with the same request id (so a run is made once, whether or not the
    lost call had made it)."""
    request_id = uuid.uuid4().hex
    end = time.monotonic() + DEADLINE
    while True:
        try:
            c.submit(n, pause=pause, request_id=request_id)
            return
        except plait.RpcError as exc:
            if exc.code not in ("UNAVAILABLE", "DEADLINE_EXCEEDED") or time.monotonic() > end:
                raise
        time.sleep(0.2)


def test_chaos(tmp_path: Path, pipeline: Pipeline) -> None:
    seed = int(os.environ.get("PLAIT_CHAOS_SEED") or random.randrange(2**32))
    print(f"chaos: PLAIT_CHAOS_SEED={seed} PLAIT_CHAOS_SECONDS={SECONDS:g}")
    rng = random.Random(seed)
    submitter_rng = random.Random(rng.random())
    actions: list[str] = []
    with cluster(tmp_path, pipeline) as c:
        names = iter(f"w{i}" for i in range(1, 10_000))
        for _ in range(2):
            c.start_worker(next(names))
        stop = threading.Event()
        failure: list[BaseException] = []

        def submitter() -> None:
            try:
                while not stop.is_set():
                    n, pause = submitter_rng.randint(1, 8), submitter_rng.uniform(0, 0.3)
                    _submit_until_accepted(c, n, pause)
                    stop.wait(submitter_rng.uniform(0, 0.3))
            except BaseException as exc:  # re-raised by the test's thread
                failure.append(exc)

        thread = threading.Thread(target=submitter, name="chaos-submitter")
        thread.start()
        try:
            end = time.monotonic() + SECONDS
            while time.monotonic() < end and not failure:
                time.sleep(rng.uniform(0.5, 3.0))
                action = rng.choice(["daemon", "daemon", "worker", "worker", "freeze"])
                name = rng.choice(sorted(c.workers))
                actions.append(f"{action} {name if action != 'daemon' else ''}".strip())
                if action == "daemon":
                    c.kill_daemon()
                    time.sleep(rng.uniform(0, 2.0))
                    c.start_daemon()
                elif action == "worker":
                    c.kill_worker(name)
                    time.sleep(rng.uniform(0, 2.0))
                    c.start_worker(next(names))
                else:  # frozen for up to twice its lease
                    c.workers[name].signal_all(signal.SIGSTOP)
                    try:
                        time.sleep(rng.uniform(0, 4.0))
                    finally:
                        c.workers[name].signal_all(signal.SIGCONT)
        finally:
            stop.set()
            thread.join(timeout=DEADLINE)
        if failure:
            raise failure[0]
        assert not thread.is_alive()
        wait_for(lambda: len(c.submitted) > 0, "a run submitted")
        report = c.check(crash_budget_may_run_out=True)
    print(
        f"chaos: {len(report.runs)} runs, {report.attempts} attempts, {report.executions} "
        f"executions, {len(report.crashed_out)} runs out of crash budget; "
        f"{len(actions)} faults: {', '.join(actions)}"
    )
    assert len(report.runs) >= 1
