"""The dashboard in a real browser (headless Chromium, Playwright) against a real daemon: a run
with a failing branch watched live on its run page (graph statuses, the failed step's traceback,
a log line while its step runs, an output downloaded through the page), signing in (the
one-time link, the token form), the runs list's filters and pages, pipeline versions and
their diff, the stacks page. docs/dashboard-api.md is the contract the pages keep.

Screenshots go to $PLAIT_TEST_ARTIFACTS (default test-artifacts/): the run page always, any
page a test failed on.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from browser import (
    WAIT_MS,
    DashboardDaemon,
    chromium,
    dashboard,
    expect,
    screenshot,
    screenshot_on_failure,
    session,
    submit_token,
    wait_signed_in,
)
from processes import run
from test_security import PLAIT

import plait
from plait.cli._common import load_pipeline

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Locator, Page

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

# ---- pipelines (module files written into each test's project, run through the daemon) ----

FIRST = "chatty started"
LINE = "chatty is waiting for the flag"

FLOW = f'''\
import time
from pathlib import Path

import plait


@plait.step
def root(n: int) -> int:
    return n


@plait.step
def explode(x: int) -> int:
    raise ValueError(f"the failing branch got {{x}}")


@plait.step
def after_explode(x: int) -> int:
    return x


def _wait_for(path: str) -> None:
    while not Path(path).exists():
        time.sleep(0.05)


@plait.step
def chatty(x: int, flag: str) -> int:
    print("{FIRST}", flush=True)
    _wait_for(flag + ".go")  # the test has the step's panel open
    print("{LINE}", flush=True)
    _wait_for(flag)  # the test saw the line on the page
    return x + 1


@plait.step
def summary(x: int) -> dict[str, object]:
    return {{"total": x, "items": [1, 2, 3], "label": "réponse"}}


@plait.pipeline
def flow(n: int, flag: str) -> None:
    x = root(n)
    after_explode(explode(x))
    summary(chatty(x, flag))
'''

FINAL = {
    "root": "SUCCEEDED",
    "explode": "FAILED",
    "after_explode": "SKIPPED",
    "chatty": "SUCCEEDED",
    "summary": "SUCCEEDED",
}

ONE = """\
import time
from pathlib import Path

import plait


@plait.step(cache=False)
def work(i: int, fail: bool, hold: str) -> int:
    while hold and not Path(hold).exists():  # a test holds the run here
        time.sleep(0.05)
    if fail:
        raise RuntimeError(f"run {i} fails")
    return i


@plait.pipeline
def one(i: int, fail: bool = False, hold: str = "") -> None:
    work(i, fail, hold)
"""

WIDE = """\
import plait


@plait.step
def leaf(i: int) -> int:
    return i


@plait.pipeline
def wide(n: int = 2) -> None:
    for i in range(n):
        leaf(i, id=f"leaf_{i}")
