"""The pipeline the fault-injection and chaos tests run, and the one checker of what every run
must look like after whatever fault it went through.

The invariants (docs/faults.md):

1. Every run ended, in the terminal status it should have (SUCCEEDED, unless a step lost every
   attempt its crash budget allows to crashes: then FAILED, and the store shows just that).
2. No completion recorded twice: at most one SUCCEEDED attempt per step, one SUCCEEDED event
   per step, one artifact row per (run, step, output).
3. Nothing lost: every succeeded step's outputs load and equal what the step computes (each
   value is a function of the run's parameters), and the metadata it logged is there.
4. Executions counted: each step appends a line (run, step, attempt, pid) to an executions log
   when it starts. Every SUCCEEDED attempt executed; no (run, step, attempt) executed twice; no
   attempt executed that the store has no row for.

The store is read through the API (``Client``) and, for what the API does not show (the
attempts table, artifact rows, events), straight from its database with SQLAlchemy.
"""

from __future__ import annotations

import collections
import importlib
import sys
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import anyio
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import create_async_engine

import plait
from plait.engine.scheduler._machine import DEFAULT_CRASH_RETRIES

PIPELINE = '''
"""The pipeline of the fault-injection tests: a fan-out over a remote pool, a local fan-in."""

import os
import signal
import time

import plait


def _executed(d: str, name: str, pause: float) -> None:
    """One line per execution, in one write to a file opened O_APPEND: lines of processes
    that write at once never mix. Then the step waits while the file `hold-<name>` exists (a
    test holds a step there to inject its fault while it runs), and takes `pause` seconds."""
    ctx = plait.get_step_context()
    line = f"{ctx.run_id} {ctx.step_id} {ctx.attempt} {os.getpid()}\\n"
    fd = os.open(os.path.join(d, "executions.log"), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)
    while os.path.exists(os.path.join(d, f"hold-{name}")):
        time.sleep(0.02)
    time.sleep(pause)
    # a local step (its parent is the daemon, or the daemon's fork server) freezes the daemon
    # (SIGSTOP) once, when a test asks: so that it finds the daemon just after a hand-off
    try:
        os.unlink(os.path.join(d, f"freeze-daemon-{name}"))
    except FileNotFoundError:
        return
    os.kill(_daemon_of_this_local_step(), signal.SIGSTOP)


def _daemon_of_this_local_step() -> int:
    """The daemon that runs this local step: this process's parent, or on Linux its
    grandparent (the parent is the fork server that forked this worker)."""
    parent = os.getppid()
    try:
        with open(f"/proc/{parent}/cmdline", "rb") as f:
            if b"--fork-server" not in f.read():
                return parent
    except OSError:  # not Linux: no fork server
        return parent
    with open(f"/proc/{parent}/stat") as f:
        return int(f.read().rpartition(")")[2].split()[1])


@plait.step(cache=False)
def source(d: str, n: int, pause: float) -> list[int]:
    _executed(d, "source", pause)
    plait.log_metadata({"n": n})
    return list(range(n))


@plait.step(pool="p", cache=False)
def square(d: str, xs: list[int], k: int, pause: float) -> int:
    _executed(d, "square", pause)
    value = sum(x * x for x in xs) + k
    plait.log_metadata({"k": k, "value": value})
    return value


@plait.step(cache=False)
def total(d: str, a: int, b: int, c: int, pause: float) -> int:
    _executed(d, "total", pause)
    plait.log_metadata({"parts": 3})
    return a + b + c


@plait.pipeline
def fan(d: str, n: int, pause: float = 0.0) -> None:
    """`pause`: how long each step takes (the chaos run's faults then find steps running)."""
    xs = source(d, n, pause)
    total(
        d,
        square(d, xs, 1, pause),
        square(d, xs, 2, pause),
        square(d, xs, 3, pause),
        pause,
    )
'''


def expected_outputs(n: int) -> dict[str, tuple[Any, dict[str, Any]]]:
    """What each step of `fan(d, n)` returns, and the metadata it logs."""
    squares = sum(x * x for x in range(n))
    out: dict[str, tuple[Any, dict[str, Any]]] = {"source": (list(range(n)), {"n": n})}
    for k, step_id in enumerate(("square", "square_2", "square_3"), start=1):
        out[step_id] = (squares + k, {"k": k, "value": squares + k})
    out["total"] = (3 * squares + 6, {"parts": 3})
    return out


