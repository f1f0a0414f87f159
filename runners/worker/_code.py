"""A task's code: the run's code archive, fetched by digest, unpacked once, imported from there.

A task names the archive its step's code is imported from (``Task.code_archive``, the sha256
of the archive the client packed, see :mod:`plait._archive`). The worker gets the bytes (from
the artifact store when it can read it, else over gRPC), checks them against the digest, and
unpacks them into ``<PLAIT_HOME>/code/<digest>/`` (owner-only), once per digest: into a
temporary folder first, renamed into place when every file is written, so a folder under its
digest is always whole and two workers unpacking the same archive leave one copy.

Unpacking trusts nothing in the archive: only regular files, each named by a relative path
without ``..``, ``.`` or empty parts, each listed in the manifest with the size and sha256 it
has, every manifest entry present once; no links, no devices, no absolute paths, nothing over
the size limits of the packer. Files are created with ``O_EXCL | O_NOFOLLOW`` in folders this
worker made, so nothing can be written outside the target folder.

Importing: the folder the step's module is importable from (its file's path less the module's
own path: ``src/pkg/mod.py`` for ``pkg.mod`` gives ``src``) goes first on ``sys.path``; a
``__main__`` script is loaded from its file, its folder on ``sys.path``. When a task comes from
another archive than the last one, the modules imported from the last one are dropped from
``sys.modules`` and its folders from ``sys.path``, so one process never mixes two versions of a
project.

The guard: a worker imports a step's module (a script too) to call the step, so whatever the
module does at import time runs again in the worker. A pipeline call there (a script's
``demo()`` without ``if __name__ == "__main__":``) would start the pipeline again from inside
its own step, recursively. While a step's module is imported (:func:`refusing_pipeline_runs`)
such a call raises :class:`~plait.errors.PipelineDefinitionError` naming the file, the line and
the fix, and the step fails with that message.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.util
import io
import json
import os
import re
import secrets
import shutil
import sys
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

from plait._archive import MANIFEST, MANIFEST_FORMAT, MAX_BYTES, MAX_FILES
from plait._settings import private_dir
from plait.ir.v1 import ir_pb2 as ir

__all__ = [
    "SCRIPT_MODULE",
    "CodeCache",
    "CodeRoots",
    "UnsafeArchiveError",
    "refusing_pipeline_runs",
    "unpack",
]

SCRIPT_MODULE = "__plait_main__"
"""The name a ``__main__`` script's steps are loaded under in a worker."""

_DIGEST = re.compile(r"[0-9a-f]{64}")


class UnsafeArchiveError(ValueError):
    """A code archive that is not what the packer makes: it is not unpacked."""


def _check_name(name: str) -> None:
    if (
        not name
        or len(name) > 4096
        or name.startswith("/")
        or "\\" in name
        or "\0" in name
        or re.match(r"[A-Za-z]:", name)
        or any(part in ("", ".", "..") for part in name.split("/"))
    ):
        raise UnsafeArchiveError(f"the archive names a path that is not safe: {name[:200]!r}")


def _manifest(tar: tarfile.TarFile) -> tuple[tarfile.TarInfo, dict[str, tuple[int, str, bool]]]:
    """The archive's first member (its manifest) and the files it lists, by path."""
    first = tar.next()
    if first is None or first.name != MANIFEST or not first.isreg():
        raise UnsafeArchiveError(f"the archive does not start with its manifest ({MANIFEST})")
    if first.size > 64 * 1024 * 1024:
        raise UnsafeArchiveError("the archive's manifest is too large")
    handle = tar.extractfile(first)
    assert handle is not None  # a regular file
    try:
        manifest = json.loads(handle.read())
        if manifest.get("format") != MANIFEST_FORMAT:
            raise UnsafeArchiveError(
                f"the archive's manifest has format {manifest.get('format')!r}; this worker "
                f"reads format {MANIFEST_FORMAT} (upgrade plait on the worker)"
            )
        files: dict[str, tuple[int, str, bool]] = {}
        for entry in manifest["files"]:
            path, size, digest = entry["path"], entry["size"], entry["sha256"]
            executable = bool(entry.get("executable", False))
            if not (
                isinstance(path, str)
                and isinstance(size, int)
                and size >= 0
                and isinstance(digest, str)
                and _DIGEST.fullmatch(digest)
            ):
                raise UnsafeArchiveError(f"a malformed manifest entry: {str(entry)[:200]}")
            _check_name(path)
            if path in files:
                raise UnsafeArchiveError(f"the manifest lists {path!r} twice")
            files[path] = (size, digest, executable)
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        if isinstance(exc, UnsafeArchiveError):
            raise
        raise UnsafeArchiveError(f"the archive's manifest is malformed: {exc}") from None
    if len(files) > MAX_FILES or sum(f[0] for f in files.values()) > MAX_BYTES:
        raise UnsafeArchiveError("the archive holds more files or bytes than a source root may")
    return first, files