"""


def project(tmp_path: Path, module: str, source: str) -> Path:
    """A source root holding `source` as MODULE.py (named per test: a module of the same name
    another test loaded stays in sys.modules); returns the file."""
    root = tmp_path / "project"
    root.mkdir(exist_ok=True)
    (root / "pyproject.toml").write_text('[project]\nname = "dashboard-test"\n')
    file = root / (module + "_" + re.sub(r"\W", "_", tmp_path.name) + ".py")
    file.write_text(source)
    return file


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    """One headless Chromium for the module; each test opens contexts of its own."""
    with chromium() as b:
        yield b


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[DashboardDaemon]:
    with dashboard(tmp_path / "home") as d:
        yield d


@pytest.fixture
def client(daemon: DashboardDaemon) -> Iterator[plait.Client]:
    c = plait.Client(daemon.address, token=daemon.credential)
    try:
        yield c
    finally:
        c.close()


def node(page: Page, step: str) -> Locator:
    return page.locator(f'svg#dag g.dag-node[data-step-id="{step}"]')


def open_step(page: Page, step: str) -> Locator:
    """Clicks the step's node (after closing the panel of another one: it may cover the
    graph); returns its panel once it shows that step."""
    close = page.locator("#step-panel a.close")
    if close.is_visible():
        close.click()
        expect(page.locator("#step-panel")).to_be_hidden()
    node(page, step).click()
    panel = page.locator("#step-panel")
    expect(panel).to_have_attribute("data-step-id", step, timeout=WAIT_MS)
    return panel


# ---- the run page ----


def test_run_page_follows_a_run_with_a_failing_branch(
    browser: Browser, tmp_path: Path, daemon: DashboardDaemon, client: plait.Client
) -> None:
    file = project(tmp_path, "flow", FLOW)
    flag, go = tmp_path / "flag", tmp_path / "flag.go"
    out = run(
        [PLAIT, "run", f"{file}:flow", "--detach", "-p", "n=3", "-p", f"flag={flag}"],
        env=daemon.client_env(),
        cwd=file.parent,
    )
    assert out.returncode == 0, out.stderr
    run_id = out.stdout.strip().splitlines()[-1]

    ctx, page = daemon.signed_in(browser)
    try:
        with screenshot_on_failure(page, "run-page"):
            page.goto(f"/#/runs/{run_id}")
            expect(page.locator("svg#dag g.dag-node")).to_have_count(len(FINAL), timeout=WAIT_MS)
            # live: chatty runs and waits for the flag, its line shows in its panel's log
            expect(node(page, "chatty")).to_have_attribute("data-status", "RUNNING")
            expect(page.locator("#run-status")).to_have_attribute("data-status", "RUNNING")
            expect(page.locator("button#cancel-run")).to_be_visible()  # an admin's session
            open_step(page, "chatty")
            logs = page.locator("pre#step-logs")
            expect(logs).to_contain_text(FIRST)  # what it printed before the panel opened
            expect(logs).not_to_contain_text(LINE)  # it cannot have printed that yet
            go.touch()
            expect(logs).to_contain_text(LINE)  # it appears live, the step still RUNNING:
            expect(node(page, "chatty")).to_have_attribute("data-status", "RUNNING")
            assert not flag.exists()  # it cannot end before this flag is up
            flag.touch()

            # the run ends; the graph follows it without a reload
            expect(page.locator("#run-status")).to_have_attribute(
                "data-status", "FAILED", timeout=WAIT_MS
            )
            for step, status in FINAL.items():
                expect(node(page, step)).to_have_attribute("data-status", status, timeout=WAIT_MS)
            done = client.get_run(run_id)
            assert {k: str(s.status) for k, s in done.steps.items()} == FINAL
            expect(page.locator("button#retry-run")).to_be_visible()
            expect(page.locator("button#cancel-run")).to_be_hidden()

            # an output, downloaded through the page: the stored bytes
            panel = open_step(page, "summary")
            output = panel.locator('#step-outputs .output[data-output="output"]')
            expect(output.locator(".preview")).to_contain_text("total")
            with page.expect_download(timeout=WAIT_MS) as info:
                output.locator("a.download").click()
            downloaded = Path(info.value.path()).read_bytes()
            artifact = done.steps["summary"].outputs["output"]
            assert downloaded == client.download_artifact(artifact.artifact_id)
            assert len(downloaded) == artifact.size
            saved = tmp_path / "artifact"
            got = run(
                [PLAIT, "artifacts", "get", artifact.artifact_id, "-o", saved],
                env=daemon.client_env(),
            )
            assert got.returncode == 0, got.stderr
            assert saved.read_bytes() == downloaded
            assert json.loads(downloaded) == {"total": 4, "items": [1, 2, 3], "label": "réponse"}

            # the failed step: its traceback, from the step's code
            panel = open_step(page, "explode")
            traceback = panel.locator("#step-error pre.traceback")
            expect(traceback).to_contain_text("ValueError: the failing branch got 3")
            expect(traceback).to_contain_text('raise ValueError(f"the failing branch got {x}")')
            expect(traceback).to_contain_text(file.name)
            screenshot(page, "run-page")
    finally:
        go.touch()  # a failed test leaves no step waiting: the daemon stops at once
        flag.touch()
        ctx.close()


# ---- signing in ----


def test_a_login_link_signs_in_once(browser: Browser, daemon: DashboardDaemon) -> None:
    link = daemon.login_link()
    first = daemon.context(browser)
    again = daemon.context(browser)
    try:
        page = first.new_page()
        page.goto(link)
        wait_signed_in(page)
        status, me = session(first)
        assert status == 200 and me["role"] == "admin", me
        # the same link in another browser: refused, that browser is not signed in
        other = again.new_page()
        other.goto(link)
        other.wait_for_load_state()
        assert "plait_session" not in {c["name"] for c in again.cookies()}
        status, body = session(again)
        assert status == 401, body
        assert body["login"] == "/login"
        # nor is a made-up code accepted
        other.goto("/login?code=not-a-code")
        assert session(again)[0] == 401
        # the first browser is still signed in
        assert session(first)[0] == 200
    finally:
        first.close()
        again.close()


def test_the_token_form_signs_in_a_user_who_may_retry_and_cancel_and_refuses_a_bad_token(
    browser: Browser, tmp_path: Path, daemon: DashboardDaemon, client: plait.Client
) -> None:
    pipe = load_pipeline(f"{project(tmp_path, 'one', ONE)}:one")
    failed = client.run_pipeline(pipe, {"i": 1, "fail": True})
    assert failed.status == "FAILED"
    hold = tmp_path / "hold"
    user = daemon.token("create", "alice")

    ctx, page, answer = daemon.signed_in_with_token(browser, user)
    try:
        with screenshot_on_failure(page, "token-form-user"):
            assert answer < 400, answer
            wait_signed_in(page)
            status, me = session(ctx)
            assert status == 200 and me["role"] == "user", me
            page.goto("/#/runs")
            expect(page.locator(f'tr.run-row[data-run-id="{failed.run_id}"]')).to_have_attribute(
                "data-status", "FAILED"
            )
            # a user may retry a run: the button shows on the failed run's page, and works
            page.goto(f"/#/runs/{failed.run_id}")
            expect(page.locator("#run-status")).to_have_attribute("data-status", "FAILED")
            expect(page.locator("button#cancel-run")).to_be_hidden()
            page.locator("button#retry-run").click()
            page.wait_for_url(lambda url: failed.run_id not in url)
            retried = page.url.rsplit("/", 1)[-1]
            expect(page.locator("#run-status")).to_have_attribute("data-status", "FAILED")
            again = client.get_run(retried)
            assert again.retry_of == failed.run_id and again.status == "FAILED", again

            # and cancel one: the button shows while it runs
            held = client.run_pipeline(pipe, {"i": 2, "hold": str(hold)}, wait=False)
            page.goto(f"/#/runs/{held.run_id}")
            expect(page.locator("#run-status")).to_have_attribute("data-status", "RUNNING")
            page.locator("button#cancel-run").click()
            expect(page.locator("#run-status")).to_have_attribute("data-status", "CANCELLED")
            expect(page.locator("button#cancel-run")).to_be_hidden()
            assert client.wait(held.run_id).status == "CANCELLED"
    finally:
        hold.touch()
        ctx.close()

    ctx = daemon.context(browser)
    try:
        page = ctx.new_page()
        with screenshot_on_failure(page, "token-form-bad"):
            answer = submit_token(page, "plait_000000000000_secret")
            page.wait_for_load_state()
            # refused: an error status, or back to the login page; no session either way
            assert answer >= 400 or "/login" in page.url, (answer, page.url)
            assert session(ctx)[0] == 401
            assert "plait_session" not in {c["name"] for c in ctx.cookies()}
    finally:
        ctx.close()


def test_a_worker_token_does_not_show_runs(
    browser: Browser, tmp_path: Path, daemon: DashboardDaemon, client: plait.Client
) -> None:
    file = project(tmp_path, "one", ONE)
    done = client.run_pipeline(load_pipeline(f"{file}:one"), {"i": 1})
    assert done.status == "SUCCEEDED"
    worker = daemon.token("create", "box", "--role", "worker")
    ctx, page, _ = daemon.signed_in_with_token(browser, worker)
    try:
        with screenshot_on_failure(page, "token-form-worker"):
            page.wait_for_load_state()
            # the server may refuse the sign-in or the runs; either way no run reaches the page
            listing = ctx.request.get("/api/runs")
            assert listing.status in (401, 403), listing.text()
            one = ctx.request.get(f"/api/runs/{done.run_id}")
            assert one.status in (401, 403), one.text()
            if "/login" not in page.url:
                with page.expect_response(lambda r: "/api/runs" in r.url) as answer:
                    page.goto("/#/runs")
                assert answer.value.status in (401, 403)
            expect(page.locator("tr.run-row")).to_have_count(0)
    finally:
        ctx.close()


# ---- the runs list ----


def select_filter(page: Page, selector: str, value: str) -> None:
    """Sets a filter, whether it is a <select> or an <input>."""
    field = page.locator(selector)
    if field.evaluate("e => e.tagName") == "SELECT":
        field.select_option(value)
    else:
        field.fill(value)
        field.press("Enter")


def run_ids(page: Page) -> list[str]:
    return [
        str(r)
        for r in page.locator("tr.run-row").evaluate_all("rows => rows.map(r => r.dataset.runId)")
    ]


def test_the_runs_list_filters_by_status_and_pages(
    browser: Browser, tmp_path: Path, daemon: DashboardDaemon, client: plait.Client
) -> None:
    pipe = load_pipeline(f"{project(tmp_path, 'one', ONE)}:one")
    failing = {7, 30, 51}
    started = [
        client.run_pipeline(pipe, {"i": i, "fail": i in failing}, wait=False).run_id
        for i in range(60)
    ]
    ended = {rid: client.wait(rid).status for rid in started}
    failed = {rid for rid, status in ended.items() if status == "FAILED"}
    assert len(failed) == 3 and len(ended) == 60, ended

    ctx, page = daemon.signed_in(browser)
    try:
        with screenshot_on_failure(page, "runs-list"):
            page.goto("/#/runs")
            rows = page.locator("table#runs-table tr.run-row")
            expect(rows).to_have_count(50)  # a page holds 50 runs, the newest first
            first_page = run_ids(page)
            assert first_page[0] == started[-1]
            page.locator("#next-page").click()
            expect(rows).to_have_count(10)
            assert sorted(first_page + run_ids(page)) == sorted(started)
            page.locator("#prev-page").click()
            expect(rows).to_have_count(50)
            assert run_ids(page) == first_page

            select_filter(page, "#filter-status", "FAILED")
            expect(rows).to_have_count(3)
            assert set(run_ids(page)) == failed
            for row in rows.all():
                expect(row).to_have_attribute("data-status", "FAILED")
            # a row links to its run
            rows.first.click()
            expect(page.locator("#run-status")).to_have_attribute("data-status", "FAILED")
            assert started[51] in page.url  # the newest failed run
    finally:
        ctx.close()


# ---- pipelines, versions, diffs ----


def test_the_pipelines_page_shows_versions_and_a_diff(
    browser: Browser, tmp_path: Path, daemon: DashboardDaemon, client: plait.Client
) -> None:
    pipe = load_pipeline(f"{project(tmp_path, 'wide', WIDE)}:wide")
    # n is structural: two leaves, then three, are two versions of one pipeline
    two, three = pipe.compile({"n": 2}).version, pipe.compile({"n": 3}).version
    client.register(pipe, {"n": 2})
    client.register(pipe, {"n": 3})

    ctx, page = daemon.signed_in(browser)
    try:
        with screenshot_on_failure(page, "pipelines"):
            page.goto("/#/pipelines")
            row = page.locator('#pipelines-table tr.pipeline-row[data-name="wide"]')
            row.locator('a[href="#/pipelines/wide"]').click()
            versions = page.locator("tr.version-row")
            expect(versions).to_have_count(2)
            # pick A and B: the diff shows below
            page.locator(f'tr.version-row[data-version="{two}"] input.pick-a').check()
            page.locator(f'tr.version-row[data-version="{three}"] input.pick-b').check()
            diff = page.locator("#diff")
            expect(diff.locator("#diff-added")).to_contain_text("leaf_2")
            expect(diff.locator("#diff-removed")).not_to_contain_text("leaf_")
            expect(diff).not_to_contain_text("leaf_0")
            screenshot(page, "pipeline-versions")

            # a version: its graph and its IR
            page.locator(f'tr.version-row[data-version="{three}"] td.num').click()
            expect(page.locator("svg#dag g.dag-node")).to_have_count(3)
            expect(page.locator("pre#ir")).to_contain_text('"leaf_2"')

            # the diff's own page, the other way round
            page.goto(f"/#/diff/{three}/{two}")
            expect(page.locator("#diff #diff-removed")).to_contain_text("leaf_2")
            expect(page.locator("#diff #diff-added")).not_to_contain_text("leaf_")
            screenshot(page, "pipeline-diff")
    finally:
        ctx.close()


# ---- stacks ----


def test_the_stacks_page_shows_stacks_and_components(
    browser: Browser, daemon: DashboardDaemon
) -> None:
    boxes = ["boxes", "--kind", "runner", "--flavor", "docker", "-c", "network=bridge"]
    out = run([PLAIT, "component", "register", *boxes], env=daemon.client_env())
    assert out.returncode == 0, out.stderr
    ctx, page = daemon.signed_in(browser)
    try:
        with screenshot_on_failure(page, "stacks"):
            page.goto("/#/stacks")
            expect(page.locator("#stacks-table")).to_contain_text("default")
            row = page.locator("#components-table tr", has_text="boxes")
            expect(row).to_have_count(1)
            expect(row.locator("td.config")).to_contain_text("bridge")
    finally:
        ctx.close()
