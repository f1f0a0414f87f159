"""The server's authentication interceptor.

Clients send a token as gRPC metadata ``authorization: Bearer <token>``. Health checking and
reflection stay open, so probes and tools work without a token.
"""

from __future__ import annotations

import hmac
import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

OPEN_SERVICES = (
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1alpha.ServerReflection/",
    "/grpc.reflection.v1.ServerReflection/",
)
CACHE_SECONDS = 2.0
"""How long a verified token is trusted without asking the store again (bounds how late a
revocation takes effect)."""


class AuthInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Refuses calls without a valid bearer token (UNAUTHENTICATED), except open services.

    ``internal`` is a token the control plane gives its own local workers at start; it lives
    only in memory.
    """

    def __init__(self, check: Callable[[str], Awaitable[bool]], internal: str) -> None:
        self._check = check
        self._internal = internal
        self._ok: dict[str, float] = {}

    async def intercept_service(
        self, continuation: Callable[[Any], Awaitable[Any]], details: Any
    ) -> Any:
        if details.method.startswith(OPEN_SERVICES):
            return await continuation(details)
        token = ""
        for key, value in details.invocation_metadata or ():
            if key == "authorization" and value.startswith("Bearer "):
                token = value[len("Bearer ") :]
        if token and (hmac.compare_digest(token, self._internal) or await self._valid(token)):
            return await continuation(details)
        message = (
            "a valid API token is required: send 'authorization: Bearer <token>' "
            "(set PLAIT_TOKEN; create one with `plait token create NAME` on the server)"
        )
        if token:
            message = "the API token is unknown or revoked"
        return _deny(details.method, message)

    async def _valid(self, token: str) -> bool:
        now = time.monotonic()
        if self._ok.get(token, 0) > now:
            return True
        if await self._check(token):
            self._ok[token] = now + CACHE_SECONDS
            return True
        self._ok.pop(token, None)
        return False


def _deny(method: str, message: str) -> Any:
    async def unary(request: Any, context: Any) -> Any:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    async def stream(request: Any, context: Any) -> Any:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
        yield  # pragma: no cover - makes this an async generator

    streaming_responses = method.endswith(("/WatchRunEvents", "/DownloadArtifact", "/Connect"))
    streaming_requests = method.endswith(("/UploadArtifact", "/Connect"))
    if streaming_requests and streaming_responses:
        return grpc.stream_stream_rpc_method_handler(stream)
    if streaming_requests:
        return grpc.stream_unary_rpc_method_handler(unary)
    if streaming_responses:
        return grpc.unary_stream_rpc_method_handler(stream)
    return grpc.unary_unary_rpc_method_handler(unary)
