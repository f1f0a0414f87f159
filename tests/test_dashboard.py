"""The dashboard's HTTP side against a real daemon: the doors (sign-in by one-time link or token,
sessions, CSRF and same-origin checks, roles), the limits and a fuzz of its endpoints, and what
the JSON says about runs, steps, artifacts, pipelines, stacks and builds. (The pages themselves
are driven in a browser by tests/test_dashboard_browser.py.)"""

from __future__ import annotations

import http.cookiejar
import json
import os
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_daemon import free_port
from test_security import Daemon

from plait.engine.dashboard import _views as views
from plait.ir.v1 import ir_pb2

PLAIT = str(Path(sys.executable).parent / "plait")

FLOW = """\
import numpy as np
import pandas as pd

import plait


@plait.step
def numbers(n: int) -> list[int]:
    print("making", n, "numbers")
    return list(range(n))


@plait.step
def table(xs: list[int]) -> pd.DataFrame:
    return pd.DataFrame({"x": xs, "y": [v * 2 for v in xs]})


@plait.step
def array(xs: list[int]) -> np.ndarray:
    return np.arange(len(xs) * 3).reshape(len(xs), 3)


@plait.step
def boom(xs: list[int]) -> int:
    raise ValueError("the branch fails")


@plait.step
def double(x: int) -> int:
    return 2 * x


@plait.pipeline
def flow(n: int = 3) -> None:
    xs = numbers(n)
    table(xs)
    array(xs)
    boom(xs)
    double.map(xs)
"""


