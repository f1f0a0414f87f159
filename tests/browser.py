"""Real-browser helpers for the dashboard's tests: a headless Chromium driven by Playwright, a
daemon serving the dashboard, signing in, and screenshots kept as test artifacts.

The browser is Debian's `chromium` (/usr/bin/chromium, or $PLAIT_TEST_CHROMIUM), which
scripts/test installs when missing; Playwright never downloads one. Without it the browser
tests are skipped, except where the browser is required: in CI, or when scripts/test exported
$PLAIT_TEST_CHROMIUM (then a browser that does not start fails them).

Run as a script, it writes the README's screenshot of a run page:

    .venv/bin/python tests/browser.py readme-screenshot [docs/dashboard.png]
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from chromium import CHROMIUM, CHROMIUM_ARGS
from processes import run, wait_for
from test_security import PLAIT, Daemon, free_port

if TYPE_CHECKING:
    from playwright.sync_api import Browser, BrowserContext, Page

ROOT = Path(__file__).resolve().parent.parent


WAIT_MS = 60_000
"""How long a page may take to show what a test waits for: a hang guard for a loaded 2-core
machine, not a speed expectation (the benchmarks time the pages)."""


def browser_required() -> bool:
    """Whether a browser that cannot start fails the tests rather than skipping them."""
    return bool(os.environ.get("CI") or os.environ.get("PLAIT_TEST_CHROMIUM"))


def _unavailable(message: str) -> None:
    if browser_required():
        pytest.fail(message)  # in CI a missing browser is a failure, never a skip
    pytest.skip(message)


@contextlib.contextmanager
def launched() -> Iterator[Browser]:
    """A headless Chromium, closed (and Playwright's driver stopped) on exit."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True, timeout=WAIT_MS
        )
        try:
            yield browser
        finally:
            browser.close()


@contextlib.contextmanager
def chromium() -> Iterator[Browser]:
    """A headless Chromium for a test module's fixture: skipped without one, failed instead
    where a browser is required (`browser_required`)."""
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError as exc:
        _unavailable(f"Playwright is not installed ({exc}): pip install -e '.[test]'")
    if not os.access(CHROMIUM, os.X_OK):
        _unavailable(f"no Chromium at {CHROMIUM} (scripts/test installs Debian's chromium)")
    with contextlib.ExitStack() as stack:
        try:
            browser = stack.enter_context(launched())
        except Exception as exc:
            _unavailable(f"Chromium ({CHROMIUM}) did not start: {exc}")
            raise
        yield browser


def artifacts_dir() -> Path:
    """Where screenshots go: $PLAIT_TEST_ARTIFACTS, else test-artifacts/ in the checkout."""
    path = Path(os.environ.get("PLAIT_TEST_ARTIFACTS") or ROOT / "test-artifacts")
    path.mkdir(parents=True, exist_ok=True)
    return path


def screenshot(page: Page, name: str, *, full_page: bool = False) -> Path:
    """A screenshot NAME.png (of the viewport, or the whole page) in the artifacts folder;
    prints its path."""
    path = artifacts_dir() / (re.sub(r"[^\w.-]", "_", name) + ".png")
    page.screenshot(path=str(path), full_page=full_page)
    print(f"screenshot: {path}")
    return path


@contextlib.contextmanager
def screenshot_on_failure(page: Page, name: str) -> Iterator[None]:
    """Keeps a screenshot NAME-FAILED.png of the page when the block raises."""
    try:
        yield
    except BaseException:
        with contextlib.suppress(Exception):
            screenshot(page, f"{name}-FAILED", full_page=True)
        raise


