"""Environments: their two digests, requirements files, resources, a pipeline's default
environment; the virtualenvs the local runner builds for them, and the one-shot step processes
it runs in those virtualenvs.

The virtualenv tests build real virtualenvs with real pip, from two tiny wheels of one project
(``conflictpkg`` 1.0 and 2.0) made here with ``pip wheel``: no network. The runner tests run a
real control plane in this process and real step processes; a runner wrapper sets
``Task.python`` the way the control plane does once it has built a step's virtualenv.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import runpy
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import anyio
import pytest
from anyio.abc import TaskStatus
from processes import run, wait_for

import plait
from plait.api.v1 import task_service_pb2 as tasks
from plait.engine._cache import cache_key, key_material
from plait.errors import PipelineDefinitionError
from plait.ir.builds import build_digest
from plait.ir.v1 import ir_pb2

# ---- build digest ----


def _digest(**kw: Any) -> str:
    return plait.Environment(**kw).build_digest


def test_the_build_digest_ignores_order_case_white_space_and_comments() -> None:
    base = _digest(requirements=["numpy>=1.26", "six==1.16.0"])
    assert _digest(requirements=["six==1.16.0", "numpy>=1.26"]) == base
    assert _digest(requirements=["NumPy >= 1.26", " six == 1.16.0  # pinned"]) == base
    assert _digest(requirements=["numpy>=1.26", "six==1.16.0", "Six==1.16.0", "# x", ""]) == base
    assert _digest(requirements=["numpy>=1.26", "six==1.16.1"]) != base
    assert _digest(requirements=["numpy>=1.26"]) != base


def test_the_build_digest_covers_what_goes_into_a_build_and_never_the_variables() -> None:
    base = plait.Environment(
        parent_image="python:3.11-slim",
        python_version="3.11",
        requirements=["six==1.16.0"],
        apt_packages=["curl", "libgomp1"],
        env={"A": "1"},
    )
    same = dataclasses.asdict(base)
    same.pop("requirements_file")

    def changed(**kw: Any) -> plait.Environment:
        return plait.Environment(**{**same, **kw})

    assert changed(apt_packages=["libgomp1", "curl", "curl"]).build_digest == base.build_digest
    for kw in (
        {"parent_image": "python:3.12-slim"},
        {"python_version": "3.12"},
        {"requirements": ["six==1.15.0"]},
        {"apt_packages": ["curl"]},
    ):
        assert changed(**kw).build_digest != base.build_digest, kw
        assert changed(**kw).digest != base.digest, kw
    # the variables: in the whole digest (the cache key), never in the build digest
    other_env = changed(env={"A": "2"})
    assert other_env.build_digest == base.build_digest
    assert other_env.digest != base.digest
    assert changed(env={}).build_digest == base.build_digest
    # what the control plane computes from the IR is the same
    assert build_digest(base.to_proto()) == base.build_digest


def test_equal_environments_encode_equally() -> None:
    a = plait.Environment(requirements=["b==1", "A==2"], apt_packages=["yy", "xx"])
    b = plait.Environment(requirements=["a==2", "b==1"], apt_packages=["xx", "yy"])
    assert a == b and a.to_proto() == b.to_proto() and a.digest == b.digest
    assert list(a.to_proto().requirements) == ["a==2", "b==1"]
    assert list(a.to_proto().apt_packages) == ["xx", "yy"]
    assert plait.Environment.from_proto(a.to_proto()) == a
    assert hash(a) == hash(b)
    c = dataclasses.replace(a, env={"X": "1"})
    assert c.requirements == a.requirements and c.build_digest == a.build_digest


# ---- requirements files ----


def test_a_requirements_files_content_counts_and_its_path_does_not(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir()
    two.mkdir()
    text = "# the project's\nsix==1.16.0\n\nNumPy >= 1.26  # arrays\n"
    (one / "requirements.txt").write_text(text)
    (two / "reqs.txt").write_text(text)
    a = plait.Environment(requirements_file=one / "requirements.txt")
    b = plait.Environment(requirements_file=str(two / "reqs.txt"))
    assert a.requirements == ("numpy>=1.26", "six==1.16.0")
    assert a.build_digest == b.build_digest and a.digest == b.digest
    assert a.to_proto() == b.to_proto()  # the content, never the path, is in the IR
    assert str(one) not in str(a.to_proto())
    assert a.build_digest == _digest(requirements=["six==1.16.0", "numpy>=1.26"])
    # a comment edited: the same; a version edited: another
    (two / "reqs.txt").write_text(text.replace("# arrays", "# arrays, faster"))
    assert plait.Environment(requirements_file=two / "reqs.txt").build_digest == a.build_digest
    (two / "reqs.txt").write_text(text.replace("1.16.0", "1.17.0"))
    assert plait.Environment(requirements_file=two / "reqs.txt").build_digest != a.build_digest
    # relative to the file that creates it (a step module, wherever its code is unpacked)
    creates = "import plait\nENV = plait.Environment(requirements_file='requirements.txt')\n"
    (one / "envmod.py").write_text(creates)
    assert runpy.run_path(str(one / "envmod.py"))["ENV"] == a
    # without such a file (a notebook's cell): relative to the working directory
    monkeypatch.chdir(one)
    cell: dict[str, Any] = {}
    exec(creates, cell)
    assert cell["ENV"] == a
    # given with requirements: merged, duplicates once
    merged = plait.Environment(
        requirements=["pandas", "six==1.16.0"], requirements_file=one / "requirements.txt"
    )
    assert merged.requirements == ("numpy>=1.26", "pandas", "six==1.16.0")


def test_bad_requirements_are_refused_clearly(tmp_path: Path) -> None:
    with pytest.raises(PipelineDefinitionError, match=r"no such file.*working directory"):
        plait.Environment(requirements_file=tmp_path / "missing.txt")
    opts = tmp_path / "opts.txt"
    opts.write_text("six\n--index-url https://example.org/simple\n")
    with pytest.raises(PipelineDefinitionError, match=r"opts.txt.*line 2.*options"):
        plait.Environment(requirements_file=opts)
    with pytest.raises(PipelineDefinitionError, match="pip options"):
        plait.Environment(requirements=["-e ."])
    with pytest.raises(TypeError, match="must be strings, got int"):
        plait.Environment(requirements=["six", 3])  # type: ignore[list-item]
    with pytest.raises(TypeError, match="not a single string"):
        plait.Environment(requirements="numpy")
    with pytest.raises(PipelineDefinitionError, match="python_version"):
        plait.Environment(python_version="three")
    with pytest.raises(PipelineDefinitionError, match="apt package"):
        plait.Environment(apt_packages=["curl; rm -rf /"])
    with pytest.raises(PipelineDefinitionError, match="variable name"):
        plait.Environment(env={"A=B": "1"})
    with pytest.raises(TypeError, match="str to str"):
        plait.Environment(env={"A": 1})  # type: ignore[dict-item]


# ---- resources ----


@pytest.mark.parametrize(
    ("memory", "expected"),
    [
        (0, 0),
        (1024, 1024),
        ("100", 100),
        ("512MiB", 512 * 2**20),
        ("512Mi", 512 * 2**20),
        ("1.5Gi", 3 * 2**29),
        ("2G", 2 * 10**9),
        ("2gb", 2 * 10**9),
        ("64K", 64_000),
        ("64Ki", 65_536),
        (" 1 Ti ", 2**40),
    ],
)
def test_memory_units(memory: int | str, expected: int) -> None:
    assert plait.Resources(memory=memory).memory == expected


def test_bad_resources_are_refused_clearly() -> None:
    for memory in ("lots", "12 parsecs", "-1", "1e9", "Gi"):
        with pytest.raises(PipelineDefinitionError, match="not an amount of memory"):
            plait.Resources(memory=memory)
    with pytest.raises(PipelineDefinitionError, match=">= 0 bytes"):
        plait.Resources(memory=-1)
    with pytest.raises(TypeError, match="memory must be bytes"):
        plait.Resources(memory=1.5)  # type: ignore[arg-type]
    with pytest.raises(PipelineDefinitionError, match="cpu"):
        plait.Resources(cpu=-1)
    with pytest.raises(PipelineDefinitionError, match="cpu"):
        plait.Resources(cpu=float("inf"))
    with pytest.raises(TypeError, match="cpu"):
        plait.Resources(cpu="2")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="gpus"):
        plait.Resources(gpus=1.0)  # type: ignore[arg-type]
    with pytest.raises(PipelineDefinitionError, match=r"unknown key\(s\) mem; the keys are"):
        plait.step(resources={"mem": "1G"})
    with pytest.raises(TypeError, match=r"plait\.Resources or a dict"):
        plait.step(resources=2)  # type: ignore[call-overload]


@plait.step(resources=plait.Resources(cpu=1.5, memory="512MiB", gpus=1))
def sized(n: int) -> int:
    return n * 2


@plait.step(resources={"cpu": 0.5, "memory": 2**20})
def small(n: int) -> int:
    return n + 1


@plait.step
def plain(n: int) -> int:
    return n


@plait.pipeline
def resourced(n: int = 1) -> None:
    sized(n)
    small(n)
    plain(n)


def test_resources_compile_into_the_ir() -> None:
    steps = {s.id: s for s in resourced.compile().spec.steps}
    r = steps["sized"].settings.resources
    assert (r.cpu, r.memory_bytes, r.gpus) == (1.5, 512 * 2**20, 1)
    r = steps["small"].settings.resources
    assert (r.cpu, r.memory_bytes, r.gpus) == (0.5, 2**20, 0)
    # none named: no field, so the pipeline's version does not move
    assert not steps["plain"].settings.HasField("resources")
    assert small.settings.resources == plait.Resources(cpu=0.5, memory="1Mi")
    given = sized.settings.resources
    assert given is not None and plait.Resources.from_proto(given.to_proto()) == given
    # with_options takes a dict too
    other = plain.with_options(resources={"gpus": 2})
    assert other.settings.resources == plait.Resources(gpus=2)


def test_resources_are_not_in_the_cache_key() -> None:
    def key(resources: ir_pb2.Resources | None) -> str:
        step = ir_pb2.StepSpec()
        step.CopyFrom(next(s for s in resourced.compile().spec.steps if s.id == "sized"))
        if resources is None:
            step.settings.ClearField("resources")
        else:
            step.settings.resources.CopyFrom(resources)
        return cache_key(key_material(step, {"n": ("json", "1")}))

    base = key(None)
    assert key(ir_pb2.Resources(cpu=8, memory_bytes=2**30, gpus=4)) == base
    assert key(ir_pb2.Resources(cpu=0.5)) == base


# ---- a pipeline's environment ----

PIPELINE_ENV = plait.Environment(requirements=["six==1.16.0"], env={"WHERE": "pipeline"})
STEP_ENV = plait.Environment(env={"WHERE": "step"})


@plait.step
def inherits(n: int) -> int:
    return n


@plait.step(environment=STEP_ENV)
def own(n: int) -> int:
    return n


@plait.pipeline(environment=PIPELINE_ENV)
def with_env(n: int = 1) -> None:
    inherits(n)
    own(n)
    inherits.with_options(environment=None, id="inherits_too")(n)


@plait.pipeline
def without_env(n: int = 1) -> None:
    inherits(n)


def test_a_pipelines_environment_is_the_default_of_its_steps() -> None:
    steps = {s.id: s for s in with_env.compile().spec.steps}
    assert steps["inherits"].settings.environment == PIPELINE_ENV.to_proto()
    assert steps["inherits_too"].settings.environment == PIPELINE_ENV.to_proto()
    assert steps["own"].settings.environment == STEP_ENV.to_proto()  # the step's own wins
    (alone,) = without_env.compile().spec.steps
    assert not alone.settings.HasField("environment")
    with pytest.raises(PipelineDefinitionError, match=r"plait\.Environment"):
        plait.pipeline(environment={"A": "1"})(lambda: None)  # type: ignore[call-overload]


# ---- virtualenvs ----

_PYPROJECT = """\
[build-system]
requires = ["setuptools"]
build-backend = "setuptools.build_meta"

