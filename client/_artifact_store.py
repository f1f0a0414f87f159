"""The local, content-addressed artifact store: bytes stored once under their sha256.

Layout: ``<root>/sha256/<first 2 hex digits>/<64 hex digits>``. Blobs are written to a
temporary file in their final folder and renamed into place, so a reader never sees half a
blob and concurrent writers of the same bytes leave one whole file. Reads are verified.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import secrets
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

__all__ = ["ArtifactCorruptedError", "BlobWriter", "LocalArtifactStore", "StoredBlob"]

_DIGEST = re.compile(r"[0-9a-f]{64}")


class ArtifactCorruptedError(ValueError):
    """Stored bytes no longer match their digest."""


@dataclass(frozen=True)
class StoredBlob:
    """Where :meth:`LocalArtifactStore.put` stored some bytes."""

    digest: str
    """Hex sha256 of the bytes."""
    size: int
    """Their length in bytes."""
    uri: str
    """A ``file://`` URI of the blob."""


_O_BINARY = getattr(os, "O_BINARY", 0)


def _read_all(fd: int, size: int) -> bytes:
    """The file ``fd``, ``size`` bytes long by its fstat: read in one call (a file object makes
    more system calls); a worker reads every step's inputs so.

    A blob never changes once it is in place (it is renamed there whole), so when the first
    read returns all ``size`` bytes there is nothing after them to look for; a shorter read (a
    file cut meanwhile) reads on to the file's end."""
    data = os.read(fd, size) if size else b""
    if size and len(data) == size:
        return data
    chunks = [data]
    while chunk := os.read(fd, 1 << 20):
        chunks.append(chunk)
    return b"".join(chunks)


