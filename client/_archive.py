"""Code travels as a content-addressed archive: the source root, packed deterministically.

The *source root* of a pipeline is the nearest folder above the pipeline function's file that
holds ``pyproject.toml`` or ``.git``, else that file's own folder; ``PLAIT_SOURCE_ROOT``
overrides it. Every file of the root that ``.gitignore`` does not exclude is packed into a tar
whose bytes depend only on the files' paths, contents and executable bits: entries sorted, mtime
0, uid and gid 0, no owner names, modes 0644 or 0755, no folders, no links, no absolute paths.
Its first entry, :data:`MANIFEST`, lists every file with its size and sha256. The archive's
sha256 is its digest: the same tree in two folders, or on two machines, packs to the same
archive.

Never packed: ``.git`` and other VCS folders, ``__pycache__`` and ``*.pyc``, virtualenvs (any
folder holding ``pyvenv.cfg``), tool caches (``.mypy_cache``, ``.pytest_cache``, ``.tox`` …),
``node_modules``, and any Plait home (the current ``PLAIT_HOME``, or a folder holding a
``plait.db``): a store or a credential never travels with the code.

Which files are in the root comes from ``git ls-files --cached --others --exclude-standard``
when the root is inside a git work tree and git is installed (git's own ``.gitignore`` rules,
exactly), else from a walk that reads every ``.gitignore`` on the way (the common subset of
git's syntax: ``*``, ``?``, ``[…]``, ``**``, ``!``, a leading or inner ``/`` to anchor, a
trailing ``/`` for folders only).

Packing twice is cheap: the digest of the last archive of each root is kept, owner-only, in
``PLAIT_HOME/code/sources/``, with every file's size, mtime, ctime and inode. When the listing
and every stat are the same, the digest is reused and no file is read (a file changed less than
:data:`RACY_SECONDS` before that record was written is read again, as git does for its index).
A root over :data:`MAX_FILES` files or :data:`MAX_BYTES` bytes is refused with an error that
names the root and says how to choose another.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import os
import re
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from plait._settings import plait_home, private_dir, write_private
from plait.errors import PipelineDefinitionError

__all__ = [
    "MANIFEST",
    "MAX_BYTES",
    "MAX_FILES",
    "SourceArchive",
    "build_archive",
    "code_file",
    "list_source_files",
    "pack_source",
    "pipeline_root",
    "relative_file",
    "remember_upload",
    "source_root",
    "was_uploaded",
]

MANIFEST = ".plait-manifest.json"
"""The archive's first entry: ``{"format": 1, "files": [{"path", "size", "sha256",
"executable"}, …]}`` in canonical JSON, sorted by path. A file of the root with this name is
not packed."""
MANIFEST_FORMAT = 1
MAX_FILES = 20_000
"""The most files a source root may hold."""
MAX_BYTES = 100 * 1024 * 1024
"""The most bytes the files of a source root may hold together (100 MiB)."""
RACY_SECONDS = 2.0
"""A file modified this close to the moment its stats were recorded is read again next time:
an edit within the same mtime tick that keeps the size would otherwise go unseen."""
ROOT_VARIABLE = "PLAIT_SOURCE_ROOT"
"""The variable that overrides the source root."""
ROOT_MARKERS = ("pyproject.toml", ".git")
"""A folder holding one of these is a source root."""

SKIP_DIRS = frozenset(
    {
        ".git",
        ".hg",
        ".svn",
        "__pycache__",
        ".mypy_cache",
        ".pytest_cache",
        ".ruff_cache",
        ".hypothesis",
        ".tox",
        ".nox",
        ".eggs",
        ".ipynb_checkpoints",
        "node_modules",
    }
)
"""Folders never packed, whatever ``.gitignore`` says."""
SKIP_SUFFIXES = (".pyc", ".pyo")
SKIP_FILES = frozenset({MANIFEST, ".DS_Store"})

_STATE_FORMAT = 1


@dataclass(frozen=True)
class SourceArchive:
    """A packed source root: what it is, and its bytes when they were just packed."""

    root: Path
    """The source root, absolute."""
    digest: str
    """sha256 of the archive's bytes, in hex."""
    size: int
    """The archive's size in bytes."""
    files: int
    """How many files it holds (the manifest not counted)."""
    git_commit: str = ""
    """The commit checked out in the root, when it is in a git work tree."""
    git_dirty: bool = False
    """Whether the root had changes that commit does not hold (untracked files included)."""
    content: bytes | None = field(default=None, repr=False, compare=False)
    """The archive's bytes when this pack made them; None when the digest came from the
    record of an earlier pack (see :meth:`with_content`)."""
    listed: list[str] = field(default_factory=list, repr=False, compare=False)
    """The files packed, relative and sorted."""

    def with_content(self) -> SourceArchive:
        """This archive with its bytes: itself when it holds them, else the root packed again.

        A root edited since it was packed gives another archive (another digest): the one
        returned is always the one its bytes are.

        Raises:
            PipelineDefinitionError: the root holds too many files or bytes.
        """
        if self.content is not None:
            return self
        entries = _read_entries(self.root, list_source_files(self.root))
        data = _tar(entries)
        digest = hashlib.sha256(data).hexdigest()
        return dataclasses.replace(
            self, digest=digest, size=len(data), files=len(entries), content=data
        )


