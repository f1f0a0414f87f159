"""Retrying a failed run (``Client.retry_run``, ``plait runs retry``): what succeeded is reused
from the old run (CACHED, its outputs linked, whatever the cache holds), the failed step and
its downstream run, with the current code; on the embedded engine and through a daemon."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_security import Daemon

import plait
from plait.cli._common import load_pipeline

PLAIT = str(Path(sys.executable).parent / "plait")

FLOW = """\
from pathlib import Path

import plait


def _note(log: str, name: str) -> None:
    with open(log, "a") as f:
        f.write(name + "\\n")


@plait.step
def first(log: str) -> int:
    _note(log, "first")
    return 1


@plait.step(cache=False)
def side(log: str) -> int:
    _note(log, "side")
    return 5


@plait.step
def middle(x: int, log: str, flag: str) -> int:
    _note(log, "middle")
    while Path(flag + ".hold").exists():  # a test holds the run here
        import time

        time.sleep(0.05)
    if Path(flag).exists():
        raise RuntimeError("the flag is up")
    return x + 1


@plait.step
def last(x: int, log: str) -> int:
    _note(log, "last")
    return x * 10


@plait.pipeline
def flow(log: str, flag: str) -> None:
    last(middle(first(log), log, flag), log)
    side(log)
"""

EDITED = (
    FLOW.replace("return x + 1", "return x + 2")
    .replace(
        '@plait.step(cache=False)\ndef side(log: str) -> int:\n    _note(log, "side")\n    '
        "return 5\n",
        "",
    )
    .replace("    side(log)\n", "    extra(log)\n")
    .replace(
        "@plait.pipeline",
        '@plait.step\ndef extra(log: str) -> str:\n    _note(log, "extra")\n    return "new"\n\n\n'
        "@plait.pipeline",
    )
)


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A source root holding the pipeline's file, a module named for the test (a module of
    the same name imported by another test stays on this process's path)."""
    root = tmp_path / "project"
    root.mkdir()
    (root / "pyproject.toml").write_text('[project]\nname = "retryflow"\n')
    (root / f"{_module(root)}.py").write_text(FLOW)
    return root


def _module(root: Path) -> str:
    return "retry_" + re.sub(r"\W", "_", root.parent.name)


def _file(root: Path) -> Path:
    return root / f"{_module(root)}.py"


