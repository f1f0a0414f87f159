"""Builds through a daemon, as a user meets them: steps on the Docker runner, images built by the
stack's image builder once per key, pushed to and pulled from a real registry, code shipped
apart from images (an edit builds nothing), and concurrent runs that need one image building it
once. Needs Docker (PLAIT_TEST_DOCKER_BASE) and a registry (PLAIT_TEST_REGISTRY), both started by
scripts/test; in CI a missing one fails these tests, elsewhere it skips them.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from processes import run
from test_security import PLAIT, Daemon

# a cold image build (Plait's layers, on a fresh machine) takes a minute or more on 2 CPUs
pytestmark = [pytest.mark.docker, pytest.mark.slow, pytest.mark.timeout(900)]
BUILD_DEADLINE = 600.0


def _needed(name: str) -> str:
    value = os.environ.get(name, "")
    if not value:
        message = f"{name} is not set (scripts/test starts Docker and the registry and sets it)"
        if os.environ.get("CI"):
            pytest.fail(message)  # in CI a missing Docker or registry fails, never skips
        pytest.skip(message)
    return value


@pytest.fixture(scope="module")
def base() -> str:
    return _needed("PLAIT_TEST_DOCKER_BASE")


@pytest.fixture(scope="module")
def registry() -> str:
    return _needed("PLAIT_TEST_REGISTRY")


def _wheel(out: Path, version: str, tag: str) -> Path:
    """A tiny wheel of project `buildpkg` (unique per test session: no image of an earlier
    session has its key)."""
    src = out / f"src-{version}"
    (src / "buildpkg").mkdir(parents=True)
    (src / "buildpkg" / "__init__.py").write_text(f'__version__ = "{version}"\nTAG = "{tag}"\n')
    (src / "pyproject.toml").write_text(
        f'[project]\nname = "buildpkg"\nversion = "{version}"\n'
        '[build-system]\nrequires = ["setuptools"]\nbuild-backend = "setuptools.build_meta"\n'
    )
    pip = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation"]
    done = run([*pip, "-w", str(out), str(src)])
    assert done.returncode == 0, done.stderr
    (wheel,) = out.glob(f"buildpkg-{version}-*.whl")
    return wheel


@pytest.fixture(scope="module")
def wheels(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("wheels")
    tag = uuid.uuid4().hex
    return {"1.0": _wheel(out, "1.0", tag), "2.0": _wheel(out, "2.0", tag)}


PIPE = """
import os
import sys

import plait

ENV = plait.Environment(requirements_file="requirements.txt", env={{"GREETING": "hi"}})


@plait.step(runner="docker", environment=ENV, cache=False)
def inside(n: int) -> str:
    import buildpkg

    print("running in a container", flush=True)
    return f"{{buildpkg.__version__}} {{os.path.exists('/.dockerenv')}} {{n * {factor}}}"


@plait.step(runner="local", cache=False)
def outside(x: str) -> str:
    return x + " local"


@plait.pipeline
def mixed(n: int = 1) -> None:
    outside(inside(n))


if __name__ == "__main__":
    import json

    r = mixed(int(sys.argv[1]))
    print(json.dumps({{"run_id": r.run_id, "status": str(r.status),
                      "out": r.steps["outside"].output() if str(r.status) == "SUCCEEDED" else "",
                      "errors": {{k: s.error.message for k, s in r.steps.items() if s.error}}}}))
"""


def _project(folder: Path, requirement: Path, factor: int = 2) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "pyproject.toml").write_text('[project]\nname = "builds-demo"\nversion = "0"\n')
    (folder / "requirements.txt").write_text(f"# the step's one requirement\n{requirement}\n")
    (folder / "pipe.py").write_text(textwrap.dedent(PIPE.format(factor=factor)))
    return folder


class Builds:
    """The daemon's build records (read straight from its SQLite file)."""

    def __init__(self, home: Path) -> None:
        self.db = home / "plait.db"

    def rows(self) -> list[tuple[str, str, str]]:
        with sqlite3.connect(self.db) as db:
            return db.execute("SELECT key, source, reference FROM builds ORDER BY key").fetchall()

    def runs_of(self, key: str) -> list[str]:
        with sqlite3.connect(self.db) as db:
            rows = db.execute("SELECT run_id FROM build_runs WHERE key = ?", (key,)).fetchall()
        return sorted(r for (r,) in rows)


@pytest.fixture
def daemon(tmp_path: Path, base: str, registry: str) -> Iterator[Daemon]:
    d = Daemon(tmp_path / "daemon-home")
    try:
        yield d
    finally:
        d.stop()


