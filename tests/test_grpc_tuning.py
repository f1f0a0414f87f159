"""`import plait` asks gRPC for its older TCP code, and for no INFO lines (plait._grpc_tuning),
when nobody chose, in its own process and in the workers it starts; a value set by the user,
or a gRPC outside the versions checked, is left alone."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import grpc
import processes

from plait import _grpc_tuning

SCRIPT = """\
import os

import plait


@plait.step
def seen() -> str:
    return os.environ.get("GRPC_EXPERIMENTS", "(unset)")


@plait.step
def verbosity() -> str:
    return os.environ.get("GRPC_VERBOSITY", "(unset)")


@plait.pipeline
def look():
    seen()
    verbosity()


if __name__ == "__main__":
    run = look()
    assert run.status == "SUCCEEDED", run.status
    print(repr(os.environ.get("GRPC_EXPERIMENTS", "(unset)")))
    print(repr(run.steps["seen"].output()))
    print(repr(os.environ.get("GRPC_VERBOSITY", "(unset)")))
    print(repr(run.steps["verbosity"].output()))
"""


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("GRPC_EXPERIMENTS", "GRPC_VERBOSITY")}
    env.pop("PLAIT_SERVER", None)
    # a home of its own: a cached step would answer with an earlier run's environment
    env["PLAIT_HOME"] = str(tmp_path / f"home-{len(list(tmp_path.glob('home-*')))}")
    env.update(extra)
    return env


def _run(tmp_path: Path, env: dict[str, str]) -> list[str]:
    script = tmp_path / "look.py"
    script.write_text(SCRIPT)
    out = processes.run([sys.executable, script], env=env, cwd=tmp_path, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "Unknown experiment" not in out.stderr, out.stderr
    return [ast.literal_eval(line) for line in out.stdout.strip().splitlines()[-4:]]


def _checked() -> bool:
    version = _grpc_tuning.grpcio_version()
    return version is not None and _grpc_tuning.CHECKED[0] <= version <= _grpc_tuning.CHECKED[1]


def test_the_version_is_read_without_importing_grpc() -> None:
    major, minor = (int(p) for p in grpc.__version__.split(".")[:2])
    assert _grpc_tuning.grpcio_version() == (major, minor)
    out = subprocess.run(
        [sys.executable, "-c", "import sys, plait; print('grpc' in sys.modules)"],
        env={k: v for k, v in os.environ.items() if k != "GRPC_EXPERIMENTS"},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert out.stdout.strip() == "False"


def test_the_engine_and_its_workers_get_the_older_tcp_code_and_no_info_lines(
    tmp_path: Path,
) -> None:
    expected = _grpc_tuning.EXPERIMENTS if _checked() else "(unset)"
    assert _run(tmp_path, _env(tmp_path)) == [expected, expected, "ERROR", "ERROR"]


def test_a_value_the_user_set_is_kept_even_empty(tmp_path: Path) -> None:
    env = _env(tmp_path, GRPC_EXPERIMENTS="", GRPC_VERBOSITY="")
    assert _run(tmp_path, env) == ["", "", "", ""]
    chosen = "-event_engine_client"
    env = _env(tmp_path, GRPC_EXPERIMENTS=chosen, GRPC_VERBOSITY="INFO")
    assert _run(tmp_path, env) == [chosen, chosen, "INFO", "INFO"]


def test_a_grpc_newer_than_the_versions_checked_is_left_alone(tmp_path: Path) -> None:
    # a fake grpc package (only its version file is read), first on the path: a newer gRPC
    # cannot be installed here beside the real one
    fake = tmp_path / "fake" / "grpc"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    (fake / "_grpcio_metadata.py").write_text('__version__ = """1.99.0"""\n')
    code = (
        "import os, sys; sys.path.insert(0, sys.argv[1]); import plait; "
        "from plait._grpc_tuning import grpcio_version; "
        "print(grpcio_version(), os.environ.get('GRPC_EXPERIMENTS', '(unset)'))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(fake.parent)],
        env=_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert out.stdout.split() == ["(1,", "99)", "(unset)"]
