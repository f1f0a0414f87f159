"""Another language drives the control plane: examples/node/client.mjs, with @grpc/grpc-js from
the npm registry, runs a pipeline registered from Python, follows it, downloads an output."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import plait

ROOT = Path(__file__).resolve().parent.parent
NODE_DIR = ROOT / "examples" / "node"


@plait.step
def words(text: str) -> list[str]:
    return text.split()


@plait.step
def shout(ws: list[str]) -> str:
    return " ".join(w.upper() for w in ws)


@plait.pipeline
def loud(text: str = "hello from python") -> None:
    shout(words(text))


@pytest.fixture(scope="module")
def node_client() -> Path:
    node, npm = shutil.which("node"), shutil.which("npm")
    if not node or not npm:
        pytest.fail("node and npm are needed (Debian: apt-get install nodejs npm)")
    if not (NODE_DIR / "node_modules" / "@grpc" / "grpc-js").is_dir():
        subprocess.run(
            [npm, "ci", "--no-audit", "--no-fund", "--loglevel=error"],
            cwd=NODE_DIR,
            check=True,
            timeout=300,
        )
    return NODE_DIR / "client.mjs"


@pytest.fixture
def client(tmp_path: Path) -> Iterator[plait.Client]:
    c = plait.Client(home=tmp_path / "home")
    yield c
    c.shutdown()


def run_in_node(node_client: Path, client: plait.Client, version: str, *step: str) -> Any:
    """What examples/node/client.mjs prints after running ``version`` (and downloading the
    output of ``step``, or of the last step)."""
    # the embedded engine accepts only its own process's secret: this test hands it to Node
    env = {**os.environ, "PLAIT_TOKEN": client.token}
    out = subprocess.run(
        ["node", str(node_client), client.address, version, *step],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_node_runs_follows_and_downloads(node_client: Path, client: plait.Client) -> None:
    result = run_in_node(node_client, client, client.register(loud))
    assert result["status"] == "RUN_STATUS_SUCCEEDED"
    assert result["steps"] == {"words": "STEP_STATUS_SUCCEEDED", "shout": "STEP_STATUS_SUCCEEDED"}
    assert result["output"] == "HELLO FROM PYTHON"
    assert result["transitions"][0] == "RUN_STATUS_RUNNING"
    assert result["transitions"][-1] == "RUN_STATUS_SUCCEEDED"
    assert "shout:STEP_STATUS_SUCCEEDED" in result["transitions"]
    # the run Node started is an ordinary run for Python
    run = client.get_run(result["run_id"])
    assert run.steps["shout"].output() == "HELLO FROM PYTHON"
    assert run.steps["shout"].outputs["output"].digest == result["digest"]


@plait.step
def shout_one(w: str) -> str:
    return w.upper()


@plait.step
def joined(ws: list[str]) -> str:
    return "-".join(ws)


@plait.pipeline
def loud_each(text: str = "map from node") -> None:
    joined(shout_one.map(words(text)))


def test_node_runs_a_map_unchanged(node_client: Path, client: plait.Client) -> None:
    """A map is IR like any step's: a client in another language runs it and reads its items."""
    result = run_in_node(node_client, client, client.register(loud_each), "joined")
    assert result["status"] == "RUN_STATUS_SUCCEEDED"
    assert result["output"] == "MAP-FROM-NODE"
    assert {k: v for k, v in result["steps"].items() if k.startswith("shout_one")} == {
        "shout_one": "STEP_STATUS_SUCCEEDED",
        "shout_one[0]": "STEP_STATUS_SUCCEEDED",
        "shout_one[1]": "STEP_STATUS_SUCCEEDED",
        "shout_one[2]": "STEP_STATUS_SUCCEEDED",
    }
