"""API tokens and the server's authentication interceptor.

A token reads ``plait_<id>_<secret>``. The store keeps the id, a name and the sha256 of the
secret, never the secret. Clients send it as gRPC metadata ``authorization: Bearer <token>``.
Health checking and reflection stay open, so probes and tools work without a token.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc
import sqlalchemy as sa
from sqlalchemy.engine import Connection

from plait.engine import _store as db
from plait.errors import NotFoundError

OPEN_SERVICES = (
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1alpha.ServerReflection/",
    "/grpc.reflection.v1.ServerReflection/",
)
CACHE_SECONDS = 2.0
"""How long a verified token is trusted without asking the store again (bounds how late a
revocation takes effect)."""


def _hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


@dataclass(frozen=True)
class TokenInfo:
    id: str
    name: str
    created_at: float
    revoked_at: float | None


def create_token(conn: Connection, name: str, now: float) -> str:
    """Stores a new token and returns it; the secret is shown this once only."""
    token_id = secrets.token_hex(6)
    secret = secrets.token_urlsafe(32)
    conn.execute(
        db.api_tokens.insert().values(
            id=token_id, name=name, secret_hash=_hash(secret), created_at=now
        )
    )
    return f"plait_{token_id}_{secret}"


def list_tokens(conn: Connection) -> list[TokenInfo]:
    rows = conn.execute(sa.select(db.api_tokens).order_by(db.api_tokens.c.created_at)).all()
    return [TokenInfo(r.id, r.name, r.created_at, r.revoked_at) for r in rows]


def revoke_token(conn: Connection, token_id: str, now: float) -> None:
    done = conn.execute(
        db.api_tokens.update()
        .where(db.api_tokens.c.id == token_id, db.api_tokens.c.revoked_at.is_(None))
        .values(revoked_at=now)
    )
    if done.rowcount == 0:
        raise NotFoundError(f"no active token with id {token_id!r} (see `plait token list`)")


def token_is_valid(conn: Connection, token: str) -> bool:
    parts = token.split("_", 2)
    if len(parts) != 3 or parts[0] != "plait":
        return False
    row = conn.execute(
        sa.select(db.api_tokens.c.secret_hash, db.api_tokens.c.revoked_at).where(
            db.api_tokens.c.id == parts[1]
        )
    ).first()
    if row is None or row.revoked_at is not None:
        return False
    return hmac.compare_digest(row.secret_hash, _hash(parts[2]))


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
