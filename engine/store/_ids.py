"""Resolving the id prefixes users type (``plait runs show 3fa2``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from plait.engine._lazy import lazy_module
from plait.engine.store._engine import sqlite3_of

if TYPE_CHECKING:
    import sqlalchemy as sa
    from sqlalchemy.engine import Connection
else:
    sa = lazy_module("sqlalchemy")


def resolve_prefix(
    conn: Connection, table: str, column: str, prefix: str, error: type[Exception], what: str
) -> str:
    """The one id in ``table.column`` that is ``prefix`` or starts with it; ``error``
    otherwise."""
    if not prefix:
        raise error(f"no {what} id given")
    escaped = prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    if (driver := sqlite3_of(conn)) is not None:
        row = driver.execute(
            f'SELECT "{column}" FROM {table} WHERE "{column}" = ?', (prefix,)
        ).fetchone()
        if row is not None:
            return str(row[0])
        found = [
            r[0]
            for r in driver.execute(
                f'SELECT "{column}" FROM {table} WHERE "{column}" LIKE ? ESCAPE ? LIMIT 2',
                (f"{escaped}%", "\\"),
            )
        ]
    else:
        col = sa.table(table, sa.column(column)).c[column]
        exact = conn.execute(sa.select(col).where(col == prefix)).scalar()
        if exact is not None:
            return str(exact)
        found = list(
            conn.execute(sa.select(col).where(col.like(f"{escaped}%", escape="\\")).limit(2))
            .scalars()
            .all()
        )
    if not found:
        raise error(f"no {what} with id {prefix!r}")
    if len(found) > 1:
        raise error(f"{what} id prefix {prefix!r} is ambiguous; give more characters")
    return str(found[0])
