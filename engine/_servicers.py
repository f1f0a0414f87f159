"""gRPC servicers: thin. Decode, call the control plane, encode; errors through one table."""

from __future__ import annotations

import hashlib
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import anyio
import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from plait.api.v1 import (
    artifact_service_pb2,
    artifact_service_pb2_grpc,
    pipeline_service_pb2,
    pipeline_service_pb2_grpc,
    run_service_pb2,
    run_service_pb2_grpc,
    stack_service_pb2,
    stack_service_pb2_grpc,
    task_service_pb2,
    task_service_pb2_grpc,
)
from plait.engine import _queries as q
from plait.engine import _stacks
from plait.engine._control_plane import (
    _token,
    metadata_from_json,
    output_from_proto,
)
from plait.engine._errors import abort_on_plait_error
from plait.engine._scheduler import Completed, Failed, Logs, Metadata, Started
from plait.errors import PipelineError, PipelineNotFoundError, PipelineValidationError
from plait.runners import WorkerPool

if TYPE_CHECKING:
    from plait.engine._control_plane import ControlPlane

DEFAULT_CHUNK = 1024 * 1024
MAX_CHUNK = 4 * 1024 * 1024
MAX_UPLOAD = 8 * 1024 * 1024 * 1024
"""The largest artifact an upload may carry (8 GiB)."""

Ctx = Any  # grpc.aio.ServicerContext: grpc ships no types

_FINAL_RUN = ("SUCCEEDED", "FAILED", "CANCELLED")
_TERMINAL_RUN = {q.RUN_STATUS[s] for s in ("SUCCEEDED", "FAILED", "CANCELLED")}


def _name_id(name: str, collection: str) -> str:
    prefix = f"{collection}/"
    if name.startswith(prefix):
        return name[len(prefix) :]
    if "/" in name:
        raise PipelineError(f"expected a resource name like '{collection}/ID', got {name!r}")
    return name


class PipelineServicer(pipeline_service_pb2_grpc.PipelineServiceServicer):
    def __init__(self, cp: ControlPlane) -> None:
        self.cp = cp

    async def RegisterPipeline(
        self, request: pipeline_service_pb2.RegisterPipelineRequest, context: Ctx
    ) -> pipeline_service_pb2.RegisterPipelineResponse:
        async with abort_on_plait_error(context):
            version, created = await self.cp.register_pipeline(request.spec)
        return pipeline_service_pb2.RegisterPipelineResponse(
            name=f"pipelines/{request.spec.name}/versions/{version}",
            version=version,
            created=created,
        )

    async def GetPipelineVersion(
        self, request: pipeline_service_pb2.GetPipelineVersionRequest, context: Ctx
    ) -> pipeline_service_pb2.GetPipelineVersionResponse:
        async with abort_on_plait_error(context):
            version = _version(request.name)
            spec = await self.cp.store.read(q.get_pipeline_version, version)
        return pipeline_service_pb2.GetPipelineVersionResponse(
            name=f"pipelines/{spec.name}/versions/{version}", version=version, spec=spec
        )

    async def ListPipelines(
        self, request: pipeline_service_pb2.ListPipelinesRequest, context: Ctx
    ) -> pipeline_service_pb2.ListPipelinesResponse:
        async with abort_on_plait_error(context):
            found = await self.cp.store.read(q.list_pipelines)
        return pipeline_service_pb2.ListPipelinesResponse(
            pipelines=[
                pipeline_service_pb2.Pipeline(
                    name=f"pipelines/{name}",
                    version_count=count,
                    latest_version=f"pipelines/{name}/versions/{latest}",
                )
                for name, count, latest in found
            ]
        )

    async def ListPipelineVersions(
        self, request: pipeline_service_pb2.ListPipelineVersionsRequest, context: Ctx
    ) -> pipeline_service_pb2.ListPipelineVersionsResponse:
        async with abort_on_plait_error(context):
            name = _name_id(request.parent, "pipelines")
            versions = await self.cp.store.read(q.list_pipeline_versions, name)
        return pipeline_service_pb2.ListPipelineVersionsResponse(
            versions=[f"pipelines/{name}/versions/{v}" for v in versions]
        )


