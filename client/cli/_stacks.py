"""``plait component …`` and ``plait stack …``: the parts runs use, and their named sets."""

from __future__ import annotations

import json
from typing import Any

import click

from plait.cli._common import EPILOG, fail, get_console, output_option, parse_params, print_json
from plait.errors import PlaitError

_KINDS = ("runner", "artifact_store", "image_builder", "container_registry", "secrets")


def _stack_pb() -> Any:
    """The generated StackService messages, imported only when a command needs them."""
    from plait.api.v1 import stack_service_pb2

    return stack_service_pb2


def _stack_call(method: str, request: Any) -> Any:
    """Calls StackService; an error ends the command with its message."""
    from plait._client import Client

    try:
        return Client.default().stacks(method, request)
    except PlaitError as exc:
        fail(str(exc))


def _component_row(c: Any, pb: Any) -> tuple[str, str, str, str]:
    """A component as it is printed: name, kind, flavor, configuration."""
    kind = pb.ComponentKind.Name(c.kind).removeprefix("COMPONENT_KIND_").lower()
    return c.name.removeprefix("components/"), kind, c.flavor, c.config_json


def _component_json(c: Any, pb: Any, stacks: Any = None) -> dict[str, Any]:
    """A component as ``--output json`` prints it; with ``stacks``, the ones that use it."""
    name, kind, flavor, config = _component_row(c, pb)
    doc: dict[str, Any] = {
        "name": name,
        "kind": kind,
        "flavor": flavor,
        "config": json.loads(config) if config else {},
    }
    if stacks is not None:
        doc["used_by"] = [s.name.removeprefix("stacks/") for s in stacks if c.name in s.components]
    return doc


