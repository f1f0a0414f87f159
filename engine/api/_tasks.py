"""TaskService: the local worker pool's stream. Each worker process keeps one Connect stream
open; tasks go down it and every report about them comes back up it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import anyio
import grpc

from plait._models import ArtifactInfo, StepError
from plait.api.v1 import task_service_pb2 as pb
from plait.api.v1 import task_service_pb2_grpc
from plait.engine.api._convert import metadata_from_json, token_from_proto
from plait.engine.api._errors import status_metadata
from plait.engine.scheduler import (
    Completed,
    Failed,
    Heartbeat,
    Lease,
    Logs,
    Metadata,
    Report,
    Started,
)
from plait.errors import PipelineError, PipelineValidationError
from plait.runners import WorkerGone, WorkerPool

if TYPE_CHECKING:
    from plait.engine._control_plane import ControlPlane

Ctx = Any  # grpc.aio.ServicerContext: grpc ships no types


def start_time_of(report: Any) -> float | None:
    """A report's start_time in epoch seconds; None when it has none."""
    if not report.HasField("start_time"):
        return None
    try:
        return float(report.start_time.ToNanoseconds() / 1e9)
    except ValueError as exc:  # nanos or seconds out of a Timestamp's range
        raise PipelineValidationError(f"start_time: {exc}") from None


def report_from_proto(req: pb.ConnectRequest) -> Report | Heartbeat | None:
    """The scheduler's report for a worker's message; None for one that reports nothing."""
    kind = req.WhichOneof("kind")
    if kind == "started":
        return Started(token_from_proto(req.started.token), start_time_of(req.started))
    if kind == "heartbeat":
        return Heartbeat(token_from_proto(req.heartbeat.token))
    if kind == "logs":
        return Logs(
            token_from_proto(req.logs.token), req.logs.stream, req.logs.text, req.logs.batch
        )
    if kind == "metadata":
        try:
            values = metadata_from_json(req.metadata.json)
        except PipelineError:
            return None
        return Metadata(token_from_proto(req.metadata.token), req.metadata.output, values)
    if kind == "completed":
        try:
            outputs = tuple(ArtifactInfo.from_proto(a) for a in req.completed.outputs)
        except (ValueError, OverflowError) as exc:  # metadata_json not JSON, a time off the scale
            raise PipelineValidationError(f"completed.outputs: {exc}") from None
        return Completed(
            token_from_proto(req.completed.token), outputs, start_time_of(req.completed)
        )
    if kind == "failed":
        return Failed(
            token_from_proto(req.failed.token),
            StepError.from_proto(req.failed.error),
            start_time=start_time_of(req.failed),
        )
    return None


class TaskServicer(task_service_pb2_grpc.TaskServiceServicer):
    def __init__(self, cp: ControlPlane) -> None:
        self.cp = cp

    async def Connect(  # type: ignore[override]  # reads and writes through the context
        self, request_iterator: AsyncIterator[pb.ConnectRequest], context: Ctx
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
        # set by each report that frees the worker; a plain asyncio Event, cleared for each
        # task, since anyio's costs a backend lookup to make and a wrapper to wait on
        idle = asyncio.Event()
        # a report refused on reading (undecodable, over a limit) aborts the call; the abort is
        # raised again outside the task group, which would wrap it in an ExceptionGroup that
        # grpc answers UNKNOWN (and logs with a traceback)
        aborted: grpc.aio.AbortError | None = None
        try:
            async with anyio.create_task_group() as tg:

                async def read() -> None:
                    nonlocal aborted
                    try:
                        while True:
                            req = await context.read()
                            if req is grpc.aio.EOF:
                                break
                            try:
                                report = report_from_proto(req)
                            except PipelineValidationError as exc:
                                code = grpc.StatusCode.INVALID_ARGUMENT
                                metadata = status_metadata(code, str(exc), exc.reason)
                                await context.abort(code, str(exc), trailing_metadata=metadata)
                            if report is None:
                                continue
                            if isinstance(report, Completed | Failed):  # the worker is free again
                                # first: it asks for its next task before the scheduler hands
                                # out what the report frees (a chain's next step), so that it
                                # gets it, warm, and the pool sees it waiting (not a backlog
                                # that starts another worker)
                                runner.task_done(worker_id)
                                idle.set()
                            self.cp.submit(report)
                    except grpc.aio.AbortError as exc:
                        aborted = exc
                    tg.cancel_scope.cancel()

                tg.start_soon(read)

                async def until_stop() -> None:
                    await self.cp.stopping()
                    tg.cancel_scope.cancel()  # the stream ends with OK: the worker exits

                tg.start_soon(until_stop)
                while True:
                    try:
                        task = await runner.next_task(worker_id)
                    except WorkerGone:
                        # not (or no longer) a process of the pool: it is handed no task; what
                        # it reports is still read (and applied by its token) until it hangs up
                        await anyio.sleep_forever()
                    # the worker dies with this process: its lease needs no commit of its own
                    self.cp.note_lease(
                        Lease(token_from_proto(task.token), worker_id, runner.handle(worker_id))
                    )
                    idle.clear()
                    await context.write(pb.ConnectResponse(assign=task))
                    await idle.wait()
        finally:
            if not self.cp.stopped:  # stopping: the runner kills it once its stream has ended
                runner.worker_gone(worker_id)
        if aborted is not None:
            raise aborted
