"""Which worker gets a step: a chain of steps stays on the worker that ran its last step (warm),
even when the pool has other idle workers, and starts no worker it cannot use."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import processes

SCRIPT = """\
import json
import os
import sys
import time
from pathlib import Path

import plait


@plait.step
def meet(folder: str, me: str, other: str) -> int:
    # two steps that wait for each other: the pool runs them at once, on two workers
    Path(folder, me).touch()
    deadline = time.monotonic() + 60
    while not Path(folder, other).exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"step {other} never came")
        time.sleep(0.01)
    return os.getpid()


@plait.pipeline
def two(folder: str):
    meet(folder, "a", "b")
    meet(folder, "b", "a")


@plait.step
def first() -> list[int]:
    return [os.getpid()]


@plait.step
def link(pids: list[int]) -> list[int]:
    return [*pids, os.getpid()]


@plait.pipeline
def chain(n: int = 12):
    pids = first()
    for _ in range(n - 1):
        pids = link(pids)
    return pids


if __name__ == "__main__":
    both = two(folder=sys.argv[1])
    assert both.status == "SUCCEEDED", both.status
    pool = sorted({s.output() for s in both.steps.values()})
    run = chain()
    assert run.status == "SUCCEEDED", run.status
    last = [k for k in run.steps if k.startswith("link")][-1]
    print(json.dumps({"pool": pool, "chain": run.steps[last].output()}))
"""


def test_a_chain_stays_on_one_worker_of_a_pool_of_idle_ones(tmp_path: Path) -> None:
    script = tmp_path / "dispatch.py"
    script.write_text(SCRIPT)
    folder = tmp_path / "meet"
    folder.mkdir()
    env = {**os.environ, "PLAIT_HOME": str(tmp_path / "home"), "PLAIT_WORKERS": "2"}
    env.pop("PLAIT_SERVER", None)
    out = processes.run([sys.executable, script, folder], env=env, cwd=tmp_path, timeout=180)
    assert out.returncode == 0, out.stdout + out.stderr
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    assert len(seen["pool"]) == 2, seen  # two workers were idle when the chain began
    assert len(seen["chain"]) == 12
    assert len(set(seen["chain"])) == 1, seen  # every step on the one that ran the last
    assert seen["chain"][0] in seen["pool"]  # and no third worker was started
