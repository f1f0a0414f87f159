"""Virtualenvs for the local runner: an environment's requirements, built once per key.

A step whose environment has requirements runs, on the local runner, in a virtualenv made for
that environment at ``PLAIT_HOME/builds/venvs/<key>`` (the key: the sha256 of the build's key
material, see :mod:`plait.engine.builds._service`). So two steps with conflicting requirements
run side by side without Docker, and a rerun builds nothing.

How one is made:

* ``python -m venv`` with the control plane's own interpreter (the local runner cannot change
  Python: an environment that asks for another version is refused), in a temporary folder
  beside the final one;
* the requirements installed with pip, its output streamed line by line to the build's log (the
  control plane's pip drives the virtualenv's interpreter, ``pip --python``; without one, the
  virtualenv gets its own pip from ``ensurepip``);
* a ``.pth`` file that adds the control plane's site-packages *after* the virtualenv's own:
  the step entrypoint imports Plait and its dependencies from there, and a requirement the
  virtualenv installed wins over the version the control plane has;
* a check that ``python -m plait.runners.step`` can be imported there;
* a rename into place, atomic: a folder under its key is always complete. Calls for one key in
  one process build once (the others wait and reuse it); a process that finds the folder
  reuses it; two processes that build the same key at once keep the first rename (the control
  plane's claim in the store keeps that from happening across runs and replicas).

A failed build leaves nothing behind and raises :class:`VenvBuildError` with pip's last lines.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
import secrets
import shutil
import site
import sys
import sysconfig
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import anyio

from plait._settings import private_dir
from plait.engine.builds._process import stream_process
from plait.errors import PlaitError
from plait.ir.builds import build_material
from plait.ir.v1 import ir_pb2

__all__ = ["BuiltVenv", "VenvBuildError", "VenvBuilder", "check_python_version"]

_KEY = re.compile(r"[0-9A-Za-z][0-9A-Za-z_-]{0,127}")
_INFO = "plait-build.json"
"""The file in a virtualenv's folder that describes it (written before the rename)."""
_PTH = "zz_plait_runtime.pth"
"""The ``.pth`` that shows the control plane's site-packages (sorted last: after any other)."""
_TAIL = 30
"""The lines of pip's output an error quotes."""


class VenvBuildError(PlaitError):
    """A virtualenv could not be made: the message says what failed and what to do."""

    reason = "FAILED_PRECONDITION"


@dataclass(frozen=True)
class BuiltVenv:
    """A virtualenv for an environment, found or built."""

    reference: str
    """Its folder (``PLAIT_HOME/builds/venvs/<key>``)."""
    python: str
    """Its interpreter (``bin/python``): what ``Task.python`` names."""
    size_bytes: int
    """The bytes of its files."""
    duration_seconds: float
    """How long this call took (building, or finding it)."""
    source: str
    """``"built"`` by this call, or ``"local"``: found already made."""


def check_python_version(wanted: str) -> None:
    """Refuses a Python version the running interpreter is not: ``"3.11"`` matches any 3.11,
    ``"3.11.7"`` only that one; empty matches all.

    Raises:
        VenvBuildError: another version.
    """
    wanted = wanted.strip()
    if not wanted:
        return
    parts = wanted.split(".")
    running = ".".join(map(str, sys.version_info[:3]))
    if not all(p.isdigit() for p in parts) or len(parts) > 3:
        raise VenvBuildError(f'python_version {wanted!r} is not a version like "3.11"')
    if tuple(int(p) for p in parts) != tuple(sys.version_info[: len(parts)]):
        mine = ".".join(map(str, sys.version_info[:2]))
        raise VenvBuildError(
            f"the environment asks for Python {wanted}, but the local runner runs steps on the "
            f"control plane's Python, {running}, and cannot change it: set "
            f'python_version="{mine}" (or leave it empty), or run the step on a container '
            f'runner (runner="docker")'
        )


def _site_packages(venv: Path) -> Path:
    """The purelib folder of a virtualenv made by this interpreter."""
    names = sysconfig.get_scheme_names()
    scheme = "venv" if "venv" in names else sysconfig.get_default_scheme()
    paths = sysconfig.get_paths(scheme, vars={"base": str(venv), "platbase": str(venv)})
    return Path(paths["purelib"])


def _python(venv: Path) -> Path:
    return venv / ("Scripts/python.exe" if sys.platform == "win32" else "bin/python")


def _runtime_site_dirs() -> list[str]:
    """The control plane's site-packages (and the user's, when Python uses it), in order."""
    dirs = list(site.getsitepackages())
    if site.ENABLE_USER_SITE:
        dirs.append(site.getusersitepackages())
    return [d for d in dict.fromkeys(dirs) if os.path.isdir(d)]