def _version(name: str) -> str:
    parts = name.split("/")
    if len(parts) == 4 and parts[0] == "pipelines" and parts[2] == "versions":
        return parts[3]
    if len(parts) == 1 and parts[0]:
        return parts[0]
    raise PipelineNotFoundError(
        f"expected 'pipelines/NAME/versions/VERSION' or a version, got {name!r}"
    )


class RunServicer(run_service_pb2_grpc.RunServiceServicer):
    def __init__(self, cp: ControlPlane) -> None:
        self.cp = cp

    async def CreateRun(
        self, request: run_service_pb2.CreateRunRequest, context: Ctx
    ) -> run_service_pb2.CreateRunResponse:
        async with abort_on_plait_error(context):
            params = {}
            for p in request.parameters:
                if p.name in params:
                    raise PipelineValidationError(f"parameters: {p.name!r} given twice")
                params[p.name] = p.json
            run_id, created = await self.cp.create_run(
                _version(request.pipeline_version), params, request.no_cache, request.request_id
            )
            run = await self.cp.store.read(q.get_run, run_id, False)
        return run_service_pb2.CreateRunResponse(run=run, created=created)

    async def GetRun(
        self, request: run_service_pb2.GetRunRequest, context: Ctx
    ) -> run_service_pb2.GetRunResponse:
        async with abort_on_plait_error(context):
            run = await self.cp.store.read(q.get_run, _name_id(request.name, "runs"))
        return run_service_pb2.GetRunResponse(run=run)

    async def ListRuns(
        self, request: run_service_pb2.ListRunsRequest, context: Ctx
    ) -> run_service_pb2.ListRunsResponse:
        async with abort_on_plait_error(context):
            if request.page_size < 0:
                raise PipelineError("page_size must not be negative")
            runs, token = await self.cp.store.read(
                q.list_runs,
                request.page_size,
                request.page_token,
                request.pipeline,
                request.status,
            )
        return run_service_pb2.ListRunsResponse(runs=runs, next_page_token=token)

    async def WatchRunEvents(
        self, request: run_service_pb2.WatchRunEventsRequest, context: Ctx
    ) -> AsyncIterator[run_service_pb2.WatchRunEventsResponse]:
        async with abort_on_plait_error(context):
            run_id = await self.cp.store.read(q.resolve_run_id, _name_id(request.name, "runs"))
        live = self.cp.hub.subscribe(run_id)
        try:
            last = request.after_sequence
            while True:  # the backlog, from the store, in pages
                backlog = await self.cp.store.read(
                    q.list_events, run_id, last, 1000, request.run_events_only
                )
                if not backlog:
                    break
                last = backlog[-1].sequence
                yield run_service_pb2.WatchRunEventsResponse(events=backlog)
                if any(e.run_status in _TERMINAL_RUN for e in backlog):
                    return
            async for batch in live:
                events = [
                    e
                    for e in batch
                    if e.sequence > last and not (request.run_events_only and e.step_id)
                ]
                if not events:
                    continue
                last = events[-1].sequence
                yield run_service_pb2.WatchRunEventsResponse(events=events)
                if any(e.run_status in _TERMINAL_RUN for e in events):
                    return
        finally:
            self.cp.hub.unsubscribe(run_id, live)
            live.close()

    async def ListRunEvents(
        self, request: run_service_pb2.ListRunEventsRequest, context: Ctx
    ) -> run_service_pb2.ListRunEventsResponse:
        async with abort_on_plait_error(context):
            size = min(request.page_size or 1000, 10000)
            run_id = await self.cp.store.read(q.resolve_run_id, _name_id(request.name, "runs"))
            events = await self.cp.store.read(q.list_events, run_id, request.after_sequence, size)
        return run_service_pb2.ListRunEventsResponse(
            events=events, next_after_sequence=events[-1].sequence if len(events) == size else 0
        )

    async def ListLogs(
        self, request: run_service_pb2.ListLogsRequest, context: Ctx
    ) -> run_service_pb2.ListLogsResponse:
        async with abort_on_plait_error(context):
            size = min(request.page_size or 1000, 10000)
            run_id = await self.cp.store.read(q.resolve_run_id, _name_id(request.name, "runs"))
            entries = await self.cp.store.read(
                q.list_logs, run_id, request.step_id, request.after_sequence, size
            )
        return run_service_pb2.ListLogsResponse(
            entries=entries, next_after_sequence=entries[-1].sequence if len(entries) == size else 0
        )

    async def CancelRun(
        self, request: run_service_pb2.CancelRunRequest, context: Ctx
    ) -> run_service_pb2.CancelRunResponse:
        async with abort_on_plait_error(context):
            run_id = await self.cp.store.read(q.resolve_run_id, _name_id(request.name, "runs"))
            cancelled = await self.cp.cancel_run(run_id)
            run = await self.cp.store.read(q.get_run, run_id)
        return run_service_pb2.CancelRunResponse(run=run, cancelled=cancelled)

    async def StreamLogs(
        self, request: run_service_pb2.StreamLogsRequest, context: Ctx
    ) -> AsyncIterator[run_service_pb2.StreamLogsResponse]:
        async with abort_on_plait_error(context):
            run_id = await self.cp.store.read(q.resolve_run_id, _name_id(request.name, "runs"))
        live = self.cp.hub.subscribe(run_id)
        try:
            last = request.after_sequence
            while True:
                # read the status first: logs committed before the run ended are then seen
                ended = await self.cp.store.read(q.run_status, run_id) in _FINAL_RUN
                while True:
                    entries = await self.cp.store.read(
                        q.list_logs, run_id, request.step_id, last, 1000
                    )
                    if not entries:
                        break
                    last = entries[-1].sequence
                    yield run_service_pb2.StreamLogsResponse(entries=entries)
                if ended:
                    return
                # woken by the run's events, or after a short while (logs alone publish none)
                with anyio.move_on_after(0.25):
                    await live.receive()
        finally:
            self.cp.hub.unsubscribe(run_id, live)
            live.close()