[project]
name = "{name}"
version = "{version}"

[tool.setuptools]
packages = ["{package}"]
"""


def _wheel(out: Path, name: str, version: str) -> Path:
    """A wheel of a one-module project, made here (setuptools, no build isolation: offline)."""
    package = name.replace("-", "_")
    src = out / f"src-{name}-{version}"
    (src / package).mkdir(parents=True)
    (src / "pyproject.toml").write_text(
        _PYPROJECT.format(name=name, version=version, package=package)
    )
    (src / package / "__init__.py").write_text(f'__version__ = "{version}"\nFAKE = True\n')
    done = run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            out,
            src,
        ],
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    (wheel,) = out.glob(f"{package}-{version}-*.whl")
    return wheel


@pytest.fixture(scope="module")
def wheels(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("wheels")
    return {
        "1.0": _wheel(out, "conflictpkg", "1.0"),
        "2.0": _wheel(out, "conflictpkg", "2.0"),
        # a project the running environment has (a test dependency Plait never imports)
        "iniconfig": _wheel(out, "iniconfig", "0.0.1"),
    }


def _env(*requirements: Path | str, **kw: Any) -> ir_pb2.Environment:
    return plait.Environment(requirements=[str(r) for r in requirements], **kw).to_proto()


def _ensure(builder: Any, env: ir_pb2.Environment, key: str, lines: list[str] | None = None) -> Any:
    async def go() -> Any:
        return await builder.ensure(env, key=key, log=(lines if lines is not None else []).append)

    return anyio.run(go)


def _python(python: str, code: str) -> str:
    out = run([python, "-c", code])
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def _venvs(home: Path) -> list[str]:
    return sorted(p.name for p in (home / "builds" / "venvs").iterdir())


@pytest.mark.slow
def test_a_virtualenv_is_built_once_and_reused(tmp_path: Path, wheels: dict[str, Path]) -> None:
    from plait.engine.builds._venv import VenvBuilder

    home = tmp_path / "home"
    builder = VenvBuilder(home)
    env = _env(wheels["1.0"])
    lines: list[str] = []
    first = _ensure(builder, env, "a" * 64, lines)
    assert first.source == "built" and first.size_bytes > 0
    assert first.reference == str(home / "builds" / "venvs" / ("a" * 64))
    assert first.python == str(Path(first.reference) / "bin" / "python")
    assert any("Successfully installed conflictpkg-1.0" in line for line in lines), lines
    again = _ensure(builder, env, "a" * 64)
    assert (again.source, again.reference, again.size_bytes) == (
        "local",
        first.reference,
        first.size_bytes,
    )
    assert _venvs(home) == ["a" * 64]  # nothing left of the temporary folder
    # another process finds it
    script = textwrap.dedent(
        f"""
        import anyio, json
        from pathlib import Path
        from plait.engine.builds._venv import VenvBuilder
        from plait.ir.v1 import ir_pb2
        env = ir_pb2.Environment.FromString({env.SerializeToString()!r})
        builder = VenvBuilder(Path({str(home)!r}))
        b = anyio.run(lambda: builder.ensure(env, key={"a" * 64!r}, log=print))
        print(json.dumps([b.source, b.reference, b.size_bytes]))
        """
    )
    out = run([sys.executable, "-c", script])
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.splitlines()[-1]) == ["local", first.reference, first.size_bytes]
    # the virtualenv runs Plait's step entrypoint, and its own requirement
    code = "import conflictpkg, plait.runners.step; print(conflictpkg.__version__)"
    assert _python(first.python, code) == "1.0"
    # made by a control plane whose packages were elsewhere: found, and pointed at ours
    (pth,) = Path(first.reference).glob("lib/python*/site-packages/zz_plait_runtime.pth")
    pth.write_text("/gone/site-packages\n")
    assert _ensure(VenvBuilder(home), env, "a" * 64).source == "local"
    assert _python(first.python, code) == "1.0"
    # removed, it is built again
    anyio.run(builder.remove, first.reference)
    assert _venvs(home) == []
    assert _ensure(builder, env, "a" * 64).source == "built"


@pytest.mark.slow
def test_concurrent_requests_for_one_key_build_once(
    tmp_path: Path, wheels: dict[str, Path]
) -> None:
    from plait.engine.builds._venv import VenvBuilder

    builder = VenvBuilder(tmp_path)
    env = _env(wheels["1.0"])
    built: list[Any] = []

    async def go() -> None:
        async def one() -> None:
            built.append(await builder.ensure(env, key="b" * 64, log=lambda _: None))

        async with anyio.create_task_group() as tg:
            for _ in range(3):
                tg.start_soon(one)

    anyio.run(go)
    assert sorted(b.source for b in built) == ["built", "local", "local"]
    assert len({b.reference for b in built}) == 1
    assert _venvs(tmp_path) == ["b" * 64]


@pytest.mark.slow
def test_conflicting_requirements_live_side_by_side(
    tmp_path: Path, wheels: dict[str, Path]
) -> None:
    from plait.engine.builds._venv import VenvBuilder

    builder = VenvBuilder(tmp_path)
    one = _ensure(builder, _env(wheels["1.0"]), "1" * 64)
    two = _ensure(builder, _env(wheels["2.0"]), "2" * 64)
    code = "import conflictpkg; print(conflictpkg.__version__)"
    assert (_python(one.python, code), _python(two.python, code)) == ("1.0", "2.0")
    # a requirement wins over the version the control plane's environment has
    from importlib.metadata import version

    mine = version("iniconfig")
    assert mine != "0.0.1"
    fake = _ensure(builder, _env(wheels["iniconfig"]), "3" * 64)
    code = (
        "import iniconfig, importlib.metadata as m; print(iniconfig.FAKE, m.version('iniconfig'))"
    )
    assert _python(fake.python, code) == "True 0.0.1"


@pytest.mark.slow
def test_a_failed_build_says_why_and_leaves_nothing(tmp_path: Path) -> None:
    from plait.engine.builds._venv import VenvBuilder, VenvBuildError

    builder = VenvBuilder(tmp_path)
    missing = tmp_path / "nowhere" / "ghost-1.0-py3-none-any.whl"
    lines: list[str] = []
    with pytest.raises(VenvBuildError, match=r"pip could not install.*ghost-1\.0") as info:
        _ensure(builder, _env(missing), "c" * 64, lines)
    assert "pip's last lines" in str(info.value) and lines
    assert _venvs(tmp_path) == []


def test_another_python_version_is_refused() -> None:
    from plait.engine.builds._venv import VenvBuilder, VenvBuildError, check_python_version

    mine = f"{sys.version_info[0]}.{sys.version_info[1]}"
    check_python_version(mine)
    check_python_version(f"{mine}.{sys.version_info[2]}")
    check_python_version(str(sys.version_info[0]))
    check_python_version("")
    other = f"{sys.version_info[0]}.{sys.version_info[1] + 1}"
    builder = VenvBuilder(Path("/nonexistent"))
    with pytest.raises(VenvBuildError, match=rf"asks for Python {other}.*cannot change it"):
        _ensure(builder, _env("six", python_version=other), "d" * 64)
    options = ir_pb2.Environment(requirements=["six", "--index-url=https://example.org"])
    with pytest.raises(VenvBuildError, match="must not be pip options: --index-url"):
        _ensure(builder, options, "d" * 64)
    with pytest.raises(VenvBuildError, match="not a build key"):
        _ensure(builder, _env("six"), "../escape")
    with pytest.raises(VenvBuildError, match="not a virtualenv of"):
        anyio.run(builder.remove, "/etc")


# ---- the local runner's one-shot step processes ----

STEPS = '''
"""Steps of the environment tests (imported here, by the warm pool and by step processes)."""

import os
import sys
import time
from pathlib import Path

import plait

ONE = plait.Environment(env={"WHICH": "one"})


@plait.step(runner="venv", environment=ONE, cache=False)
def one() -> str:
    import conflictpkg

    return f"{conflictpkg.__version__} {os.environ['WHICH']} {sys.prefix}"


@plait.step(runner="venv", cache=False)
def two() -> str:
    import conflictpkg

    return f"{conflictpkg.__version__} {sys.prefix}"


@plait.step(cache=False)
def warm() -> str:
    try:
        import conflictpkg  # noqa: F401
    except ImportError:
        return f"none {sys.prefix}"
    return "found"


@plait.pipeline
def side_by_side() -> None:
    one()
    two()
    warm()


@plait.step(runner="venv", cache=False)
def broken() -> str:
    return "never"


@plait.pipeline
def lost() -> None:
    broken()


@plait.step(runner="venv", cache=False)
def waiting(d: str) -> str:
    Path(d, "pid").write_text(str(os.getpid()))
    while True:
        time.sleep(0.05)


@plait.pipeline
def hold(d: str) -> None:
    waiting(d)


@plait.step(resources={"cpu": 1, "memory": "64Mi"})
def doubled(n: int) -> int:
    return n * 2


@plait.pipeline
def cached(n: int = 1) -> None:
    doubled(n)


RESIZED = doubled.with_options(resources=plait.Resources(cpu=4, memory="1Gi", gpus=1))


@plait.pipeline
def cached_resized(n: int = 1) -> None:
    RESIZED(n)
'''


class VenvRunner:
    """The local runner, given each task's interpreter by step id, as the control plane sets
    ``Task.python`` once it has built the step's virtualenv."""

    name = "venv"

    def __init__(self, pythons: dict[str, str], offer: Callable[[tasks.Task], None]) -> None:
        from plait.runners import LocalRunner

        self.pythons = pythons
        self.offer = offer
        self.inner = LocalRunner(1, prestart=0)
        self.handles: list[str] = []

    async def run(
        self, ctx: Any, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        await self.inner.run(ctx, task_status=task_status)

    async def submit(self, task: tasks.Task) -> str | None:
        task.python = self.pythons[task.step.id]
        self.offer(task)
        handle = await self.inner.submit(task)
        assert handle is not None
        self.handles.append(handle)
        return handle

    async def cancel(self, token: tasks.LeaseToken) -> None:
        await self.inner.cancel(token)

    def alive(self, handle: str) -> bool | None:
        return self.inner.alive(handle)


@pytest.fixture(scope="module")
def steps(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ModuleType]:
    folder = tmp_path_factory.mktemp("env_steps")
    (folder / "env_steps.py").write_text(textwrap.dedent(STEPS))
    sys.path.insert(0, str(folder))
    try:
        yield importlib.import_module("env_steps")
    finally:
        sys.path.remove(str(folder))
        sys.modules.pop("env_steps", None)


class Plane:
    """A control plane in this process (auth on, as the embedded engine's), its runners the
    local warm pool and a VenvRunner, and a client."""

    def __init__(self, home: Path, pythons: dict[str, str]) -> None:
        from anyio.from_thread import start_blocking_portal

        from plait.engine import ControlPlane, ControlPlaneConfig
        from plait.runners import LocalRunner

        # the step process claims its task by its lease (PollTask); the control plane holds
        # the tasks it builds for, and this wrapper sets Task.python after that point
        self.venv = VenvRunner(pythons, lambda task: self.cp.pools.hold(task))
        self.cp = ControlPlane(
            ControlPlaneConfig(home=home, auth=True, api_tokens=False, crash_retries=0),
            runners={"local": LocalRunner(1), "venv": self.venv},
        )
        self._portal_cm = start_blocking_portal("asyncio")
        self.portal = self._portal_cm.__enter__()
        try:
            self._future, port = self.portal.start_task(self.cp.serve, "127.0.0.1:0")
            self.client = plait.Client(f"127.0.0.1:{port}", token=self.cp.owner_secret)
        except BaseException:
            self._portal_cm.__exit__(None, None, None)
            raise

    def close(self) -> None:
        try:
            self.client.close()
            self.portal.call(self.cp.stop)
            self._future.result(timeout=30)
        finally:
            self._portal_cm.__exit__(None, None, None)


@pytest.fixture(scope="module")
def plane(
    tmp_path_factory: pytest.TempPathFactory, wheels: dict[str, Path], steps: ModuleType
) -> Iterator[Plane]:
    from plait.engine.builds._venv import VenvBuilder

    tmp = tmp_path_factory.mktemp("env_plane")
    builder = VenvBuilder(tmp / "home")
    v1 = _ensure(builder, _env(wheels["1.0"]), "1" * 64).python
    v2 = _ensure(builder, _env(wheels["2.0"]), "2" * 64).python
    # a virtualenv that cannot import Plait: its step process exits without reporting
    bare = tmp / "bare"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", bare], check=True)
    pythons = {"one": v1, "two": v2, "waiting": v1, "broken": str(bare / "bin" / "python")}
    p = Plane(tmp / "home", pythons)
    try:
        yield p
    finally:
        p.close()


@pytest.mark.slow
def test_steps_with_conflicting_requirements_run_side_by_side(
    plane: Plane, steps: ModuleType
) -> None:
    done = plane.client.run_pipeline(steps.side_by_side, {})
    assert str(done.status) == "SUCCEEDED", {
        k: s.error and s.error.message for k, s in done.steps.items()
    }
    one = done.steps["one"].output().split()
    two = done.steps["two"].output().split()
    warm = done.steps["warm"].output().split()
    assert one[:2] == ["1.0", "one"] and two[0] == "2.0"  # and the environment's variables
    assert one[2] != two[1] and warm == ["none", sys.prefix]  # three interpreters
    assert len(plane.venv.handles) == 2 and all(h.isdigit() for h in plane.venv.handles)


@pytest.mark.slow
def test_a_step_process_that_ends_without_reporting_crashes_its_attempt(
    plane: Plane, steps: ModuleType
) -> None:
    done = plane.client.run_pipeline(steps.lost, {})
    step = done.steps["broken"]
    assert str(done.status) == "FAILED" and str(step.status) == "CRASHED", step
    assert step.error is not None
    assert "step process" in step.error.message and "exited with code 1" in step.error.message
    assert "No module named" in step.error.message  # what the process said


@pytest.mark.slow
def test_cancelling_a_run_stops_its_step_process(
    plane: Plane, steps: ModuleType, tmp_path: Path
) -> None:
    run_id = plane.client.run_pipeline(steps.hold, {"d": str(tmp_path)}, wait=False).run_id
    wait_for(lambda: (tmp_path / "pid").exists(), "the step starting in its virtualenv")
    pid = int((tmp_path / "pid").read_text())
    handle = plane.venv.handles[-1]
    assert handle == str(pid) and plane.venv.alive(handle)
    plane.client.cancel_run(run_id)
    done = plane.client.wait(run_id)
    assert str(done.status) == "CANCELLED" and str(done.steps["waiting"].status) == "CANCELLED"
    wait_for(lambda: not plane.venv.alive(handle), "the step process ending")
    assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text()


@pytest.mark.slow
def test_changing_resources_keeps_a_cache_hit(plane: Plane, steps: ModuleType) -> None:
    first = plane.client.run_pipeline(steps.cached, {"n": 21})
    assert str(first.steps["doubled"].status) in ("SUCCEEDED", "CACHED")
    again = plane.client.run_pipeline(steps.cached_resized, {"n": 21})
    resources = steps.cached_resized.compile().spec.steps[0].settings.resources
    assert (resources.cpu, resources.gpus) == (4, 1)  # the IR changed ...
    assert str(again.steps["doubled"].status) == "CACHED"  # ... the cache key did not
    assert again.steps["doubled"].output() == 42


def test_the_runner_knows_the_step_entrypoints_exit_codes() -> None:
    from plait.runners._local import _REPORTED
    from plait.runners.step import EXIT_CANCELLED, EXIT_OK

    assert (EXIT_OK, EXIT_CANCELLED) == _REPORTED


# ---- end to end: the control plane builds each step's virtualenv, once per key ----

BUILT = """
import sys

import plait

V1 = plait.Environment(requirements=[{w1!r}], env={{"WHICH": "one"}})
V2 = plait.Environment(requirements=[{w2!r}])


@plait.step(environment=V1, cache=False)
def first() -> str:
    import conflictpkg

    return conflictpkg.__version__


@plait.step(environment=V2, cache=False)
def second() -> str:
    import conflictpkg

    return conflictpkg.__version__


@plait.step(cache=False)
def plain() -> str:
    return sys.prefix


@plait.pipeline
def built() -> None:
    first()
    second()
    plain()
"""


@pytest.mark.slow
def test_the_control_plane_builds_each_virtualenv_once(
    tmp_path: Path, wheels: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    import sqlite3

    folder = tmp_path / "project"
    folder.mkdir()
    (folder / "built_steps.py").write_text(
        BUILT.format(w1=str(wheels["1.0"]), w2=str(wheels["2.0"]))
    )
    monkeypatch.syspath_prepend(str(folder))
    module = importlib.import_module("built_steps")
    home = tmp_path / "home"
    client = plait.Client(home=home)
    try:
        runs = [client.run_pipeline(module.built, {}) for _ in range(2)]
        for done in runs:
            assert str(done.status) == "SUCCEEDED", {
                k: s.error and s.error.message for k, s in done.steps.items()
            }
            assert done.steps["first"].output() == "1.0" and done.steps["second"].output() == "2.0"
            assert done.steps["plain"].output() == sys.prefix  # the warm pool, as before
        logs = "".join(e.text for e in client.logs(runs[0].run_id, "first"))
        assert "[build]" in logs  # the build's output is the attempt's log
        with sqlite3.connect(home / "plait.db") as db:
            builds = db.execute("SELECT key, kind, status, source FROM builds").fetchall()
            uses = db.execute("SELECT key, run_id FROM build_runs").fetchall()
    finally:
        client.shutdown()
        sys.modules.pop("built_steps", None)
    # two environments, two builds; the second run reused both
    assert sorted((kind, status, source) for _, kind, status, source in builds) == [
        ("venv", "READY", "local"),
        ("venv", "READY", "local"),
    ]
    assert sorted(run for _, run in uses) == sorted([r.run_id for r in runs] * 2)
    assert len(list((home / "builds" / "venvs").iterdir())) == 2
