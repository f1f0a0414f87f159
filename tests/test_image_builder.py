"""The Docker image builder against a real Docker daemon and a real registry.

scripts/test starts both: PLAIT_TEST_DOCKER_BASE is a local Debian image with Python (no image
can be pulled from a public registry here), PLAIT_TEST_REGISTRY the HOST:PORT of a
docker-registry on loopback. Every image is made unique to this test session by a requirement
(a tiny wheel with a random value), so neither the Docker host nor the registry can answer from
an earlier session; every image and registry entry made here is removed at the end.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import socket
import subprocess
import tomllib
import urllib.error
import urllib.request
import uuid
import zipfile
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import anyio
import pytest

import plait
from plait.engine.builds._docker import (
    KEY_LABEL,
    RECIPE_VERSION,
    BuildError,
    BuiltImage,
    DockerImageBuilder,
    image_reference,
)
from plait.engine.builds._key import diff_material, image_material, material_key
from plait.engine.builds._wheels import PACKAGE_ROOTS, Target, WheelCache, installed_plait
from plait.ir.builds import build_digest
from plait.ir.v1 import ir_pb2

ROOT = Path(__file__).resolve().parent.parent
pytestmark = [pytest.mark.docker, pytest.mark.slow, pytest.mark.timeout(900)]
T = TypeVar("T")


def _needed(variable: str, what: str) -> str:
    value = os.environ.get(variable)
    if not value:
        message = f"{variable} is not set (scripts/test starts {what} and sets it)"
        if os.environ.get("CI"):
            pytest.fail(message)  # in CI a missing Docker or registry fails, never skips
        pytest.skip(message)
    return value


def docker(
    *args: str, check: bool = True, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["docker", *args], capture_output=True, text=True, check=check, timeout=timeout
    )


def run(fn: Callable[[], Awaitable[T]]) -> T:
    return anyio.run(fn)


@pytest.fixture(scope="module")
def base() -> str:
    image = _needed("PLAIT_TEST_DOCKER_BASE", "Docker")
    if docker("image", "inspect", image, check=False).returncode != 0:
        pytest.fail(f"PLAIT_TEST_DOCKER_BASE={image} is not an image on the Docker host")
    return image


@pytest.fixture(scope="module")
def registry() -> str:
    address = _needed("PLAIT_TEST_REGISTRY", "a docker-registry")
    try:
        urllib.request.urlopen(f"http://{address}/v2/", timeout=10).close()
    except OSError as exc:
        pytest.fail(f"PLAIT_TEST_REGISTRY={address} does not answer: {exc}")
    return address


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("plait-home")


@pytest.fixture(scope="module")
def made() -> Iterator[list[str]]:
    """Image references to remove at the end (locally, and from the registry they name)."""
    references: list[str] = []
    yield references
    for reference in references:
        docker("rmi", "-f", reference, check=False)
        if "/" in reference:
            _registry_delete(reference)


def _registry_url(reference: str) -> str:
    host, _, rest = reference.partition("/")
    repo, _, tag = rest.rpartition(":")
    return f"http://{host}/v2/{repo}/manifests/{tag}"


_ACCEPT = "application/vnd.docker.distribution.manifest.v2+json"


def _registry_digest(reference: str) -> str | None:
    """The manifest digest of ``reference`` in its registry, None when it is not there."""
    request = urllib.request.Request(
        _registry_url(reference), method="HEAD", headers={"Accept": _ACCEPT}
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as resp:
            return str(resp.headers["Docker-Content-Digest"])
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            return None
        raise


def _registry_delete(reference: str) -> None:
    try:
        digest = _registry_digest(reference)
        if digest:
            url = _registry_url(reference).rsplit("/", 1)[0] + "/" + digest
            urllib.request.urlopen(urllib.request.Request(url, method="DELETE"), timeout=10).close()
    except OSError:
        pass  # a registry without deletion enabled keeps it; its tags are unique to a session


def tiny_wheel(folder: Path, name: str, value: str) -> Path:
    """A pure-Python wheel of module ``name`` whose ``VALUE`` is ``value``."""
    info = f"{name}-1.0.dist-info"
    files = {
        f"{name}.py": f"VALUE = {value!r}\n",
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n\n",
        f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
        "Tag: py3-none-any\n\n",
    }
    record = []
    for path, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=")
        record.append(f"{path},sha256={digest.decode()},{len(text.encode())}")
    files[f"{info}/RECORD"] = "\n".join([*record, f"{info}/RECORD,,"]) + "\n"
    folder.mkdir(parents=True, exist_ok=True)
    wheel = folder / f"{name}-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        for path, text in files.items():
            z.writestr(path, text)
    return wheel


def project_folder(folder: Path, name: str, value: str) -> Path:
    """A setuptools project (built by the builder with pip wheel) with module ``name``."""
    folder.mkdir(parents=True)
    (folder / "pyproject.toml").write_text(
        '[build-system]\nrequires = ["setuptools>=61"]\nbuild-backend = "setuptools.build_meta"\n'
        f'[project]\nname = "{name}"\nversion = "1.0"\n'
        f'[tool.setuptools]\npy-modules = ["{name}"]\n'
    )
    (folder / f"{name}.py").write_text(f"VALUE = {value!r}\n")
    return folder


async def ensure(
    builder: DockerImageBuilder, env: ir_pb2.Environment, registry: str = ""
) -> tuple[BuiltImage, list[str]]:
    material = await builder.material(env, registry)
    lines: list[str] = []
    built = await builder.ensure(
        env, key=material_key(material), material=material, registry=registry, log=lines.append
    )
    return built, lines


def unique_env(tmp: Path, tag: str, **fields: Any) -> tuple[ir_pb2.Environment, str]:
    """An environment whose key no earlier session made (a wheel with a random value)."""
    value = uuid.uuid4().hex
    wheel = tiny_wheel(tmp / f"wheel-{tag}-{value}", f"plaitprobe_{tag}", value)
    requirements = [str(wheel), *fields.pop("requirements", [])]
    return ir_pb2.Environment(requirements=requirements, **fields), value


@dataclass
class Image:
    env: ir_pb2.Environment
    material: dict[str, Any]
    built: BuiltImage
    lines: list[str]
    value: str
    folder_value: str


@pytest.fixture(scope="module")
def image(
    base: str, home: Path, made: list[str], tmp_path_factory: pytest.TempPathFactory
) -> Image:
    """One image built for this session: Plait, a wheel and a project folder as requirements."""
    tmp = tmp_path_factory.mktemp("image")
    folder_value = uuid.uuid4().hex
    folder = project_folder(tmp / "project", "plaitprobe_folder", folder_value)
    env, value = unique_env(tmp, "image", requirements=[str(folder)])

    async def main() -> tuple[dict[str, Any], BuiltImage, list[str]]:
        builder = DockerImageBuilder(home, parent_image=base)
        try:
            material = await builder.material(env)
            made.append(image_reference(material_key(material)))
            built, lines = await ensure(builder, env)
            assert builder.build_count == 1
            return material, built, lines
        finally:
            await builder.aclose()

    material, built, lines = run(main)
    print(f"first build (Plait layers cold or cached): {built.duration_seconds:.1f} s")
    return Image(env, material, built, lines, value, folder_value)


# -- key material -------------------------------------------------------------------------


def test_the_installed_plait_covers_every_package_and_maps_to_its_source() -> None:
    plait_files = installed_plait()
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert set(config["package-dir"]) <= set(PACKAGE_ROOTS)
    for package in config["packages"]:
        assert f"{package.replace('.', '/')}/__init__.py" in plait_files.files, package
    # the files are the ones imported (an editable checkout's sources), so an edit changes them
    import plait.engine.builds._key as key_module

    assert plait_files.files["plait/engine/builds/_key.py"] == Path(key_module.__file__)
    assert not any(p.endswith(".pyc") or "__pycache__" in p for p in plait_files.files)
    assert plait_files.plait_version.startswith(plait.__version__ + "+")
    assert any(pin.startswith("grpcio==") for pin in plait_files.pins)


def test_material_diffs_name_each_component() -> None:
    env = ir_pb2.Environment(requirements=["six==1.15.0"], apt_packages=["curl"])
    common: dict[str, Any] = dict(
        parent_image="python:3.11-slim",
        parent_image_id="sha256:" + "a" * 64,
        python_version="",
        plait_version="0.1.0+x",
        recipe_version="1",
        file_digests={},
    )
    a = image_material(env, **common)
    assert {"key_scheme", "parent_image_id", "plait_version", "recipe_version"} <= set(a)
    env2 = ir_pb2.Environment(requirements=["six==1.16.0"], apt_packages=["curl"])
    b = image_material(env2, **{**common, "parent_image_id": "sha256:" + "b" * 64})
    assert material_key(a) != material_key(b)
    assert diff_material(a, b) == [
        "parent_image_id: sha256:aaaaaaaaaaaa… → sha256:bbbbbbbbbbbb… "
        "(the tag python:3.11-slim moved)",
        "requirements: + six==1.16.0 - six==1.15.0",
    ]
    c = {**a, "file_digests": {"/w/x.whl": "c" * 64}, "plait_version": "0.1.0+y"}
    assert diff_material(a, c) == [
        "file_digests: /w/x.whl (none) → cccccccccccc…",
        "plait_version: 0.1.0+x → 0.1.0+y",
    ]
    assert diff_material(a, dict(a)) == []


def test_key_material_resolves_the_parent_and_ignores_runtime_variables(
    base: str, home: Path, tmp_path: Path
) -> None:
    base_id = docker("image", "inspect", "-f", "{{.Id}}", base).stdout.strip()
    wheel = tiny_wheel(tmp_path / "w", "plaitprobe_key", "one")

    async def main() -> None:
        builder = DockerImageBuilder(home, parent_image=base)
        try:
            plain = ir_pb2.Environment(requirements=["six==1.15.0", str(wheel)])
            m = await builder.material(plain)
            assert m["parent_image"] == base
            assert m["parent_image_id"] == base_id
            assert m["recipe_version"] == RECIPE_VERSION
            assert m["plait_version"] == installed_plait().plait_version
            assert m["file_digests"] == {str(wheel): hashlib.sha256(wheel.read_bytes()).hexdigest()}
            # runtime variables are never in it
            with_vars = ir_pb2.Environment()
            with_vars.CopyFrom(plain)
            with_vars.env.add(name="SECRET_TOKEN", value="hunter2")
            m_vars = await builder.material(with_vars)
            assert m_vars == m
            assert "hunter2" not in json.dumps(m) and "SECRET_TOKEN" not in json.dumps(m)
            # a requirement change changes the key, and the diff says which
            other = ir_pb2.Environment(requirements=["six==1.16.0", str(wheel)])
            m_other = await builder.material(other)
            assert material_key(m_other) != material_key(m)
            assert diff_material(m, m_other) == ["requirements: + six==1.16.0 - six==1.15.0"]
            # the same wheel path with new content: a new key (contents, not paths)
            tiny_wheel(tmp_path / "w", "plaitprobe_key", "two")
            m_new_wheel = await builder.material(plain)
            assert material_key(m_new_wheel) != material_key(m)
            [line] = diff_material(m, m_new_wheel)
            assert line.startswith(f"file_digests: {wheel} ")
            # the environment's parent wins over the builder's default; python_version is in
            named = ir_pb2.Environment(parent_image=base, python_version="3.11")
            m_named = await builder.material(named)
            assert m_named["parent_image"] == base and m_named["python_version"] == "3.11"
        finally:
            await builder.aclose()

    run(main)


def test_a_moved_parent_tag_changes_the_key(base: str, home: Path, image: Image) -> None:
    tag = f"plait-test-moved:{os.getpid()}"
    docker("tag", base, tag)
    try:

        async def main() -> tuple[dict[str, Any], dict[str, Any]]:
            builder = DockerImageBuilder(home)
            try:
                env = ir_pb2.Environment(parent_image=tag)
                before = await builder.material(env)
                # the tag now names another image (any other will do: the session's build)
                docker("tag", image.built.image_id, tag)
                after = await builder.material(env)
                return before, after
            finally:
                await builder.aclose()

        before, after = run(main)
    finally:
        docker("rmi", tag, check=False)
    assert before["parent_image_id"] != after["parent_image_id"]
    assert after["parent_image_id"] == image.built.image_id
    assert material_key(before) != material_key(after)
    [line] = diff_material(before, after)
    assert line.startswith("parent_image_id: sha256:") and f"(the tag {tag} moved)" in line


def test_a_missing_parent_image_or_requirement_file_fails_clearly(
    home: Path, tmp_path: Path, base: str
) -> None:
    async def main() -> None:
        builder = DockerImageBuilder(home, parent_image=base)
        try:
            with pytest.raises(BuildError, match="not present on the Docker host"):
                await builder.material(ir_pb2.Environment(parent_image="plait-no-such:image"))
            missing = tmp_path / "nope-1.0-py3-none-any.whl"
            with pytest.raises(BuildError, match="does not exist"):
                await builder.material(ir_pb2.Environment(requirements=[str(missing)]))
        finally:
            await builder.aclose()

    run(main)


# -- building and reusing -----------------------------------------------------------------


def test_an_image_is_built_with_progress_and_then_reused(
    base: str, home: Path, image: Image
) -> None:
    assert image.built.source == "built"
    assert image.built.reference == image_reference(material_key(image.material))
    assert image.built.reference.startswith("plait-env:") and image.built.pushed_to == ""
    steps = [re.match(r"step (\d+)/(\d+): ", line) for line in image.lines]
    numbers = [(int(m.group(1)), int(m.group(2))) for m in steps if m]
    assert numbers[0][0] == 1 and numbers[-1][0] == numbers[-1][1]  # step 1/N ... step N/N
    inspected = json.loads(docker("image", "inspect", image.built.reference).stdout)[0]
    labels = inspected["Config"]["Labels"]
    assert labels[KEY_LABEL] == material_key(image.material)
    assert labels["plait.build.digest"] == build_digest(image.env)
    assert inspected["Id"] == image.built.image_id and image.built.size_bytes > 0

    async def main() -> tuple[BuiltImage, list[str], int]:
        builder = DockerImageBuilder(home, parent_image=base)
        try:
            again, lines = await ensure(builder, image.env)
            return again, lines, builder.build_count
        finally:
            await builder.aclose()

    again, lines, builds = run(main)
    assert (again.source, builds) == ("local", 0)
    assert again.image_id == image.built.image_id
    assert not any(line.startswith("step ") for line in lines)


def test_the_image_runs_the_step_entrypoint_and_has_the_requirements(image: Image) -> None:
    ref = image.built.reference
    step = docker("run", "--rm", ref, "python", "-m", "plait.runners.step", "--help")
    assert step.returncode == 0 and "--lease" in step.stdout
    probe = docker(
        "run",
        "--rm",
        ref,
        "python",
        "-c",
        "import plaitprobe_image, plaitprobe_folder, plait, sys; "
        "print(plaitprobe_image.VALUE, plaitprobe_folder.VALUE, plait.__file__, sys.prefix)",
    )
    value, folder_value, plait_file, prefix = probe.stdout.split()
    assert (value, folder_value) == (image.value, image.folder_value)
    assert plait_file.startswith("/opt/plait/") and prefix == "/opt/plait"


def test_building_a_project_folder_leaves_its_key_unchanged(
    base: str, home: Path, image: Image
) -> None:
    # pip wheel writes build/ and *.egg-info into the folder: they are not its content
    async def main() -> dict[str, Any]:
        builder = DockerImageBuilder(home, parent_image=base)
        try:
            return await builder.material(image.env)
        finally:
            await builder.aclose()

    assert run(main) == image.material


def test_concurrent_requests_for_one_key_build_once(
    base: str, home: Path, made: list[str], image: Image, tmp_path: Path
) -> None:
    env, value = unique_env(tmp_path, "concurrent")

    async def main() -> tuple[list[tuple[BuiltImage, list[str]]], int]:
        builder = DockerImageBuilder(home, parent_image=base)
        results: list[tuple[BuiltImage, list[str]]] = []
        try:
            made.append(image_reference(material_key(await builder.material(env))))

            async def one() -> None:
                results.append(await ensure(builder, env))

            async with anyio.create_task_group() as tg:
                for _ in range(3):
                    tg.start_soon(one)
            return results, builder.build_count
        finally:
            await builder.aclose()

    results, builds = run(main)
    assert builds == 1
    assert sorted(r.source for r, _ in results) == ["built", "local", "local"]
    assert len({r.image_id for r, _ in results}) == 1
    # a requirement-only change reuses the Plait layers of the session's first build
    [(built, lines)] = [(r, lines) for r, lines in results if r.source == "built"]
    print(f"requirement-only build: {built.duration_seconds:.1f} s")
    plait_step = next(
        i
        for i, line in enumerate(lines)
        if line.startswith("step ") and ": RUN /opt/plait/bin/python /tmp/plait-wheels/" in line
    )
    assert lines[plait_step + 1].strip() == "---> Using cache"
    out = docker(
        "run",
        "--rm",
        built.reference,
        "python",
        "-c",
        "import plaitprobe_concurrent as m; print(m.VALUE)",
    )
    assert out.stdout.strip() == value


def test_apt_packages_are_installed(
    base: str, home: Path, made: list[str], image: Image, tmp_path: Path
) -> None:
    env, _ = unique_env(tmp_path, "apt", apt_packages=["tree"])

    async def main() -> BuiltImage:
        builder = DockerImageBuilder(home, parent_image=base)
        try:
            made.append(image_reference(material_key(await builder.material(env))))
            built, _ = await ensure(builder, env)
            return built
        finally:
            await builder.aclose()

    built = run(main)
    assert built.source == "built"
    assert docker("run", "--rm", built.reference, "tree", "--version").returncode == 0


def test_a_python_version_the_parent_lacks_fails_the_build(base: str, home: Path) -> None:
    async def main() -> None:
        builder = DockerImageBuilder(home, parent_image=base)
        try:
            with pytest.raises(BuildError, match=r"asks for Python 3\.99"):
                await ensure(builder, ir_pb2.Environment(python_version="3.99"))
        finally:
            await builder.aclose()

    run(main)


# -- the registry -------------------------------------------------------------------------


def test_a_pushed_image_is_pulled_not_rebuilt(
    base: str, home: Path, registry: str, made: list[str], image: Image, tmp_path: Path
) -> None:
    env, value = unique_env(tmp_path, "registry")

    async def first() -> tuple[BuiltImage, int]:
        builder = DockerImageBuilder(home, parent_image=base)
        try:
            made.append(image_reference(material_key(await builder.material(env)), registry))
            built, _ = await ensure(builder, env, registry)
            return built, builder.build_count
        finally:
            await builder.aclose()

    built, builds = run(first)
    assert (built.source, builds) == ("built", 1)
    assert built.reference.startswith(f"{registry}/plait-env:")
    assert built.pushed_to == built.reference
    assert _registry_digest(built.reference) is not None
    docker("rmi", built.reference)
    assert docker("image", "inspect", built.reference, check=False).returncode != 0

    async def again() -> tuple[BuiltImage, list[str], BuiltImage, int]:
        builder = DockerImageBuilder(home, parent_image=base)
        try:
            pulled, lines = await ensure(builder, env, registry)
            local, _ = await ensure(builder, env, registry)
            return pulled, lines, local, builder.build_count
        finally:
            await builder.aclose()

    pulled, lines, local, builds = run(again)
    assert (pulled.source, local.source, builds) == ("pulled", "local", 0)
    assert pulled.image_id == built.image_id and pulled.pushed_to == built.reference
    assert any(line.startswith("pulling ") for line in lines)
    out = docker(
        "run",
        "--rm",
        pulled.reference,
        "python",
        "-c",
        "import plaitprobe_registry as m; print(m.VALUE)",
    )
    assert out.stdout.strip() == value


def test_an_image_built_without_the_registry_is_pushed_when_one_is_configured(
    base: str, home: Path, registry: str, made: list[str], image: Image
) -> None:
    reference = image_reference(material_key(image.material), registry)
    made.append(reference)

    async def main() -> tuple[BuiltImage, int]:
        builder = DockerImageBuilder(home, parent_image=base)
        try:
            built, _ = await ensure(builder, image.env, registry)
            return built, builder.build_count
        finally:
            await builder.aclose()

    built, builds = run(main)
    assert (built.source, builds, built.reference) == ("local", 0, reference)
    assert built.pushed_to == reference and _registry_digest(reference) is not None


def test_an_unreachable_registry_fails_the_build_and_builds_nothing(
    base: str, home: Path, tmp_path: Path
) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = f"127.0.0.1:{s.getsockname()[1]}"  # nothing listens once it is closed
    env, _ = unique_env(tmp_path, "unreachable")

    async def main() -> tuple[str, int]:
        builder = DockerImageBuilder(home, parent_image=base)
        try:
            material = await builder.material(env, closed)
            with pytest.raises(BuildError, match="cannot be reached") as caught:
                await builder.ensure(
                    env,
                    key=material_key(material),
                    material=material,
                    registry=closed,
                    log=lambda _: None,
                )
            assert "nothing was built" in str(caught.value)
            return material_key(material), builder.build_count
        finally:
            await builder.aclose()

    key, builds = run(main)
    assert builds == 0
    listed = docker("image", "ls", "-q", "--filter", f"label={KEY_LABEL}={key}")
    assert listed.stdout.strip() == ""


# -- wheels for another Python ------------------------------------------------------------


def test_wheels_for_another_python_are_downloaded_for_its_platform(tmp_path: Path) -> None:
    target = Target(
        python="3.12.4",
        implementation="cpython",
        machine="x86_64",
        libc="glibc",
        libc_version="2.36",
    )
    assert not target.host_compatible()

    async def main() -> Path:
        return await WheelCache(tmp_path).requirements(
            ["markupsafe==3.0.2"], {}, target, lambda _: None, image_folder="/tmp/reqs"
        )

    folder = run(main)
    [wheel] = folder.glob("*.whl")
    assert wheel.name.startswith("MarkupSafe-3.0.2-cp312-cp312-") or wheel.name.startswith(
        "markupsafe-3.0.2-cp312-cp312-"
    )
    assert (folder / "requirements.txt").read_text() == "markupsafe==3.0.2\n"
