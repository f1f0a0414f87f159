"""Per-step overhead of Plait, every state change persisted. One command:

    .venv/bin/python benchmarks/run.py [--repeat 3] [--json FILE] [--postgres URL] [--only ...]

Workloads (no-op steps, local process runner, embedded engine, SQLite):
  chain      1,000 steps, each consuming the previous one's output (uncached)
  fan-out    999 independent steps and a join of all of them (1,000 steps, uncached)
  cached     the all-cached rerun of the chain
  cold       a one-step pipeline in a fresh process and a fresh PLAIT_HOME: start to exit
  daemon     chain and fan-out through a daemon (SQLite, and PostgreSQL when given)
  workers    through a daemon with 4 remote workers (`plait worker --pool bench`): steps/s of a
             1,000-step fan-out, and dispatch latency (a step queued -> its code starts) p50/p99
  load       50 runs of 100 steps (a root, 98 branches, their join) created at once by 50 client
             threads, through a daemon with 4 remote workers, on SQLite (and PostgreSQL when
             given): wall time, steps/s, dispatch p50/p99 over all 5,000 steps
             (`--only load`; see benchmarks/README.md)
  docker     the Docker runner through a daemon (benchmarks/containers.py): from `run` to the first
             step's code when its image is built (cold, and once truly cold: no layer cached),
             found (warm), and after an edit of the step (no build); a 20-step chain per step,
             beside the same chain on the local runner. Needs Docker and
             PLAIT_TEST_DOCKER_BASE (scripts/docker.sh; PLAIT_TEST_REGISTRY, from
             scripts/registry.sh, adds the registry); in the default run only when that is set
  whole      whole processes, as users run them (benchmarks/whole.py): a fresh `python
             pipeline.py` of one step, a chain of 50, a fan-out of 200 and a join, and the chain
             again all cached; medians, beside `python -c pass` and `import plait`
  dashboard  the web dashboard in headless Chromium (benchmarks/dashboard.py): the run page of a
             1,000-step run, from navigation start to all its graph's nodes in the DOM (median),
             beside a blank page of the same server; GET /api/runs over 10,000 runs. Needs
             Playwright and Debian's chromium; in the default run only when they are there

Baselines, measured in the same run on the same machine, so that figures read as ratios:
  sqlite-commit  one committed single-row INSERT through SQLAlchemy Core (pysqlite, WAL)
  grpc-unary     one unary gRPC round trip between two processes on loopback
  python-start   `python -c "pass"`, process start to exit
  docker floor   `docker run --rm BASE python3 -c 'import time; print(time.time())'`, from before
                 it to the printed time (docker group only; medians there, best elsewhere)
  blank page     the dashboard's login page in headless Chromium, navigation start to its load
                 event (dashboard group only; medians there)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

TARGETS_MS = {"chain": 1.0, "fan-out": 2.0, "cached": 0.2}
"""Per step, embedded engine: the chain and the cache hit are issue 12's goals."""
TARGET_COLD_S = 1.0
TARGETS_WORKERS = {"steps_per_s": 300.0, "dispatch_p50_ms": 5.0, "dispatch_p99_ms": 25.0}
"""Remote workers: at least this many steps/s, at most these latencies."""
LOAD_RUNS = 50
LOAD_WORKERS = 4
"""The load workload: this many 100-step runs at once on this many `plait worker` processes."""


def _best(samples: list[float]) -> float:
    return min(samples)


def baseline_sqlite(n: int = 2000) -> float:
    import sqlalchemy as sa

    with tempfile.TemporaryDirectory() as tmp:
        engine = sa.create_engine(f"sqlite:///{tmp}/b.db")
        with engine.begin() as c:
            c.exec_driver_sql("PRAGMA journal_mode=WAL")
            c.exec_driver_sql("PRAGMA synchronous=NORMAL")
            c.exec_driver_sql("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT)")
        stmt = sa.text("INSERT INTO t (v) VALUES (:v)")
        t0 = time.perf_counter()
        for _ in range(n):
            with engine.begin() as c:
                c.execute(stmt, {"v": "x"})
        per = (time.perf_counter() - t0) / n
        engine.dispose()
    return per * 1e3


_GRPC_SERVER = """
import sys, grpc
from concurrent import futures
from grpc_health.v1 import health, health_pb2_grpc
server = grpc.server(futures.ThreadPoolExecutor(2))
health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
port = server.add_insecure_port("127.0.0.1:0")
server.start()
print(port, flush=True)
sys.stdin.read()
"""


