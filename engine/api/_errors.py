"""One table from Plait errors to gRPC status codes, with an ErrorInfo reason in the details."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2

from plait import errors

DOMAIN = "plait.dev"

STATUS_FOR: tuple[tuple[type[errors.PlaitError], grpc.StatusCode], ...] = (
    (errors.NotFoundError, grpc.StatusCode.NOT_FOUND),
    (errors.PipelineError, grpc.StatusCode.INVALID_ARGUMENT),
    (errors.LeaseLostError, grpc.StatusCode.FAILED_PRECONDITION),
    (errors.InUseError, grpc.StatusCode.FAILED_PRECONDITION),
    (errors.ArtifactError, grpc.StatusCode.FAILED_PRECONDITION),
    (errors.UnavailableError, grpc.StatusCode.UNAVAILABLE),
    (errors.PlaitError, grpc.StatusCode.INTERNAL),
)


def status_code_for(exc: errors.PlaitError) -> grpc.StatusCode:
    for cls, code in STATUS_FOR:
        if isinstance(exc, cls):
            return code
    return grpc.StatusCode.INTERNAL


def status_metadata(code: grpc.StatusCode, message: str, reason: str) -> tuple[tuple[str, Any]]:
    info = any_pb2.Any()
    info.Pack(error_details_pb2.ErrorInfo(reason=reason, domain=DOMAIN))
    status = status_pb2.Status(code=code.value[0], message=message, details=[info])
    return (("grpc-status-details-bin", status.SerializeToString()),)


@asynccontextmanager
async def abort_on_plait_error(context: Any) -> AsyncIterator[None]:
    """Turns a PlaitError raised inside into an aborted RPC with its status and reason."""
    try:
        yield
    except errors.PlaitError as exc:
        code = status_code_for(exc)
        await context.abort(
            code, str(exc), trailing_metadata=status_metadata(code, str(exc), exc.reason)
        )
