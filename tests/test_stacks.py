"""Stacks and components, as ZenML users know them: through the CLI, on a real store."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import sqlalchemy as sa
from test_runs import demo

import plait
from plait.engine.store import _schema as db

ROOT = Path(__file__).resolve().parent.parent
PLAIT = str(Path(sys.executable).parent / "plait")


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    e = {**os.environ, "PLAIT_HOME": str(tmp_path / "home"), "PLAIT_WORKERS": "1"}
    e.pop("PLAIT_SERVER", None)
    return e


def plait_cli(env: dict[str, str], *args: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
    out = subprocess.run(
        [PLAIT, *args], env=env, capture_output=True, text=True, timeout=60, cwd=ROOT
    )
    if ok:
        assert out.returncode == 0, f"{args}: {out.stdout}{out.stderr}"
    return out


def test_a_default_stack_exists_and_runs_record_their_stack(env: dict[str, str]) -> None:
    listed = plait_cli(env, "stack", "list").stdout
    assert "default" in listed and "*" in listed and "local-artifacts" in listed
    described = plait_cli(env, "stack", "describe").stdout
    assert "runner: local (local)" in described
    client = plait.Client(home=env["PLAIT_HOME"])
    try:
        run = demo.run({"n": 3}, client=client)
        assert run.stack == "default"
    finally:
        client.shutdown()
    rid = run.run_id
    assert "stack default" in plait_cli(env, "runs", "show", rid).stdout


def test_register_compose_activate_and_delete(env: dict[str, str]) -> None:
    plait_cli(
        env,
        "component",
        "register",
        "fast",
        "--kind",
        "runner",
        "--flavor",
        "local",
    )
    comps = plait_cli(env, "component", "list", "--kind", "runner").stdout
    assert "fast" in comps and "local-artifacts" not in comps
    # a key the flavor does not read is refused, with the valid ones (engine/_flavors.py)
    out = plait_cli(
        env,
        "component",
        "register",
        "fast",
        "--kind",
        "runner",
        "--flavor",
        "local",
        "-c",
        "workers=4",
        ok=False,
    )
    assert out.returncode == 2 and "unknown key 'workers' for a local runner" in out.stderr
    plait_cli(env, "stack", "register", "quick", "-c", "fast", "-c", "local-artifacts", "--set")
    stacks = plait_cli(env, "stack", "list").stdout
    quick_line = next(line for line in stacks.splitlines() if "quick" in line)
    assert "*" in quick_line
    assert "used by: quick" in plait_cli(env, "component", "describe", "fast").stdout
    # runs record the active stack
    client = plait.Client(home=env["PLAIT_HOME"])
    try:
        assert demo.run({"n": 2}, client=client).stack == "quick"
    finally:
        client.shutdown()
    # refusals say why
    out = plait_cli(env, "component", "delete", "fast", ok=False)
    assert out.returncode == 2 and "used by stack(s) quick" in out.stderr
    out = plait_cli(env, "stack", "delete", "quick", ok=False)
    assert out.returncode == 2 and "is active" in out.stderr
    out = plait_cli(env, "stack", "register", "bad", "-c", "local-artifacts", ok=False)
    assert out.returncode == 2 and "needs a runner" in out.stderr
    out = plait_cli(env, "stack", "register", "two", "-c", "fast", "-c", "local", ok=False)
    assert out.returncode == 2 and "two runner components" in out.stderr
    out = plait_cli(env, "stack", "register", "ghost", "-c", "nope", ok=False)
    assert out.returncode == 2 and "no component 'nope'" in out.stderr
    out = plait_cli(env, "stack", "set", "nope", ok=False)
    assert out.returncode == 2 and "no stack 'nope'" in out.stderr
    plait_cli(env, "stack", "set", "default")
    plait_cli(env, "stack", "delete", "quick")
    plait_cli(env, "component", "delete", "fast")
    assert "fast" not in plait_cli(env, "component", "list").stdout


def test_a_stack_whose_runner_is_not_here_is_refused_at_create(env: dict[str, str]) -> None:
    out = plait_cli(
        env, "component", "register", "ray1", "--kind", "runner", "--flavor", "ray", ok=False
    )
    assert out.returncode == 2 and "runner flavor 'ray' is not known; valid: " in out.stderr
    # a component stored before flavors were checked is still read, and refused at create
    plait_cli(env, "stack", "list")  # makes the database
    url = f"sqlite:///{Path(env['PLAIT_HOME']) / 'plait.db'}"
    engine = sa.create_engine(url)
    try:
        with engine.begin() as conn:
            conn.execute(
                db.components.insert().values(
                    name="ray1", kind="RUNNER", flavor="ray", config={}, created_at=0.0
                )
            )
    finally:
        engine.dispose()
    plait_cli(env, "stack", "register", "cluster", "-c", "ray1", "--set")
    client = plait.Client(home=env["PLAIT_HOME"])
    try:
        with pytest.raises(plait.PipelineError, match="runner 'ray'"):
            demo.run({"n": 2}, client=client)
    finally:
        client.shutdown()
