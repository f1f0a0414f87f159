"""Pipelines in scripts run with `python script.py`: steps in __main__ run in worker processes,
and editing a step's code misses the cache exactly where it should."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import processes
import pytest

TEMPLATE = """
import json, sys
import plait

@plait.step
def first(x: int) -> int:
    return x + 1{first_comment}

@plait.step{second_settings}
def second(y: int) -> int:
    return {second_body}

@plait.step
def third(z: int) -> int:
    return z * 10

@plait.pipeline
def chain(x: int = 1):
    third(second(first(x)))

if __name__ == "__main__":
    run = chain()
    print(json.dumps({{k: [s.status, s.output()] for k, s in run.steps.items()}}))
"""


def _run(script: Path, home: Path, **parts: str) -> dict[str, list[object]]:
    values = {"first_comment": "", "second_settings": "", "second_body": "y * 2", **parts}
    script.write_text(TEMPLATE.format(**values))
    env = {**os.environ, "PLAIT_HOME": str(home)}
    out = processes.run([sys.executable, script], env=env, timeout=processes.DEADLINE)
    assert out.returncode == 0, out.stderr
    result: dict[str, list[object]] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


@pytest.fixture
def script(tmp_path: Path) -> Path:
    return tmp_path / "pipeline_script.py"


def statuses(result: dict[str, list[object]]) -> dict[str, object]:
    return {k: v[0] for k, v in result.items()}


def test_steps_defined_in_main_run_and_cache(script: Path, tmp_path: Path) -> None:
    home = tmp_path / "home"
    first = _run(script, home)
    assert first == {
        "first": ["SUCCEEDED", 2],
        "second": ["SUCCEEDED", 4],
        "third": ["SUCCEEDED", 40],
    }
    again = _run(script, home)
    assert statuses(again) == {"first": "CACHED", "second": "CACHED", "third": "CACHED"}


def test_editing_code_misses_exactly_where_it_should(script: Path, tmp_path: Path) -> None:
    home = tmp_path / "home"
    _run(script, home)
    # a comment is not code; an equivalent body is code: second re-runs, returns the same
    # value, so third stays cached
    r = _run(script, home, first_comment="  # just a comment", second_body="2 * y")
    assert statuses(r) == {"first": "CACHED", "second": "SUCCEEDED", "third": "CACHED"}
    # a body that changes the value: second and third run
    r = _run(script, home, second_body="y * 3")
    assert r == {"first": ["CACHED", 2], "second": ["SUCCEEDED", 6], "third": ["SUCCEEDED", 60]}


def test_cache_version_invalidates_one_step(script: Path, tmp_path: Path) -> None:
    home = tmp_path / "home"
    _run(script, home)
    r = _run(script, home, second_settings='(cache_version="2")')
    assert statuses(r) == {"first": "CACHED", "second": "SUCCEEDED", "third": "CACHED"}


LONG_LIVED = '''
import importlib, pathlib, sys
sys.path.insert(0, sys.argv[1])
import plait

src = pathlib.Path(sys.argv[1]) / "editable_steps.py"
body = """
import plait

@plait.step
def value() -> int:
    return {n}

@plait.pipeline
def p():
    value()
"""
src.write_text(body.format(n=1))
import editable_steps
print(editable_steps.p().steps["value"].output())
src.write_text(body.format(n=2))  # edited while the engine and its workers keep running
importlib.invalidate_caches()
importlib.reload(editable_steps)
print(editable_steps.p().steps["value"].output())
'''


def test_workers_pick_up_code_edited_in_a_long_lived_process(tmp_path: Path) -> None:
    script = tmp_path / "long_lived.py"
    script.write_text(LONG_LIVED)
    env = {
        **os.environ,
        "PLAIT_HOME": str(tmp_path / "home"),
        "PLAIT_WORKERS": "1",
        "PYTHONDONTWRITEBYTECODE": "1",
    }
    out = processes.run([sys.executable, script, tmp_path], env=env, timeout=processes.DEADLINE)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["1", "2"]
