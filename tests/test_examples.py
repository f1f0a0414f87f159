"""Every example runs as documented, on a fresh PLAIT_HOME, and checks its own results."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import processes
import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = sorted((ROOT / "examples").glob("*.py"))


def test_there_are_examples() -> None:
    names = {p.stem for p in EXAMPLES}
    assert {
        "quickstart",
        "fan_in",
        "failures_and_retries",
        "context_and_metadata",
        "custom_materializer",
        "caching",
        "retry_policies",
        "environments",
        "parameters",
        "everyday_types",
        "hooks",
        "churn",
        "cache_control",
        "fan_out",
    } <= names


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.stem)
def test_example_runs(example: Path, tmp_path: Path) -> None:
    env = {**os.environ, "PLAIT_HOME": str(tmp_path / "home"), "PLAIT_WORKERS": "2"}
    env.pop("PLAIT_SERVER", None)
    # in a process group of its own, killed after: the embedded engine's workers included
    out = processes.run([sys.executable, example], env=env, cwd=tmp_path, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