def baseline_grpc(n: int = 2000) -> float:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    proc = subprocess.Popen(
        [sys.executable, "-c", _GRPC_SERVER],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        port = int(proc.stdout.readline())
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            stub = health_pb2_grpc.HealthStub(ch)
            req = health_pb2.HealthCheckRequest()
            for _ in range(100):
                stub.Check(req)
            t0 = time.perf_counter()
            for _ in range(n):
                stub.Check(req)
            per = (time.perf_counter() - t0) / n
    finally:
        proc.kill()
        proc.wait()
    return per * 1e3


def baseline_python_start(repeat: int) -> float:
    samples = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", "pass"], check=True)
        samples.append(time.perf_counter() - t0)
    return _best(samples)


def measure(client: Any, repeat: int, *, cached: bool = True) -> dict[str, Any]:
    """Per-step overhead of the workloads through ``client`` (best of ``repeat``)."""
    import workloads

    out: dict[str, Any] = {}
    # warm up: the worker pool, the compiled pipelines, the store
    for p in (workloads.chain, workloads.fan_out):
        p.compile()
    workloads.one_step.run(client=client, no_cache=True)

    def timed(pipe: Any, *, no_cache: bool) -> float:
        t0 = time.perf_counter()
        run = pipe.run(client=client, no_cache=no_cache)
        took = time.perf_counter() - t0
        assert run.status == "SUCCEEDED", run.status
        return took

    for name, pipe in (("chain", workloads.chain), ("fan-out", workloads.fan_out)):
        samples = [timed(pipe, no_cache=True) for _ in range(repeat)]
        steps = len(pipe.compile().spec.steps)
        out[name] = {
            "steps": steps,
            "ms_per_step": _best(samples) / steps * 1e3,
            "samples_s": samples,
        }
    if cached:
        run = workloads.chain.run(client=client)
        assert all(s.status == "CACHED" for s in run.steps.values())
        samples = [timed(workloads.chain, no_cache=False) for _ in range(repeat)]
        out["cached"] = {
            "steps": 1000,
            "ms_per_step": _best(samples) / 1000 * 1e3,
            "samples_s": samples,
        }
    return out


def bench_pipelines(repeat: int) -> dict[str, Any]:
    import plait

    with tempfile.TemporaryDirectory() as home:
        client = plait.Client(home=home)
        try:
            return measure(client, repeat)
        finally:
            client.shutdown()


def runs_per_second(client: Any, n: int = 300) -> float:
    """CreateRun calls per second over gRPC (one-step runs, not waited for)."""
    import workloads

    workloads.one_step.compile()
    t0 = time.perf_counter()
    ids = [
        workloads.one_step.run(client=client, no_cache=True, wait=False).run_id for _ in range(n)
    ]
    rate = n / (time.perf_counter() - t0)
    for rid in ids:  # let them finish before the next measurement
        client.wait(rid)
    return rate


@contextlib.contextmanager
def _fresh_database(server_url: str) -> Iterator[str]:
    """A new, empty database on the PostgreSQL server of `server_url` (dropped after): its URL.
    The server may be shared (scripts/postgres.sh's cluster is), and a daemon resumes the
    unfinished runs it finds, so no benchmark starts on what another left behind."""
    import uuid

    import anyio
    import sqlalchemy as sa
    from sqlalchemy.ext.asyncio import create_async_engine

    async def admin(sql: str) -> None:
        engine = create_async_engine(server_url, isolation_level="AUTOCOMMIT")
        try:
            async with engine.connect() as conn:
                await conn.execute(sa.text(sql))
        finally:
            await engine.dispose()

    name = f"plait_bench_{uuid.uuid4().hex[:12]}"
    anyio.run(admin, f'CREATE DATABASE "{name}"')
    try:
        yield (
            sa.engine.make_url(server_url).set(database=name).render_as_string(hide_password=False)
        )
    finally:
        anyio.run(admin, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextlib.contextmanager
def _daemon(home: str, database_url: str = "") -> Iterator[tuple[str, str, dict[str, str]]]:
    """A daemon process on a free port: yields its address, its admin token and its env. With
    a PostgreSQL `database_url`, its store is a fresh database on that server."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PLAIT_HOME": home}
    env.pop("PLAIT_SERVER", None)
    cmd = [sys.executable, "-m", "plait", "server", "start", "--foreground", "--port", str(port)]
    with contextlib.ExitStack() as stack:
        if database_url:
            cmd += ["--database-url", stack.enter_context(_fresh_database(database_url))]
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 30
            while not Path(home, "server.pid").exists():
                assert proc.poll() is None and time.monotonic() < deadline, "no daemon"
                time.sleep(0.05)
            # the daemon's local admin credential: every call needs a token
            token = json.loads(Path(home, "credentials.json").read_text())["token"]
            yield f"127.0.0.1:{port}", token, env
        finally:
            proc.terminate()
            proc.wait(timeout=60)


def bench_daemon(repeat: int, database_url: str = "") -> dict[str, Any]:
    """The same workloads through a daemon process (`plait server start --foreground`)."""
    import plait

    with tempfile.TemporaryDirectory() as home, _daemon(home, database_url) as (address, token, _):
        client = plait.Client(address, token=token)
        out = measure(client, repeat, cached=False)
        out["runs_per_s"] = runs_per_second(client)
        client.close()
    return out


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


@contextlib.contextmanager
def _workers(
    home: str, address: str, token: str, env: dict[str, str], pool: str, n: int
) -> Iterator[None]:
    """`n` remote workers (`plait worker --pool POOL`) of the daemon at `address`."""
    worker_token = subprocess.run(
        [sys.executable, "-m", "plait", "token", "create", f"{pool}-workers", "--role", "worker"],
        env={**env, "PLAIT_SERVER": address, "PLAIT_TOKEN": token},
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "plait", "worker", "--server", address, "--pool", pool],
            env={**env, "PLAIT_TOKEN": worker_token, "PLAIT_HOME": f"{home}/{pool}-worker-{i}"},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for i in range(n)
    ]
    try:
        yield
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _dispatch_ms(client: Any, run: Any) -> list[float]:
    """Each started step's dispatch latency: from the event that queued it to its code's start."""
    queued = {
        e.step_id: e.time.timestamp()
        for batch in client.watch(run.run_id)
        for e in batch
        if e.step_status == "QUEUED"
    }
    return [
        (s.start_time.timestamp() - queued[s.step_id]) * 1e3
        for s in run.steps.values()
        if s.start_time is not None and s.step_id in queued
    ]


def bench_workers(repeat: int, workers: int = 4) -> dict[str, Any]:
    """Through a daemon with `workers` remote workers (`plait worker --pool bench`): no-op
    steps per second for a 1,000-step fan-out, and the dispatch latency of a chain's steps
    (from the event that queued a step to its code's start), p50 and p99."""
    import workloads

    import plait

    with (
        tempfile.TemporaryDirectory() as home,
        _daemon(home) as (address, token, env),
        _workers(home, address, token, env, "bench", workers),
    ):
        client = plait.Client(address, token=token)
        # warm: the workers have fetched the code and imported the steps
        run = workloads.pool_chain.run({"n": 200}, client=client, no_cache=True)
        assert run.status == "SUCCEEDED", run
        rates, p50s, p99s = [], [], []
        for _ in range(repeat):
            t0 = time.perf_counter()
            run = workloads.pool_fan_out.run({"n": 1000}, client=client, no_cache=True)
            rates.append(1000 / (time.perf_counter() - t0))
            assert run.status == "SUCCEEDED", run
            run = workloads.pool_chain.run({"n": 200}, client=client, no_cache=True)
            assert run.status == "SUCCEEDED", run
            latencies = _dispatch_ms(client, run)
            p50s.append(_percentile(latencies, 0.50))
            p99s.append(_percentile(latencies, 0.99))
        client.close()
    return {
        "workers": workers,
        "steps_per_s": max(rates),
        "dispatch_p50_ms": min(p50s),
        "dispatch_p99_ms": min(p99s),
    }


def bench_load(
    repeat: int, database_url: str = "", *, runs: int = LOAD_RUNS, workers: int = LOAD_WORKERS
) -> dict[str, Any]:
    """`runs` runs of the 100-step `load` pipeline (a root, 98 branches, their join), created at
    once by as many client threads, through a daemon with `workers` remote workers (`plait
    worker --pool load`): wall time from the first CreateRun to the last run's end, steps per
    second, and dispatch latency over all the steps (QUEUED event -> code start), which here
    is mostly the wait for a free worker, p50 and p99. Its baseline, on the same daemon and
    workers: the same pipeline, one run alone."""
    from concurrent.futures import ThreadPoolExecutor

    import workloads

    import plait

    def sample(done: list[Any], wall: float) -> dict[str, float]:
        assert all(d.status == "SUCCEEDED" for d in done), [d.status for d in done]
        steps = sum(len(d.steps) for d in done)
        assert steps == len(done) * workloads.LOAD_STEPS, steps
        latencies = [ms for d in done for ms in _dispatch_ms(client, d)]
        return {
            "wall_s": wall,
            "steps_per_s": steps / wall,
            "dispatch_p50_ms": _percentile(latencies, 0.50),
            "dispatch_p99_ms": _percentile(latencies, 0.99),
        }

    created: list[float] = []

    def one(seed: int) -> Any:
        run = workloads.load.run({"seed": seed}, client=client, no_cache=True, wait=False)
        created.append(time.perf_counter())
        return client.wait(run.run_id)

    alone: list[dict[str, float]] = []
    samples: list[dict[str, float]] = []
    with (
        tempfile.TemporaryDirectory() as home,
        _daemon(home, database_url) as (address, token, env),
        _workers(home, address, token, env, "load", workers),
        ThreadPoolExecutor(runs, thread_name_prefix="load") as threads,
    ):
        client = plait.Client(address, token=token)
        one(-1)  # warm: the code archive is uploaded, the workers have imported the steps
        for r in range(repeat):
            t0 = time.perf_counter()
            done = [one(-2 - r)]
            alone.append(sample(done, time.perf_counter() - t0))
            created.clear()
            t0 = time.perf_counter()
            done = list(threads.map(one, range(r * runs, (r + 1) * runs)))
            samples.append(sample(done, time.perf_counter() - t0))
            samples[-1]["created_s"] = max(created) - t0  # when the last CreateRun returned
        client.close()
    return {
        "runs": runs,
        "steps": runs * workloads.LOAD_STEPS,
        "workers": workers,
        **min(samples, key=lambda s: s["wall_s"]),
        "samples": samples,
        "alone": min(alone, key=lambda s: s["wall_s"]),
    }


_COLD = """
import sys
sys.path.insert(0, {here!r})
import workloads
run = workloads.one_step()
assert run.status == "SUCCEEDED"
"""


def bench_cold(repeat: int) -> float:
    samples = []
    for _ in range(repeat):
        with tempfile.TemporaryDirectory() as home:
            env = {**os.environ, "PLAIT_HOME": home}
            env.pop("PLAIT_SERVER", None)
            t0 = time.perf_counter()
            subprocess.run(
                [sys.executable, "-c", _COLD.format(here=str(HERE))], env=env, check=True
            )
            samples.append(time.perf_counter() - t0)
    return _best(samples)


GROUPS = ("embedded", "cold", "whole", "daemon", "workers", "load", "docker", "dashboard")
"""What `--only` selects: the embedded workloads, the cold start, whole processes of the
pipelines users run (benchmarks/whole.py), the daemon's workloads, the 4
remote workers, the load (50 concurrent runs of 100 steps on 4 remote workers), the Docker
runner's start-up (benchmarks/containers.py), the dashboard in a browser
(benchmarks/dashboard.py)."""
DOCKER_BASE = "PLAIT_TEST_DOCKER_BASE"
"""The docker group's parent image (made by scripts/docker.sh); the group is part of the default
run only when it is set."""


def default_groups() -> tuple[str, ...]:
    """The groups run without `--only`: all of them, but docker only when a base image for it
    is named (it needs a Docker daemon and that image; nothing is pulled)."""
    import dashboard  # benchmarks/dashboard.py

    skip = set() if os.environ.get(DOCKER_BASE) else {"docker"}
    if dashboard.available():
        skip.add("dashboard")  # it needs Playwright and a Chromium
    return tuple(g for g in GROUPS if g not in skip)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog="The load (--only load) and docker (--only docker) workloads are described in "
        "benchmarks/README.md.",
    )
    parser.add_argument("--repeat", type=int, default=3, help="runs per workload (best counts)")
    parser.add_argument("--json", help="also write the figures to this file")
    parser.add_argument(
        "--postgres",
        "--postgres-url",
        default="",
        metavar="URL",
        help="also benchmark the daemon on this PostgreSQL server (a SQLAlchemy URL; each "
        "daemon gets a fresh database on it) [default: $PLAIT_TEST_POSTGRES_URL]",
    )
    parser.add_argument(
        "--only",
        default="",
        metavar="NAMES",
        help=f"comma-separated, among {', '.join(GROUPS)} [default: all, docker only when "
        f"${DOCKER_BASE} is set, dashboard only with Playwright and a Chromium]; load runs "
        "once per database unless selected alone, then "
        "--repeat times",
    )
    opts = parser.parse_args()
    only = [g.strip() for g in opts.only.split(",") if g.strip()] or list(default_groups())
    if unknown := set(only) - set(GROUPS):
        parser.error(f"--only: unknown {', '.join(sorted(unknown))} (known: {', '.join(GROUPS)})")
    pg_url = opts.postgres or os.environ.get("PLAIT_TEST_POSTGRES_URL", "")
    docker_base = os.environ.get(DOCKER_BASE, "")
    if "docker" in only:
        import containers as docker_bench  # benchmarks/containers.py

        if not docker_base:
            parser.error(
                f"--only docker needs ${DOCKER_BASE}, the parent image (nothing is pulled): "
                f"export {DOCKER_BASE}=$(bash scripts/docker.sh) "
                "PLAIT_TEST_REGISTRY=$(bash scripts/registry.sh)"
            )
        if why := docker_bench.docker_available():
            parser.error(f"--only docker needs a Docker daemon: {why}")
    if "dashboard" in only:
        import dashboard as dashboard_bench  # benchmarks/dashboard.py

        if why := dashboard_bench.available():
            parser.error(f"--only dashboard needs a browser: {why}")

    print(
        f"plait benchmarks: {os.cpu_count()} CPUs, Python {sys.version.split()[0]}, "
        f"best of {opts.repeat}" + (" (docker: median)" if "docker" in only else ""),
        flush=True,
    )
    sqlite_ms = baseline_sqlite()
    grpc_ms = baseline_grpc()
    py_s = baseline_python_start(opts.repeat)
    print(
        f"baselines: sqlite-commit {sqlite_ms:.3f} ms, grpc-unary {grpc_ms:.3f} ms, "
        f"python-start {py_s * 1e3:.0f} ms",
        flush=True,
    )
    figures: dict[str, Any] = {
        "baselines": {
            "sqlite_commit_ms": sqlite_ms,
            "grpc_unary_ms": grpc_ms,
            "python_start_s": py_s,
        }
    }
    ok = True
    if "embedded" in only:
        results = figures["workloads"] = bench_pipelines(opts.repeat)
        print(
            f"\n{'workload':10} {'ms/step':>9} {'target':>8} {'x sqlite-commit':>16} "
            f"{'x grpc-unary':>13}"
        )
        for name, r in results.items():
            ms = r["ms_per_step"]
            target = TARGETS_MS[name]
            ok &= ms <= target
            print(
                f"{name:10} {ms:9.3f} {target:8.1f} {ms / sqlite_ms:16.1f} {ms / grpc_ms:13.1f}"
                f"{'' if ms <= target else '  OVER TARGET'}"
            )
    if "cold" in only:
        cold = figures["cold_s"] = bench_cold(opts.repeat)
        ok &= cold <= TARGET_COLD_S
        print(
            f"{'cold':10} {cold * 1e3:8.0f}ms {TARGET_COLD_S * 1e3:6.0f}ms   "
            f"{cold / py_s:.1f} x python-start{'' if cold <= TARGET_COLD_S else '  OVER TARGET'}"
        )
    if "whole" in only:
        import whole  # benchmarks/whole.py

        figures["whole"] = whole.bench_whole(max(opts.repeat, 5))
        whole.report(figures["whole"])
    if "daemon" in only:
        daemon = figures["daemon"] = {"daemon, sqlite": bench_daemon(opts.repeat)}
        if pg_url:
            daemon["daemon, postgres"] = bench_daemon(opts.repeat, pg_url)
        print(
            f"\n{'through the daemon':18} {'chain ms/step':>14} {'fan-out ms/step':>16} "
            f"{'runs created/s':>15}"
        )
        if "workloads" in figures:
            results = figures["workloads"]
            print(
                f"{'embedded (above)':18} {results['chain']['ms_per_step']:14.3f} "
                f"{results['fan-out']['ms_per_step']:16.3f} {'':>15}"
            )
        for name, r in daemon.items():
            print(
                f"{name:18} {r['chain']['ms_per_step']:14.3f} "
                f"{r['fan-out']['ms_per_step']:16.3f} {r['runs_per_s']:15.0f}"
            )
    if "workers" in only:
        remote = figures["remote_workers"] = bench_workers(opts.repeat)
        rate = remote["steps_per_s"]
        p50, p99 = remote["dispatch_p50_ms"], remote["dispatch_p99_ms"]
        t = TARGETS_WORKERS
        ok &= (
            rate >= t["steps_per_s"] and p50 <= t["dispatch_p50_ms"] and p99 <= t["dispatch_p99_ms"]
        )
        print(
            f"\n{remote['workers']} remote workers (daemon, sqlite): {rate:.0f} steps/s "
            f"(target >= {t['steps_per_s']:.0f}) on a 1,000-step fan-out; dispatch latency "
            f"p50 {p50:.2f} ms (<= {t['dispatch_p50_ms']:g}), p99 {p99:.2f} ms "
            f"(<= {t['dispatch_p99_ms']:g}); {p50 / grpc_ms:.1f} x grpc-unary at p50"
        )
    if "load" in only:
        repeat = opts.repeat if only == ["load"] else 1
        load = figures["load"] = {"sqlite": bench_load(repeat)}
        if pg_url:
            load["postgres"] = bench_load(repeat, pg_url)
        print(
            f"\nload: {LOAD_RUNS} runs x 100 steps created at once, {LOAD_WORKERS} remote "
            f"workers, best of {repeat}; dispatch = QUEUED -> started, mostly the wait for a "
            f"free worker; (x) = against one run of the same pipeline alone, on the same daemon"
            f"\n{'store':9} {'wall s':>7} {'steps/s':>8} {'(x)':>6} {'ms/step':>8} "
            f"{'x grpc-unary':>13} {'dispatch p50 ms':>16} {'(x)':>6} {'p99 ms':>8}"
        )
        for name, r in load.items():
            ms, alone = 1e3 / r["steps_per_s"], r["alone"]
            print(
                f"{name:9} {r['wall_s']:7.2f} {r['steps_per_s']:8.0f} "
                f"{r['steps_per_s'] / alone['steps_per_s']:6.2f} {ms:8.2f} {ms / grpc_ms:13.1f} "
                f"{r['dispatch_p50_ms']:16.0f} "
                f"{r['dispatch_p50_ms'] / alone['dispatch_p50_ms']:6.1f} "
                f"{r['dispatch_p99_ms']:8.0f}"
            )
            print(
                f"{'  alone':9} {alone['wall_s']:7.2f} {alone['steps_per_s']:8.0f} {'':6} "
                f"{1e3 / alone['steps_per_s']:8.2f} {'':13} {alone['dispatch_p50_ms']:16.0f} "
                f"{'':6} {alone['dispatch_p99_ms']:8.0f}"
            )
            walls = ", ".join(f"{s['wall_s']:.2f}" for s in r["samples"])
            print(
                f"{'':9} the last of the {r['runs']} runs was created after "
                f"{r['created_s']:.2f} s; wall s of each try: {walls}"
            )
    if "docker" in only:
        registry = os.environ.get("PLAIT_TEST_REGISTRY", "")
        figures["docker"] = docker_bench.bench_docker(opts.repeat, docker_base, registry)
        ok &= docker_bench.report(figures["docker"])
    elif not opts.only:
        print(
            f"\n(docker: not run, it needs Docker and a base image: export {DOCKER_BASE}=$(bash "
            "scripts/docker.sh) PLAIT_TEST_REGISTRY=$(bash scripts/registry.sh), then "
            "benchmarks/run.py --only docker, or the default run includes it)"
        )
    if "dashboard" in only:
        figures["dashboard"] = dashboard_bench.bench_dashboard(opts.repeat)
        dashboard_bench.report(figures["dashboard"])
    elif not opts.only:
        import dashboard as dashboard_bench  # benchmarks/dashboard.py

        print(f"(dashboard: not run: {dashboard_bench.available()})")
    if ("daemon" in only or "load" in only) and not pg_url:
        print(
            "(no PostgreSQL: pass --postgres URL or set PLAIT_TEST_POSTGRES_URL, e.g. "
            "from scripts/postgres.sh)"
        )
    if opts.json:
        Path(opts.json).write_text(json.dumps(figures, indent=2) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