class ArtifactServicer(artifact_service_pb2_grpc.ArtifactServiceServicer):
    def __init__(self, cp: ControlPlane) -> None:
        self.cp = cp

    async def GetArtifact(
        self, request: artifact_service_pb2.GetArtifactRequest, context: Ctx
    ) -> artifact_service_pb2.GetArtifactResponse:
        async with abort_on_plait_error(context):
            artifact = await self.cp.store.read(q.get_artifact, _name_id(request.name, "artifacts"))
        return artifact_service_pb2.GetArtifactResponse(artifact=artifact)

    async def DownloadArtifact(
        self, request: artifact_service_pb2.DownloadArtifactRequest, context: Ctx
    ) -> AsyncIterator[artifact_service_pb2.DownloadArtifactResponse]:
        async with abort_on_plait_error(context):
            if not 0 <= request.chunk_size <= MAX_CHUNK:
                raise PipelineError(f"chunk_size must be between 0 and {MAX_CHUNK}")
            artifact = await self.cp.store.read(q.get_artifact, _name_id(request.name, "artifacts"))
        size = request.chunk_size or DEFAULT_CHUNK
        path = self.cp.artifacts.path_for(artifact.digest)
        digest = hashlib.sha256()
        try:
            handle = await anyio.open_file(path, "rb")
        except FileNotFoundError:
            await context.abort(
                grpc.StatusCode.NOT_FOUND,
                f"the bytes of artifact {artifact.artifact_id} are gone from the store",
            )
        first = True
        async with handle:
            while True:
                data = await handle.read(size)
                if not data and not first:
                    break
                digest.update(data)
                msg = artifact_service_pb2.DownloadArtifactResponse(data=data)
                if first:
                    msg.artifact.CopyFrom(artifact)
                    first = False
                yield msg
                if not data:
                    break
        if digest.hexdigest() != artifact.digest:
            await context.abort(
                grpc.StatusCode.DATA_LOSS,
                f"the stored bytes of artifact {artifact.artifact_id} do not match its digest",
            )

    async def UploadArtifact(
        self,
        request_iterator: AsyncIterator[artifact_service_pb2.UploadArtifactRequest],
        context: Ctx,
    ) -> artifact_service_pb2.UploadArtifactResponse:
        header = None
        writer = self.cp.artifacts.writer()
        try:
            async for req in request_iterator:
                kind = req.WhichOneof("kind")
                if header is None:
                    if kind != "header":
                        await context.abort(
                            grpc.StatusCode.INVALID_ARGUMENT,
                            "the first message of an upload must be a header",
                        )
                    header = req.header
                    if not 0 <= header.size_bytes <= MAX_UPLOAD:
                        await context.abort(
                            grpc.StatusCode.RESOURCE_EXHAUSTED,
                            f"uploads are limited to {MAX_UPLOAD} bytes",
                        )
                    continue
                if kind != "data":
                    await context.abort(
                        grpc.StatusCode.INVALID_ARGUMENT, "only one header per upload"
                    )
                if writer.size + len(req.data) > header.size_bytes:
                    await context.abort(
                        grpc.StatusCode.INVALID_ARGUMENT,
                        f"more bytes than the header's {header.size_bytes}",
                    )
                await anyio.to_thread.run_sync(writer.write, req.data)
            if header is None:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "an upload needs a header")
            assert header is not None  # abort() raised otherwise
            if writer.size != header.size_bytes:
                await context.abort(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"got {writer.size} bytes, the header said {header.size_bytes}",
                )
            try:
                blob = await anyio.to_thread.run_sync(writer.commit, header.sha256)
            except ValueError as exc:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        finally:
            writer.abort()  # a no-op after a commit
        return artifact_service_pb2.UploadArtifactResponse(
            digest=blob.digest, size_bytes=blob.size, uri=blob.uri
        )