def _cli(d: Daemon, *args: str) -> str:
    env = {**d.env, "PLAIT_SERVER": d.address, "PLAIT_TOKEN": d.credential}
    out = run([PLAIT, *args], env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout + out.stderr


def _stack(d: Daemon, base: str, registry: str) -> None:
    """The documented set-up: a Docker runner, an image builder, the registry."""
    _cli(d, "component", "register", "dock", "--kind", "runner", "--flavor", "docker")
    _cli(d, "component", "register", "builder", "--kind", "image_builder", "--flavor", "docker",
         "-c", f"parent_image={base}")  # fmt: skip
    _cli(d, "component", "register", "reg", "--kind", "container_registry", "--flavor",
         "docker", "-c", f"uri={registry}")  # fmt: skip
    _cli(d, "stack", "register", "containers", "-c", "dock", "-c", "builder", "-c", "reg",
         "-c", "local-artifacts", "--set")  # fmt: skip


def _run(d: Daemon, project: Path, n: int) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PLAIT_")}
    env.update(PLAIT_SERVER=d.address, PLAIT_TOKEN=d.credential)
    env["PLAIT_HOME"] = str(project.parent / "client-home")
    out = run(
        [sys.executable, project / "pipe.py", str(n)], env=env, cwd=project, timeout=BUILD_DEADLINE
    )
    assert out.returncode == 0, out.stdout + out.stderr
    answer: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    assert answer["status"] == "SUCCEEDED", answer
    return answer


def _docker(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["docker", *args], capture_output=True, text=True, timeout=300)


def test_code_edits_build_nothing_a_requirement_builds_one_and_the_registry_serves_it(
    tmp_path: Path, daemon: Daemon, base: str, registry: str, wheels: dict[str, Path]
) -> None:
    _stack(daemon, base, registry)
    project = _project(tmp_path / "proj", wheels["1.0"])
    builds = Builds(daemon.home)
    references: list[str] = []
    try:
        first = _run(daemon, project, 3)
        assert first["out"] == "1.0 True 6 local"  # in a container, with its requirement
        ((key, source, ref),) = builds.rows()
        references.append(ref)
        assert source == "built" and ref.startswith(f"{registry}/plait-env:")
        logs = _cli(daemon, "runs", "logs", first["run_id"])
        assert "[build]" in logs and "running in a container" in logs

        again = _run(daemon, project, 4)  # a rerun builds nothing
        assert again["out"] == "1.0 True 8 local"
        assert builds.rows() == [(key, "local", ref)]

        # an edit of the step's code travels in the code archive: nothing is built
        _project(project, wheels["1.0"], factor=10)
        edited = _run(daemon, project, 4)
        assert edited["out"] == "1.0 True 40 local"
        assert builds.rows() == [(key, "local", ref)]
        assert builds.runs_of(key) == sorted([first["run_id"], again["run_id"], edited["run_id"]])

        # a changed requirement builds exactly one image
        _project(project, wheels["2.0"], factor=10)
        bumped = _run(daemon, project, 1)
        assert bumped["out"] == "2.0 True 10 local"
        rows = builds.rows()
        assert len(rows) == 2
        ((new_key, new_source, new_ref),) = [r for r in rows if r[0] != key]
        references.append(new_ref)
        assert new_source == "built"
        explained = _cli(daemon, "builds", "explain", key, new_key)
        assert "requirements" in explained

        # the image was pushed: removed here, it is pulled back from the registry, not rebuilt
        assert _docker("rmi", "-f", new_ref).returncode == 0
        pulled = _run(daemon, project, 2)
        assert pulled["out"] == "2.0 True 20 local"
        assert (new_key, "pulled", new_ref) in builds.rows()
        assert _docker("image", "inspect", new_ref).returncode == 0
    finally:
        for ref in references:
            _docker("rmi", "-f", ref)


def test_runs_that_need_one_new_image_at_once_build_it_once(
    tmp_path: Path, daemon: Daemon, base: str, registry: str, wheels: dict[str, Path]
) -> None:
    _stack(daemon, base, registry)
    out = tmp_path / "wheels"
    out.mkdir()
    project = _project(tmp_path / "proj", _wheel(out, "3.0", uuid.uuid4().hex))
    env = {k: v for k, v in os.environ.items() if not k.startswith("PLAIT_")}
    env.update(PLAIT_SERVER=daemon.address, PLAIT_TOKEN=daemon.credential)
    env["PLAIT_HOME"] = str(tmp_path / "client-home")
    builds = Builds(daemon.home)
    procs = [
        subprocess.Popen(
            [sys.executable, project / "pipe.py", str(n)],
            env=env,
            cwd=project,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for n in (1, 2)
    ]
    answers = []
    try:
        for proc in procs:
            stdout, stderr = proc.communicate(timeout=BUILD_DEADLINE)
            assert proc.returncode == 0, stdout + stderr
            answers.append(json.loads(stdout.strip().splitlines()[-1]))
        assert sorted(a["out"] for a in answers) == ["3.0 True 2 local", "3.0 True 4 local"]
        ((key, _, ref),) = builds.rows()
        assert builds.runs_of(key) == sorted(a["run_id"] for a in answers)
        # the image was built once: one run's log has the build's steps, the other's none
        logs = [_cli(daemon, "runs", "logs", a["run_id"], "inside") for a in answers]
        assert sorted("step 1/" in log for log in logs) == [False, True], logs
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
        for _key, _, ref in builds.rows():
            _docker("rmi", "-f", ref)


def test_the_docker_example_runs(tmp_path: Path, base: str, registry: str) -> None:
    """examples/docker/run.sh, as documented: a step in a container beside a local one."""
    script = Path(__file__).resolve().parent.parent / "examples" / "docker" / "run.sh"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PLAIT_")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PLAIT_HOME"] = str(tmp_path / "home")
    env["XDG_CONFIG_HOME"] = str(tmp_path / "xdg")
    out = run(["bash", script, base, registry], env=env, cwd=tmp_path, timeout=BUILD_DEADLINE)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "train: {'loss': 0.4, 'six': 1.17}" in out.stdout, out.stdout
    assert "rerun: {'train': 'CACHED', 'report': 'CACHED'}" in out.stdout
    assert "READY" in out.stdout and f"{registry}/plait-env:" in out.stdout
