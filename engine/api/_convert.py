"""Proto <-> domain at the API boundary, for what the engine alone knows (stacks, lease tokens,
tasks, names). The shared records (:mod:`plait._models`) carry their own ``to_proto`` /
``from_proto``."""

from __future__ import annotations

from typing import Any

from plait._models import ArtifactInfo, RunStatus
from plait.api.v1 import stack_service_pb2 as stack_pb
from plait.api.v1 import task_service_pb2 as tasks
from plait.engine._ir import load_json, name_problem, valid_name
from plait.engine.scheduler import TaskOrder, Token, Value
from plait.engine.store._stacks import Component, Stack
from plait.errors import PipelineError, PipelineNotFoundError, PipelineValidationError
from plait.ir.canonical import canonical_json

# ---- resource names ----


def name_id(name: str, collection: str) -> str:
    """The id in ``collection/ID`` (or a bare ID)."""
    prefix = f"{collection}/"
    if name.startswith(prefix):
        return name[len(prefix) :]
    if "/" in name:
        raise PipelineError(f"expected a resource name like '{collection}/ID', got {name!r}")
    return name


def strict_name(resource: str, collection: str, field: str = "name") -> str:
    """The NAME in ``collection/NAME`` (or a bare NAME); NAME must match
    :data:`~plait.engine._ir.NAME_PATTERN`, so what is registered can be named again."""
    name = resource.removeprefix(f"{collection}/")
    if not valid_name(name):
        raise PipelineError(f"{field}: {name_problem(name)}; expected '{collection}/NAME'")
    return name


def version_id(name: str) -> str:
    """The version in ``pipelines/NAME/versions/VERSION`` (or a bare VERSION)."""
    parts = name.split("/")
    if len(parts) == 4 and parts[0] == "pipelines" and parts[2] == "versions":
        return parts[3]
    if len(parts) == 1 and parts[0]:
        return parts[0]
    raise PipelineNotFoundError(
        f"expected 'pipelines/NAME/versions/VERSION' or a version, got {name!r}"
    )


def run_status_from_proto(value: int) -> RunStatus | None:
    """A filter's run status; None for UNSPECIFIED (no filter)."""
    if not value:
        return None
    try:
        return RunStatus.from_proto(value)
    except ValueError as exc:
        raise PipelineError(f"status: {exc}") from None


# ---- stacks ----

KINDS = {
    stack_pb.ComponentKind.Name(v).removeprefix("COMPONENT_KIND_"): v
    for v in stack_pb.ComponentKind.values()
    if v
}


def kind_from_proto(value: int) -> str:
    try:
        return stack_pb.ComponentKind.Name(stack_pb.ComponentKind.ValueType(value)).removeprefix(
            "COMPONENT_KIND_"
        )
    except ValueError:
        raise PipelineError(f"component.kind: no kind numbered {value}") from None


def component_to_proto(c: Component) -> stack_pb.Component:
    return stack_pb.Component(
        name=f"components/{c.name}",
        kind=KINDS[c.kind],
        flavor=c.flavor,
        config_json=canonical_json(c.config),
    )


def component_from_proto(c: stack_pb.Component) -> Component:
    name = strict_name(c.name, "components", "component.name")
    if not c.kind:
        raise PipelineError("component.kind is required")
    if not c.flavor:
        raise PipelineError("component.flavor is required")
    try:
        config = load_json(c.config_json or "{}")
    except ValueError as exc:
        raise PipelineError(f"component.config_json: not JSON ({exc})") from None
    if not isinstance(config, dict):
        raise PipelineError("component.config_json must be a JSON object")
    return Component(name, kind_from_proto(c.kind), c.flavor, config)


def stack_to_proto(s: Stack) -> stack_pb.Stack:
    return stack_pb.Stack(
        name=f"stacks/{s.name}",
        components=[f"components/{c}" for _, c in sorted(s.components.items())],
        active=s.active,
    )


# ---- tasks and reports ----


def token_from_proto(t: tasks.LeaseToken) -> Token:
    return Token(t.run_id, t.step_id, t.attempt, t.epoch)


def token_to_proto(t: Token) -> tasks.LeaseToken:
    return tasks.LeaseToken(run_id=t.run_id, step_id=t.step_id, attempt=t.attempt, epoch=t.epoch)


def value_to_proto(value: Value, msg: tasks.Value | None = None) -> tasks.Value:
    """A resolved input value as the message a worker reads (filled in place when given)."""
    msg = tasks.Value() if msg is None else msg
    kind, v = value
    if kind == "json":
        msg.json = v
    elif kind == "artifact":
        info: ArtifactInfo = v
        info.fill_proto(msg.artifact)
    elif kind == "list":
        msg.list.SetInParent()  # an empty list is still a list (a map over no item)
        items = msg.list.items
        for item in v:
            value_to_proto(item, items.add())
    else:
        msg.map.SetInParent()
        entries = msg.map.entries
        for key, item in sorted(v.items()):
            entry = entries.add(key=key)
            value_to_proto(item, entry.value)
    return msg


def task_to_proto(order: TaskOrder, store_uri: str, log_limit_bytes: int = 0) -> tasks.Task:
    task = tasks.Task(
        token=token_to_proto(order.token),
        pipeline=order.pipeline,
        step=order.step,
        outputs=[tasks.OutputLocation(name=n, artifact_id=a) for n, a in order.outputs],
        artifact_store_uri=store_uri,
        log_limit_bytes=log_limit_bytes,
        code_archive=order.code_archive,
        code_root=order.code_root,
        lease_seconds=order.lease_seconds,
        pool=order.pool,
    )
    for name, value in order.inputs:
        value_to_proto(value, task.inputs.add(name=name).value)
    return task


def metadata_from_json(text: str) -> dict[str, Any]:
    """Metadata: a JSON object, without NaN or Infinity (they have no JSON form)."""
    try:
        value = load_json(text)
    except ValueError as exc:
        raise PipelineValidationError(f"metadata is not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise PipelineValidationError("metadata must be a JSON object")
    return value