def _stack_json(s: Any, components: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """A stack as ``--output json`` prints it: its components by name, or in full when
    ``components`` (by resource name) is given."""
    names = [c.removeprefix("components/") for c in s.components]
    return {
        "name": s.name.removeprefix("stacks/"),
        "active": s.active,
        "components": names if components is None else [components[c] for c in s.components],
    }


@click.group("component", epilog=EPILOG)
def component() -> None:
    """Register the parts stacks are made of: runner, artifact store, image builder, ..."""


@component.command("register", epilog=EPILOG)
@click.argument("name")
@click.option("--kind", required=True, type=click.Choice(_KINDS), help="What it is.")
@click.option(
    "--flavor", required=True, help="Its implementation (the flavors of each kind are below)."
)
@click.option(
    "-c",
    "--config",
    "config",
    multiple=True,
    metavar="KEY=VALUE",
    help="A configuration entry; VALUE is read as JSON, else as a string.",
)
def component_register(name: str, kind: str, flavor: str, config: tuple[str, ...]) -> None:
    """Register the component NAME, or replace its configuration.

    A flavor a kind does not have, or a key its flavor does not read, is refused with the
    valid ones: nothing a stack holds is silently ignored.

    \b
    Flavors of each kind, and the keys they read (-c KEY=VALUE, all optional unless said):
      runner local                no keys: steps run in worker processes on the server
      runner docker               each step in its own container, from its environment's image
                                    network=host|bridge        [host]
                                    keep_containers=true|false [false]
                                    stop_grace_seconds=SECONDS [10] (after SIGTERM, a kill)
      artifact_store local        no keys (`plait server start --artifact-store` sets where)
      image_builder docker        builds images with the Docker daemon
                                    parent_image=IMAGE  the parent of environments naming none
                                                        [python:MAJOR.MINOR-slim]
      container_registry docker   where builds are pushed and pulled (registry API v2)
                                    uri=[http(s)://]HOST:PORT[/PATH]  required
      secrets                     no flavor yet

    \b
    Examples:
      plait component register boxes --kind runner --flavor docker -c network=bridge
      plait component register builder --kind image_builder --flavor docker \\
          -c parent_image=python:3.11-slim
      plait component register registry --kind container_registry --flavor docker \\
          -c uri=127.0.0.1:5000
      plait stack register containers -c boxes -c local-artifacts -c builder -c registry --set
    """
    pb = _stack_pb()
    req = pb.RegisterComponentRequest(
        component=pb.Component(
            name=f"components/{name}",
            kind=pb.ComponentKind.Value(f"COMPONENT_KIND_{kind.upper()}"),
            flavor=flavor,
            config_json=json.dumps(parse_params(config)),
        )
    )
    c = _stack_call("RegisterComponent", req).component
    click.echo(f"registered component {c.name.removeprefix('components/')} ({kind}, {flavor})")


@component.command("list", epilog=EPILOG)
@click.option("--kind", type=click.Choice(_KINDS), help="Only components of this kind.")
@output_option
def component_list(kind: str | None, output: str) -> None:
    """List components.

    With --output json: {"components": [{name, kind, flavor, config}, ...]}, config an
    object.
    """
    from rich.table import Table

    pb = _stack_pb()
    value = pb.ComponentKind.Value(f"COMPONENT_KIND_{kind.upper()}") if kind else 0
    found = _stack_call("ListComponents", pb.ListComponentsRequest(kind=value)).components
    if output == "json":
        print_json({"components": [_component_json(c, pb) for c in found]})
        return
    table = Table("component", "kind", "flavor", "config")
    for c in found:
        table.add_row(*_component_row(c, pb))
    get_console().print(table)


@component.command("describe", epilog=EPILOG)
@click.argument("name")
@output_option
def component_describe(name: str, output: str) -> None:
    """Show one component and the stacks that use it.

    With --output json: {name, kind, flavor, config, used_by: [STACK, ...]}.
    """
    pb = _stack_pb()
    found = [
        c
        for c in _stack_call("ListComponents", pb.ListComponentsRequest()).components
        if c.name == f"components/{name}"
    ]
    stacks = _stack_call("ListStacks", pb.ListStacksRequest()).stacks
    if not found:
        fail(f"no component {name!r} (see `plait component list`)")
    if output == "json":
        print_json(_component_json(found[0], pb, stacks))
        return
    cname, kind, flavor, config = _component_row(found[0], pb)
    users = [s.name.removeprefix("stacks/") for s in stacks if f"components/{name}" in s.components]
    click.echo(
        f"component {cname}\n  kind: {kind}\n  flavor: {flavor}\n  config: {config}\n"
        f"  used by: {', '.join(users) or 'no stack'}"
    )


@component.command("delete", epilog=EPILOG)
@click.argument("name")
def component_delete(name: str) -> None:
    """Delete a component that no stack uses."""
    pb = _stack_pb()
    _stack_call("DeleteComponent", pb.DeleteComponentRequest(name=f"components/{name}"))
    click.echo(f"deleted component {name}")


@click.group("stack", epilog=EPILOG)
def stack() -> None:
    """Compose components into named stacks; every run records the active stack."""


@stack.command("register", epilog=EPILOG)
@click.argument("name")
@click.option(
    "-c",
    "--component",
    "components",
    multiple=True,
    required=True,
    metavar="COMPONENT",
    help="A component of the stack (one per kind). Repeatable.",
)
@click.option("--set", "activate", is_flag=True, help="Also make it the active stack.")
def stack_register(name: str, components: tuple[str, ...], activate: bool) -> None:
    """Register the stack NAME from components (a runner among them), or replace it.

    \b
    Example:
      plait stack register gpu -c gpu-docker -c local-artifacts --set
    """
    pb = _stack_pb()
    s = _stack_call(
        "RegisterStack",
        pb.RegisterStackRequest(
            stack=pb.Stack(
                name=f"stacks/{name}", components=[f"components/{c}" for c in components]
            )
        ),
    ).stack
    if activate:
        s = _stack_call("SetActiveStack", pb.SetActiveStackRequest(name=s.name)).stack
    click.echo(f"registered stack {name}{' (active)' if s.active else ''}")


@stack.command("list", epilog=EPILOG)
@output_option
def stack_list(output: str) -> None:
    """List stacks; the active one is marked.

    With --output json: {"stacks": [{name, active, components: [NAME, ...]}, ...]}.
    """
    from rich.table import Table

    pb = _stack_pb()
    stacks = _stack_call("ListStacks", pb.ListStacksRequest()).stacks
    if output == "json":
        print_json({"stacks": [_stack_json(s) for s in stacks]})
        return
    table = Table("stack", "active", "components")
    for s in stacks:
        table.add_row(
            s.name.removeprefix("stacks/"),
            "*" if s.active else "",
            ", ".join(c.removeprefix("components/") for c in s.components),
        )
    get_console().print(table)


@stack.command("describe", epilog=EPILOG)
@click.argument("name", required=False)
@output_option
def stack_describe(name: str | None, output: str) -> None:
    """Show a stack's components (the active stack when NAME is left out).

    With --output json: {name, active, components: [{name, kind, flavor, config}, ...]}.
    """
    pb = _stack_pb()
    stacks = _stack_call("ListStacks", pb.ListStacksRequest()).stacks
    comps = {
        c.name: c for c in _stack_call("ListComponents", pb.ListComponentsRequest()).components
    }
    chosen = [s for s in stacks if (s.active if name is None else s.name == f"stacks/{name}")]
    if not chosen:
        fail(f"no stack {name!r} (see `plait stack list`)")
    s = chosen[0]
    if output == "json":
        print_json(_stack_json(s, {c: _component_json(comps[c], pb) for c in s.components}))
        return
    click.echo(f"stack {s.name.removeprefix('stacks/')}{' (active)' if s.active else ''}")
    for c in s.components:
        cname, kind, flavor, config = _component_row(comps[c], pb)
        click.echo(f"  {kind}: {cname} ({flavor}) {config}")


@stack.command("set", epilog=EPILOG)
@click.argument("name")
def stack_set(name: str) -> None:
    """Make NAME the active stack: new runs use it, and record it."""
    pb = _stack_pb()
    _stack_call("SetActiveStack", pb.SetActiveStackRequest(name=f"stacks/{name}"))
    click.echo(f"active stack: {name}")


@stack.command("delete", epilog=EPILOG)
@click.argument("name")
def stack_delete(name: str) -> None:
    """Delete a stack that is not active."""
    pb = _stack_pb()
    _stack_call("DeleteStack", pb.DeleteStackRequest(name=f"stacks/{name}"))
    click.echo(f"deleted stack {name}")