class StackServicer(stack_service_pb2_grpc.StackServiceServicer):
    def __init__(self, cp: ControlPlane) -> None:
        self.cp = cp

    async def RegisterComponent(
        self, request: stack_service_pb2.RegisterComponentRequest, context: Ctx
    ) -> stack_service_pb2.RegisterComponentResponse:
        async with abort_on_plait_error(context):
            c = await self.cp.store.write(
                _stacks.register_component, request.component, time.time()
            )
        return stack_service_pb2.RegisterComponentResponse(component=c)

    async def ListComponents(
        self, request: stack_service_pb2.ListComponentsRequest, context: Ctx
    ) -> stack_service_pb2.ListComponentsResponse:
        async with abort_on_plait_error(context):
            found = await self.cp.store.read(_stacks.list_components, request.kind)
        return stack_service_pb2.ListComponentsResponse(components=found)

    async def DeleteComponent(
        self, request: stack_service_pb2.DeleteComponentRequest, context: Ctx
    ) -> stack_service_pb2.DeleteComponentResponse:
        async with abort_on_plait_error(context):
            await self.cp.store.write(_stacks.delete_component, request.name)
        return stack_service_pb2.DeleteComponentResponse()

    async def RegisterStack(
        self, request: stack_service_pb2.RegisterStackRequest, context: Ctx
    ) -> stack_service_pb2.RegisterStackResponse:
        async with abort_on_plait_error(context):
            s = await self.cp.store.write(_stacks.register_stack, request.stack, time.time())
        return stack_service_pb2.RegisterStackResponse(stack=s)

    async def ListStacks(
        self, request: stack_service_pb2.ListStacksRequest, context: Ctx
    ) -> stack_service_pb2.ListStacksResponse:
        async with abort_on_plait_error(context):
            found = await self.cp.store.read(_stacks.list_stacks)
        return stack_service_pb2.ListStacksResponse(stacks=found)

    async def DeleteStack(
        self, request: stack_service_pb2.DeleteStackRequest, context: Ctx
    ) -> stack_service_pb2.DeleteStackResponse:
        async with abort_on_plait_error(context):
            await self.cp.store.write(_stacks.delete_stack, request.name)
        return stack_service_pb2.DeleteStackResponse()

    async def SetActiveStack(
        self, request: stack_service_pb2.SetActiveStackRequest, context: Ctx
    ) -> stack_service_pb2.SetActiveStackResponse:
        async with abort_on_plait_error(context):
            s = await self.cp.store.write(_stacks.set_active_stack, request.name)
        return stack_service_pb2.SetActiveStackResponse(stack=s)


