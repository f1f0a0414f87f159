"""The gRPC API of the control plane: one thin servicer module per service.

Servicers decode requests, call the control plane or a store repository, and encode the
domain records they get back; errors go through one table (:mod:`._errors`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from plait.api.v1 import (
    artifact_service_pb2,
    artifact_service_pb2_grpc,
    build_service_pb2,
    build_service_pb2_grpc,
    pipeline_service_pb2,
    pipeline_service_pb2_grpc,
    run_service_pb2,
    run_service_pb2_grpc,
    stack_service_pb2,
    stack_service_pb2_grpc,
    task_service_pb2,
    task_service_pb2_grpc,
    token_service_pb2,
    token_service_pb2_grpc,
    worker_service_pb2,
    worker_service_pb2_grpc,
)
from plait.engine.api._artifacts import ArtifactServicer
from plait.engine.api._builds import BuildServicer
from plait.engine.api._pipelines import PipelineServicer
from plait.engine.api._runs import RunServicer
from plait.engine.api._stacks import StackServicer
from plait.engine.api._tasks import TaskServicer
from plait.engine.api._tokens import TokenServicer
from plait.engine.api._workers import WorkerServicer

if TYPE_CHECKING:
    from plait.engine._control_plane import ControlPlane

__all__ = ["add_servicers"]


async def add_servicers(server: grpc.aio.Server, cp: ControlPlane) -> None:
    pipeline_service_pb2_grpc.add_PipelineServiceServicer_to_server(PipelineServicer(cp), server)
    run_service_pb2_grpc.add_RunServiceServicer_to_server(RunServicer(cp), server)
    artifact_service_pb2_grpc.add_ArtifactServiceServicer_to_server(ArtifactServicer(cp), server)
    task_service_pb2_grpc.add_TaskServiceServicer_to_server(TaskServicer(cp), server)
    stack_service_pb2_grpc.add_StackServiceServicer_to_server(StackServicer(cp), server)
    token_service_pb2_grpc.add_TokenServiceServicer_to_server(TokenServicer(cp), server)
    worker_service_pb2_grpc.add_WorkerServiceServicer_to_server(WorkerServicer(cp), server)
    build_service_pb2_grpc.add_BuildServiceServicer_to_server(BuildServicer(cp), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = [
        s.full_name
        for s in (
            pipeline_service_pb2.DESCRIPTOR.services_by_name["PipelineService"],
            run_service_pb2.DESCRIPTOR.services_by_name["RunService"],
            artifact_service_pb2.DESCRIPTOR.services_by_name["ArtifactService"],
            task_service_pb2.DESCRIPTOR.services_by_name["TaskService"],
            stack_service_pb2.DESCRIPTOR.services_by_name["StackService"],
            token_service_pb2.DESCRIPTOR.services_by_name["TokenService"],
            worker_service_pb2.DESCRIPTOR.services_by_name["WorkerService"],
            build_service_pb2.DESCRIPTOR.services_by_name["BuildService"],
        )
    ]
    for name in names:
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    if not cp.config.reflection:
        return
    from grpc_reflection.v1alpha import reflection  # (a twentieth of an engine's start)

    reflection.enable_server_reflection(
        [*names, reflection.SERVICE_NAME, health.SERVICE_NAME], server
    )