def _pth_text(dirs: list[str]) -> str:
    # site.addsitedir appends each folder to sys.path and runs its .pth files (an editable
    # install of Plait is one): processed from the virtualenv's own site-packages, they come
    # after it, so what the virtualenv installed wins
    return (
        "# Plait: the control plane's packages, after this virtualenv's own\n"
        f"import site; list(map(site.addsitedir, {dirs!r}))\n"
    )


def _own_pip() -> bool:
    """Whether this interpreter has a pip that can drive another one (``--python``, pip 22.3)."""
    if importlib.util.find_spec("pip") is None:
        return False
    from importlib.metadata import PackageNotFoundError, version

    try:
        major, minor = (int(x) for x in version("pip").split(".")[:2])
    except (PackageNotFoundError, ValueError):
        return False
    return (major, minor) >= (22, 3)


def _size(folder: Path) -> int:
    total = 0
    for root, _, files in os.walk(folder):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, name)).st_size
    return total


def _relocate_scripts(tmp: Path, final: Path) -> None:
    """Points the scripts in ``bin/`` (their ``#!`` lines, the activate scripts) at the final
    folder: the virtualenv is made under a temporary name and renamed when complete."""
    old, new = str(tmp).encode(), str(final).encode()
    bin_dir = _python(tmp).parent
    for path in bin_dir.iterdir():
        if path.is_symlink() or not path.is_file():
            continue
        data = path.read_bytes()
        if old in data and b"\0" not in data[:1024]:
            path.write_bytes(data.replace(old, new))


def _finish(tmp: Path, final: Path, info: dict[str, object]) -> int | None:
    """Completes the virtualenv in ``tmp`` and renames it to ``final``; returns its size, or
    None when another process's build of the same key took ``final`` first (``tmp`` is then
    removed)."""
    _relocate_scripts(tmp, final)
    size = _size(tmp)
    info = {**info, "size_bytes": size, "built_at": time.time()}
    (tmp / _INFO).write_text(json.dumps(info, indent=1, sort_keys=True) + "\n")
    try:
        tmp.rename(final)
    except OSError:
        if not _python(final).exists():
            raise
        shutil.rmtree(tmp, ignore_errors=True)
        return None
    return size


def _found_size(final: Path) -> int | None:
    """The size of the virtualenv in ``final``, or None when there is none. Its ``.pth`` is
    pointed at this control plane's site-packages again when they moved (a virtualenv made
    by an earlier control plane, from another checkout or environment of Plait)."""
    if not _python(final).exists():
        return None
    pth = _site_packages(final) / _PTH
    text = _pth_text(_runtime_site_dirs())
    with contextlib.suppress(OSError):
        if pth.read_text() != text:
            tmp = pth.with_name(f".{_PTH}.{secrets.token_hex(4)}")
            tmp.write_text(text)
            os.replace(tmp, pth)
    try:
        return int(json.loads((final / _INFO).read_text())["size_bytes"])
    except (OSError, ValueError, KeyError, TypeError):
        return _size(final)


def _discard(path: Path, trash: Path) -> None:
    """Renames ``path`` to ``trash`` (gone from its key at once), then deletes it."""
    try:
        path.rename(trash)
    except FileNotFoundError:
        return
    shutil.rmtree(trash, ignore_errors=True)