class Browser:
    """An HTTP client with a cookie jar, as a browser of the dashboard is."""

    def __init__(self, base: str) -> None:
        self.base = base
        self.jar = http.cookiejar.CookieJar()
        self.opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(self.jar))
        self.csrf = ""

    def request(
        self,
        path: str,
        *,
        method: str = "GET",
        data: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, bytes, Any]:
        req = urllib.request.Request(
            self.base + path, data=data, method=method, headers=headers or {}
        )
        try:
            with self.opener.open(req, timeout=60) as resp:
                return resp.status, resp.read(), resp.headers
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read(), exc.headers

    def get(self, path: str) -> tuple[int, Any]:
        status, body, headers = self.request(path)
        if headers.get("Content-Type", "").startswith("application/json"):
            return status, json.loads(body)
        return status, body

    def post(self, path: str, *, csrf: bool = True, origin: str | None = None) -> tuple[int, Any]:
        headers = {"Origin": self.base if origin is None else origin}
        if csrf:
            headers["X-Plait-CSRF"] = self.csrf
        status, body, _ = self.request(path, method="POST", data=b"", headers=headers)
        return status, json.loads(body)

    def sign_in(self, link: str) -> int:
        status, _, _ = self.request(link.removeprefix(self.base))
        if status == 200:
            self.csrf = self.get("/api/session")[1].get("csrf", "")
        return status

    def sign_in_with_token(self, token: str) -> tuple[int, bytes]:
        data = urllib.parse.urlencode({"token": token}).encode()
        status, body, _ = self.request(
            "/login",
            method="POST",
            data=data,
            headers={
                "Origin": self.base,
                "Content-Type": "application/x-www-form-urlencoded",
            },
        )
        if status == 200 and b"token-form" not in body:
            self.csrf = self.get("/api/session")[1].get("csrf", "")
        return status, body


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Daemon, str, str]]:
    """A daemon with a dashboard, a run of FLOW (failed: one branch raises), the URL."""
    tmp = tmp_path_factory.mktemp("dashboard")
    port = free_port()
    daemon = Daemon(tmp / "home", "--dashboard-port", str(port))
    try:
        project = tmp / "project"
        project.mkdir()
        (project / "flow.py").write_text(FLOW)
        out = subprocess.run(
            [PLAIT, "run", "flow.py:flow"],
            env=daemon.client_env(),
            cwd=project,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert out.returncode == 1, out.stdout + out.stderr  # the failing branch
        runs = subprocess.run(
            [PLAIT, "runs", "list", "--output", "json"],
            env=daemon.client_env(),
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        run_id = json.loads(runs.stdout)["runs"][0]["run_id"]
        yield daemon, f"http://127.0.0.1:{port}", run_id
    finally:
        daemon.stop()


def login_link(daemon: Daemon) -> str:
    out = subprocess.run(
        [PLAIT, "dashboard", "--no-browser"],
        env=daemon.env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


@pytest.fixture
def browser(served: tuple[Daemon, str, str]) -> Browser:
    daemon, base, _ = served
    b = Browser(base)
    assert b.sign_in(login_link(daemon)) == 200
    return b


# ---- the doors ----

API = [
    "/api/session",
    "/api/runs",
    "/api/runs/RUN",
    "/api/runs/RUN/events",
    "/api/runs/RUN/logs",
    "/api/runs/RUN/steps/numbers",
    "/api/artifacts/abc/preview",
    "/api/artifacts/abc/download",
    "/api/pipelines",
    "/api/pipelines/flow/versions",
    "/api/versions/abc",
    "/api/versions/a/diff/b",
    "/api/stacks",
    "/api/builds",
]


def test_every_endpoint_needs_a_session(served: tuple[Daemon, str, str]) -> None:
    _, base, run_id = served
    anonymous = Browser(base)
    for path in API:
        status, doc = anonymous.get(path.replace("RUN", run_id))
        assert status == 401, path
        assert doc["login"] == "/login" and "sign in" in doc["error"], path
    for path in ("/api/runs/RUN/cancel", "/api/runs/RUN/retry"):
        status, doc = anonymous.post(path.replace("RUN", run_id))
        assert status == 401, path
    # a login link is only for the bearer of a valid token
    for headers in ({}, {"Authorization": "Bearer not-a-token"}):
        status, body, _ = anonymous.request(
            "/api/login-codes", method="POST", data=b"", headers=headers
        )
        assert status == 401 and b"token" in body, headers
    # the page itself sends a browser with no session to sign in
    status, body, _ = anonymous.request("/")
    assert status == 200 and b'id="token-form"' in body


def test_a_login_link_works_once(served: tuple[Daemon, str, str]) -> None:
    daemon, base, _ = served
    link = login_link(daemon)
    first, second = Browser(base), Browser(base)
    assert first.sign_in(link) == 200
    assert first.get("/api/session")[1]["role"] == "admin"
    assert second.sign_in(link) == 401  # used: the page says so
    assert second.get("/api/session")[0] == 401
    assert Browser(base).sign_in(f"{base}/login?code=made-up") == 401


def test_a_token_signs_in_and_its_role_is_the_apis(served: tuple[Daemon, str, str]) -> None:
    daemon, base, run_id = served
    env = daemon.client_env()

    def token(*args: str) -> str:
        return subprocess.run(
            [PLAIT, "token", "create", *args], env=env, capture_output=True, text=True,
            timeout=60, check=True,
        ).stdout.strip()  # fmt: skip

    user = Browser(base)
    status, _ = user.sign_in_with_token(token("alice"))
    assert status == 200 and user.get("/api/session")[1]["role"] == "user"
    status, doc = user.get(f"/api/runs/{run_id}")
    assert status == 200 and doc["can_retry"] and not doc["can_cancel"]
    worker = Browser(base)
    status, body = worker.sign_in_with_token(token("w", "--role", "worker"))
    assert status == 403 and b"worker token cannot use the dashboard" in body
    assert worker.get("/api/runs")[0] == 401
    status, body = Browser(base).sign_in_with_token("not-a-token")
    assert status == 401 and b"unknown or revoked" in body


def test_a_state_changing_request_needs_the_csrf_secret_and_the_same_origin(
    served: tuple[Daemon, str, str], browser: Browser
) -> None:
    _, _, run_id = served
    status, doc = browser.post(f"/api/runs/{run_id}/retry", csrf=False)
    assert status == 403 and "X-Plait-CSRF" in doc["error"]
    status, doc = browser.post(f"/api/runs/{run_id}/retry", origin="http://evil.example")
    assert status == 403 and "cross-origin" in doc["error"]
    status, doc = browser.post(f"/api/runs/{run_id}/cancel")  # it ended: nothing to cancel
    assert status == 200 and doc["cancelled"] is False


def test_limits_are_kept_and_errors_are_json(browser: Browser) -> None:
    status, doc = browser.get("/api/runs/" + "a" * 3000)
    assert status == 414 and "longer than" in doc["error"]
    status, doc = browser.get("/api/runs?pipeline=" + "p" * 2000)
    assert status == 400 and "pipeline" in doc["error"]
    status, doc = browser.get("/api/runs?page_size=100000")
    assert status == 400 and "page_size" in doc["error"]
    status, doc = browser.get("/api/runs?since=yesterday")
    assert status == 400 and "ISO 8601" in doc["error"]
    status, doc = browser.get("/api/runs/0000000000000000")
    assert status == 404 and doc["code"] == "NOT_FOUND"
    status, _body, _ = browser.request(
        "/login",
        method="POST",
        data=b"token=" + b"x" * 20_000,
        headers={"Origin": browser.base, "Content-Type": "application/x-www-form-urlencoded"},
    )
    assert status == 413
    status, _, _ = browser.request("/static/../../etc/passwd")
    assert status == 404


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    path=st.lists(
        st.text(alphabet=st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=40),
        max_size=6,
    ),
    query=st.dictionaries(st.sampled_from(["page_size", "status", "since", "step", "after",
                                           "pipeline", "page_token", "until", "code"]),
                          st.text(max_size=60), max_size=4),
    method=st.sampled_from(["GET", "POST", "PUT", "DELETE"]),
)  # fmt: skip
def test_fuzzed_requests_fail_only_themselves(
    browser: Browser, path: list[str], query: dict[str, str], method: str
) -> None:
    """Any path, query and method under /api/ gets an answer below 500, as JSON, and the
    dashboard keeps serving."""
    quoted = "/".join(urllib.parse.quote(p, safe="") for p in path)
    url = f"/api/{quoted}?{urllib.parse.urlencode(query)}"
    headers = {"Origin": browser.base, "X-Plait-CSRF": browser.csrf}
    data = b"{}" if method != "GET" else None
    status, body, _ = browser.request(url, method=method, data=data, headers=headers)
    assert status < 500, (url, method, status, body[:300])
    if status >= 400 and body:
        assert "error" in json.loads(body)
    assert browser.get("/api/session")[0] == 200


# ---- what the JSON says ----


def test_runs_filter_and_page(served: tuple[Daemon, str, str], browser: Browser) -> None:
    _, _, run_id = served
    status, doc = browser.get("/api/runs?status=FAILED&pipeline=flow")
    assert status == 200 and [r["run_id"] for r in doc["runs"]] == [run_id]
    assert browser.get("/api/runs?status=SUCCEEDED")[1]["runs"] == []
    assert browser.get("/api/runs?since=2999-01-01T00:00:00Z")[1]["runs"] == []
    assert len(browser.get("/api/runs?until=2999-01-01T00:00:00Z")[1]["runs"]) == 1
    page = browser.get("/api/runs?page_size=1")[1]
    assert len(page["runs"]) == 1


def test_a_run_has_its_graph_and_steps(served: tuple[Daemon, str, str], browser: Browser) -> None:
    _, _, run_id = served
    status, doc = browser.get(f"/api/runs/{run_id}")
    assert status == 200
    assert doc["run"]["status"] == "FAILED" and doc["can_retry"] and not doc["can_cancel"]
    layers = {n["id"]: n["layer"] for n in doc["graph"]["nodes"]}
    assert layers == {"numbers": 0, "table": 1, "array": 1, "boom": 1, "double": 1}
    assert ["numbers", "boom"] in doc["graph"]["edges"]
    steps = {s["step_id"]: s for s in doc["steps"]}
    assert steps["boom"]["status"] == "FAILED"
    assert "the branch fails" in steps["boom"]["error"]["traceback"]
    assert steps["double[2]"]["parent"] == "double" and steps["double"]["parent"] is None
    # an output a map iterates lists the list, not its items
    assert [o["output"] for o in steps["numbers"]["outputs"]] == ["output"]


def test_a_step_panel_has_inputs_attempts_and_why(
    served: tuple[Daemon, str, str], browser: Browser
) -> None:
    _, _, run_id = served
    status, doc = browser.get(f"/api/runs/{run_id}/steps/boom")
    assert status == 200
    assert doc["inputs"] == [
        {
            "name": "xs",
            "type": "list[int]",
            "source": "output",
            "value": None,
            "step_id": "numbers",
            "output": "output",
            "mapped": False,
        }
    ]
    (attempt,) = doc["attempts"]
    assert attempt["attempt"] == 1 and attempt["status"] == "FAILED"
    assert doc["explain"]["reason"]
    status, doc = browser.get(f"/api/runs/{run_id}/steps/{urllib.parse.quote('double[1]')}")
    assert status == 200 and doc["inputs"][0]["source"] == "item"


def test_previews_and_downloads(served: tuple[Daemon, str, str], browser: Browser) -> None:
    _daemon, _, run_id = served
    steps = {s["step_id"]: s for s in browser.get(f"/api/runs/{run_id}")[1]["steps"]}

    def artifact(step: str) -> dict[str, Any]:
        (out,) = steps[step]["outputs"]
        return dict(out)

    preview = browser.get(f"/api/artifacts/{artifact('numbers')['artifact_id']}/preview")[1]
    assert preview == {"kind": "json", "data": [0, 1, 2], "truncated": False}
    table = browser.get(f"/api/artifacts/{artifact('table')['artifact_id']}/preview")[1]
    assert table["kind"] == "table" and table["data"]["columns"] == ["x", "y"]
    assert table["data"]["rows"] == [[0, 0], [1, 2], [2, 4]] and table["data"]["shape"] == [3, 2]
    array = browser.get(f"/api/artifacts/{artifact('array')['artifact_id']}/preview")[1]
    assert array["kind"] == "array" and array["data"]["shape"] == [3, 3]
    assert array["data"]["values"][2] == [6, 7, 8]
    out = artifact("numbers")
    status, body, headers = browser.request(out["download"])
    assert status == 200 and "attachment" in headers["Content-Disposition"]
    assert len(body) == out["size_bytes"]
    import hashlib

    assert hashlib.sha256(body).hexdigest() == out["digest"]


def test_events_and_logs_stream_and_end(served: tuple[Daemon, str, str], browser: Browser) -> None:
    _, _, run_id = served
    status, body, headers = browser.request(f"/api/runs/{run_id}/events")
    assert status == 200 and headers["Content-Type"].startswith("text/event-stream")
    text = body.decode()
    assert text.endswith("event: end\ndata: {}\n\n")
    events = [json.loads(line[6:]) for line in text.splitlines() if line.startswith('data: {"')]
    assert events[-1]["run_status"] == "FAILED"
    assert {"step_id": "boom", "step_status": "FAILED"}.items() <= next(
        e for e in events if e["step_id"] == "boom" and e["step_status"] == "FAILED"
    ).items()
    status, body, _ = browser.request(f"/api/runs/{run_id}/logs?step=numbers")
    assert status == 200 and "making 3 numbers" in body.decode()


def test_pipelines_versions_and_a_diff(browser: Browser) -> None:
    pipelines = browser.get("/api/pipelines")[1]["pipelines"]
    (flow,) = [p for p in pipelines if p["name"] == "flow"]
    versions = browser.get("/api/pipelines/flow/versions")[1]["versions"]
    assert [v["version"] for v in versions] == [flow["latest_version"]]
    version = browser.get(f"/api/versions/{flow['latest_version']}")[1]
    assert version["pipeline"] == "flow" and len(version["ir"]["steps"]) == 5
    diff = browser.get(f"/api/versions/{flow['latest_version']}/diff/{flow['latest_version']}")
    assert diff[1]["added"] == [] and diff[1]["changed"] == []


def test_stacks_and_builds(browser: Browser) -> None:
    stacks = browser.get("/api/stacks")[1]
    assert any(s["name"] == "default" and s["active"] for s in stacks["stacks"])
    assert browser.get("/api/builds") == (200, {"builds": []})


# ---- starting and not starting it ----


def test_no_dashboard_and_a_taken_port(tmp_path: Path) -> None:
    daemon = Daemon(tmp_path / "off", "--no-dashboard")
    try:
        assert not (daemon.home / "dashboard.json").exists()
        out = subprocess.run(
            [PLAIT, "dashboard", "--no-browser"], env=daemon.env, capture_output=True, text=True,
            timeout=60,
        )  # fmt: skip
        assert out.returncode != 0 and "serves no dashboard" in out.stderr
    finally:
        daemon.stop()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = {**os.environ, "PLAIT_HOME": str(tmp_path / "t")}
        env.pop("PLAIT_SERVER", None)
        out = subprocess.run(
            [PLAIT, "server", "start", "--foreground", "--port", str(free_port()),
             "--dashboard-port", str(port)],
            env=env, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert out.returncode != 0
        assert f"cannot serve the dashboard on 127.0.0.1:{port}" in out.stderr


# ---- pure parts ----


def test_layout_puts_each_step_after_its_longest_upstream_path() -> None:
    spec = ir_pb2.PipelineSpec(name="p")
    for step_id, ups in (("a", []), ("b", ["a"]), ("c", ["a", "b"]), ("d", [])):
        s = spec.steps.add(id=step_id)
        for u in ups:
            s.inputs.add(name=u, binding=ir_pb2.Binding(output=ir_pb2.OutputRef(step_id=u)))
    graph = views.layout(spec)
    assert graph["nodes"] == [
        {"id": "a", "layer": 0, "row": 0},
        {"id": "b", "layer": 1, "row": 0},
        {"id": "c", "layer": 2, "row": 0},
        {"id": "d", "layer": 0, "row": 1},
    ]
    assert graph["edges"] == [["a", "b"], ["a", "c"], ["b", "c"]]


def test_secret_like_values_are_masked() -> None:
    assert views.masked({"uri": "r:5000", "password": "p", "api_key": "k", "token": ""}) == {
        "uri": "r:5000",
        "password": views.MASK,
        "api_key": views.MASK,
        "token": "",
    }


def test_previews_are_cut() -> None:
    long = views.preview("x" * (views.PREVIEW_CHARS + 10))
    assert long["kind"] == "text" and long["truncated"] and len(long["data"]) == views.PREVIEW_CHARS
    assert views.preview({"a": (1, 2), "b": float("nan")})["data"] == {"a": [1, 2], "b": "nan"}
    assert views.preview(b"raw")["kind"] == "none"


def test_the_url_file_is_private_and_goes_with_the_daemon(tmp_path: Path) -> None:
    port = free_port()
    daemon = Daemon(tmp_path / "home", "--dashboard-port", str(port))
    try:
        url_file = daemon.home / "dashboard.json"
        assert url_file.stat().st_mode & 0o777 == 0o600
        assert json.loads(url_file.read_text())["url"] == f"http://127.0.0.1:{port}"
    finally:
        daemon.stop()
    assert not url_file.exists()


def test_without_auth_on_loopback_every_browser_is_signed_in(tmp_path: Path) -> None:
    port = free_port()
    daemon = Daemon(tmp_path / "home", "--no-auth", "--dashboard-port", str(port))
    try:
        anyone = Browser(f"http://127.0.0.1:{port}")
        status, doc = anyone.get("/api/session")
        assert status == 200 and doc["role"] == "admin"
        anyone.csrf = doc["csrf"]
        assert anyone.get("/api/runs") == (200, {"runs": [], "next_page_token": ""})
        # state changes still need the CSRF secret and the same origin
        status, _ = anyone.post("/api/runs/abc/cancel", origin="http://evil.example")
        assert status == 403
    finally:
        daemon.stop()


def test_a_step_that_ran_again_says_what_changed(
    served: tuple[Daemon, str, str], browser: Browser, tmp_path: Path
) -> None:
    """(Last: it adds a run.) The step panel of a step whose key changed lists the difference."""
    daemon, _, _ = served
    project = tmp_path / "again"
    project.mkdir()
    (project / "flow.py").write_text(FLOW)
    subprocess.run(
        [PLAIT, "run", "flow.py:flow", "-p", "n=4"], env=daemon.client_env(), cwd=project,
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    newest = browser.get("/api/runs?page_size=1")[1]["runs"][0]["run_id"]
    status, doc = browser.get(f"/api/runs/{newest}/steps/numbers")
    assert status == 200, doc
    (difference,) = doc["explain"]["differences"]
    assert difference == {"component": "parameter", "name": "n", "now": "4", "before": "3"}


def test_the_dashboard_example_runs(tmp_path: Path) -> None:
    """examples/dashboard/run.sh: a daemon, a run, a login link, the run read through it."""
    import processes

    script = Path(__file__).resolve().parent.parent / "examples" / "dashboard" / "run.sh"
    env = {**os.environ, "PLAIT_HOME": str(tmp_path / "home"), "PLAIT_BIN": str(Path(PLAIT).parent)}
    out = processes.run(["bash", script], env=env, cwd=tmp_path, timeout=180)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "load mapped over 4 files" in out.stdout
    assert not (tmp_path / "home" / "server.pid").exists()  # the daemon was stopped
