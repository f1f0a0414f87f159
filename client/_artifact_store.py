"""The local, content-addressed artifact store: bytes stored once under their sha256."""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

_DIGEST = re.compile(r"[0-9a-f]{64}")


class ArtifactCorruptedError(ValueError):
    """Stored bytes no longer match their digest."""


@dataclass(frozen=True)
class StoredBlob:
    """Where ``put`` stored some bytes."""

    digest: str
    """Hex sha256 of the bytes."""
    size: int
    """Their length."""
    uri: str
    """A file URI of the blob."""


class LocalArtifactStore:
    """Blobs under ``root/sha256/<2 hex>/<digest>``, written atomically, read verified.

    Writes are not fsynced: an output counts only once the metadata commit that names it is
    done, and a blob torn by a crash fails verification on read (and a cache hit on it is
    then a miss, since the step runs again).
    """

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).expanduser().resolve()
        self.uri = self.root.as_uri()

    @classmethod
    def from_uri(cls, uri: str) -> LocalArtifactStore:
        """A store for ``file:///path`` or a plain path."""
        parsed = urlparse(uri)
        if parsed.scheme == "file":
            return cls(unquote(parsed.path))
        if parsed.scheme == "" or len(parsed.scheme) == 1:  # a path (or a Windows drive)
            return cls(uri)
        raise ValueError(
            f"artifact store {uri!r}: only local folders (file:// or a path) are supported for now"
        )

    def path_for(self, digest: str) -> Path:
        """The blob's path; refuses anything but 64 lowercase hex digits (no path tricks)."""
        if not _DIGEST.fullmatch(digest):
            raise ValueError(f"not a sha256 hex digest: {digest!r}")
        return self.root / "sha256" / digest[:2] / digest

    def put(self, data: bytes) -> StoredBlob:
        """Stores ``data`` once; storing the same bytes again is a no-op."""
        digest = hashlib.sha256(data).hexdigest()
        path = self.path_for(digest)
        try:
            if path.stat().st_size == len(data):
                return StoredBlob(digest, len(data), path.as_uri())
        except FileNotFoundError:
            pass
        path.parent.mkdir(parents=True, exist_ok=True)
        # a temporary file in the same folder, then an atomic rename: concurrent writers of
        # the same content leave one whole file and no debris
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{digest[:8]}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return StoredBlob(digest, len(data), path.as_uri())

    def writer(self) -> BlobWriter:
        """A writer for bytes that arrive in pieces (an upload); commit() stores them."""
        return BlobWriter(self)

    def get(self, digest: str) -> bytes:
        """The bytes stored under ``digest``, verified.

        Raises:
            FileNotFoundError: no such blob.
            ArtifactCorruptedError: the blob's bytes do not match the digest.
        """
        path = self.path_for(digest)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise FileNotFoundError(
                f"artifact bytes {digest} are not in the store at {self.root}"
            ) from None
        if hashlib.sha256(data).hexdigest() != digest:
            raise ArtifactCorruptedError(
                f"artifact bytes at {path} do not match their digest {digest}"
            )
        return data

    def exists(self, digest: str) -> bool:
        """Whether a blob with that digest is stored (a stat, no read)."""
        try:
            return self.path_for(digest).is_file()
        except ValueError:
            return False


class BlobWriter:
    """Writes a blob piece by piece into a temporary file, then stores it under its digest."""

    def __init__(self, store: LocalArtifactStore) -> None:
        self._store = store
        tmp_dir = store.root / "tmp"
        tmp_dir.mkdir(parents=True, exist_ok=True)
        fd, self._tmp = tempfile.mkstemp(dir=tmp_dir, suffix=".upload")
        self._file = os.fdopen(fd, "wb")
        self._hash = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> None:
        self._file.write(data)
        self._hash.update(data)
        self.size += len(data)

    def commit(self, expected_sha256: str = "") -> StoredBlob:
        """Stores the bytes; refuses them (ValueError) when ``expected_sha256`` differs."""
        self._file.close()
        digest = self._hash.hexdigest()
        if expected_sha256 and expected_sha256 != digest:
            self.abort()
            raise ValueError(f"the bytes have sha256 {digest}, not {expected_sha256}")
        path = self._store.path_for(digest)
        path.parent.mkdir(parents=True, exist_ok=True)
        os.replace(self._tmp, path)
        return StoredBlob(digest, self.size, path.as_uri())

    def abort(self) -> None:
        self._file.close()
        Path(self._tmp).unlink(missing_ok=True)