class DashboardDaemon(Daemon):
    """A daemon (`plait server start --foreground`) with its dashboard on a port of its own."""

    def __init__(self, home: Path, *flags: str) -> None:
        self.dashboard_port = free_port()
        super().__init__(home, "--dashboard-port", str(self.dashboard_port), *flags)
        try:
            wait_for(self._listening, "the dashboard listening")
        except BaseException:
            self.stop()
            raise

    def _listening(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(self.log.read_text())
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", self.dashboard_port)) == 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def login_link(self) -> str:
        """A one-time login link for the local account (`plait dashboard --no-browser`)."""
        out = run([PLAIT, "dashboard", "--no-browser"], env=self.client_env())
        assert out.returncode == 0, out.stderr
        found = re.search(r"https?://\S+/login\?code=[\w.~%-]+", out.stdout + out.stderr)
        assert found, f"no login link in:\n{out.stdout}\n{out.stderr}"
        # the link names the dashboard's address; this daemon's port is the one it was given
        assert f":{self.dashboard_port}/" in found.group(0), found.group(0)
        return found.group(0)

    def context(self, browser: Browser) -> BrowserContext:
        """A new browser context (no cookies: nobody signed in) on this dashboard."""
        ctx = browser.new_context(
            base_url=self.url, accept_downloads=True, viewport={"width": 1400, "height": 900}
        )
        ctx.set_default_timeout(WAIT_MS)
        return ctx

    def signed_in(self, browser: Browser) -> tuple[BrowserContext, Page]:
        """A context signed in with a fresh one-time link (the local admin account), and its
        page, at the dashboard's start page."""
        ctx = self.context(browser)
        page = ctx.new_page()
        page.goto(self.login_link())
        wait_signed_in(page)
        return ctx, page

    def signed_in_with_token(
        self, browser: Browser, token: str
    ) -> tuple[BrowserContext, Page, int]:
        """A context that sent TOKEN through the login page's form, its page, and the HTTP
        status of the form's POST /login (the caller judges whether it signed in)."""
        ctx = self.context(browser)
        page = ctx.new_page()
        return ctx, page, submit_token(page, token)


def submit_token(page: Page, token: str) -> int:
    """Opens /login, sends TOKEN with the token form; returns the HTTP status of its POST."""
    page.goto("/login")
    form = page.locator("form#token-form")
    form.locator("input[name=token]").fill(token)
    with page.expect_response(
        lambda r: r.request.method == "POST" and r.url.split("?")[0].endswith("/login")
    ) as answer:
        form.evaluate("f => f.requestSubmit()")  # as pressing Enter or its button would
    return answer.value.status


def expect(target: Any) -> Any:
    """Playwright's `expect`, waiting up to WAIT_MS (its default is 5 s)."""
    from playwright.sync_api import expect as pw_expect

    pw_expect.set_options(timeout=WAIT_MS)
    return pw_expect(target)


def session(ctx: BrowserContext) -> tuple[int, Any]:
    """GET /api/session with the context's cookies: (HTTP status, JSON body)."""
    resp = ctx.request.get("/api/session")
    try:
        body = resp.json()
    except Exception:
        body = resp.text()
    return resp.status, body


def wait_signed_in(page: Page) -> None:
    """Waits until the page left /login (the dashboard redirects to `/` once signed in)."""
    page.wait_for_url(lambda url: "/login" not in url, timeout=WAIT_MS)


@contextlib.contextmanager
def dashboard(home: Path, *flags: str) -> Iterator[DashboardDaemon]:
    """A daemon with a dashboard, stopped on exit whatever happened."""
    daemon = DashboardDaemon(home, *flags)
    try:
        yield daemon
    finally:
        daemon.stop()


# ---- the README's screenshot ----

README_FLOW = """\
import json

import plait


@plait.step
def load(n: int) -> list[int]:
    return list(range(n))


@plait.step
def clean(xs: list[int]) -> list[int]:
    print(f"cleaning {len(xs)} rows", flush=True)
    return [x for x in xs if x % 7]


@plait.step
def features(xs: list[int]) -> dict[str, float]:
    return {"mean": sum(xs) / len(xs), "max": float(max(xs))}


@plait.step
def validate(xs: list[int]) -> int:
    raise ValueError(f"{len(xs)} rows, expected at least 1000")


@plait.step
def train(f: dict[str, float], seed: int) -> dict[str, float]:
    return {"accuracy": 0.93, "seed": seed, **f}


@plait.step
def report(model: dict[str, float], checked: int) -> str:
    return json.dumps(model)


@plait.step
def export(model: dict[str, float]) -> str:
    return "model.json"


@plait.pipeline
def training(n: int = 500, seed: int = 7) -> None:
    xs = clean(load(n))
    model = train(features(xs), seed)
    report(model, validate(xs))
    export(model)
"""


def readme_screenshot(path: Path) -> None:
    """Runs a small pipeline with a failing branch through a daemon and saves its run page."""
    import tempfile

    import plait
    from plait.cli._common import load_pipeline

    with tempfile.TemporaryDirectory() as tmp, dashboard(Path(tmp) / "home") as daemon:
        flow = Path(tmp) / "training.py"
        flow.write_text(README_FLOW)
        client = plait.Client(daemon.address, token=daemon.credential)
        try:
            done = client.run_pipeline(load_pipeline(f"{flow}:training"), {})
        finally:
            client.close()
        with launched() as browser:
            ctx, page = daemon.signed_in(browser)
            ctx.set_default_timeout(WAIT_MS)
            page.set_viewport_size({"width": 1600, "height": 900})
            page.goto(f"/#/runs/{done.run_id}")
            page.locator(f'#run-status[data-status="{done.status}"]').wait_for()
            page.locator('g.dag-node[data-step-id="train"]').click()
            panel = page.locator('#step-panel[data-step-id="train"]')
            expect(panel.locator('.output[data-output="output"] .preview')).to_contain_text(
                "accuracy"
            )
            # the panel took the graph's room: fit the graph to what is left
            page.locator('button[data-zoom="fit"]').click()
            page.mouse.move(0, 0)  # no hover effect in the picture
            page.screenshot(path=str(path))
            ctx.close()
    print(path)


if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] != "readme-screenshot":
        sys.exit(f"usage: {sys.argv[0]} readme-screenshot [PATH (default docs/dashboard.png)]")
    readme_screenshot(Path(sys.argv[2]) if len(sys.argv) > 2 else ROOT / "docs" / "dashboard.png")
