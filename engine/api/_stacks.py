"""StackService: components and stacks, as ZenML users know them."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from plait.api.v1 import stack_service_pb2 as pb
from plait.api.v1 import stack_service_pb2_grpc
from plait.engine.api._convert import (
    component_from_proto,
    component_to_proto,
    kind_from_proto,
    stack_to_proto,
    strict_name,
)
from plait.engine.api._errors import abort_on_plait_error
from plait.engine.store import _stacks

if TYPE_CHECKING:
    from plait.engine._control_plane import ControlPlane

Ctx = Any  # grpc.aio.ServicerContext: grpc ships no types


class StackServicer(stack_service_pb2_grpc.StackServiceServicer):
    def __init__(self, cp: ControlPlane) -> None:
        self.cp = cp

    async def RegisterComponent(
        self, request: pb.RegisterComponentRequest, context: Ctx
    ) -> pb.RegisterComponentResponse:
        async with abort_on_plait_error(context):
            component = component_from_proto(request.component)
            c = await self.cp.store.write(_stacks.register_component, component, time.time())
        return pb.RegisterComponentResponse(component=component_to_proto(c))

    async def ListComponents(
        self, request: pb.ListComponentsRequest, context: Ctx
    ) -> pb.ListComponentsResponse:
        async with abort_on_plait_error(context):
            kind = kind_from_proto(request.kind) if request.kind else ""
            found = await self.cp.store.read(_stacks.list_components, kind)
        return pb.ListComponentsResponse(components=[component_to_proto(c) for c in found])

    async def DeleteComponent(
        self, request: pb.DeleteComponentRequest, context: Ctx
    ) -> pb.DeleteComponentResponse:
        async with abort_on_plait_error(context):
            name = strict_name(request.name, "components")
            await self.cp.store.write(_stacks.delete_component, name)
        return pb.DeleteComponentResponse()

    async def RegisterStack(
        self, request: pb.RegisterStackRequest, context: Ctx
    ) -> pb.RegisterStackResponse:
        async with abort_on_plait_error(context):
            name = strict_name(request.stack.name, "stacks")
            components = [strict_name(c, "components") for c in request.stack.components]
            s = await self.cp.store.write(_stacks.register_stack, name, components, time.time())
        return pb.RegisterStackResponse(stack=stack_to_proto(s))

    async def ListStacks(
        self, request: pb.ListStacksRequest, context: Ctx
    ) -> pb.ListStacksResponse:
        async with abort_on_plait_error(context):
            found = await self.cp.store.read(_stacks.list_stacks)
        return pb.ListStacksResponse(stacks=[stack_to_proto(s) for s in found])

    async def DeleteStack(
        self, request: pb.DeleteStackRequest, context: Ctx
    ) -> pb.DeleteStackResponse:
        async with abort_on_plait_error(context):
            await self.cp.store.write(_stacks.delete_stack, strict_name(request.name, "stacks"))
        return pb.DeleteStackResponse()

    async def SetActiveStack(
        self, request: pb.SetActiveStackRequest, context: Ctx
    ) -> pb.SetActiveStackResponse:
        async with abort_on_plait_error(context):
            name = strict_name(request.name, "stacks")
            s = await self.cp.store.write(_stacks.set_active_stack, name)
        return pb.SetActiveStackResponse(stack=stack_to_proto(s))
