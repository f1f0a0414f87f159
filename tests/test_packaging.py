"""The distribution `plait`: one import root, built from client/, engine/, runners/ and proto/.

The folders are not named like the packages (client/ is `plait`), so the wheel and the editable
install are checked for what they really hold and import, not for what the mapping suggests.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
PACKAGES: list[str] = PYPROJECT["tool"]["setuptools"]["packages"]
PACKAGE_DIRS: dict[str, str] = PYPROJECT["tool"]["setuptools"]["package-dir"]
NAME: str = PYPROJECT["project"]["name"]
VERSION: str = PYPROJECT["project"]["version"]

# What a checkout holds besides the sources: never copied into the build.
NOT_SOURCES = {".git", ".venv", "build", "dist", "node_modules", ".hypothesis", ".mypy_cache"}


def _run(*args: str | Path, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    p = subprocess.run(args, capture_output=True, text=True, check=False, **kwargs)
    assert p.returncode == 0, f"{args} failed:\n{p.stdout}\n{p.stderr}"
    return p


def _folder_of(package: str) -> Path:
    """Where setuptools takes `package` from: its own package-dir entry or its parent's."""
    parts = package.split(".")
    for i in range(len(parts), 0, -1):
        if (prefix := ".".join(parts[:i])) in PACKAGE_DIRS:
            return ROOT.joinpath(PACKAGE_DIRS[prefix], *parts[i:])
    return ROOT.joinpath(*parts)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A wheel built from a copy of the checkout, so the build leaves nothing in the checkout."""
    src = tmp_path_factory.mktemp("src") / "plait"

    def ignore(folder: str, names: list[str]) -> set[str]:
        top = Path(folder) == ROOT
        return {
            n
            for n in names
            if n == "__pycache__" or n.endswith(".egg-info") or (top and n in NOT_SOURCES)
        }

    shutil.copytree(ROOT, src, ignore=ignore, symlinks=True)
    out = tmp_path_factory.mktemp("dist")
    _run(sys.executable, "-m", "build", "--wheel", "--outdir", out, src, timeout=280)
    (built,) = out.glob("*.whl")
    return built


@pytest.fixture(scope="module")
def installed(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel installed on its own into a folder (the dependencies come from this venv)."""
    target = tmp_path_factory.mktemp("site")
    _run(
        sys.executable,
        "-m",
        "pip",
        "install",
        "-q",
        "--no-deps",
        "--target",
        target,
        wheel,
        timeout=110,
    )
    return target


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_wheel_holds_the_plait_packages(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {
        "plait/__init__.py",
        "plait/py.typed",
        "plait/engine/migrations/env.py",
        "plait/engine/migrations/versions/0001_the_first_schema.py",
        "plait/engine/__init__.py",
        "plait/runners/__init__.py",
        "plait/ir/__init__.py",
        "plait/ir/v1/ir_pb2.py",
        "plait/ir/v1/ir_pb2.pyi",
        "plait/api/v1/run_service_pb2.py",
        "plait/api/v1/run_service_pb2_grpc.py",
        # the dashboard's pages, served from the wheel
        "plait/engine/dashboard/static/index.html",
        "plait/engine/dashboard/static/app.js",
        "plait/engine/dashboard/static/app.css",
    }
    assert expected <= names, f"missing from the wheel: {sorted(expected - names)}"


def test_the_dashboard_fetches_nothing_from_the_network() -> None:
    """Every asset of the pages is in the wheel: no page or script names another host (a CDN,
    a web font), and every file the page loads is one of the shipped ones."""
    static = ROOT / "engine" / "dashboard" / "static"
    files = {p.name: p.read_text() for p in static.iterdir() if p.is_file()}
    assert {"index.html", "app.js", "app.css"} <= set(files)
    for name, text in files.items():
        remote = re.findall(r"""(?:https?:)?//[\w.-]+\.[a-z]{2,}[/\w.-]*""", text)
        # the SVG namespace is a name, not a fetch
        remote = [r for r in remote if "www.w3.org" not in r]
        assert remote == [], f"{name} refers to another host: {remote[:3]}"
    loaded = re.findall(r'(?:src|href)="(/static/[^"]+)"', files["index.html"])
    assert loaded and all(path.removeprefix("/static/") in files for path in loaded), loaded


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_wheel_has_one_import_root(wheel: Path) -> None:
    # No top-level engine/, client/, runners/, proto/ or tests/ may land in site-packages.
    top = {n.split("/", 1)[0] for n in zipfile.ZipFile(wheel).namelist()}
    assert top == {"plait", f"{NAME.replace('-', '_')}-{VERSION}.dist-info"}


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_installed_wheel_imports_on_its_own(installed: Path, tmp_path: Path) -> None:
    # -S keeps site-packages' .pth files, and so the editable install of this checkout, out of
    # the way: every plait module must come from the wheel. Dependencies come from this venv.
    # cwd=tmp_path keeps the checkout off sys.path.
    code = (
        "import plait, plait.engine, plait.runners, plait.ir.v1.ir_pb2 as ir, "
        "plait.api.v1.run_service_pb2_grpc as rs\n"
        "for m in (plait, plait.engine, plait.runners, ir, rs): print(m.__file__)\n"
    )
    deps = [p for p in sys.path if Path(p).name in ("site-packages", "dist-packages")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(installed), *deps])}
    p = _run(sys.executable, "-S", "-c", code, cwd=tmp_path, env=env, timeout=60)
    files = [Path(f) for f in p.stdout.split()]
    assert len(files) == 5
    assert all(f.is_relative_to(installed / "plait") for f in files), files


@pytest.mark.parametrize("package", sorted(PACKAGE_DIRS))
def test_editable_install_maps_packages_to_the_checkout(package: str) -> None:
    spec = importlib.util.find_spec(package)
    assert spec is not None and spec.origin is not None, f"{package} is not importable"
    assert Path(spec.origin).resolve() == ROOT / PACKAGE_DIRS[package] / "__init__.py"


def test_every_source_folder_is_a_listed_package() -> None:
    # setuptools ships only the packages listed in pyproject: a new subpackage (or a folder of
    # modules without __init__.py) missing from the list would silently be left out of the wheel.
    listed = {_folder_of(p) for p in PACKAGES}
    # folders shipped as package data (Alembic's migrations) are files, not packages
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-data"
    ]
    shipped = {
        (_folder_of(pkg) / pattern).parent
        for pkg, patterns in data.items()
        if pkg != "*"
        for pattern in patterns
    }
    problems = []
    for src in ("client", "engine", "runners"):
        for folder in sorted({p.parent for p in (ROOT / src).rglob("*.py")}):
            rel = folder.relative_to(ROOT).as_posix()
            if folder in shipped:
                continue
            if not (folder / "__init__.py").is_file():
                problems.append(f"{rel}/ holds modules but no __init__.py")
            elif folder not in listed:
                problems.append(f"{rel}/ is a package not listed in [tool.setuptools] packages")
    assert problems == []


@pytest.mark.parametrize("package", PACKAGES)
def test_every_listed_package_has_a_folder(package: str) -> None:
    assert (_folder_of(package) / "__init__.py").is_file()