@dataclass
class Pipeline:
    """The pipeline module, imported from a source root of its own (shipped as the runs' code
    archive, and the folder remote workers start in), and the folder its steps write to."""

    module: ModuleType
    root: Path
    marks: Path
    """Holds `executions.log` (the steps' lines) and `hold-<step>` files (steps wait while
    theirs exists)."""

    def params(self, n: int, pause: float = 0.0) -> dict[str, Any]:
        return {"d": str(self.marks), "n": n, "pause": pause}

    def hold(self, step: str) -> None:
        """Steps named `step` (``square`` holds all three) wait once they started."""
        (self.marks / f"hold-{step}").touch()

    def release(self, step: str) -> None:
        (self.marks / f"hold-{step}").unlink(missing_ok=True)

    def freeze_daemon(self, step: str) -> None:
        """The next local step named `step` to start SIGSTOPs its parent, the daemon."""
        (self.marks / f"freeze-daemon-{step}").touch()

    def executions(self, *, pids: bool = False) -> list[Any]:
        """(run, step, attempt) of every execution so far; with `pids`, and the process's id."""
        path = self.marks / "executions.log"
        lines = path.read_text().splitlines() if path.exists() else []
        rows = [(r, s, int(a), int(pid)) for r, s, a, pid in (line.split() for line in lines)]
        return rows if pids else [row[:3] for row in rows]

    def executing(self, step: str, *, run_id: str = "", attempt: int = 0) -> bool:
        """Whether an attempt of `step` (``square``: any of the three; of that run, that
        attempt number when given) started executing."""
        return any(
            s.startswith(step) and run_id in ("", r) and attempt in (0, a)
            for r, s, a in self.executions()
        )

    def pid_of(self, step: str) -> int:
        """The process that executed `step` first."""
        return next(p for _, s, _, p in self.executions(pids=True) if s.startswith(step))


def fault_pipeline(tmp_path: Path) -> Iterator[Pipeline]:
    """A fixture body: the pipeline in a source root under `tmp_path`, imported."""
    root = tmp_path / "project"
    root.mkdir()
    (root / "pyproject.toml").write_text('[project]\nname = "faults-test"\n')
    (root / "fault_steps.py").write_text(textwrap.dedent(PIPELINE))
    marks = tmp_path / "step-marks"
    marks.mkdir()
    sys.path.insert(0, str(root))
    try:
        yield Pipeline(importlib.import_module("fault_steps"), root, marks)
    finally:
        sys.path.remove(str(root))
        sys.modules.pop("fault_steps", None)


@dataclass(frozen=True)
class Submitted:
    """A run a test started, and what it was started with."""

    run_id: str
    n: int


@dataclass
class Report:
    """What the checker saw, for a test to print or assert more on."""

    runs: dict[str, plait.Run] = field(default_factory=dict)
    attempts: int = 0
    executions: int = 0
    crashed_out: list[str] = field(default_factory=list)
    """Runs FAILED because a step lost its whole crash budget (allowed, and checked)."""


async def _rows(url: str, run_ids: list[str]) -> dict[str, list[dict[str, Any]]]:
    """The attempts, artifacts and step events of these runs, read straight from the store."""
    url = url.replace("sqlite:///", "sqlite+aiosqlite:///", 1) if url.startswith("sqlite:") else url
    engine = create_async_engine(url)
    out: dict[str, list[dict[str, Any]]] = {}
    queries = {
        "attempts": "SELECT run_id, step_id, attempt, epoch, status FROM attempts",
        "artifacts": "SELECT run_id, step_id, output FROM artifacts",
        "events": "SELECT run_id, step_id, step_status, attempt FROM events WHERE step_id <> ''",
    }
    try:
        async with engine.connect() as conn:
            for name, sql in queries.items():
                rows = []
                for i in range(0, len(run_ids), 500):
                    chunk = run_ids[i : i + 500]
                    stmt = sa.text(f"{sql} {'AND' if 'WHERE' in sql else 'WHERE'} run_id IN :ids")
                    stmt = stmt.bindparams(sa.bindparam("ids", expanding=True))
                    rows += [dict(r._mapping) for r in await conn.execute(stmt, {"ids": chunk})]
                out[name] = rows
    finally:
        await engine.dispose()
    return out