def _write_all(fd: int, data: bytes) -> None:
    """Writes all of ``data`` to ``fd`` (without a file object, whose setup costs more system
    calls than one small write)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _create_temp(folder: str, prefix: str) -> tuple[int, str]:
    """A new, empty, owner-only file in ``folder``, opened for writing.

    Artifacts are the user's data: readable by their owner only, whatever the umask. Workers
    elsewhere, or of other users, read them through the control plane's ArtifactService.
    """
    path = f"{folder}/{prefix}{secrets.token_hex(8)}.tmp"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_BINARY, 0o600)
    os.fchmod(fd, 0o600)
    return fd, path


class LocalArtifactStore:
    """Blobs under ``root/sha256/<2 hex>/<digest>``, written atomically, read verified.

    Writes are not fsynced, on purpose: an output counts only once the metadata commit that
    names its digest is done, and a blob torn by a machine crash fails verification when it is
    read. :meth:`get` then moves the torn blob aside, so that the next :meth:`put` of the same
    bytes (the step run again) writes it anew instead of trusting a file of the right size.

    Attributes:
        root: the store's folder (absolute); created by the first :meth:`put`.
        uri: the ``file://`` URI of ``root``.
    """

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).expanduser().resolve()
        self.uri = self.root.as_uri()
        # strings, not Path objects: a worker puts and gets blobs for every step it runs, and
        # joining Paths cost more than the file operations themselves
        self._blobs = str(self.root / "sha256")
        self._blobs_uri = (self.root / "sha256").as_uri()  # hex digits need no quoting
        self._private = False

    def _make_private(self) -> None:
        """Makes the store's root owner-only (0700) before the first write: nothing below it
        is then reachable by other users, whatever modes its subfolders got."""
        if not self._private:
            from plait._settings import private_dir

            private_dir(self.root)
            self._private = True

    @classmethod
    def from_uri(cls, uri: str) -> LocalArtifactStore:
        """A store for ``file:///path`` or a plain path.

        Raises:
            ValueError: another scheme, or a ``file://`` URI that names another host.
        """
        parsed = urlparse(uri)
        if parsed.scheme == "file":
            if parsed.netloc not in ("", "localhost"):
                raise ValueError(
                    f"artifact store {uri!r} names the host {parsed.netloc!r}: only local "
                    f"folders are supported for now (file:///path or a path)"
                )
            return cls(unquote(parsed.path))
        if parsed.scheme == "" or len(parsed.scheme) == 1:  # a path (or a Windows drive)
            return cls(uri)
        raise ValueError(
            f"artifact store {uri!r}: only local folders are supported for now "
            f"(file:///path or a path), not {parsed.scheme}://"
        )

    def path_for(self, digest: str) -> Path:
        """The blob's path.

        Raises:
            ValueError: ``digest`` is not 64 lowercase hex digits (so no digest can name a
                path outside the store).
        """
        return Path(self._file(digest))

    def _file(self, digest: str) -> str:
        """`path_for` as a string."""
        if not isinstance(digest, str) or not _DIGEST.fullmatch(digest):
            raise ValueError(f"not a sha256 hex digest (64 lowercase hex digits): {digest!r}")
        return f"{self._blobs}/{digest[:2]}/{digest}"

    def _uri(self, digest: str) -> str:
        """The ``file://`` URI of a valid digest's blob (``path_for(digest).as_uri()``)."""
        return f"{self._blobs_uri}/{digest[:2]}/{digest}"

    def put(self, data: bytes) -> StoredBlob:
        """Stores ``data`` once; storing the same bytes again finds them and writes nothing."""
        digest = hashlib.sha256(data).hexdigest()
        folder = f"{self._blobs}/{digest[:2]}"
        path = f"{folder}/{digest}"
        blob = StoredBlob(digest, len(data), self._uri(digest))
        try:
            if os.stat(path).st_size == len(data):
                return blob
        except FileNotFoundError:
            pass
        self._make_private()
        # a temporary file in the same folder, then an atomic rename: concurrent writers of
        # the same content leave one whole file and no debris
        try:
            fd, tmp = _create_temp(folder, f".{digest[:8]}.")
        except FileNotFoundError:  # the folder's first blob (not looked for first: most exist)
            os.makedirs(folder, exist_ok=True)
            fd, tmp = _create_temp(folder, f".{digest[:8]}.")
        try:
            try:
                _write_all(fd, data)
            finally:
                os.close(fd)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        return blob

    def writer(self) -> BlobWriter:
        """A writer for bytes that arrive in pieces (an upload); its ``commit()`` stores them."""
        return BlobWriter(self)

    def get(self, digest: str) -> bytes:
        """The bytes stored under ``digest``, verified against it.

        Raises:
            ValueError: ``digest`` is not a sha256 hex digest.
            FileNotFoundError: no such blob.
            ArtifactCorruptedError: the blob's bytes do not match the digest (the blob is moved
                aside, so that storing the right bytes again repairs it).
        """
        path = self._file(digest)
        try:
            fd = os.open(path, os.O_RDONLY | _O_BINARY)
        except FileNotFoundError:
            raise FileNotFoundError(
                f"artifact bytes {digest} are not in the store at {self.root}"
            ) from None
        try:
            identity = os.fstat(fd)
            data = _read_all(fd, identity.st_size)
        finally:
            os.close(fd)
        if hashlib.sha256(data).hexdigest() != digest:
            self._quarantine(path, identity)
            raise ArtifactCorruptedError(
                f"artifact bytes at {path} do not match their digest {digest}"
            )
        return data

    def _quarantine(self, path: str, identity: os.stat_result) -> None:
        # only the file that was read: a writer may have just renamed the right bytes into place
        try:
            now = os.stat(path)
            if (now.st_ino, now.st_dev) == (identity.st_ino, identity.st_dev):
                os.replace(path, f"{path}.corrupt")
        except OSError:
            pass  # best effort (a read-only store, say): the error is raised either way

    def exists(self, digest: str) -> bool:
        """Whether a blob with that digest is stored (a stat, no read; not verified).

        Anything that is not a sha256 hex digest names no blob: False.
        """
        if not isinstance(digest, str) or not _DIGEST.fullmatch(digest):
            return False
        # strings, not Path objects: every cache hit asks this, on the scheduler's hot path
        return os.path.isfile(f"{self._blobs}/{digest[:2]}/{digest}")


class BlobWriter:
    """Writes a blob piece by piece into a temporary file, then stores it under its digest.

    Attributes:
        size: the number of bytes written so far.
    """

    def __init__(self, store: LocalArtifactStore) -> None:
        self._store = store
        store._make_private()
        tmp_dir = store.root / "tmp"
        tmp_dir.mkdir(parents=True, exist_ok=True)
        fd, self._tmp = _create_temp(str(tmp_dir), "upload.")
        self._file = os.fdopen(fd, "wb")
        self._hash = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> None:
        """Appends ``data``."""
        self._file.write(data)
        self._hash.update(data)
        self.size += len(data)

    def commit(self, expected_sha256: str = "") -> StoredBlob:
        """Stores the bytes written.

        Raises:
            ValueError: ``expected_sha256`` is given and is not the bytes' digest (nothing is
                stored then).
        """
        self._file.close()
        digest = self._hash.hexdigest()
        if expected_sha256 and expected_sha256 != digest:
            self.abort()
            raise ValueError(f"the bytes have sha256 {digest}, not {expected_sha256}")
        path = self._store.path_for(digest)
        path.parent.mkdir(parents=True, exist_ok=True)
        os.replace(self._tmp, path)
        return StoredBlob(digest, self.size, self._store._uri(digest))

    def abort(self) -> None:
        """Drops the bytes written; nothing is stored."""
        self._file.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._tmp)
