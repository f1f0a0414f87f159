"""The `dashboard` group of benchmarks/run.py: how fast the dashboard shows a 1,000-step run, in
headless Chromium, beside a blank page of the same server measured in the same run.

Set-up: a daemon (`plait server start --foreground --dashboard-port N`, a fresh PLAIT_HOME,
SQLite, the local runner), a browser signed in with a one-time link (`plait dashboard
--no-browser`), Debian's chromium driven by Playwright (tests/chromium.py's flags).

  run page    a finished 1,000-step run (the no-op chain and the fan-out of workloads.py): from
              the navigation's start (performance.timeOrigin) until all 1,000 `g.dag-node`
              elements are in the DOM, and until all of them show SUCCEEDED; median of the loads.
              Each load is a new document (about:blank first), in the same browser context
  one step    the same for the run page of a one-step run: the page's own start-up
  blank       the baseline: the login page (`/login`, no session: no API call), from the
              navigation's start to its load event
  run JSON    GET /api/runs/RUN of the 1,000-step chain over HTTP (urllib, the session's cookie)
  runs list   GET /api/runs?page_size=50 over a store with --runs one-step runs (10,000 unless
              said; skipped with 0), beside GET /login over the same connection type
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
from chromium import CHROMIUM, CHROMIUM_ARGS  # noqa: E402  (the browser tests' launch)

STEPS = 1000
RUNS = 10_000
"""One-step runs in the store when GET /api/runs is timed."""


_WATCH = """
(() => {
  const want = %d;
  window.__plaitBench = {nodes: null, done: null};
  const check = (obs) => {
    const b = window.__plaitBench;
    if (b.nodes === null && document.querySelectorAll("g.dag-node").length >= want) {
      b.nodes = performance.now();
    }
    if (b.nodes !== null &&
        document.querySelectorAll('g.dag-node[data-status="SUCCEEDED"]').length >= want) {
      b.done = performance.now();
      obs.disconnect();
    }
  };
  const obs = new MutationObserver(() => check(obs));
  obs.observe(document, {childList: true, subtree: true, attributes: true,
                         attributeFilter: ["data-status"]});
})();
"""
"""Records, against the document's time origin (its navigation's start), when `want` nodes are
in the DOM and when all of them are SUCCEEDED."""


def available() -> str:
    """Why the group cannot run here ("" when it can)."""
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "Playwright is not installed (pip install -e '.[test]')"
    if not os.access(CHROMIUM, os.X_OK):
        return f"no Chromium at {CHROMIUM} (apt-get install chromium, or set PLAIT_TEST_CHROMIUM)"
    return ""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def _daemon(home: str) -> Iterator[tuple[str, str, dict[str, str], str]]:
    """A daemon with a dashboard: its address, admin token, client env and dashboard URL."""
    port, web = _free_port(), _free_port()
    env = {**os.environ, "PLAIT_HOME": home}
    for key in ("PLAIT_SERVER", "PLAIT_TOKEN", "PLAIT_TLS_CA"):
        env.pop(key, None)
    cmd = [sys.executable, "-m", "plait", "server", "start", "--foreground", "--port", str(port)]
    log = open(Path(home, "foreground.log"), "wb")  # noqa: SIM115 (closed below)
    proc = subprocess.Popen([*cmd, "--dashboard-port", str(web)], env=env, stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                raise RuntimeError(Path(home, "foreground.log").read_text())
            if Path(home, "server.pid").exists():
                with socket.socket() as s:
                    if s.connect_ex(("127.0.0.1", web)) == 0:
                        break
            assert time.monotonic() < deadline, "the daemon's dashboard did not start"
            time.sleep(0.05)
        token = json.loads(Path(home, "credentials.json").read_text())["token"]
        address = f"127.0.0.1:{port}"
        yield address, token, {**env, "PLAIT_SERVER": address}, f"http://127.0.0.1:{web}"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def _login_link(env: dict[str, str]) -> str:
    out = subprocess.run(
        [sys.executable, "-m", "plait", "dashboard", "--no-browser"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    found = re.search(r"https?://\S+/login\?code=[\w.~%-]+", out.stdout + out.stderr)
    if out.returncode or not found:
        raise RuntimeError(f"plait dashboard --no-browser: no login link in\n{out}")
    return found.group(0)


def _median(samples: list[float]) -> float:
    return statistics.median(samples)


def _recorded(page: Any, deadline: float = 300.0) -> dict[str, float]:
    """What the init script recorded, once the nodes are all there and SUCCEEDED. Polled from
    here (page.evaluate): the dashboard's CSP forbids the eval that wait_for_function needs;
    the times themselves are taken in the page."""
    end = time.monotonic() + deadline
    while True:
        got = page.evaluate("window.__plaitBench")
        if got and got["done"] is not None:
            return dict(got)
        assert time.monotonic() < end, f"the page did not show its nodes: {got}"
        time.sleep(0.05)


def _page_times(context: Any, url: str, want: int, loads: int) -> dict[str, Any]:
    """Loads `url` `loads` times (a new document each time, after a first unmeasured load):
    median ms from the navigation's start to `want` nodes in the DOM, and to all SUCCEEDED."""
    page = context.new_page()
    page.add_init_script(_WATCH % want)
    nodes, done = [], []
    try:
        for i in range(loads + 1):
            page.goto("about:blank")
            page.goto(url)
            got = _recorded(page)
            if i:  # the first load warms the server's and the browser's caches
                nodes.append(got["nodes"])
                done.append(got["done"])
    finally:
        page.close()
    return {
        "nodes_ms": _median(nodes),
        "statuses_ms": _median(done),
        "nodes_samples_ms": nodes,
        "statuses_samples_ms": done,
    }