# ---- the source root and the paths in the IR ----


def code_file(obj: Any) -> Path | None:
    """The resolved source file of a function or module; None when it has none (a REPL)."""
    import inspect

    try:
        file = inspect.getsourcefile(obj)
    except TypeError:
        return None
    if not file or file.startswith("<"):
        return None
    return Path(file).resolve()


def source_root(start: Path) -> Path:
    """The source root for a file or folder: ``$PLAIT_SOURCE_ROOT`` when set, else the nearest
    folder at or above ``start`` holding ``pyproject.toml`` or ``.git``, else ``start``'s
    folder."""
    override = os.environ.get(ROOT_VARIABLE)
    if override:
        return Path(override).expanduser().resolve()
    start = start.resolve()
    folder = start if start.is_dir() else start.parent
    for candidate in (folder, *folder.parents):
        if any((candidate / marker).exists() for marker in ROOT_MARKERS):
            return candidate
    return folder


def pipeline_root(fn: Callable[..., Any]) -> Path | None:
    """The source root of a pipeline function; None when the function has no source file (it
    was defined in an interactive session: there is no script to pack, workers import the
    steps from their own path)."""
    file = code_file(fn)
    if file is None:
        override = os.environ.get(ROOT_VARIABLE)
        return Path(override).expanduser().resolve() if override else None
    return source_root(file)


def relative_file(file: Path, root: Path) -> str:
    """``file`` relative to ``root``, "/"-separated, for the IR; "" when it is outside the root
    or in a part of it that is never packed (a virtualenv's site-packages, say): then workers
    import it by module name from their own path."""
    try:
        rel = file.resolve().relative_to(root)
    except ValueError:
        return ""
    parts = rel.parts
    if not parts or any(p in SKIP_DIRS or p == "site-packages" for p in parts[:-1]):
        return ""
    return PurePosixPath(*parts).as_posix()


# ---- which files ----


class _Ignore:
    """The rules of the ``.gitignore`` files met on a walk (a common subset of git's syntax)."""

    def __init__(self) -> None:
        self._rules: list[tuple[str, re.Pattern[str], bool, bool]] = []

    def read(self, folder: str, rel: str) -> None:
        """Adds the rules of ``folder/.gitignore``; ``rel`` is the folder's path in the root."""
        try:
            with open(os.path.join(folder, ".gitignore"), encoding="utf-8") as fh:
                lines = fh.read().splitlines()
        except (OSError, UnicodeDecodeError):
            return
        for line in lines:
            rule = _rule(line)
            if rule is not None:
                self._rules.append((rel, *rule))

    def ignored(self, rel: str, is_dir: bool) -> bool:
        """Whether the path ``rel`` (relative to the root, "/"-separated) is ignored."""
        result = False
        for base, pattern, negate, dir_only in self._rules:
            if dir_only and not is_dir:
                continue
            if base:
                if not rel.startswith(base + "/"):
                    continue
                sub = rel[len(base) + 1 :]
            else:
                sub = rel
            if pattern.fullmatch(sub):
                result = not negate
        return result

    def copy(self) -> _Ignore:
        other = _Ignore()
        other._rules = list(self._rules)
        return other