def check(
    client: plait.Client,
    database_url: str,
    submitted: list[Submitted],
    pipeline: Pipeline,
    *,
    crash_budget_may_run_out: bool = False,
) -> Report:
    """Waits for every submitted run to end (`Client.wait`: it rides out a restarting daemon),
    then checks the invariants of the module docstring over all of them; AssertionError says
    which failed, for which run.

    ``crash_budget_may_run_out``: a FAILED run is allowed when a step's every attempt
    (``DEFAULT_CRASH_RETRIES`` + 1) CRASHED; the chaos run kills often enough for that.
    """
    report = Report()
    for s in submitted:
        report.runs[s.run_id] = client.wait(s.run_id)
    ids = [s.run_id for s in submitted]
    rows = anyio.run(_rows, database_url, ids)
    attempts: dict[tuple[str, str], list[dict[str, Any]]] = collections.defaultdict(list)
    for a in rows["attempts"]:
        attempts[a["run_id"], a["step_id"]].append(a)
    report.attempts = len(rows["attempts"])
    executions = [e for e in pipeline.executions() if e[0] in report.runs]
    report.executions = len(executions)
    counted = collections.Counter(executions)
    twice = [e for e, c in counted.items() if c > 1]
    assert not twice, "attempts executed more than once (run, step, attempt, pids): " + str(
        [(*e, [p for *x, p in pipeline.executions(pids=True) if tuple(x) == e]) for e in twice]
    )
    for run_id, step_id, attempt in counted:
        recorded = {a["attempt"] for a in attempts[run_id, step_id]}
        assert attempt in recorded, (
            f"{run_id}/{step_id} attempt {attempt} executed, but the store has no such attempt "
            f"(it has {sorted(recorded)})"
        )
    artifacts = collections.Counter(
        (a["run_id"], a["step_id"], a["output"]) for a in rows["artifacts"]
    )
    twice_stored = [k for k, c in artifacts.items() if c > 1]
    assert not twice_stored, f"outputs stored more than once: {twice_stored}"
    succeeded_events = collections.Counter(
        (e["run_id"], e["step_id"]) for e in rows["events"] if e["step_status"] == "SUCCEEDED"
    )
    twice_told = [k for k, c in succeeded_events.items() if c > 1]
    assert not twice_told, f"completions recorded twice (SUCCEEDED events): {twice_told}"

    for s in submitted:
        run = report.runs[s.run_id]
        expected = expected_outputs(s.n)
        assert set(run.steps) == set(expected), (s.run_id, sorted(run.steps))
        for step_id, (value, metadata) in expected.items():
            step = run.steps[step_id]
            tries = attempts[s.run_id, step_id]
            won = [a for a in tries if a["status"] == "SUCCEEDED"]
            assert len(won) <= 1, f"{s.run_id}/{step_id}: {len(won)} SUCCEEDED attempts: {tries}"
            if step.status != "SUCCEEDED":
                continue
            assert [a["attempt"] for a in won] == [step.attempt], (s.run_id, step_id, tries)
            assert (s.run_id, step_id, step.attempt) in counted, (
                f"{s.run_id}/{step_id} SUCCEEDED on attempt {step.attempt}, which never executed"
            )
            assert succeeded_events[s.run_id, step_id] == 1, (s.run_id, step_id, "no event")
            assert step.output() == value, (s.run_id, step_id, step.output(), value)
            assert step.metadata == metadata, (s.run_id, step_id, step.metadata)
            assert artifacts[s.run_id, step_id, next(iter(step.outputs))] == 1
        if run.status == "SUCCEEDED":
            assert all(st.status == "SUCCEEDED" for st in run.steps.values()), run
            continue
        crashed = [
            step_id
            for step_id in run.steps
            if len(attempts[s.run_id, step_id]) == DEFAULT_CRASH_RETRIES + 1
            and all(a["status"] == "CRASHED" for a in attempts[s.run_id, step_id])
        ]
        assert crash_budget_may_run_out and run.status == "FAILED" and crashed, (
            f"run {s.run_id} ended {run.status}, not SUCCEEDED: "
            + "; ".join(f"{k} {v.status} {v.error}" for k, v in run.steps.items())
        )
        report.crashed_out.append(s.run_id)
    return report
