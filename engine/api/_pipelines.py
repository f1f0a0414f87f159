"""PipelineService: register pipeline versions and read them back."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from plait.api.v1 import pipeline_service_pb2 as pb
from plait.api.v1 import pipeline_service_pb2_grpc
from plait.engine.api._convert import name_id, version_id
from plait.engine.api._errors import abort_on_plait_error
from plait.engine.store import _pipelines

if TYPE_CHECKING:
    from plait.engine._control_plane import ControlPlane

Ctx = Any  # grpc.aio.ServicerContext: grpc ships no types


class PipelineServicer(pipeline_service_pb2_grpc.PipelineServiceServicer):
    def __init__(self, cp: ControlPlane) -> None:
        self.cp = cp

    async def RegisterPipeline(
        self, request: pb.RegisterPipelineRequest, context: Ctx
    ) -> pb.RegisterPipelineResponse:
        async with abort_on_plait_error(context):
            version, created = await self.cp.register_pipeline(request.spec)
        return pb.RegisterPipelineResponse(
            name=f"pipelines/{request.spec.name}/versions/{version}",
            version=version,
            created=created,
        )

    async def GetPipelineVersion(
        self, request: pb.GetPipelineVersionRequest, context: Ctx
    ) -> pb.GetPipelineVersionResponse:
        async with abort_on_plait_error(context):
            version = version_id(request.name)
            spec = await self.cp.store.read(_pipelines.get_pipeline_version, version)
        return pb.GetPipelineVersionResponse(
            name=f"pipelines/{spec.name}/versions/{version}", version=version, spec=spec
        )

    async def ListPipelines(
        self, request: pb.ListPipelinesRequest, context: Ctx
    ) -> pb.ListPipelinesResponse:
        async with abort_on_plait_error(context):
            found = await self.cp.store.read(_pipelines.list_pipelines)
        return pb.ListPipelinesResponse(
            pipelines=[
                pb.Pipeline(
                    name=f"pipelines/{p.name}",
                    version_count=p.version_count,
                    latest_version=f"pipelines/{p.name}/versions/{p.latest_version}",
                )
                for p in found
            ]
        )

    async def ListPipelineVersions(
        self, request: pb.ListPipelineVersionsRequest, context: Ctx
    ) -> pb.ListPipelineVersionsResponse:
        async with abort_on_plait_error(context):
            name = name_id(request.parent, "pipelines")
            versions = await self.cp.store.read(_pipelines.list_pipeline_versions, name)
        return pb.ListPipelineVersionsResponse(
            versions=[f"pipelines/{name}/versions/{v}" for v in versions]
        )