class TaskServicer(task_service_pb2_grpc.TaskServiceServicer):
    def __init__(self, cp: ControlPlane) -> None:
        self.cp = cp

    async def Connect(  # type: ignore[override]  # reads and writes through the context
        self, request_iterator: AsyncIterator[task_service_pb2.ConnectRequest], context: Ctx
    ) -> None:
        hello = await context.read()
        if hello is grpc.aio.EOF or not hello.HasField("hello"):
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, "the first message on Connect must be a hello"
            )
        runner = self.cp.runners.get(hello.hello.runner)
        if not isinstance(runner, WorkerPool):
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, f"no worker pool named {hello.hello.runner!r}"
            )
        assert isinstance(runner, WorkerPool)
        worker_id = hello.hello.worker_id
        idle = anyio.Event()
        try:
            async with anyio.create_task_group() as tg:

                async def read() -> None:
                    nonlocal idle
                    while True:
                        req = await context.read()
                        if req is grpc.aio.EOF:
                            break
                        if self._report(req):
                            runner.task_done(worker_id)
                            idle.set()
                    tg.cancel_scope.cancel()

                tg.start_soon(read)
                while True:
                    task = await runner.next_task(worker_id)
                    idle = anyio.Event()
                    await context.write(task_service_pb2.ConnectResponse(assign=task))
                    await idle.wait()
        finally:
            runner.worker_gone(worker_id)

    def _report(self, req: task_service_pb2.ConnectRequest) -> bool:
        """Passes a report to the scheduler; True when it ends the worker's task."""
        kind = req.WhichOneof("kind")
        if kind == "started":
            self.cp.submit(Started(_token(req.started.token), _time(req.started)))
        elif kind == "logs":
            self.cp.submit(Logs(_token(req.logs.token), req.logs.stream, req.logs.text))
        elif kind == "metadata":
            try:
                values = metadata_from_json(req.metadata.json)
            except PipelineError:
                return False
            self.cp.submit(Metadata(_token(req.metadata.token), req.metadata.output, values))
        elif kind == "completed":
            self.cp.submit(
                Completed(
                    _token(req.completed.token),
                    tuple(output_from_proto(a) for a in req.completed.outputs),
                    _time(req.completed),
                )
            )
            return True
        elif kind == "failed":
            e = req.failed.error
            self.cp.submit(
                Failed(
                    _token(req.failed.token),
                    {"type": e.type, "message": e.message, "traceback": e.traceback},
                    start_time=_time(req.failed),
                )
            )
            return True
        return False


def _time(report: Any) -> float | None:
    if not report.HasField("start_time"):
        return None
    return float(report.start_time.ToNanoseconds() / 1e9)


async def add_servicers(server: grpc.aio.Server, cp: ControlPlane) -> None:
    pipeline_service_pb2_grpc.add_PipelineServiceServicer_to_server(PipelineServicer(cp), server)
    run_service_pb2_grpc.add_RunServiceServicer_to_server(RunServicer(cp), server)
    artifact_service_pb2_grpc.add_ArtifactServiceServicer_to_server(ArtifactServicer(cp), server)
    task_service_pb2_grpc.add_TaskServiceServicer_to_server(TaskServicer(cp), server)
    stack_service_pb2_grpc.add_StackServiceServicer_to_server(StackServicer(cp), server)
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
        )
    ]
    for name in names:
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    reflection.enable_server_reflection(
        [*names, reflection.SERVICE_NAME, health.SERVICE_NAME], server
    )
