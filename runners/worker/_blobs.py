"""The artifact store of a worker that cannot reach the control plane's: bytes over gRPC.

A remote worker (``plait worker`` on another machine, or in a container) has no path to the
daemon's store. `RemoteBlobStore` gives the executor the same two calls as
:class:`plait._artifact_store.LocalArtifactStore` (`get` and `put`), made through the
ArtifactService over the worker's channel: `get` streams ``DownloadBlob`` and checks the bytes
against the digest, `put` streams ``UploadArtifact`` with the digest the bytes must have.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator, Sequence
from typing import Any, Protocol

import grpc

from plait._artifact_store import ArtifactCorruptedError, StoredBlob
from plait.api.v1 import artifact_service_pb2 as pb
from plait.api.v1 import artifact_service_pb2_grpc as pb_grpc

__all__ = ["BlobStore", "RemoteBlobStore"]

CHUNK = 1024 * 1024
"""Bytes per message, both ways."""
CALL_SECONDS = 600.0
"""The longest one transfer may take (a hang guard, not a speed expectation)."""

_DIGEST = re.compile(r"[0-9a-f]{64}")


class BlobStore(Protocol):
    """What the executor needs of an artifact store: the local one, or `RemoteBlobStore`."""

    def get(self, digest: str) -> bytes:
        """The bytes stored under ``digest``, verified against it."""
        ...

    def put(self, data: bytes) -> StoredBlob:
        """Stores ``data`` under its sha256; returns where."""
        ...


class RemoteBlobStore:
    """The control plane's store, through its ArtifactService.

    Args:
        channel: a ``grpc.Channel`` to the control plane.
        metadata: the call metadata that carries the worker's token.
        timeout: the longest one transfer may take, in seconds.
    """

    def __init__(
        self,
        channel: Any,
        metadata: Sequence[tuple[str, str]] | None = None,
        *,
        timeout: float = CALL_SECONDS,
    ) -> None:
        self._stub = pb_grpc.ArtifactServiceStub(channel)
        self._metadata = tuple(metadata) if metadata else None
        self._timeout = timeout

    def get(self, digest: str) -> bytes:
        """The bytes with sha256 ``digest``, streamed and checked.

        Raises:
            ValueError: ``digest`` is not 64 lowercase hex digits.
            FileNotFoundError: the control plane holds no such bytes.
            ArtifactCorruptedError: the bytes received do not match the digest (or the stored
                ones no longer do).
            grpc.RpcError: the call failed otherwise.
        """
        if not isinstance(digest, str) or not _DIGEST.fullmatch(digest):
            raise ValueError(f"not a sha256 hex digest (64 lowercase hex digits): {digest!r}")
        chunks: list[bytes] = []
        hasher = hashlib.sha256()
        size = -1
        try:
            for msg in self._stub.DownloadBlob(
                pb.DownloadBlobRequest(digest=digest, chunk_size=CHUNK),
                metadata=self._metadata,
                timeout=self._timeout,
            ):
                if size < 0:
                    size = msg.size_bytes
                hasher.update(msg.data)
                chunks.append(msg.data)
        except grpc.RpcError as exc:
            code = exc.code() if isinstance(exc, grpc.Call) else None
            if code == grpc.StatusCode.NOT_FOUND:
                raise FileNotFoundError(
                    f"the control plane holds no bytes with sha256 {digest}"
                ) from None
            if code == grpc.StatusCode.DATA_LOSS:
                raise ArtifactCorruptedError(
                    f"the control plane's copy of {digest} no longer matches its digest"
                ) from None
            raise
        data = b"".join(chunks)
        if hasher.hexdigest() != digest or (size >= 0 and len(data) != size):
            raise ArtifactCorruptedError(
                f"the bytes received for {digest} do not match it ({len(data)} bytes)"
            )
        return data

    def put(self, data: bytes) -> StoredBlob:
        """Uploads ``data``; the control plane stores it once under its sha256.

        Raises:
            grpc.RpcError: the upload failed.
        """
        digest = hashlib.sha256(data).hexdigest()

        def requests() -> Iterator[pb.UploadArtifactRequest]:
            yield pb.UploadArtifactRequest(
                header=pb.UploadHeader(size_bytes=len(data), sha256=digest)
            )
            view = memoryview(data)
            for i in range(0, len(data), CHUNK):
                yield pb.UploadArtifactRequest(data=bytes(view[i : i + CHUNK]))

        resp = self._stub.UploadArtifact(requests(), metadata=self._metadata, timeout=self._timeout)
        return StoredBlob(str(resp.digest), int(resp.size_bytes), str(resp.uri))