def _rule(line: str) -> tuple[re.Pattern[str], bool, bool] | None:
    line = line.rstrip()
    if not line or line.startswith("#"):
        return None
    negate = line.startswith("!")
    if negate:
        line = line[1:]
    if line.startswith("\\"):
        line = line[1:]
    dir_only = line.endswith("/")
    line = line.rstrip("/")
    if not line:
        return None
    anchored = "/" in line
    line = line.lstrip("/")
    if not anchored:
        line = "**/" + line
    return re.compile(_translate(line)), negate, dir_only


def _translate(pattern: str) -> str:
    """A gitignore glob as a regex over "/"-separated paths."""
    out: list[str] = []
    i, n = 0, len(pattern)
    while i < n:
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif pattern.startswith("/**", i) and i + 3 == n:
            out.append("/.*")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append("[^/]*")
            i += 1
        elif pattern[i] == "?":
            out.append("[^/]")
            i += 1
        elif pattern[i] == "[":
            end = pattern.find("]", i + 2)
            if end < 0:
                out.append(re.escape("["))
                i += 1
                continue
            body = pattern[i + 1 : end]
            if body.startswith("!"):
                body = "^" + body[1:]
            out.append(f"[{body.replace(chr(92), chr(92) * 2)}]")
            i = end + 1
        elif pattern[i] == "\\" and i + 1 < n:
            out.append(re.escape(pattern[i + 1]))
            i += 2
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    # a folder that matches takes everything below it
    return "".join(out) + "(?:/.*)?"


def _skipped_dir(path: str, name: str, homes: frozenset[str]) -> bool:
    if name in SKIP_DIRS or path in homes:
        return True
    return os.path.exists(os.path.join(path, "pyvenv.cfg")) or os.path.exists(
        os.path.join(path, "plait.db")
    )


def _skipped_file(name: str) -> bool:
    return name in SKIP_FILES or name.endswith(SKIP_SUFFIXES)


def _homes() -> frozenset[str]:
    return frozenset({str(plait_home())})


def _git_dir(root: Path) -> Path | None:
    """The work tree holding ``root`` (the folder with ``.git``), if any and git is installed."""
    import shutil

    for candidate in (root, *root.parents):
        if (candidate / ".git").exists():
            return candidate if shutil.which("git") else None
    return None


