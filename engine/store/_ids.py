"""Resolving the id prefixes users type (``plait runs show 3fa2``)."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection


def resolve_prefix(
    conn: Connection, col: sa.Column[Any], prefix: str, error: type[Exception], what: str
) -> str:
    """The one id in ``col`` that is ``prefix`` or starts with it; ``error`` otherwise."""
    if not prefix:
        raise error(f"no {what} id given")
    exact = conn.execute(sa.select(col).where(col == prefix)).scalar()
    if exact is not None:
        return str(exact)
    escaped = prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    found = (
        conn.execute(sa.select(col).where(col.like(f"{escaped}%", escape="\\")).limit(2))
        .scalars()
        .all()
    )
    if not found:
        raise error(f"no {what} with id {prefix!r}")
    if len(found) > 1:
        raise error(f"{what} id prefix {prefix!r} is ambiguous; give more characters")
    return str(found[0])