@pytest.fixture
def client(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[plait.Client]:
    monkeypatch.setenv("PLAIT_WORKERS", "1")
    c = plait.Client(home=tmp_path / "home")
    yield c
    c.shutdown()


def ran(log: Path) -> Counter[str]:
    """How many times each step's code ran."""
    return Counter(log.read_text().split()) if log.exists() else Counter()


def statuses(run: plait.Run) -> dict[str, str]:
    return {k: str(s.status) for k, s in run.steps.items()}


def _failed_run(client: plait.Client, project: Path) -> tuple[plait.Run, dict[str, str]]:
    flag = project / "flag"
    flag.touch()
    params = {"log": str(project / "log"), "flag": str(flag)}
    pipe = load_pipeline(f"{_file(project)}:flow")
    old = client.run_pipeline(pipe, params)
    assert old.status == "FAILED"
    assert statuses(old) == {
        "first": "SUCCEEDED",
        "middle": "FAILED",
        "last": "SKIPPED",
        "side": "SUCCEEDED",
    }
    return old, params


def test_a_retry_reuses_what_succeeded_and_runs_the_failed_step_and_its_downstream(
    client: plait.Client, project: Path
) -> None:
    old, params = _failed_run(client, project)
    (project / "flag").unlink()  # the outside cause is fixed
    new = client.retry_run(old.run_id, load_pipeline(f"{_file(project)}:flow"))
    assert new.status == "SUCCEEDED" and new.retry_of == old.run_id
    assert new.parameters == old.parameters and new.pipeline_version == old.pipeline_version
    assert statuses(new) == {
        "first": "CACHED",
        "middle": "SUCCEEDED",
        "last": "SUCCEEDED",
        "side": "CACHED",  # cache=False, reused all the same: a retry does not ask the cache
    }
    assert new.steps["first"].cached_from == old.run_id
    assert new.steps["side"].cached_from == old.run_id
    assert (
        new.steps["first"].outputs["output"].digest == old.steps["first"].outputs["output"].digest
    )
    assert new.steps["middle"].cached_from == ""
    why = client.explain_step(new.run_id, "side").reason
    assert why.startswith(f"cached: reused from run {old.run_id}, which this run retries")
    assert new.steps["last"].output() == 20
    # the reused steps' code did not run again
    assert ran(project / "log") == {"first": 1, "side": 1, "middle": 2, "last": 1}
    assert params["log"] == new.parameters["log"]


def test_a_retry_with_edited_code_runs_the_new_code_and_new_steps(
    client: plait.Client, project: Path
) -> None:
    old, _ = _failed_run(client, project)
    (project / "flag").unlink()
    _file(project).write_text(EDITED)  # middle changed, side gone, extra new
    edited = load_pipeline(f"{_file(project)}:flow")
    new = client.retry_run(old.run_id[:10], edited)
    assert new.status == "SUCCEEDED", [s.error.message for s in new.steps.values() if s.error]
    assert new.status == "SUCCEEDED" and new.retry_of == old.run_id
    assert new.pipeline_version != old.pipeline_version
    assert statuses(new) == {
        "first": "CACHED",
        "middle": "SUCCEEDED",
        "last": "SUCCEEDED",
        "extra": "SUCCEEDED",
    }
    assert new.steps["last"].output() == 30  # (1 + 2) * 10: the edited code ran
    assert new.steps["first"].cached_from == old.run_id
    assert ran(project / "log") == {"first": 1, "side": 1, "middle": 2, "last": 1, "extra": 1}


def test_a_retry_of_an_unknown_or_unfinished_run_is_refused(
    client: plait.Client, project: Path
) -> None:
    with pytest.raises(plait.errors.RunNotFoundError):
        client.retry_run("0123456789abcdef")
    hold = project / "flag.hold"
    hold.touch()
    pipe = load_pipeline(f"{_file(project)}:flow")
    params = {"log": str(project / "log"), "flag": str(project / "flag")}
    running = client.run_pipeline(pipe, params, wait=False)
    try:
        # refused by the control plane (no pipeline), and by the client (with one)
        with pytest.raises(plait.errors.InUseError, match="has not ended"):
            client.retry_run(running.run_id)
        with pytest.raises(plait.errors.InUseError, match="has not ended"):
            client.retry_run(running.run_id, pipe)
    finally:
        hold.unlink()
    assert client.wait(running.run_id).status == "SUCCEEDED"
    # a run that succeeded may be retried too: everything is reused, nothing runs
    again = client.retry_run(running.run_id, pipe)
    assert again.status == "SUCCEEDED"
    assert set(statuses(again).values()) == {"CACHED"}
    assert ran(project / "log") == {"first": 1, "side": 1, "middle": 1, "last": 1}


def test_retry_through_a_daemon_with_the_cli(tmp_path: Path, project: Path) -> None:
    daemon = Daemon(tmp_path / "daemon-home")
    try:
        env = daemon.client_env()
        flag, log = project / "flag", project / "log"
        flag.touch()
        target = f"{_file(project)}:flow"
        params = ["-p", f"log={log}", "-p", f"flag={flag}"]
        out = subprocess.run(
            [PLAIT, "run", target, "-q", *params], env=env, capture_output=True, text=True
        )
        assert out.returncode == 1, out.stderr
        old = out.stdout.strip().splitlines()[-1]
        flag.unlink()

        # the old run's version and code archive, no FILE:PIPELINE
        out = subprocess.run(
            [PLAIT, "runs", "retry", old[:10]], env=env, capture_output=True, text=True
        )
        assert out.returncode == 0, out.stderr
        assert f"retries run {old}" in out.stderr
        assert ran(log) == {"first": 1, "side": 1, "middle": 2, "last": 1}

        shown = subprocess.run(
            [PLAIT, "runs", "list", "-n", "1", "--output", "json"],
            env=env,
            capture_output=True,
            text=True,
        )
        new = json.loads(shown.stdout)["runs"][0]
        assert new["retry_of"] == old and new["status"] == "SUCCEEDED"
        shown = subprocess.run(
            [PLAIT, "runs", "show", new["run_id"], "--output", "json"],
            env=env,
            capture_output=True,
            text=True,
        )
        steps = {s["step_id"]: s for s in json.loads(shown.stdout)["steps"]}
        assert {k: (s["status"], s["cached_from"]) for k, s in steps.items()} == {
            "first": ("CACHED", old),
            "middle": ("SUCCEEDED", None),
            "last": ("SUCCEEDED", None),
            "side": ("CACHED", old),
        }
        text = subprocess.run(
            [PLAIT, "runs", "show", new["run_id"]], env=env, capture_output=True, text=True
        ).stdout
        assert f"retry of run {old}" in text and f"from {old[:12]}" in text

        # with FILE:PIPELINE: the current code, compiled and shipped
        _file(project).write_text(EDITED)
        out = subprocess.run(
            [PLAIT, "runs", "retry", old, target], env=env, capture_output=True, text=True
        )
        assert out.returncode == 0, out.stderr
        assert ran(log)["extra"] == 1 and ran(log)["middle"] == 3

        # refusals: an unknown run
        bad = subprocess.run(
            [PLAIT, "runs", "retry", "0123456789abcdef"], env=env, capture_output=True, text=True
        )
        assert bad.returncode == 2 and "0123456789abcdef" in bad.stderr
        # a run that has not ended
        hold = project / "other.hold"
        hold.touch()
        out = subprocess.run(
            [PLAIT, "run", target, "-d", "-p", f"log={log}", "-p", f"flag={project / 'other'}"],
            env=env,
            capture_output=True,
            text=True,
        )
        assert out.returncode == 0, out.stderr
        running = out.stdout.strip().splitlines()[-1]
        try:
            busy = subprocess.run(
                [PLAIT, "runs", "retry", running], env=env, capture_output=True, text=True
            )
            assert busy.returncode == 2 and "has not ended" in busy.stderr
        finally:
            hold.unlink()
        client = plait.Client(daemon.address, token=daemon.credential)
        try:
            assert client.wait(running).status == "SUCCEEDED"
        finally:
            client.close()
    finally:
        daemon.stop()
