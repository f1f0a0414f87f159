"""Components and stacks in the store (StackService's repository functions)."""

from __future__ import annotations

import json
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from plait.api.v1 import stack_service_pb2 as pb
from plait.engine import _store as db
from plait.errors import InUseError, NotFoundError, PipelineError
from plait.ir.canonical import canonical_json

KINDS = {
    pb.ComponentKind.Name(v).removeprefix("COMPONENT_KIND_"): v
    for v in pb.ComponentKind.values()
    if v
}


def _name(resource: str, collection: str) -> str:
    name = resource.removeprefix(f"{collection}/")
    if not name or "/" in name:
        raise PipelineError(f"expected '{collection}/NAME', got {resource!r}")
    return name


def _component_msg(r: Any) -> pb.Component:
    return pb.Component(
        name=f"components/{r.name}",
        kind=KINDS[r.kind],
        flavor=r.flavor,
        config_json=canonical_json(r.config),
    )


def active_stack(conn: Connection) -> str:
    value = conn.execute(
        sa.select(db.settings.c.value).where(db.settings.c.key == "active_stack")
    ).scalar()
    return str(value or "default")


def stack_runner(conn: Connection, stack: str) -> str:
    """The flavor of the stack's runner component."""
    comps = conn.execute(
        sa.select(db.stacks.c.components).where(db.stacks.c.name == stack)
    ).scalar()
    if not comps or "RUNNER" not in comps:
        return "local"
    flavor = conn.execute(
        sa.select(db.components.c.flavor).where(db.components.c.name == comps["RUNNER"])
    ).scalar()
    return str(flavor or "local")


def register_component(conn: Connection, c: pb.Component, now: float) -> pb.Component:
    name = _name(c.name, "components")
    if not c.kind:
        raise PipelineError("component.kind is required")
    if not c.flavor:
        raise PipelineError("component.flavor is required")
    try:
        config = json.loads(c.config_json or "{}")
    except ValueError as exc:
        raise PipelineError(f"component.config_json: not JSON ({exc})") from None
    if not isinstance(config, dict):
        raise PipelineError("component.config_json must be a JSON object")
    kind = pb.ComponentKind.Name(c.kind).removeprefix("COMPONENT_KIND_")
    row = {"kind": kind, "flavor": c.flavor, "config": config}
    existing = conn.execute(
        sa.select(db.components.c.kind).where(db.components.c.name == name)
    ).scalar()
    if existing is None:
        conn.execute(db.components.insert().values(name=name, created_at=now, **row))
    else:
        if existing != kind and _stacks_using(conn, name):
            raise InUseError(f"component {name!r} is used by a stack: its kind cannot change")
        conn.execute(db.components.update().where(db.components.c.name == name).values(**row))
    r = conn.execute(sa.select(db.components).where(db.components.c.name == name)).one()
    return _component_msg(r)


def list_components(conn: Connection, kind: int) -> list[pb.Component]:
    q = sa.select(db.components).order_by(db.components.c.name)
    if kind:
        name = pb.ComponentKind.Name(pb.ComponentKind.ValueType(kind))
        q = q.where(db.components.c.kind == name.removeprefix("COMPONENT_KIND_"))
    return [_component_msg(r) for r in conn.execute(q)]


def _stacks_using(conn: Connection, component: str) -> list[str]:
    return sorted(
        r.name for r in conn.execute(sa.select(db.stacks)) if component in r.components.values()
    )


def delete_component(conn: Connection, resource: str) -> None:
    name = _name(resource, "components")
    users = _stacks_using(conn, name)
    if users:
        raise InUseError(
            f"component {name!r} is used by stack(s) {', '.join(users)}: "
            f"delete or change them first"
        )
    if conn.execute(db.components.delete().where(db.components.c.name == name)).rowcount == 0:
        raise NotFoundError(f"no component {name!r}")


def _stack_msg(conn: Connection, r: Any) -> pb.Stack:
    return pb.Stack(
        name=f"stacks/{r.name}",
        components=[f"components/{c}" for _, c in sorted(r.components.items())],
        active=r.name == active_stack(conn),
    )


def register_stack(conn: Connection, s: pb.Stack, now: float) -> pb.Stack:
    name = _name(s.name, "stacks")
    by_kind: dict[str, str] = {}
    for resource in s.components:
        comp = _name(resource, "components")
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
    return _stack_msg(
        conn, conn.execute(sa.select(db.stacks).where(db.stacks.c.name == name)).one()
    )


def list_stacks(conn: Connection) -> list[pb.Stack]:
    return [
        _stack_msg(conn, r) for r in conn.execute(sa.select(db.stacks).order_by(db.stacks.c.name))
    ]


def delete_stack(conn: Connection, resource: str) -> None:
    name = _name(resource, "stacks")
    if name == active_stack(conn):
        raise InUseError(f"stack {name!r} is active: `plait stack set` another one first")
    if conn.execute(db.stacks.delete().where(db.stacks.c.name == name)).rowcount == 0:
        raise NotFoundError(f"no stack {name!r}")


def set_active_stack(conn: Connection, resource: str) -> pb.Stack:
    name = _name(resource, "stacks")
    row = conn.execute(sa.select(db.stacks).where(db.stacks.c.name == name)).first()
    if row is None:
        raise NotFoundError(f"no stack {name!r} (see `plait stack list`)")
    conn.execute(db.settings.delete().where(db.settings.c.key == "active_stack"))
    conn.execute(db.settings.insert().values(key="active_stack", value=name))
    return _stack_msg(conn, row)
