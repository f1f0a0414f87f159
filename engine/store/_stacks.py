"""Components and stacks: the repository behind StackService and the scheduler's stack reads."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from plait.engine._lazy import lazy_module
from plait.engine.store._engine import sqlite3_of
from plait.errors import InUseError, NotFoundError, PipelineError

if TYPE_CHECKING:
    import sqlalchemy as sa
    from sqlalchemy.engine import Connection

    from plait.engine.store import _schema as db
else:
    sa = lazy_module("sqlalchemy")
    db = lazy_module("plait.engine.store._schema")


@dataclass(frozen=True)
class Component:
    """A stack component: a runner, an artifact store, ..."""

    name: str
    kind: str
    """The kind's name without prefix: ``RUNNER``, ``ARTIFACT_STORE``, ..."""
    flavor: str
    """Its implementation: ``local``, ``docker``, ..."""
    config: dict[str, Any]


@dataclass(frozen=True)
class Stack:
    """A named set of components, at most one of each kind."""

    name: str
    components: dict[str, str]
    """Component name by kind."""
    active: bool
    """True for the stack new runs use."""


def _component(r: Any) -> Component:
    return Component(r.name, r.kind, r.flavor, dict(r.config))


def active_stack(conn: Connection) -> str:
    if (driver := sqlite3_of(conn)) is not None:
        found = driver.execute("SELECT value FROM settings WHERE key = 'active_stack'").fetchone()
        return str(found[0] if found and found[0] else "default")
    value = conn.execute(
        sa.select(db.settings.c.value).where(db.settings.c.key == "active_stack")
    ).scalar()
    return str(value or "default")


def stack_runner(conn: Connection, stack: str) -> str:
    """The flavor of the stack's runner component."""
    if (driver := sqlite3_of(conn)) is not None:
        found = driver.execute("SELECT components FROM stacks WHERE name = ?", (stack,)).fetchone()
        runner = json.loads(found[0]).get("RUNNER") if found and found[0] else None
        if not runner:
            return "local"
        found = driver.execute("SELECT flavor FROM components WHERE name = ?", (runner,)).fetchone()
        return str(found[0] if found and found[0] else "local")
    comps = conn.execute(
        sa.select(db.stacks.c.components).where(db.stacks.c.name == stack)
    ).scalar()
    if not comps or "RUNNER" not in comps:
        return "local"
    flavor = conn.execute(
        sa.select(db.components.c.flavor).where(db.components.c.name == comps["RUNNER"])
    ).scalar()
    return str(flavor or "local")


def register_component(conn: Connection, c: Component, now: float) -> Component:
    """Adds a component, or changes one (its kind only while no stack uses it).

    Its flavor must be one of its kind's and its configuration hold only keys that flavor reads
    (:func:`plait.engine._flavors.check_component`); components stored before that rule are
    read as they are.
    """
    from plait.engine._flavors import check_component  # only registration pays for it

    check_component(c.name, c.kind, c.flavor, c.config)
    row = {"kind": c.kind, "flavor": c.flavor, "config": c.config}
    existing = conn.execute(
        sa.select(db.components.c.kind).where(db.components.c.name == c.name)
    ).scalar()
    if existing is None:
        conn.execute(db.components.insert().values(name=c.name, created_at=now, **row))
    else:
        if existing != c.kind and _stacks_using(conn, c.name):
            raise InUseError(f"component {c.name!r} is used by a stack: its kind cannot change")
        conn.execute(db.components.update().where(db.components.c.name == c.name).values(**row))
    return _component(
        conn.execute(sa.select(db.components).where(db.components.c.name == c.name)).one()
    )


def list_components(conn: Connection, kind: str = "") -> list[Component]:
    q = sa.select(db.components).order_by(db.components.c.name)
    if kind:
        q = q.where(db.components.c.kind == kind)
    return [_component(r) for r in conn.execute(q)]


def _stacks_using(conn: Connection, component: str) -> list[str]:
    return sorted(
        r.name for r in conn.execute(sa.select(db.stacks)) if component in r.components.values()
    )


def delete_component(conn: Connection, name: str) -> None:
    users = _stacks_using(conn, name)
    if users:
        raise InUseError(
            f"component {name!r} is used by stack(s) {', '.join(users)}: "
            f"delete or change them first"
        )
    if conn.execute(db.components.delete().where(db.components.c.name == name)).rowcount == 0:
        raise NotFoundError(f"no component {name!r}")


def _stack(conn: Connection, r: Any) -> Stack:
    return Stack(r.name, dict(r.components), r.name == active_stack(conn))


def register_stack(conn: Connection, name: str, components: list[str], now: float) -> Stack:
    """Adds or replaces a stack made of the named components (one runner at least)."""
    by_kind: dict[str, str] = {}
    for comp in components:
        kind = conn.execute(
            sa.select(db.components.c.kind).where(db.components.c.name == comp)
        ).scalar()
        if kind is None:
            raise NotFoundError(
                f"stack {name!r}: no component {comp!r} "
                f"(register it with `plait component register`)"
            )
        if kind in by_kind:
            raise PipelineError(
                f"stack {name!r}: two {kind.lower()} components "
                f"({by_kind[kind]}, {comp}); a stack has one of each kind"
            )
        by_kind[kind] = comp
    if "RUNNER" not in by_kind:
        raise PipelineError(f"stack {name!r} needs a runner component")
    conn.execute(db.stacks.delete().where(db.stacks.c.name == name))
    conn.execute(db.stacks.insert().values(name=name, components=by_kind, created_at=now))
    return _stack(conn, conn.execute(sa.select(db.stacks).where(db.stacks.c.name == name)).one())


def list_stacks(conn: Connection) -> list[Stack]:
    return [_stack(conn, r) for r in conn.execute(sa.select(db.stacks).order_by(db.stacks.c.name))]


def delete_stack(conn: Connection, name: str) -> None:
    if name == active_stack(conn):
        raise InUseError(f"stack {name!r} is active: `plait stack set` another one first")
    if conn.execute(db.stacks.delete().where(db.stacks.c.name == name)).rowcount == 0:
        raise NotFoundError(f"no stack {name!r}")


def set_active_stack(conn: Connection, name: str) -> Stack:
    row = conn.execute(sa.select(db.stacks).where(db.stacks.c.name == name)).first()
    if row is None:
        raise NotFoundError(f"no stack {name!r} (see `plait stack list`)")
    conn.execute(db.settings.delete().where(db.settings.c.key == "active_stack"))
    conn.execute(db.settings.insert().values(key="active_stack", value=name))
    return _stack(conn, row)
