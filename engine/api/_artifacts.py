"""ArtifactService: artifacts' metadata, and their bytes streamed in and out."""

from __future__ import annotations

import hashlib
import os
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import anyio
import grpc

from plait.api.v1 import artifact_service_pb2 as pb
from plait.api.v1 import artifact_service_pb2_grpc
from plait.engine.api._convert import name_id
from plait.engine.api._errors import abort_on_plait_error
from plait.engine.store._artifacts import get_artifact
from plait.errors import ArtifactError, ArtifactNotFoundError, PipelineError

if TYPE_CHECKING:
    from plait.engine._control_plane import ControlPlane

Ctx = Any  # grpc.aio.ServicerContext: grpc ships no types

DEFAULT_CHUNK = 1024 * 1024
MAX_CHUNK = 4 * 1024 * 1024
MAX_UPLOAD = 8 * 1024 * 1024 * 1024
"""The largest artifact an upload may carry (8 GiB)."""


class ArtifactServicer(artifact_service_pb2_grpc.ArtifactServiceServicer):
    def __init__(self, cp: ControlPlane) -> None:
        self.cp = cp

    async def GetArtifact(
        self, request: pb.GetArtifactRequest, context: Ctx
    ) -> pb.GetArtifactResponse:
        async with abort_on_plait_error(context):
            artifact = await self.cp.store.read(get_artifact, name_id(request.name, "artifacts"))
        return pb.GetArtifactResponse(artifact=artifact.to_proto())

    async def DownloadArtifact(
        self, request: pb.DownloadArtifactRequest, context: Ctx
    ) -> AsyncIterator[pb.DownloadArtifactResponse]:
        async with abort_on_plait_error(context):
            if not 0 <= request.chunk_size <= MAX_CHUNK:
                raise PipelineError(f"chunk_size must be between 0 and {MAX_CHUNK}")
            artifact = await self.cp.store.read(get_artifact, name_id(request.name, "artifacts"))
        size = request.chunk_size or DEFAULT_CHUNK
        path = self.cp.artifacts.path_for(artifact.digest)
        digest = hashlib.sha256()
        try:
            handle = await anyio.open_file(path, "rb")
        except FileNotFoundError:
            await context.abort(
                grpc.StatusCode.NOT_FOUND,
                f"the bytes of artifact {artifact.artifact_id} are gone from the store",
            )
        first = True
        async with handle:
            while True:
                data = await handle.read(size)
                if not data and not first:
                    break
                digest.update(data)
                msg = pb.DownloadArtifactResponse(data=data)
                if first:
                    msg.artifact.CopyFrom(artifact.to_proto())
                    first = False
                yield msg
                if not data:
                    break
        if digest.hexdigest() != artifact.digest:
            await context.abort(
                grpc.StatusCode.DATA_LOSS,
                f"the stored bytes of artifact {artifact.artifact_id} do not match its digest",
            )

    async def DownloadBlob(
        self, request: pb.DownloadBlobRequest, context: Ctx
    ) -> AsyncIterator[pb.DownloadBlobResponse]:
        """Streams stored bytes by their sha256: the first message carries their size; the bytes
        are hashed as they are read and a mismatch ends the stream with DATA_LOSS."""
        async with abort_on_plait_error(context):
            if not 0 <= request.chunk_size <= MAX_CHUNK:
                raise PipelineError(f"chunk_size must be between 0 and {MAX_CHUNK}")
            try:
                path = self.cp.artifacts.path_for(request.digest)
            except ValueError:
                raise PipelineError(
                    f"digest must be a sha256 in hex (64 lowercase hex digits), "
                    f"not {request.digest[:80]!r}"
                ) from None
            try:
                handle = await anyio.open_file(path, "rb")
            except (FileNotFoundError, NotADirectoryError):
                raise ArtifactNotFoundError(
                    f"no bytes with sha256 {request.digest} are in the control plane's store"
                ) from None
            except OSError as exc:
                raise ArtifactError(
                    f"cannot read the bytes with sha256 {request.digest}: {exc}"
                ) from None
        size = request.chunk_size or DEFAULT_CHUNK
        digest = hashlib.sha256()
        async with handle:
            total = os.fstat(handle.wrapped.fileno()).st_size
            first = True
            while True:
                data = await handle.read(size)
                if not data and not first:
                    break
                digest.update(data)
                msg = pb.DownloadBlobResponse(data=data)
                if first:
                    msg.size_bytes = total
                    first = False
                yield msg
                if not data:
                    break
        if digest.hexdigest() != request.digest:
            await context.abort(
                grpc.StatusCode.DATA_LOSS,
                f"the stored bytes with sha256 {request.digest} no longer match it",
            )

    async def UploadArtifact(
        self,
        request_iterator: AsyncIterator[pb.UploadArtifactRequest],
        context: Ctx,
    ) -> pb.UploadArtifactResponse:
        header = None
        writer = self.cp.artifacts.writer()
        try:
            async for req in request_iterator:
                kind = req.WhichOneof("kind")
                if header is None:
                    if kind != "header":
                        await context.abort(
                            grpc.StatusCode.INVALID_ARGUMENT,
                            "the first message of an upload must be a header",
                        )
                    header = req.header
                    if not 0 <= header.size_bytes <= MAX_UPLOAD:
                        await context.abort(
                            grpc.StatusCode.RESOURCE_EXHAUSTED,
                            f"uploads are limited to {MAX_UPLOAD} bytes",
                        )
                    continue
                if kind != "data":
                    await context.abort(
                        grpc.StatusCode.INVALID_ARGUMENT, "only one header per upload"
                    )
                if writer.size + len(req.data) > header.size_bytes:
                    await context.abort(
                        grpc.StatusCode.INVALID_ARGUMENT,
                        f"more bytes than the header's {header.size_bytes}",
                    )
                await anyio.to_thread.run_sync(writer.write, req.data)
            if header is None:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "an upload needs a header")
            assert header is not None  # abort() raised otherwise
            if writer.size != header.size_bytes:
                await context.abort(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"got {writer.size} bytes, the header said {header.size_bytes}",
                )
            try:
                blob = await anyio.to_thread.run_sync(writer.commit, header.sha256)
            except ValueError as exc:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        finally:
            writer.abort()  # a no-op after a commit
        return pb.UploadArtifactResponse(digest=blob.digest, size_bytes=blob.size, uri=blob.uri)