def _git(root: Path, *args: str) -> bytes | None:
    import subprocess

    try:
        out = subprocess.run(
            ["git", "-C", str(root), *args],
            capture_output=True,
            timeout=60,
            check=False,
            env={**os.environ, "GIT_OPTIONAL_LOCKS": "0", "LC_ALL": "C"},
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout if out.returncode == 0 else None


def _listed_by_git(root: Path) -> list[str] | None:
    out = _git(root, "ls-files", "-z", "--cached", "--others", "--exclude-standard")
    if out is None:
        return None
    homes = _homes()
    paths: set[str] = set()
    skipped_dirs: dict[str, bool] = {}
    for raw in out.split(b"\0"):
        if not raw or raw.endswith(b"/"):
            continue
        rel = os.fsdecode(raw)
        parts = rel.split("/")
        if _skipped_file(parts[-1]):
            continue
        skip = False
        for i in range(1, len(parts)):
            folder = "/".join(parts[:i])
            known = skipped_dirs.get(folder)
            if known is None:
                known = skipped_dirs[folder] = _skipped_dir(
                    os.path.join(root, folder), parts[i - 1], homes
                )
            if known:
                skip = True
                break
        if not skip:
            paths.add(rel)
    return sorted(paths)


def _walked(root: Path) -> list[str]:
    homes = _homes()
    out: list[str] = []

    def walk(folder: str, rel: str, rules: _Ignore) -> None:
        rules = rules.copy()
        rules.read(folder, rel)
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError:
            return
        for entry in entries:
            path = f"{rel}/{entry.name}" if rel else entry.name
            try:
                is_dir = entry.is_dir()  # follows a link: a link to a folder is a folder
            except OSError:
                continue
            if is_dir:
                if entry.is_symlink() or _skipped_dir(entry.path, entry.name, homes):
                    continue
                if not rules.ignored(path, True):
                    walk(entry.path, path, rules)
            elif not _skipped_file(entry.name) and not rules.ignored(path, False):
                out.append(path)

    walk(str(root), "", _Ignore())
    return sorted(out)


def _stat(root: Path, rel: str) -> os.stat_result | None:
    """The file's stat when it is packed: a regular file, or a link that stays in the root."""
    path = os.path.join(root, rel)
    try:
        st = os.lstat(path)
        if stat.S_ISLNK(st.st_mode):
            target = Path(path).resolve()
            target.relative_to(root)  # ValueError: a link out of the root is not packed
            st = os.stat(path)
    except (OSError, ValueError):
        return None
    return st if stat.S_ISREG(st.st_mode) else None


def _git_state(root: Path) -> tuple[str, bool]:
    """(the commit checked out, whether the root holds changes it does not) or ("", False)."""
    out = _git(
        root, "status", "--porcelain=v2", "--branch", "-z", "--untracked-files=normal", "--", "."
    )
    if out is None:
        return "", False
    commit, dirty = "", False
    for item in out.split(b"\0"):
        if item.startswith(b"# branch.oid "):
            oid = item[len(b"# branch.oid ") :].decode("ascii", "replace")
            commit = oid if re.fullmatch(r"[0-9a-f]{40}|[0-9a-f]{64}", oid) else ""
        elif item and not item.startswith(b"#"):
            dirty = True
    return commit, dirty


# ---- the archive ----


def _too_large(root: Path, files: int, size: int) -> PipelineDefinitionError:
    what = (
        f"{files} files (the limit is {MAX_FILES})"
        if files > MAX_FILES
        else f"{size / 2**20:.1f} MiB of files (the limit is {MAX_BYTES // 2**20} MiB)"
    )
    how = (
        f"it was set by ${ROOT_VARIABLE}"
        if os.environ.get(ROOT_VARIABLE)
        else "it is the nearest folder holding pyproject.toml or .git above the pipeline's file"
    )
    return PipelineDefinitionError(
        f"the source root {root} holds {what}: too much to ship as the pipeline's code ({how}). "
        f"List data, outputs and environments in .gitignore, or set {ROOT_VARIABLE} to the "
        f"folder that holds only your code"
    )


def _tar(entries: list[tuple[str, bytes, bool]]) -> bytes:
    """The deterministic tar of (path, bytes, executable), the manifest first."""
    import tarfile

    manifest = {
        "format": MANIFEST_FORMAT,
        "files": [
            {
                "path": path,
                "size": len(data),
                "sha256": hashlib.sha256(data).hexdigest(),
                "executable": executable,
            }
            for path, data, executable in entries
        ],
    }
    text = json.dumps(manifest, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT, encoding="utf-8") as tar:
        for path, data, executable in [(MANIFEST, text.encode(), False), *entries]:
            info = tarfile.TarInfo(path)
            info.size = len(data)
            info.mtime = 0
            info.mode = 0o755 if executable else 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            info.type = tarfile.REGTYPE
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _read_entries(root: Path, files: list[str]) -> list[tuple[str, bytes, bool]]:
    entries: list[tuple[str, bytes, bool]] = []
    total = 0
    for rel in files:
        path = root / rel
        try:
            with open(path, "rb") as fh:
                data = fh.read(MAX_BYTES + 1 - total)
                executable = bool(os.fstat(fh.fileno()).st_mode & 0o111)
        except FileNotFoundError:
            continue  # deleted since it was listed
        except OSError as exc:
            raise PipelineDefinitionError(
                f"cannot read {path} to pack the source root {root}: {exc}"
            ) from None
        total += len(data)
        if total > MAX_BYTES:
            raise _too_large(root, len(files), total)
        entries.append((rel, data, executable))
    return entries


def _listing(root: Path) -> tuple[bool, dict[str, os.stat_result]]:
    """(whether git listed the files, the stat of each file packed, by relative path)."""
    listed = _listed_by_git(root) if _git_dir(root) is not None else None
    by_git = listed is not None
    if listed is None:
        listed = _walked(root)
    stats: dict[str, os.stat_result] = {}
    for rel in listed:
        st = _stat(root, rel)
        if st is not None:
            stats[rel] = st
    files = len(stats)
    total = sum(st.st_size for st in stats.values())
    if files > MAX_FILES or total > MAX_BYTES:
        raise _too_large(root, files, total)
    return by_git, stats


def list_source_files(root: Path) -> list[str]:
    """The files of ``root`` that are packed, relative and "/"-separated, sorted.

    Only regular files (or links to regular files inside the root) are kept.

    Raises:
        PipelineDefinitionError: the root holds too many files or bytes.
    """
    return sorted(_listing(root.resolve())[1])


def build_archive(root: Path) -> bytes:
    """The archive of ``root``'s files, as they are now (no cache).

    Raises:
        PipelineDefinitionError: the root holds too many files or bytes.
    """
    root = root.resolve()
    return _tar(_read_entries(root, list_source_files(root)))


def _private_dirs(home: Path, folder: Path) -> None:
    """Makes ``home`` and every folder from it down to ``folder`` owner-only."""
    private_dir(home)
    for part in folder.relative_to(home).parts:
        home = private_dir(home / part)


def _state_path(home: Path, root: Path) -> Path:
    key = hashlib.sha256(os.fsencode(str(root))).hexdigest()[:32]
    return home / "code" / "sources" / f"{key}.json"


def _signature(st: os.stat_result) -> list[int]:
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_mode & 0o111]


