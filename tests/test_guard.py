"""The guard: a module whose pipeline call is not under ``if __name__ == "__main__":`` would run
the pipeline again when a worker imports it to run a step. The worker refuses that call, and the
step fails with a message naming the file, the line and the fix (embedded and on a daemon).

Each case is a real Python process running the user's script, as a user runs it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from processes import run
from test_security import Daemon

STEPS = """
import plait

@plait.step
def one() -> int:
    return 1

@plait.step
def two(x: int) -> int:
    return x + 1

@plait.pipeline
def demo():
    two(one())

"""

REPORT = """
import json
print("REPORT " + json.dumps({
    "status": str(run.status),
    "errors": {
        s.step_id: {"type": s.error.type, "message": s.error.message}
        for s in run.steps.values() if s.error is not None
    },
}))
"""

UNGUARDED = STEPS + "run = demo()\n" + REPORT
GUARDED = (
    STEPS
    + 'if __name__ == "__main__":\n'
    + "".join(f"    {line}\n" for line in ("run = demo()" + REPORT).splitlines() if line)
)


def _report(args: list[str], env: dict[str, str], cwd: Path) -> dict[str, object]:
    out = run([sys.executable, *args], env=env, cwd=cwd)
    assert out.returncode == 0, out.stdout + out.stderr
    lines = [line for line in out.stdout.splitlines() if line.startswith("REPORT ")]
    # the module-level call ran once: in the user's process, not again in the worker
    assert len(lines) == 1, out.stdout + out.stderr
    report: dict[str, object] = json.loads(lines[0].removeprefix("REPORT "))
    return report


def _assert_refused(report: dict[str, object], where: str) -> None:
    assert report["status"] == "FAILED", report
    errors = report["errors"]
    assert isinstance(errors, dict) and list(errors) == ["one"], report  # `two` was skipped
    error = errors["one"]
    assert error["type"] == "plait.errors.PipelineDefinitionError", error
    message = error["message"]
    assert message.startswith(f"{where} runs pipeline 'demo' at import time"), message
    assert 'Put the call under `if __name__ == "__main__":`' in message, message


def test_an_unguarded_script_fails_with_the_fix_embedded(
    embedded: dict[str, str], tmp_path: Path
) -> None:
    (tmp_path / "flow.py").write_text(UNGUARDED)
    line = UNGUARDED.splitlines().index("run = demo()") + 1
    _assert_refused(_report(["flow.py"], embedded, tmp_path), f"flow.py:{line}")


def test_an_unguarded_module_fails_with_the_fix_embedded(
    embedded: dict[str, str], tmp_path: Path
) -> None:
    """Imported as a module (not run as a script), the worker imports it by its name."""
    (tmp_path / "flow.py").write_text(UNGUARDED)
    line = UNGUARDED.splitlines().index("run = demo()") + 1
    report = _report(["-c", "import flow"], {**embedded, "PYTHONPATH": str(tmp_path)}, tmp_path)
    _assert_refused(report, f"flow.py:{line}")


def test_an_unguarded_script_fails_with_the_fix_on_a_daemon(daemon: Daemon, tmp_path: Path) -> None:
    """Through the daemon the worker imports the script from the run's code archive: the
    message names the file as the archive holds it."""
    project = tmp_path / "project"
    (project / "pipes").mkdir(parents=True)
    (project / "pyproject.toml").write_text('[project]\nname = "guarded"\n')
    (project / "pipes" / "flow.py").write_text(UNGUARDED)
    line = UNGUARDED.splitlines().index("run = demo()") + 1
    report = _report(["pipes/flow.py"], daemon.client_env(), project)
    _assert_refused(report, f"pipes/flow.py:{line}")


@pytest.mark.parametrize("where", ["embedded", "daemon"])
def test_a_guarded_script_runs(
    where: str, embedded: dict[str, str], daemon: Daemon, tmp_path: Path
) -> None:
    (tmp_path / "flow.py").write_text(GUARDED)
    env = embedded if where == "embedded" else daemon.client_env()
    report = _report(["flow.py"], env, tmp_path)
    assert report == {"status": "SUCCEEDED", "errors": {}}