def _write(target: Path, name: str, data: bytes, executable: bool) -> None:
    folder = target
    for part in name.split("/")[:-1]:
        folder = folder / part
        try:
            folder.mkdir(mode=0o700)
        except FileExistsError:
            if folder.is_symlink() or not folder.is_dir():
                raise UnsafeArchiveError(f"{name!r} goes through a file of the archive") from None
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(folder / name.rsplit("/", 1)[-1], flags, 0o700 if executable else 0o600)
    except FileExistsError:
        raise UnsafeArchiveError(f"the archive holds {name!r} twice") from None
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)


def unpack(data: bytes, target: Path) -> None:
    """Unpacks a code archive into ``target``, which must not exist; it appears whole or not
    at all (an existing ``target``, unpacked by another process meanwhile, is kept).

    Raises:
        UnsafeArchiveError: the archive is not one the packer makes (a link, a device, a path
            out of the folder, a file the manifest does not list or lists otherwise …).
    """
    private_dir(target.parent)
    tmp = target.parent / f".{target.name[:16]}.{secrets.token_hex(6)}.tmp"
    tmp.mkdir(mode=0o700)
    try:
        try:
            tar = tarfile.open(fileobj=io.BytesIO(data), mode="r:")  # noqa: SIM115
        except tarfile.TarError as exc:
            raise UnsafeArchiveError(f"not a tar archive: {exc}") from None
        with tar:
            manifest, files = _manifest(tar)
            seen: set[str] = set()
            try:
                for member in tar:
                    if member is manifest:
                        continue
                    _check_name(member.name)
                    if not member.isreg():
                        raise UnsafeArchiveError(
                            f"{member.name!r} is not a regular file (links, folders and devices "
                            f"are not unpacked)"
                        )
                    expected = files.get(member.name)
                    if expected is None or member.name in seen:
                        raise UnsafeArchiveError(
                            f"{member.name!r} is not in the manifest, or is in the archive twice"
                        )
                    size, digest, executable = expected
                    if member.size != size:
                        raise UnsafeArchiveError(f"{member.name!r} has another size than listed")
                    handle = tar.extractfile(member)
                    assert handle is not None  # a regular file
                    content = handle.read()
                    if hashlib.sha256(content).hexdigest() != digest:
                        raise UnsafeArchiveError(f"{member.name!r} does not match its sha256")
                    _write(tmp, member.name, content, executable)
                    seen.add(member.name)
            except tarfile.TarError as exc:
                raise UnsafeArchiveError(f"a damaged tar archive: {exc}") from None
            missing = set(files) - seen
            if missing:
                raise UnsafeArchiveError(
                    f"the archive lacks {len(missing)} file(s) its manifest lists, e.g. "
                    f"{sorted(missing)[0]!r}"
                )
        try:
            os.rename(tmp, target)
        except OSError:
            if not target.is_dir():
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # another worker unpacked it first
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


class CodeCache:
    """Code archives unpacked by digest under ``<home>/code/``.

    Args:
        home: the worker's PLAIT_HOME.
    """

    def __init__(self, home: Path) -> None:
        self.folder = home / "code"

    def root(self, digest: str, fetch: Callable[[str], bytes]) -> Path:
        """The folder of archive ``digest``, unpacked first if it is not yet.

        Args:
            digest: the archive's sha256.
            fetch: returns the archive's bytes (called only when it is not unpacked yet).

        Raises:
            ValueError: ``digest`` is not a sha256 in hex.
            UnsafeArchiveError: the bytes are not a safe code archive or do not match.
        """
        if not _DIGEST.fullmatch(digest):
            raise ValueError(f"the task's code_archive is not a sha256 in hex: {digest[:80]!r}")
        target = self.folder / digest
        if target.is_dir():
            return target
        data = fetch(digest)
        if hashlib.sha256(data).hexdigest() != digest:
            raise UnsafeArchiveError(f"the bytes fetched for code archive {digest} do not match")
        unpack(data, target)
        return target


def module_base(root: Path, code: ir.CodeRef) -> Path | None:
    """The folder in ``root`` that ``code.module`` is importable from, when ``code.file`` is
    that module's file (``src/pkg/mod.py`` for ``pkg.mod``: ``root/src``); else None."""
    if not code.file or code.module == "__main__":
        return None
    own = code.module.replace(".", "/")
    for suffix in (f"{own}.py", f"{own}/__init__.py"):
        if code.file == suffix:
            return root
        if code.file.endswith("/" + suffix):
            return root / code.file[: -len(suffix) - 1]
    return None


def _inside(root: Path, file: str) -> Path:
    """``root/file`` for a root-relative, "/"-separated path that stays inside ``root``."""
    try:
        _check_name(file)
    except UnsafeArchiveError:
        raise ImportError(
            f"the step's file {file[:200]!r} is not a path inside its archive"
        ) from None
    return root.joinpath(*file.split("/"))


def _under(file: Any, folder: str) -> bool:
    return isinstance(file, str) and file.startswith(folder)