_Quick = tuple[tuple[int, ...], ...]


@dataclass(frozen=True)
class _Seen:
    """What a pack of a root depends on that stat calls can read: the packed files, the folders
    holding them (a file added or removed changes its folder) and git's index, HEAD and branch
    (a commit, an add). Paths are kept absolute, so that checking costs one stat each."""

    paths: tuple[str, ...]
    signatures: _Quick
    files: int
    """How many of the paths, from the first, are packed files."""

    @classmethod
    def read(cls, root: Path, files: list[str], work_tree: Path | None) -> _Seen | None:
        base = str(root)
        paths = [os.path.join(base, rel) for rel in files]
        paths += [
            os.path.join(base, folder)
            for folder in sorted({os.path.dirname(rel) for rel in files} | {""})
        ]
        if work_tree is not None:
            git = _git_dirs(work_tree)
            if git is None:
                return None
            own, common = git
            try:
                head = (own / "HEAD").read_text().strip()
            except OSError:
                return None
            paths += [str(own / "index"), str(own / "HEAD"), str(common / "packed-refs")]
            if head.startswith("ref: "):
                paths.append(str(common / head[5:]))
        signatures = _signatures(paths)
        return None if signatures is None else cls(tuple(paths), signatures, len(files))

    def unchanged(self) -> bool:
        return _signatures(self.paths) == self.signatures


def _git_dirs(work_tree: Path) -> tuple[Path, Path] | None:
    """A work tree's own git folder (its index and HEAD) and the common one (its refs): the
    same folder for a plain clone; for a linked work tree (``git worktree``), ``.git`` is a file
    naming its own folder, which names the common one."""
    dot_git = work_tree / ".git"
    if dot_git.is_dir():
        return dot_git, dot_git
    try:
        line = dot_git.read_text().strip()
        if not line.startswith("gitdir: "):
            return None
        own = (work_tree / line[len("gitdir: ") :]).resolve()
        common_file = own / "commondir"
        common = (own / common_file.read_text().strip()).resolve() if common_file.exists() else own
    except OSError:
        return None
    return own, common


def _signatures(paths: list[str] | tuple[str, ...]) -> _Quick | None:
    out: list[tuple[int, ...]] = []
    for path in paths:
        try:
            st = os.stat(path)
        except FileNotFoundError:
            out.append(())  # absent (a packed-refs file a repository has not made)
            continue
        except OSError:
            return None
        out.append((st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_mode))
    return tuple(out)


_MEMO: dict[tuple[str, str], tuple[_Seen, SourceArchive, int]] = {}
"""This process's last pack of each (root, home): what it depended on, what it made, when."""


