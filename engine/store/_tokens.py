"""API tokens: the repository.

A token reads ``plait_<id>_<secret>``. The store keeps the id, a name and the sha256 of the
secret, never the secret.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from plait.engine.store import _schema as db
from plait.errors import NotFoundError


def _hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


@dataclass(frozen=True)
class TokenInfo:
    """A stored token, without its secret."""

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