class CodeRoots:
    """Which archive this process imports steps from, and the ``sys.path`` entries and modules
    that belong to it."""

    def __init__(self) -> None:
        self.current: Path | None = None
        self._paths: list[str] = []

    def activate(self, root: Path | None) -> None:
        """Makes ``root`` the archive steps come from (None: this process's own path); the
        modules and path entries of the archive before are dropped."""
        if root == self.current:
            return
        if self.current is not None:
            folder = str(self.current) + os.sep
            for entry in self._paths:
                with contextlib.suppress(ValueError):
                    sys.path.remove(entry)
            for name, module in list(sys.modules.items()):
                if _under(getattr(module, "__file__", None), folder):
                    sys.modules.pop(name, None)
            sys.modules.pop(SCRIPT_MODULE, None)
        self._paths = []
        self.current = root
        importlib.invalidate_caches()

    def add_path(self, folder: Path) -> None:
        """Puts ``folder`` (in the current archive) first on ``sys.path``."""
        entry = str(folder)
        if entry in self._paths:
            return
        sys.path.insert(0, entry)
        self._paths.append(entry)
        importlib.invalidate_caches()

    def load(self, code: ir.CodeRef) -> ModuleType:
        """Imports the module of ``code`` from the current archive.

        Raises:
            ImportError: it cannot be imported.
        """
        root = self.current
        assert root is not None
        if code.module == "__main__":
            if not code.file:
                raise RuntimeError("the step is defined in __main__ without a source file")
            path = _inside(root, code.file)
            if not path.is_file():
                raise ImportError(f"{code.file} is not in the run's code archive")
            self.add_path(path.parent)
            return _exec_file(SCRIPT_MODULE, path)
        base = module_base(root, code)
        if base is not None:
            self.add_path(base)
        loaded = sys.modules.get(code.module)
        inside = loaded is not None and _under(getattr(loaded, "__file__", None), f"{root}{os.sep}")
        if loaded is not None and base is not None and not inside:
            # imported from this process's own path before: the archive's copy is the one
            sys.modules.pop(code.module, None)
        try:
            return importlib.import_module(code.module)
        except ImportError:
            if not code.file:
                raise
            path = _inside(root, code.file)
            if not path.is_file():
                raise
            self.add_path(path.parent)
            return _exec_file(code.module, path)


def _exec_file(name: str, path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    return module


_PLAIT_DIRS = tuple(
    str(Path(m.__file__).parent) + os.sep
    for m in (sys.modules["plait"], sys.modules["plait.runners"])
    if m.__file__
)
"""Where Plait's own code is (the SDK, the runners): frames skipped when naming the caller."""


def _caller(root: Path | None) -> str:
    """``FILE:LINE`` of the user's code that started a pipeline run (the innermost frame outside
    Plait), FILE relative to the code root when it is inside it."""
    frame = sys._getframe(1)
    while frame is not None and frame.f_code.co_filename.startswith(_PLAIT_DIRS):
        frame = frame.f_back  # type: ignore[assignment]
    if frame is None:
        return "the step's module"
    file = frame.f_code.co_filename
    if root is not None and file.startswith(f"{root}{os.sep}"):
        file = file[len(str(root)) + 1 :].replace(os.sep, "/")
    return f"{file}:{frame.f_lineno}"


@contextlib.contextmanager
def refusing_pipeline_runs(module_file: str, root: Path | None = None) -> Iterator[None]:
    """While a step's module is imported: a pipeline run it starts raises
    :class:`~plait.errors.PipelineDefinitionError` (naming the file, the line and the fix)
    instead of starting the pipeline again from inside its own step.

    ``Pipeline.run`` (which a pipeline call goes through) and ``Client.run_pipeline`` refuse
    for as long as the import lasts; a worker process imports and runs one step at a time.

    Args:
        module_file: the step module's file as the IR names it (for the message).
        root: the folder the code is imported from; paths under it are shown relative.
    """
    from plait._client import Client
    from plait._pipeline import Pipeline
    from plait.errors import PipelineDefinitionError

    def refuse(name: str) -> PipelineDefinitionError:
        where = _caller(root)
        return PipelineDefinitionError(
            f"{where} runs pipeline {name!r} at import time: a worker imports "
            f"{module_file or 'the module'} to run the pipeline's steps, so the call would start "
            f"the pipeline again from inside its own step. Put the call under `if __name__ == "
            f'"__main__":`'
        )

    def run(self: Any, *args: Any, **kwargs: Any) -> Any:
        raise refuse(self.name)

    def run_pipeline(self: Any, pipeline: Any, *args: Any, **kwargs: Any) -> Any:
        raise refuse(getattr(pipeline, "name", "?"))

    saved = Pipeline.__dict__["run"], Client.__dict__["run_pipeline"]
    Pipeline.run = run  # type: ignore[method-assign]
    Client.run_pipeline = run_pipeline  # type: ignore[method-assign]
    try:
        yield
    finally:
        Pipeline.run, Client.run_pipeline = saved  # type: ignore[method-assign]