def _blank_times(context: Any, url: str, loads: int) -> dict[str, Any]:
    """The login page (no session): median ms from the navigation's start to its load event."""
    page = context.new_page()
    samples = []
    try:
        for i in range(loads + 1):
            page.goto("about:blank")
            page.goto(url, wait_until="load")
            ms = page.evaluate("performance.getEntriesByType('navigation')[0].loadEventEnd")
            if i:
                samples.append(ms)
    finally:
        page.close()
    return {"ms": _median(samples), "samples_ms": samples}


def _http_ms(url: str, cookie: str, n: int) -> float:
    """Median ms of GET `url` with the session cookie (status 200 expected), after a warm-up."""
    request = urllib.request.Request(url, headers={"Cookie": cookie})
    samples = []
    for i in range(n + 1):
        t0 = time.perf_counter()
        with urllib.request.urlopen(request, timeout=120) as resp:
            resp.read()
            assert resp.status == 200, resp.status
        if i:
            samples.append((time.perf_counter() - t0) * 1e3)
    return _median(samples)


def _fill(client: Any, runs: int) -> float:
    """Creates `runs` one-step runs (4 client threads) and waits for them; returns seconds."""
    import workloads

    workloads.one_step.compile()

    def batch(n: int) -> None:
        ids = [
            workloads.one_step.run(client=client, no_cache=True, wait=False).run_id
            for _ in range(n)
        ]
        for rid in ids:
            client.wait(rid)

    t0 = time.perf_counter()
    sizes = [runs // 4 + (1 if i < runs % 4 else 0) for i in range(4)]
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(batch, sizes))
    return time.perf_counter() - t0


def bench_dashboard(repeat: int, runs: int = RUNS) -> dict[str, Any]:
    """The figures of the group (see the module's docstring); `repeat` page loads (at least
    5) per page, medians."""
    import workloads
    from playwright.sync_api import sync_playwright

    import plait

    loads = max(5, repeat)
    out: dict[str, Any] = {"loads": loads, "steps": STEPS}
    with (
        tempfile.TemporaryDirectory() as home,
        _daemon(home) as (address, token, env, web),
        sync_playwright() as pw,
    ):
        client = plait.Client(address, token=token)
        try:
            big = {}
            for name, pipe in (("chain", workloads.chain), ("fan-out", workloads.fan_out)):
                done = pipe.run(client=client, no_cache=True)
                assert done.status == "SUCCEEDED" and len(done.steps) == STEPS, done.status
                big[name] = done.run_id
            small = workloads.one_step.run(client=client, no_cache=True)
            assert small.status == "SUCCEEDED", small.status

            browser = pw.chromium.launch(
                executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True
            )
            try:
                viewport = {"width": 1400, "height": 900}
                anonymous = browser.new_context(viewport=viewport)
                out["blank"] = _blank_times(anonymous, f"{web}/login", loads)
                anonymous.close()
                signed = browser.new_context(viewport=viewport)
                page = signed.new_page()
                page.goto(_login_link(env))
                page.wait_for_url(lambda url: "/login" not in url)
                page.close()
                for name, run_id in big.items():
                    out[name] = _page_times(signed, f"{web}/#/runs/{run_id}", STEPS, loads)
                out["one-step"] = _page_times(signed, f"{web}/#/runs/{small.run_id}", 1, loads)
                cookie = "; ".join(f"{c['name']}={c['value']}" for c in signed.cookies())
                signed.close()
            finally:
                browser.close()

            n = 10 * loads
            out["http_login_ms"] = _http_ms(f"{web}/login", "", n)
            out["run_json_ms"] = _http_ms(f"{web}/api/runs/{big['chain']}", cookie, n)
            if runs:
                out["runs_in_store"] = runs + 3
                out["fill_s"] = _fill(client, runs)
                out["runs_list_ms"] = _http_ms(f"{web}/api/runs?page_size=50", cookie, n)
        finally:
            client.close()
    return out


def report(fig: dict[str, Any]) -> None:
    """Prints the group's figures, as ratios to the blank page measured in the same run."""
    blank = fig["blank"]["ms"]
    print(
        f"\ndashboard (headless Chromium, daemon on SQLite): median of {fig['loads']} loads; "
        f"(x) = against the blank page (the login page) of the same server, {blank:.0f} ms to "
        f"its load event\n{'run page':22} {'nodes in DOM ms':>16} {'(x)':>6} "
        f"{'all SUCCEEDED ms':>17} {'(x)':>6}"
    )
    for name in ("chain", "fan-out", "one-step"):
        r = fig[name]
        label = f"{fig['steps']:,}-step {name}" if name != "one-step" else "one-step run"
        print(
            f"{label:22} {r['nodes_ms']:16.0f} {r['nodes_ms'] / blank:6.1f} "
            f"{r['statuses_ms']:17.0f} {r['statuses_ms'] / blank:6.1f}"
        )
    http = fig["http_login_ms"]
    print(
        f"HTTP, median: GET /login {http:.1f} ms; GET /api/runs/RUN of the 1,000-step chain "
        f"{fig['run_json_ms']:.1f} ms ({fig['run_json_ms'] / http:.1f} x GET /login)"
    )
    if "runs_list_ms" in fig:
        print(
            f"GET /api/runs?page_size=50 over {fig['runs_in_store']:,} runs: "
            f"{fig['runs_list_ms']:.1f} ms ({fig['runs_list_ms'] / http:.1f} x GET /login); "
            f"the runs took {fig['fill_s']:.0f} s to create and finish"
        )


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    figures = bench_dashboard(3, int(sys.argv[1]) if len(sys.argv) > 1 else RUNS)
    report(figures)
