"""``plait.File``: a file whose content, not its path, goes into a step's cache key.

A pipeline parameter given a :class:`File` (or a :class:`pathlib.Path`, or a string for a
parameter annotated ``plait.File`` or ``pathlib.Path``) travels as the JSON object
``{"plait.file": ABSOLUTE_PATH, "sha256": DIGEST}``: the client reads the file and computes the
digest when the run is created. The cache key counts the digest alone (engine/_cache.py), so
overwriting the file at the same path runs the steps that take it again, and the same bytes
under another path are a hit. A step receives a :class:`pathlib.Path` it can read (the file
itself is not copied: the worker must see the same path).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

FILE_MARKER = "plait.file"
"""The key of the JSON object that stands for a file (the engine's cache rules know it)."""

_CHUNK = 1 << 20


if TYPE_CHECKING:
    _PathBase = Path
else:  # before Python 3.12, pathlib's concrete class (PosixPath, WindowsPath) is subclassed
    _PathBase = type(Path())


class File(_PathBase):
    """A file passed to a pipeline: a :class:`pathlib.Path` whose content digest is part of
    the cache key of the steps that take it.

    Example::

        @plait.step
        def load(data: Path) -> int:
            return len(data.read_text().splitlines())

        @plait.pipeline
        def churn(data: plait.File) -> None:
            load(data)

        churn.run({"data": plait.File("customers.csv")})

    A ``pathlib.Path`` value (or a string, for a parameter annotated ``plait.File`` or
    ``pathlib.Path``) is taken the same way. The digest is read when the run is created.
    """

    def digest(self) -> str:
        """The sha256 of the file's bytes, in hex.

        Raises:
            FileNotFoundError: the file does not exist.
        """
        h = hashlib.sha256()
        with self.open("rb") as f:
            while chunk := f.read(_CHUNK):
                h.update(chunk)
        return h.hexdigest()

    def to_json(self) -> dict[str, str]:
        """The file as a run carries it: its absolute path and its content digest (read now)."""
        return {FILE_MARKER: str(self.resolve()), "sha256": self.digest()}

    def __repr__(self) -> str:
        return f"plait.File({str(self)!r})"


_FILE_TYPES = {"plait.File", "plait._file.File", "pathlib.Path", "pathlib._local.Path"}


def is_file_type(expr: str) -> bool:
    """Whether a parameter's declared type expression (as the IR writes it) is a file:
    ``plait.File`` or ``pathlib.Path``, or one of them or None."""
    members = {m.strip() for m in expr.split("|")} - {"None"}
    return bool(members) and members <= _FILE_TYPES


def files_to_json(value: Any, declared: str = "") -> Any:
    """``value`` with every :class:`File` and :class:`pathlib.Path` in it (and a string, when
    ``declared`` is a file type) replaced by its JSON form, the digest computed now."""
    if isinstance(value, File):
        return value.to_json()
    if isinstance(value, os.PathLike):
        return File(value).to_json()
    if isinstance(value, str) and declared and is_file_type(declared):
        return File(value).to_json()
    if isinstance(value, list | tuple):
        return [files_to_json(v) for v in value]
    if isinstance(value, Mapping) and FILE_MARKER not in value:
        return {k: files_to_json(v) for k, v in value.items()}
    return value


def files_to_paths(value: Any) -> Any:
    """A JSON value as a step receives it: each file's JSON form is a :class:`pathlib.Path`."""
    if isinstance(value, dict):
        if FILE_MARKER in value and "sha256" in value and len(value) == 2:
            return Path(value[FILE_MARKER])
        return {k: files_to_paths(v) for k, v in value.items()}
    if isinstance(value, list):
        return [files_to_paths(v) for v in value]
    return value


def load_json(text: str) -> Any:
    """A JSON input's value as a step receives it (files as paths); what a worker decodes."""
    value = json.loads(text)
    return files_to_paths(value) if FILE_MARKER in text else value