def pack_source(root: Path, *, home: Path | None = None) -> SourceArchive:
    """Packs ``root`` (or finds that the last archive of it is still right) and returns what
    it is; the bytes are not kept (see :meth:`SourceArchive.data`).

    A process that packs the same root again (a run started in a loop, a notebook) checks with
    stat calls alone that nothing changed since its last pack, and then asks git nothing.

    Args:
        root: the source root.
        home: where the record of the last archive is kept; ``$PLAIT_HOME`` by default.

    Raises:
        PipelineDefinitionError: the root holds too many files or bytes.
    """
    root = root.resolve()
    home = home if home is not None else plait_home()
    key = (str(root), str(home))
    memo = _MEMO.get(key)
    if memo is not None:
        seen, made, made_ns = memo
        racy = made_ns - RACY_SECONDS * 1e9
        # a file written within the racy window may change again unseen by its mtime
        files = seen.signatures[: seen.files]
        if seen.unchanged() and all(s[1] < racy for s in files):
            return made
    made_ns = time.time_ns()
    archive = _pack(root, home)
    memo_seen = _Seen.read(root, archive.listed, _git_dir(root))
    if memo_seen is not None:
        _MEMO[key] = (memo_seen, dataclasses.replace(archive, content=None), made_ns)
    return archive


def git_state(root: Path) -> tuple[str, bool]:
    """(the commit checked out in ``root``'s work tree, whether the root has changes it does not
    hold); ("", False) outside git. What this process saw at its last pack of the root when
    stat calls show nothing changed since, else one ``git status``."""
    root = root.resolve()
    for (memo_root, _), (seen, made, made_ns) in _MEMO.items():
        if memo_root == str(root):
            racy = made_ns - RACY_SECONDS * 1e9
            files = seen.signatures[: seen.files]
            if seen.unchanged() and all(s[1] < racy for s in files):
                return made.git_commit, made.git_dirty
    return _git_state(root) if _git_dir(root) is not None else ("", False)


def _pack(root: Path, home: Path) -> SourceArchive:
    by_git, listing = _listing(root)
    stats = {rel: _signature(st) for rel, st in listing.items()}
    commit, dirty = _git_state(root) if by_git else ("", False)

    state_file = _state_path(home, root)
    try:
        state = json.loads(state_file.read_text())
    except (OSError, ValueError):
        state = None
    if (
        isinstance(state, dict)
        and state.get("format") == _STATE_FORMAT
        and state.get("root") == str(root)
        and state.get("files") == stats
        and all(s[1] < state.get("written_ns", 0) - RACY_SECONDS * 1e9 for s in stats.values())
    ):
        return SourceArchive(
            root,
            str(state["digest"]),
            int(state["size"]),
            len(stats),
            commit,
            dirty,
            listed=sorted(stats),
        )
    written = time.time_ns()
    entries = _read_entries(root, sorted(stats))
    data = _tar(entries)
    digest = hashlib.sha256(data).hexdigest()
    record = {
        "format": _STATE_FORMAT,
        "root": str(root),
        "digest": digest,
        "size": len(data),
        "written_ns": written,
        "files": stats,
    }
    with contextlib.suppress(OSError):  # only a cache: the next pack reads the files again
        _private_dirs(home, state_file.parent)
        write_private(state_file, json.dumps(record, separators=(",", ":")))
    return SourceArchive(
        root, digest, len(data), len(entries), commit, dirty, content=data, listed=sorted(stats)
    )


# ---- what a server already has ----

_KEEP_UPLOADS = 256
"""How many archive digests are remembered per server."""


def _uploads_path(home: Path) -> Path:
    return home / "code" / "uploaded.json"


def was_uploaded(home: Path, server: str, digest: str) -> bool:
    """Whether this home remembers uploading ``digest`` to ``server``."""
    try:
        known = json.loads(_uploads_path(home).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(known, dict) and digest in (known.get(server) or [])


def remember_upload(home: Path, server: str, digest: str, *, forget: bool = False) -> None:
    """Records (or, with ``forget``, drops) an upload of ``digest`` to ``server`` (owner-only;
    the newest :data:`_KEEP_UPLOADS` per server are kept)."""
    path = _uploads_path(home)
    try:
        known = json.loads(path.read_text())
    except (OSError, ValueError):
        known = {}
    if not isinstance(known, dict):
        known = {}
    digests = [d for d in known.get(server) or [] if isinstance(d, str) and d != digest]
    if not forget:
        digests.append(digest)
    known[server] = digests[-_KEEP_UPLOADS:]
    try:
        _private_dirs(home, path.parent)
        write_private(path, json.dumps(known, separators=(",", ":")))
    except OSError:
        pass  # only a cache: the server is asked again next time
