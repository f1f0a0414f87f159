"""Who may call what: the server's authentication and authorization interceptor.

Clients send a token as gRPC metadata ``authorization: Bearer <token>``. A call without a valid
token is refused UNAUTHENTICATED; a valid token whose role may not call the method is refused
PERMISSION_DENIED. Health checking and reflection stay open, so probes and tools work without a
token. The rules, by service:

=====================  ===============================
service                roles that may call it
=====================  ===============================
TaskService            worker
WorkerService          worker
ArtifactService        user, admin, worker (a remote worker reads inputs and code, writes outputs)
TokenService           admin
every other service    user, admin (BuildService too: listing builds and pruning them)
=====================  ===============================

Besides the stored tokens (roles in :mod:`plait.engine.store._tokens`), the control plane
holds secrets that live only in its memory: one for the local workers it starts (worker) and,
in an embedded engine, one for the process that embeds it (admin). An embedded engine accepts
only those.
"""

from __future__ import annotations

import hmac
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import grpc

from plait.engine.store._tokens import Role

OPEN_SERVICES = (
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1alpha.ServerReflection/",
    "/grpc.reflection.v1.ServerReflection/",
)
CACHE_SECONDS = 2.0
"""How long a verified token is trusted without asking the store again (bounds how late a
revocation takes effect)."""

_BY_SERVICE: dict[str, frozenset[Role]] = {
    "/plait.api.v1.TaskService/": frozenset({Role.WORKER}),
    "/plait.api.v1.WorkerService/": frozenset({Role.WORKER}),
    "/plait.api.v1.ArtifactService/": frozenset({Role.USER, Role.ADMIN, Role.WORKER}),
    "/plait.api.v1.TokenService/": frozenset({Role.ADMIN}),
}
_DEFAULT = frozenset({Role.USER, Role.ADMIN})


def roles_for(method: str) -> frozenset[Role]:
    """The roles that may call a method (``/package.Service/Method``)."""
    for prefix, roles in _BY_SERVICE.items():
        if method.startswith(prefix):
            return roles
    return _DEFAULT


class AuthInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Refuses calls without a valid token (UNAUTHENTICATED) and calls a token's role may not
    make (PERMISSION_DENIED); open services pass.

    Args:
        lookup: the role of a stored token, None when it is unknown or revoked; None to accept
            no stored tokens (an embedded engine).
        internal: secrets that live in memory only, with their roles.
    """

    def __init__(
        self,
        lookup: Callable[[str], Awaitable[Role | None]] | None,
        internal: Mapping[str, Role],
    ) -> None:
        self._lookup = lookup
        self._internal = dict(internal)
        self._ok: dict[str, tuple[float, Role]] = {}

    async def intercept_service(
        self, continuation: Callable[[Any], Awaitable[Any]], details: Any
    ) -> Any:
        method = details.method
        if method.startswith(OPEN_SERVICES):
            return await continuation(details)
        token = ""
        for key, value in details.invocation_metadata or ():
            if key == "authorization" and value.startswith("Bearer "):
                token = value[len("Bearer ") :]
        role = await self.role(token) if token else None
        if role is None:
            message = (
                "a valid API token is required: send 'authorization: Bearer <token>' "
                "(set PLAIT_TOKEN, or `plait login HOST:PORT --token TOKEN`; an admin makes "
                "tokens with `plait token create NAME`)"
            )
            if token:
                message = "the API token is unknown or revoked"
            return _deny(await continuation(details), grpc.StatusCode.UNAUTHENTICATED, message)
        allowed = roles_for(method)
        if role not in allowed:
            service = method.strip("/").split("/")[0].rsplit(".", 1)[-1]
            need = " or ".join(sorted(allowed))
            return _deny(
                await continuation(details),
                grpc.StatusCode.PERMISSION_DENIED,
                f"a {role} token may not call {service}: it needs a {need} token",
            )
        return await continuation(details)

    async def role(self, token: str) -> Role | None:
        """The role of a token (an internal secret's, or a stored token's), None when it is
        unknown or revoked."""
        for secret, internal_role in self._internal.items():
            if hmac.compare_digest(token, secret):
                return internal_role
        if self._lookup is None:
            return None
        now = time.monotonic()
        cached = self._ok.get(token)
        if cached is not None and cached[0] > now:
            return cached[1]
        role = await self._lookup(token)
        if role is None:
            self._ok.pop(token, None)
        else:
            self._ok[token] = (now + CACHE_SECONDS, role)
        return role


def _deny(handler: Any, code: grpc.StatusCode, message: str) -> Any:
    """A handler of the same kind as ``handler`` that refuses the call."""

    async def unary(request: Any, context: Any) -> Any:
        await context.abort(code, message)

    async def stream(request: Any, context: Any) -> Any:
        await context.abort(code, message)
        yield  # pragma: no cover - makes this an async generator

    streaming_requests = bool(handler and handler.request_streaming)
    streaming_responses = bool(handler and handler.response_streaming)
    if streaming_requests and streaming_responses:
        return grpc.stream_stream_rpc_method_handler(stream)
    if streaming_requests:
        return grpc.stream_unary_rpc_method_handler(unary)
    if streaming_responses:
        return grpc.unary_stream_rpc_method_handler(stream)
    return grpc.unary_unary_rpc_method_handler(unary)