def _child_env() -> dict[str, str]:
    """The environment of pip and the check: the control plane's, without what would show
    them the control plane's packages (then pip would take them as installed)."""
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    env.pop("PYTHONHOME", None)
    env["PYTHONNOUSERSITE"] = "1"
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    env["PIP_NO_INPUT"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    return env


async def _run(args: list[str], *, log: Callable[[str], None], tail: deque[str]) -> int:
    """Runs ``args`` (pip, venv) in :func:`_child_env`, its output to ``log``."""
    return await stream_process(args, log=log, tail=tail, env=_child_env())


class VenvBuilder:
    """Makes and finds the virtualenvs of environments under ``home/builds/venvs``.

    Args:
        home: PLAIT_HOME.
    """

    def __init__(self, home: Path) -> None:
        self.root = home / "builds" / "venvs"
        """The folder of the virtualenvs, one per key."""
        self._locks: dict[str, anyio.Lock] = {}
        self._found: dict[str, BuiltVenv] = {}

    def path(self, key: str) -> Path:
        """The folder of the virtualenv of ``key``."""
        if not _KEY.fullmatch(key):
            raise VenvBuildError(f"not a build key: {key!r}")
        return self.root / key

    async def ensure(
        self, env: ir_pb2.Environment, *, key: str, log: Callable[[str], None]
    ) -> BuiltVenv:
        """The virtualenv of ``key`` for ``env``: found, or built now (once per key).

        Args:
            env: the environment (its requirements are installed; the parent image is a
                container's concern and ignored; apt packages are not installed).
            key: the build's key, the folder's name.
            log: gets each line of the build's output (pip's, and Plait's own notes).

        Raises:
            VenvBuildError: another Python version than this one, or the build failed.
        """
        start = time.monotonic()
        check_python_version(env.python_version)
        options = [r for r in env.requirements if r.strip().startswith("-")]
        if options:  # the SDK refuses them; the IR may come from another client
            raise VenvBuildError(
                f"requirements must not be pip options: {', '.join(options)}; list the "
                f"requirements themselves"
            )
        final = self.path(key)
        lock = self._locks.setdefault(key, anyio.Lock())
        async with lock:
            found = await self._find(key, final, start)
            if found is not None:
                return found
            return await self._build(env, key, final, log, start)

    async def _find(self, key: str, final: Path, start: float) -> BuiltVenv | None:
        known = self._found.get(key)
        if known is not None and _python(final).exists():
            return BuiltVenv(
                known.reference, known.python, known.size_bytes, time.monotonic() - start, "local"
            )
        self._found.pop(key, None)
        size = await anyio.to_thread.run_sync(_found_size, final)
        if size is None:
            return None
        built = BuiltVenv(str(final), str(_python(final)), size, time.monotonic() - start, "local")
        self._found[key] = built
        return built

    async def _build(
        self,
        env: ir_pb2.Environment,
        key: str,
        final: Path,
        log: Callable[[str], None],
        start: float,
    ) -> BuiltVenv:
        private_dir(self.root)
        tmp = self.root / f".tmp-{key[:16]}-{secrets.token_hex(4)}"
        reqs = list(build_material(env)["requirements"])
        if env.apt_packages:
            log(
                f"note: the local runner does not install apt packages "
                f"({', '.join(env.apt_packages)}); steps use this machine's"
            )
        try:
            await self._make(tmp, reqs, log)
            info: dict[str, object] = {
                "key": key,
                "material": build_material(env),
                "python": sys.version.split()[0],
            }
            size = await anyio.to_thread.run_sync(_finish, tmp, final, info)
            if size is None:  # another process renamed its build of this key first: use it
                log(f"another process built {key[:12]} meanwhile; using its virtualenv")
                found = await self._find(key, final, start)
                assert found is not None
                return found
        except BaseException:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(lambda: shutil.rmtree(tmp, ignore_errors=True))
            raise
        built = BuiltVenv(str(final), str(_python(final)), size, time.monotonic() - start, "built")
        self._found[key] = built
        log(f"virtualenv {key[:12]} built ({size / 1e6:.1f} MB, {built.duration_seconds:.1f} s)")
        return built

    async def _make(self, tmp: Path, reqs: list[str], log: Callable[[str], None]) -> None:
        tail: deque[str] = deque(maxlen=_TAIL)
        own_pip = _own_pip()
        log(
            f"creating a virtualenv for {len(reqs)} requirement(s) with Python "
            f"{sys.version.split()[0]}"
        )
        venv = [sys.executable, "-m", "venv", str(tmp)]
        if own_pip:
            venv.insert(3, "--without-pip")
        code = await _run(venv, log=log, tail=tail)
        if code != 0:
            raise VenvBuildError(
                f"python -m venv failed (exit code {code}); is the venv module installed "
                f"(Debian: apt install python3-venv)? Its last lines:\n" + "\n".join(tail)
            )
        python = str(_python(tmp))
        if reqs:
            pip = (
                [sys.executable, "-m", "pip", "--python", python]
                if own_pip
                else [python, "-m", "pip"]
            )
            args = [*pip, "install", "--progress-bar", "off", "--no-warn-script-location"]
            tail.clear()
            code = await _run([*args, *reqs], log=log, tail=tail)
            if code != 0:
                raise VenvBuildError(
                    f"pip could not install the environment's requirements "
                    f"({', '.join(reqs)}): exit code {code}. pip's last lines:\n" + "\n".join(tail)
                )
        site_dir = _site_packages(tmp)
        site_dir.mkdir(parents=True, exist_ok=True)
        (site_dir / _PTH).write_text(_pth_text(_runtime_site_dirs()))
        tail.clear()
        code = await _run(
            [python, "-c", "import plait.runners.step.__main__"], log=lambda _: None, tail=tail
        )
        if code != 0:
            raise VenvBuildError(
                "the virtualenv cannot import Plait's step entrypoint (a requirement may have "
                "replaced one of Plait's dependencies with a version it cannot use):\n"
                + "\n".join(tail)
            )

    async def remove(self, reference: str) -> None:
        """Removes a virtualenv this builder made (its folder, ``BuiltVenv.reference``); one
        that is gone already is fine.

        Raises:
            VenvBuildError: ``reference`` is not a virtualenv folder of this builder.
        """
        path = Path(reference)
        if path.parent.resolve() != self.root.resolve() or not _KEY.fullmatch(path.name):
            raise VenvBuildError(f"{reference!r} is not a virtualenv of {self.root}")
        async with self._locks.setdefault(path.name, anyio.Lock()):  # not while it is built
            self._found.pop(path.name, None)
            trash = self.root / f".trash-{path.name[:16]}-{secrets.token_hex(4)}"
            await anyio.to_thread.run_sync(_discard, path, trash)
