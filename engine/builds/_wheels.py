"""Wheels made on the host for image builds, so that a build needs no network.

An image gets Plait, its runtime dependencies and the environment's requirements from wheel
folders ("wheelhouses") made here with the host's pip and installed in the build with ``pip
install --no-index``: no image build reaches a package index, and what pip resolved is what the
image gets. The wheelhouses are cached under ``PLAIT_HOME/builds/wheels/``, each in a folder
named by the digest of what went into it:

* ``deps-…``: Plait's runtime dependencies, pinned to the versions installed on the host (so
  the image runs the versions the host runs), and pip itself (run from its wheel in the build);
* ``plait-…``: one wheel of the *installed* Plait, made from its files (an editable checkout or
  an installed wheel alike); :func:`installed_plait` gives the digest of those files that is part
  of every image key, so editing Plait's code makes new images;
* ``reqs-…``: the environment's requirements and their dependencies.

Wheels are made for the image's Python: with ``pip wheel`` when the host's interpreter could
run the image's wheels (same Python version, machine and C library, the image's glibc no older
than the host's), else with ``pip download --only-binary=:all:`` and the image's platform tags.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import importlib.metadata
import importlib.util
import os
import platform
import re
import shutil
import sys
import tempfile
import urllib.parse
import zipfile
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread

from plait.engine.builds._errors import BuildError
from plait.engine.builds._process import stream_process
from plait.ir.canonical import digest_json

__all__ = [
    "PACKAGE_ROOTS",
    "InstalledPlait",
    "Target",
    "WheelCache",
    "content_digest",
    "installed_plait",
    "local_path",
    "requirement_digests",
]

PACKAGE_ROOTS = (
    "plait",
    "plait.api",
    "plait.api.v1",
    "plait.engine",
    "plait.ir",
    "plait.ir.v1",
    "plait.runners",
)
"""Plait's packages that an editable install may map to folders of their own (pyproject's
``[tool.setuptools.package-dir]``); every other package is a sub-folder of one of them."""

_SKIP_DIRS = {"__pycache__", ".git", ".hg", ".svn", ".tox", ".venv", ".eggs", "build", "dist"}
_NAME = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[([^\]]*)\])?")
_EXTRA = re.compile(r"""extra\s*==\s*["']([^"']+)["']""")

Log = Callable[[str], None]


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _walk(folder: Path) -> Iterable[tuple[str, Path]]:
    """The files under ``folder`` as (relative posix path, path), sorted; bytecode, VCS and
    build output folders (``build/``, ``*.egg-info`` …, which building a project writes into
    it) left out."""
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(
            d
            for d in dirs
            if d not in _SKIP_DIRS and not d.endswith(".egg-info") and not d.startswith(".")
        )
        for name in sorted(files):
            if name.endswith((".pyc", ".pyo")) or name.startswith("."):
                continue
            path = Path(root, name)
            yield path.relative_to(folder).as_posix(), path


def content_digest(path: Path) -> str:
    """The sha256 of a file's content, or of a folder's files (relative paths and contents;
    bytecode, VCS and build output left out)."""
    if path.is_dir():
        return digest_json({rel: _sha256_file(p) for rel, p in _walk(path)})
    return _sha256_file(path)


def local_path(requirement: str) -> Path | None:
    """The local file or folder a requirement names (``./x.whl``, ``/src/proj``,
    ``name @ file:///x.whl``), else None."""
    text = requirement.split(" @ ", 1)[1] if " @ " in requirement else requirement
    text = text.split(";", 1)[0].strip()
    if text.startswith("file://"):
        return Path(urllib.parse.unquote(urllib.parse.urlparse(text).path))
    if text.startswith(("/", ".", "~")):
        return Path(text).expanduser()
    return None


def _is_plain(requirement: str) -> bool:
    """A requirement pip finds in an index by name (not a path, not a URL)."""
    return local_path(requirement) is None and "://" not in requirement


def requirement_digests(requirements: Iterable[str]) -> dict[str, str]:
    """requirement → content digest, for each requirement that is a local path.

    Raises:
        BuildError: a path does not exist.
    """
    out = {}
    for req in requirements:
        path = local_path(req)
        if path is None:
            continue
        if not path.exists():
            raise BuildError(
                f"requirement {req!r}: {path} does not exist on the machine that builds the "
                f"image (a relative path is relative to the control plane's working "
                f"directory, {os.getcwd()})"
            )
        out[req] = content_digest(path)
    return out


@dataclass(frozen=True)
class InstalledPlait:
    """The Plait installed in this process's environment, as it goes into an image."""

    version: str
    """``plait.__version__``."""
    files: Mapping[str, Path]
    """Path inside a wheel (``plait/engine/_ir.py``) → the installed file."""
    file_digests: Mapping[str, str]
    """Path inside a wheel → the sha256 of the file's content when this was computed."""
    requires: tuple[str, ...]
    """Plait's runtime requirements (its ``Requires-Dist`` without extras)."""
    requires_python: str
    entry_points: str
    """The ``entry_points.txt`` of the installed distribution (the ``plait`` command)."""
    pins: tuple[str, ...]
    """``name==version`` of every installed distribution Plait's requirements reach."""
    pip_version: str
    """The host's pip, which also runs inside builds (from its wheel)."""
    digest: str
    """The sha256 of the files' contents, the requirements and the pins."""

    @property
    def plait_version(self) -> str:
        """The version that goes into image keys and into the wheel: ``0.1.0+<digest>``."""
        return f"{self.version}+{self.digest[:32]}"


def _plait_distribution() -> importlib.metadata.Distribution:
    # an installed distribution has a RECORD; a checkout's plait.egg-info (found first when
    # the working directory is on sys.path) has not, and may be stale
    for dist in importlib.metadata.distributions(name="plait"):
        if dist.read_text("RECORD") is not None:
            return dist
    raise BuildError(
        "the installed Plait's metadata (a plait-*.dist-info) was not found: install Plait "
        "with pip (pip install -e . for a checkout) before building images"
    )


def _pins(requires: Iterable[str]) -> dict[str, str]:
    """name → installed version of every distribution the requirements reach (markers other
    than extras are not evaluated: a pin of a package the image does not need is harmless)."""
    pins: dict[str, str] = {}
    seen: set[tuple[str, frozenset[str]]] = set()
    todo = [r for r in requires]
    while todo:
        m = _NAME.match(todo.pop())
        if m is None:
            continue
        name = _canonical(m.group(1))
        extras = frozenset(_canonical(e) for e in (m.group(2) or "").split(",") if e.strip())
        if (name, extras) in seen:
            continue
        seen.add((name, extras))
        try:
            dist = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            continue  # not installed here (e.g. a marker excludes it on this host)
        pins.setdefault(name, dist.version)
        for req in dist.requires or []:
            wanted = {_canonical(e) for e in _EXTRA.findall(req.partition(";")[2])}
            if not wanted or wanted & extras:
                todo.append(req)
    return pins


@functools.cache
def installed_plait() -> InstalledPlait:
    """The installed Plait (computed once per process; blocking: call it in a thread)."""
    import plait

    files: dict[str, Path] = {}
    for root in PACKAGE_ROOTS:
        spec = importlib.util.find_spec(root)
        if spec is None or not spec.submodule_search_locations:
            raise BuildError(f"Plait's package {root} is not importable: reinstall Plait")
        prefix = root.replace(".", "/")
        for folder in spec.submodule_search_locations:
            for rel, path in _walk(Path(folder)):
                files.setdefault(f"{prefix}/{rel}", path)
    dist = _plait_distribution()
    requires = tuple(r for r in dist.requires or [] if not _EXTRA.search(r.partition(";")[2]))
    pins = tuple(f"{n}=={v}" for n, v in sorted(_pins(requires).items()))
    try:
        pip_version = importlib.metadata.version("pip")
    except importlib.metadata.PackageNotFoundError:
        raise BuildError(
            f"building images needs pip in the environment that runs Plait ({sys.executable})"
        ) from None
    file_digests = {rel: _sha256_file(path) for rel, path in sorted(files.items())}
    digest = digest_json(
        {
            "files": file_digests,
            "requires": list(requires),
            "pins": list(pins),
        }
    )
    return InstalledPlait(
        version=plait.__version__,
        files=files,
        file_digests=file_digests,
        requires=requires,
        requires_python=dist.metadata["Requires-Python"] or "",
        entry_points=dist.read_text("entry_points.txt") or "",
        pins=pins,
        pip_version=pip_version,
        digest=digest,
    )


@dataclass(frozen=True)
class Target:
    """The Python of an image (what :data:`PROBE` prints, run in the parent image)."""

    python: str
    """``3.11.2``"""
    implementation: str
    """``cpython``"""
    machine: str
    """``x86_64``"""
    libc: str
    """``glibc``, ``musl`` or "" (unknown)."""
    libc_version: str
    """``2.36``"""

    @property
    def minor(self) -> str:
        """``3.11``"""
        return ".".join(self.python.split(".")[:2])

    def key(self) -> dict[str, str]:
        """What a wheelhouse made for this target depends on."""
        return {
            "python": self.minor,
            "implementation": self.implementation,
            "machine": self.machine,
            "libc": f"{self.libc} {self.libc_version}".strip(),
        }

    def host_compatible(self) -> bool:
        """Whether wheels ``pip wheel`` makes for the host's interpreter run in the image."""
        libc, version = platform.libc_ver()
        return (
            sys.implementation.name == self.implementation
            and f"{sys.version_info.major}.{sys.version_info.minor}" == self.minor
            and platform.machine() == self.machine
            and libc == self.libc == "glibc"
            and _version_tuple(self.libc_version) >= _version_tuple(version)
        )

    def pip_platform_args(self) -> list[str]:
        """``pip download`` options that select wheels for this target."""
        major, minor = (int(x) for x in self.minor.split("."))
        impl = {"cpython": "cp", "pypy": "pp"}.get(self.implementation, "cp")
        args = ["--only-binary=:all:", "--python-version", self.minor, "--implementation", impl]
        for abi in (f"{impl}{major}{minor}", "abi3", "none"):
            args += ["--abi", abi]
        m = self.machine
        platforms: list[str] = []
        lv = _version_tuple(self.libc_version)
        if self.libc == "glibc" and len(lv) >= 2:
            platforms += [f"manylinux_2_{k}_{m}" for k in range(lv[1], 4, -1)]
            for alias, needs in (("manylinux2014", 17), ("manylinux2010", 12), ("manylinux1", 5)):
                if lv[1] >= needs:
                    platforms.append(f"{alias}_{m}")
        elif self.libc == "musl" and len(lv) >= 2:
            platforms += [f"musllinux_1_{k}_{m}" for k in range(lv[1], -1, -1)]
        for p in platforms:
            args += ["--platform", p]
        return args


PROBE = (
    "import json, platform, sys; l = platform.libc_ver(); "
    "print(json.dumps({'python': platform.python_version(), "
    "'implementation': sys.implementation.name, 'machine': platform.machine(), "
    "'libc': l[0], 'libc_version': l[1]}))"
)
"""The Python code run in a parent image (``python3 -c``) to learn its :class:`Target`; musl's
version is not reported by ``platform.libc_ver`` and stays empty."""


def _version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", text))


async def _pip(args: list[str], log: Log, what: str) -> None:
    """Runs the host's pip (``sys.executable -m pip``), its output to ``log``."""
    cmd = [sys.executable, "-m", "pip", *args]
    env = {
        **os.environ,
        "PIP_NO_INPUT": "1",
        "PIP_DISABLE_PIP_VERSION_CHECK": "1",
        "PIP_PROGRESS_BAR": "off",
    }
    tail: deque[str] = deque(maxlen=15)
    code = await stream_process(cmd, log=log, tail=tail, env=env)
    if code != 0:
        output = "\n".join(tail)
        raise BuildError(
            f"{what} failed (pip exited with {code}); pip's output ends with:\n{output}"
        )


def _record_line(name: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{name},sha256={digest},{len(data)}"


def _write_plait_wheel(plait: InstalledPlait, dest: Path) -> Path:
    """A py3-none-any wheel of the installed Plait's files, written deterministically."""
    version = plait.plait_version
    info = f"plait-{version}.dist-info"
    metadata = "\n".join(
        [
            "Metadata-Version: 2.1",
            "Name: plait",
            f"Version: {version}",
            *([f"Requires-Python: {plait.requires_python}"] if plait.requires_python else []),
            *(f"Requires-Dist: {r}" for r in plait.requires),
            "",
            "",
        ]
    )
    wheel = "Wheel-Version: 1.0\nGenerator: plait\nRoot-Is-Purelib: true\nTag: py3-none-any\n\n"
    members: list[tuple[str, bytes]] = []
    for rel, path in sorted(plait.files.items()):
        data = path.read_bytes()
        if hashlib.sha256(data).hexdigest() != plait.file_digests[rel]:
            # the digest in the keys is of the files as they were when this process started
            raise BuildError(
                f"Plait's file {path} changed since this process computed Plait's version: "
                f"restart it to build images of the changed Plait"
            )
        members.append((rel, data))
    members += [(f"{info}/METADATA", metadata.encode()), (f"{info}/WHEEL", wheel.encode())]
    if plait.entry_points:
        members.append((f"{info}/entry_points.txt", plait.entry_points.encode()))
    record = [_record_line(n, d) for n, d in members] + [f"{info}/RECORD,,"]
    members.append((f"{info}/RECORD", ("\n".join(record) + "\n").encode()))
    out = dest / f"plait-{version}-py3-none-any.whl"
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in members:
            zi = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
            zi.external_attr = 0o644 << 16
            zi.compress_type = zipfile.ZIP_DEFLATED
            z.writestr(zi, data)
    return out


def _single_wheel(folder: Path) -> Path:
    wheels = sorted(folder.glob("*.whl"))
    if len(wheels) != 1:
        raise BuildError(f"expected one wheel in {folder}, found {[w.name for w in wheels]}")
    return wheels[0]


def _move_into_place(tmp: Path, final: Path) -> None:
    try:
        tmp.rename(final)
    except OSError:
        if not final.is_dir():  # else another process made it meanwhile
            raise


class WheelCache:
    """Wheelhouses under ``home/builds/wheels``, each made once (per process: under a lock;
    across processes: made in a temporary folder and renamed into place)."""

    def __init__(self, home: Path) -> None:
        self.root = home / "builds" / "wheels"
        self._locks: dict[str, anyio.Lock] = {}

    async def _once(self, name: str, make: Callable[[Path], Any], log: Log, what: str) -> Path:
        final = self.root / name
        lock = self._locks.setdefault(name, anyio.Lock())
        async with lock:
            if final.is_dir():
                log(f"{what}: cached in {final}")
                return final
            self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
            tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=self.root))
            try:
                await make(tmp)
                await anyio.to_thread.run_sync(_move_into_place, tmp, final)
            finally:
                await anyio.to_thread.run_sync(shutil.rmtree, tmp, True)
            return final

    async def plait_wheel(self, plait: InstalledPlait, log: Log) -> Path:
        """The folder holding the wheel of the installed Plait."""

        async def make(tmp: Path) -> None:
            await anyio.to_thread.run_sync(_write_plait_wheel, plait, tmp)

        folder = await self._once(
            f"plait-{plait.digest[:32]}", make, log, f"a wheel of Plait {plait.plait_version}"
        )
        return _single_wheel(folder)

    async def dependencies(self, plait: InstalledPlait, target: Target, log: Log) -> Path:
        """A wheelhouse of Plait's runtime dependencies (pinned to the host's versions) and of
        pip, for ``target``, with ``requirements.txt`` (Plait's requirements) beside them."""
        host = target.host_compatible()
        name = (
            "deps-"
            + digest_json(
                {
                    "requires": list(plait.requires),
                    "pins": list(plait.pins),
                    "pip": plait.pip_version,
                    "target": target.key(),
                    "host": host,
                }
            )[:32]
        )

        async def make(tmp: Path) -> None:
            (tmp / "requirements.txt").write_text("\n".join(plait.requires) + "\n")
            (tmp / "constraints.txt").write_text("\n".join(plait.pins) + "\n")
            what = f"making wheels of Plait's dependencies for Python {target.minor}"
            reqs = ["-r", str(tmp / "requirements.txt"), "-c", str(tmp / "constraints.txt")]
            pip = [f"pip=={plait.pip_version}", "--no-deps"]
            if host:
                await _pip(["wheel", "-w", str(tmp), *reqs], log, what)
                await _pip(["wheel", "-w", str(tmp), *pip], log, what)
            else:
                platform_args = target.pip_platform_args()
                await _pip(["download", "-d", str(tmp), *platform_args, *reqs], log, what)
                await _pip(["download", "-d", str(tmp), *platform_args, *pip], log, what)

        log(f"wheels of Plait's dependencies for Python {target.minor}")
        return await self._once(name, make, log, "Plait's dependencies")

    async def requirements(
        self,
        requirements: list[str],
        file_digests: Mapping[str, str],
        target: Target,
        log: Log,
        *,
        image_folder: str,
    ) -> Path:
        """A wheelhouse of the requirements and their dependencies for ``target``, with a
        ``requirements.txt`` to install them from it in the image, where the folder is
        ``image_folder`` (paths and URLs replaced by the wheels made of them).

        Raises:
            BuildError: a local requirement changed since its digest was taken, or pip failed.
        """
        host = target.host_compatible()
        name = (
            "reqs-"
            + digest_json(
                {
                    "requirements": requirements,
                    "file_digests": dict(file_digests),
                    "target": target.key(),
                    "host": host,
                    "image_folder": image_folder,
                }
            )[:32]
        )

        async def make(tmp: Path) -> None:
            what = f"making wheels of the requirements for Python {target.minor}"
            final: list[str] = []  # what pip installs in the image
            resolve: list[str] = []  # what pip resolves here
            local = tmp / ".local"  # wheels made of paths and URLs
            local.mkdir()
            for i, req in enumerate(requirements):
                if _is_plain(req):
                    final.append(req)
                    resolve.append(req)
                    continue
                path = local_path(req)
                if path is not None:
                    now = await anyio.to_thread.run_sync(content_digest, path)
                    if file_digests.get(req) not in (None, now):
                        raise BuildError(
                            f"requirement {req!r} changed since the image's key was computed; "
                            f"run again"
                        )
                one = tmp / f".one-{i}"
                one.mkdir()
                if path is not None and path.is_file() and path.suffix == ".whl":
                    shutil.copy2(path, one / path.name)
                else:  # a project folder, an sdist or a URL: one wheel of it (no dependencies)
                    source = str(path) if path is not None else req
                    await _pip(["wheel", "--no-deps", "-w", str(one), source], log, what)
                wheel = _single_wheel(one)
                wheel = wheel.rename(local / wheel.name)
                shutil.rmtree(one)
                final.append(f"{image_folder}/{wheel.name}")
                resolve.append(str(wheel))
            if host:
                await _pip(["wheel", "-w", str(tmp), *resolve], log, what)
            else:
                await _pip(
                    ["download", "-d", str(tmp), *target.pip_platform_args(), *resolve], log, what
                )
            for wheel in local.iterdir():
                if not (tmp / wheel.name).exists():
                    wheel.rename(tmp / wheel.name)
            shutil.rmtree(local)
            (tmp / "requirements.txt").write_text("\n".join(final) + "\n")

        log(f"wheels of the requirements for Python {target.minor}")
        return await self._once(name, make, log, "the requirements")
