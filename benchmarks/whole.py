"""Whole processes: the pipelines users run, each as a fresh `python pipeline.py`.

Our users' pipelines have 3 to 50 steps and run as a fresh process, so what they wait for is
the process: Python's start, importing Plait and their module, the embedded engine's start,
the workers' warm-up, the run, the stop. Four workloads, no-op steps, every state change
persisted (embedded engine, SQLite, a fresh PLAIT_HOME each time):

  one step        a one-step pipeline
  chain of 50     50 steps, each consuming the previous one's output
  fan-out of 200  200 independent steps and a join of all of them
  chain, cached   the chain of 50 again in the PLAIT_HOME of a run of it: every step cached

Each figure is the median of several processes, from before the process starts to its exit,
beside the floor measured in the same run: a bare `python -c pass` and `python -c "import
plait"`, as ratios. `benchmarks/run.py --only whole` runs it; `python benchmarks/whole.py
--against before=/path/to/venv/bin/python` measures another Plait beside this one, interleaved
in the same run (a revision from before a change, installed in a venv of its own).
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

GOALS_S = {"one step": 0.5, "chain of 50": 0.6, "fan-out of 200": 0.8, "chain, cached": 0.5}
"""Issue 12's goals, seconds per process on our 2-core machines."""

PIPELINES = """\
import sys

import plait


@plait.step
def noop() -> int:
    return 0


@plait.step
def link(x: int) -> int:
    return x


@plait.step
def join(xs: list[int]) -> int:
    return len(xs)


@plait.pipeline
def one_step():
    noop()


@plait.pipeline
def chain(n: int = 50):
    x = noop()
    for _ in range(n - 1):
        x = link(x)


@plait.pipeline
def fan_out(n: int = 200):
    join([noop.with_options(cache_version=str(i))() for i in range(n)])


if __name__ == "__main__":
    run = {"one": one_step, "chain": chain, "fan": fan_out}[sys.argv[1]]()
    assert run.status == "SUCCEEDED", run.status
"""

WORKLOADS = {
    "one step": "one",
    "chain of 50": "chain",
    "fan-out of 200": "fan",
    "chain, cached": "chain",
}


def _timed(args: list[str], env: dict[str, str], cwd: Path) -> float:
    t0 = time.perf_counter()
    subprocess.run(args, env=env, cwd=cwd, check=True, stdin=subprocess.DEVNULL)
    return time.perf_counter() - t0


def bench_whole(repeat: int = 5, against: dict[str, str] | None = None) -> dict[str, Any]:
    """The median seconds of each workload and of the two floors, over ``repeat`` processes
    each, interleaved (one of each in turn, so that a busy moment touches them all).

    ``against``: other Plaits to measure in the same run, by label, each the Python of an
    environment where that Plait is installed (``--against before=/tmp/venv/bin/python``):
    their workloads are interleaved with this one's, on the same floors."""
    pythons = {"plait": sys.executable, **(against or {})}
    samples: dict[str, list[float]] = {k: [] for k in ("python -c pass", "import plait")}
    runs: dict[str, dict[str, list[float]]] = {
        label: {k: [] for k in WORKLOADS} for label in pythons
    }
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        script = root / "pipelines.py"
        script.write_text(PIPELINES)
        base = {k: v for k, v in os.environ.items() if k != "PLAIT_SERVER"}
        base.pop("PYTHONDONTWRITEBYTECODE", None)  # as users run: compiled modules are kept
        py = sys.executable
        for i in range(repeat):
            env = {**base, "PLAIT_HOME": str(root / f"floor{i}")}
            samples["python -c pass"].append(_timed([py, "-c", "pass"], env, root))
            samples["import plait"].append(_timed([py, "-c", "import plait"], env, root))
            for n, (label, python) in enumerate(pythons.items()):
                for name, arg in WORKLOADS.items():
                    home = root / f"home-{n}-{arg}-{name[:5]}-{i}"
                    env = {**base, "PLAIT_HOME": str(home)}
                    if name == "chain, cached":  # the same home as a run of the chain
                        subprocess.run([python, str(script), arg], env=env, cwd=root, check=True)
                    runs[label][name].append(_timed([python, str(script), arg], env, root))
    median = {k: statistics.median(v) for k, v in samples.items()}
    median.update({k: statistics.median(v) for k, v in runs["plait"].items()})
    return {
        "repeat": repeat,
        "median_s": median,
        "samples_s": {**samples, **runs["plait"]},
        "against": {
            label: {k: statistics.median(v) for k, v in r.items()}
            for label, r in runs.items()
            if label != "plait"
        },
    }


def report(figures: dict[str, Any]) -> bool:
    """Prints the table; True when every workload meets its goal."""
    med = figures["median_s"]
    floor, plait = med["python -c pass"], med["import plait"]
    against: dict[str, dict[str, float]] = figures.get("against", {})
    extra = "".join(f" {label[:12]:>12} {'x':>5}" for label in against)
    print(
        f"\nwhole processes (embedded engine, SQLite, fresh PLAIT_HOME), median of "
        f"{figures['repeat']}: floor python -c pass {floor * 1e3:.0f} ms, import plait "
        f"{plait * 1e3:.0f} ms\n"
        f"{'workload':16} {'s':>7} {'goal':>6} {'x python':>9} {'x import plait':>15} "
        f"{'ms/step':>8}{extra}"
    )
    ok = True
    steps = {"one step": 1, "chain of 50": 50, "fan-out of 200": 201, "chain, cached": 50}
    for name, goal in GOALS_S.items():
        s = med[name]
        ok &= s <= goal
        others = "".join(f" {r[name]:12.3f} {r[name] / s:5.2f}" for r in against.values())
        print(
            f"{name:16} {s:7.3f} {goal:6.2f} {s / floor:9.1f} {s / plait:15.1f} "
            f"{(s - plait) * 1e3 / steps[name]:8.2f}{others}{'' if s <= goal else '  OVER GOAL'}"
        )
    print("(ms/step: the process less the import of plait, per step", end="")
    if against:
        print("; x: that Plait's seconds over this one's", end="")
    print(")")
    return ok


def _against(values: list[str]) -> dict[str, str]:
    out = {}
    for value in values:
        label, sep, python = value.partition("=")
        if not sep or not label or not python:
            raise SystemExit(f"--against takes LABEL=PYTHON, not {value!r}")
        out[label] = python
    return out


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("repeat", nargs="?", type=int, default=5, help="processes per figure")
    parser.add_argument(
        "--against",
        action="append",
        default=[],
        metavar="LABEL=PYTHON",
        help="also measure the Plait installed for that Python, in the same run (repeatable)",
    )
    opts = parser.parse_args()
    report(bench_whole(opts.repeat, _against(opts.against)))
