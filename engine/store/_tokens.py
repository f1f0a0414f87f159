"""API tokens: the repository.

A token reads ``plait_<id>_<secret>``. The store keeps the id, a name, a role and the sha256 of
the secret, never the secret.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from plait.engine._lazy import lazy_module
from plait.engine.store._engine import sqlite3_of
from plait.errors import NotFoundError, PipelineError

if TYPE_CHECKING:
    import sqlalchemy as sa
    from sqlalchemy.engine import Connection

    from plait.engine.store import _schema as db
else:
    sa = lazy_module("sqlalchemy")
    db = lazy_module("plait.engine.store._schema")


class Role(StrEnum):
    """What a token may do."""

    ADMIN = "admin"
    """Tokens and server settings, and everything a user may do."""
    USER = "user"
    """Pipelines, runs, artifacts, stacks. A token that can create runs can run code."""
    WORKER = "worker"
    """Only the worker-facing services."""


def _hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


@dataclass(frozen=True)
class TokenInfo:
    """A stored token, without its secret."""

    id: str
    name: str
    role: Role
    created_at: float
    revoked_at: float | None


def _info(r: Any) -> TokenInfo:
    return TokenInfo(r.id, r.name, Role(r.role), r.created_at, r.revoked_at)


def create_token(conn: Connection, name: str, role: Role, now: float) -> tuple[TokenInfo, str]:
    """Stores a new token; returns it and its secret, which is shown this once only."""
    if not name:
        raise PipelineError("a token needs a name (who or what it is for)")
    token_id = secrets.token_hex(6)
    secret = secrets.token_urlsafe(32)
    conn.execute(
        db.api_tokens.insert().values(
            id=token_id, name=name, role=role, secret_hash=_hash(secret), created_at=now
        )
    )
    return TokenInfo(token_id, name, role, now, None), f"plait_{token_id}_{secret}"


def list_tokens(conn: Connection) -> list[TokenInfo]:
    rows = conn.execute(sa.select(db.api_tokens).order_by(db.api_tokens.c.created_at)).all()
    return [_info(r) for r in rows]


def revoke_token(conn: Connection, token_id: str, now: float) -> TokenInfo:
    done = conn.execute(
        db.api_tokens.update()
        .where(db.api_tokens.c.id == token_id, db.api_tokens.c.revoked_at.is_(None))
        .values(revoked_at=now)
    )
    if done.rowcount == 0:
        raise NotFoundError(f"no active token with id {token_id!r} (see `plait token list`)")
    return _info(conn.execute(sa.select(db.api_tokens).where(db.api_tokens.c.id == token_id)).one())


def token_role(conn: Connection, token: str) -> Role | None:
    """The role of a valid token; None for one that is malformed, unknown or revoked."""
    parts = token.split("_", 2)
    if len(parts) != 3 or parts[0] != "plait":
        return None
    if (driver := sqlite3_of(conn)) is not None:  # (the daemon reads it on every call)
        row = driver.execute(
            "SELECT secret_hash, revoked_at, role FROM api_tokens WHERE id = ?", (parts[1],)
        ).fetchone()
    else:
        t = db.api_tokens.c
        row = conn.execute(
            sa.select(t.secret_hash, t.revoked_at, t.role).where(t.id == parts[1])
        ).first()
    if row is None or row[1] is not None:
        return None
    secret_hash, _, role = row
    if not hmac.compare_digest(secret_hash, _hash(parts[2])):
        return None
    return Role(role)
