"""WorkerService: remote workers and one-shot step processes, over unary calls.

Every call is safe to retry. A report is applied only while its token is the attempt's current
lease; otherwise it is refused FAILED_PRECONDITION (ErrorInfo reason ``LEASE_LOST``) and
changes nothing, except that a completion or failure sent again after its first try took effect
is answered as the first was (completions are idempotent per attempt).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from plait._models import ArtifactInfo, StepError, StepStatus
from plait.api.v1 import task_service_pb2 as tasks
from plait.api.v1 import worker_service_pb2 as pb
from plait.api.v1 import worker_service_pb2_grpc
from plait.engine._ir import name_problem, valid_name
from plait.engine.api._convert import metadata_from_json, token_from_proto
from plait.engine.api._errors import abort_on_plait_error
from plait.engine.api._tasks import start_time_of
from plait.engine.scheduler import (
    Beat,
    Completed,
    Failed,
    Heartbeat,
    Lease,
    Logs,
    Metadata,
    Release,
    Started,
    Token,
)
from plait.engine.store._scheduling import attempt_outcome
from plait.errors import LeaseLostError, PipelineValidationError

if TYPE_CHECKING:
    from plait.engine._control_plane import ControlPlane

Ctx = Any  # grpc.aio.ServicerContext: grpc ships no types

DEFAULT_WAIT = 20.0
"""How long PollTask waits for a task when the request does not say."""
MAX_WAIT = 60.0


def _token(token: tasks.LeaseToken) -> Token:
    if not token.run_id or not token.step_id or token.attempt < 1:
        raise PipelineValidationError("token: run_id, step_id and attempt (>= 1) are required")
    return token_from_proto(token)


def _lost(token: Token, what: str) -> LeaseLostError:
    return LeaseLostError(
        f"{what} refused: the lease on attempt {token.attempt} of step {token.step_id!r} "
        f"of run {token.run_id} (epoch {token.epoch}) is no longer held by this worker (it "
        f"expired, the attempt ended, or it was handed to another worker); stop the step"
    )


class WorkerServicer(worker_service_pb2_grpc.WorkerServiceServicer):
    def __init__(self, cp: ControlPlane) -> None:
        self.cp = cp

    async def _applied(self, cmd: Any, token: Token, what: str, done: tuple[str, ...]) -> None:
        """Applies a report; a refused one is LEASE_LOST unless the attempt, under this very
        epoch, already ended as ``done`` says (a retry of a report that took effect)."""
        if await self.cp.ask(cmd):
            return
        outcome = await self.cp.store.read(attempt_outcome, token)
        if outcome is not None and outcome[0] == token.epoch and outcome[1] in done:
            return
        raise _lost(token, what)

    async def PollTask(self, request: pb.PollTaskRequest, context: Ctx) -> pb.PollTaskResponse:
        async with abort_on_plait_error(context):
            if request.wait_seconds < 0 or request.wait_seconds > MAX_WAIT:
                raise PipelineValidationError(
                    f"wait_seconds: expected 0 to {MAX_WAIT:g} seconds, got {request.wait_seconds}"
                )
            if not request.worker_id:
                raise PipelineValidationError("worker_id: required (the lease's holder)")
            host = request.hostname or context.peer()
            handle = f"{host}:{request.pid}" if request.pid else host
            if request.HasField("lease"):
                token = _token(request.lease)
                task = self.cp.pools.claim(request.lease)
                if task is None:
                    raise _lost(token, "claiming the task")
                if not await self.cp.ask(Lease(token, request.worker_id, handle, ask=True)):
                    raise _lost(token, "claiming the task")
                return pb.PollTaskResponse(task=task)
            if not valid_name(request.pool):
                raise PipelineValidationError(f"pool: {name_problem(request.pool)}")
            deadline = time.monotonic() + (request.wait_seconds or DEFAULT_WAIT)
            while True:
                left = deadline - time.monotonic()
                task = await self.cp.pools.take(request.pool, left) if left > 0 else None
                if task is None:
                    return pb.PollTaskResponse()
                token = token_from_proto(task.token)
                try:
                    granted = await self.cp.ask(Lease(token, request.worker_id, handle, ask=True))
                except BaseException:
                    # the worker went away (a drain cancels its poll): hand the task back, to
                    # the queue at once rather than to the reaper once its lease expires
                    self.cp.submit(Release(token, request.worker_id))
                    raise
                if granted:
                    return pb.PollTaskResponse(task=task)
                # the attempt ended while it waited (a cancelled run): take the next one

    async def StartTask(self, request: pb.StartTaskRequest, context: Ctx) -> pb.StartTaskResponse:
        async with abort_on_plait_error(context):
            token = _token(request.started.token)
            started = Started(token, start_time_of(request.started), ask=True)
            await self._applied(started, token, "StartTask", ("SUCCEEDED", "FAILED"))
            return pb.StartTaskResponse()

    async def Heartbeat(self, request: pb.HeartbeatRequest, context: Ctx) -> pb.HeartbeatResponse:
        async with abort_on_plait_error(context):
            token = _token(request.token)
            beat: Beat = await self.cp.ask(Heartbeat(token, ask=True))
            if beat.alive:
                return pb.HeartbeatResponse(
                    cancel_requested=beat.cancel, lease_seconds=beat.lease_seconds
                )
            # the run is over (and forgotten): an attempt that ended under this epoch stops
            outcome = await self.cp.store.read(attempt_outcome, token)
            # (a CRASHED one lost its lease: that is said as such)
            ended = outcome is not None and StepStatus(outcome[1]).is_final
            crashed = outcome is not None and outcome[1] == StepStatus.CRASHED
            if ended and not crashed and outcome is not None and outcome[0] == token.epoch:
                return pb.HeartbeatResponse(cancel_requested=True)
            raise _lost(token, "Heartbeat")

    async def LogMetadata(
        self, request: pb.LogMetadataRequest, context: Ctx
    ) -> pb.LogMetadataResponse:
        async with abort_on_plait_error(context):
            report = request.metadata
            token = _token(report.token)
            values = metadata_from_json(report.json)
            await self._applied(
                Metadata(token, report.output, values, ask=True), token, "LogMetadata", ()
            )
            return pb.LogMetadataResponse()

    async def AppendLogs(
        self, request: pb.AppendLogsRequest, context: Ctx
    ) -> pb.AppendLogsResponse:
        async with abort_on_plait_error(context):
            token = _token(request.token)
            if request.batch < 1:
                raise PipelineValidationError("batch: batches are numbered from 1")
            chunks = [(c.stream, c.text) for c in request.chunks]
            for stream, _ in chunks:
                if stream not in ("stdout", "stderr"):
                    raise PipelineValidationError(
                        f"chunks.stream: 'stdout' or 'stderr', not {stream!r}"
                    )
            if not chunks:
                return pb.AppendLogsResponse()
            (stream, text), more = chunks[0], tuple(chunks[1:])
            logs = Logs(token, stream, text, request.batch, more, ask=True)
            await self._applied(logs, token, "AppendLogs", ())
            return pb.AppendLogsResponse()

    async def CompleteTask(
        self, request: pb.CompleteTaskRequest, context: Ctx
    ) -> pb.CompleteTaskResponse:
        async with abort_on_plait_error(context):
            report = request.completed
            token = _token(report.token)
            try:
                outputs = tuple(ArtifactInfo.from_proto(a) for a in report.outputs)
            except (ValueError, OverflowError) as exc:
                raise PipelineValidationError(f"completed.outputs: {exc}") from None
            completed = Completed(token, outputs, start_time_of(report), ask=True)
            await self._applied(completed, token, "CompleteTask", ("SUCCEEDED",))
            return pb.CompleteTaskResponse()

    async def FailTask(self, request: pb.FailTaskRequest, context: Ctx) -> pb.FailTaskResponse:
        async with abort_on_plait_error(context):
            report = request.failed
            token = _token(report.token)
            failed = Failed(
                token,
                StepError.from_proto(report.error),
                start_time=start_time_of(report),
                ask=True,
            )
            await self._applied(failed, token, "FailTask", ("FAILED", "CRASHED"))
            return pb.FailTaskResponse()

    async def ReleaseTask(
        self, request: pb.ReleaseTaskRequest, context: Ctx
    ) -> pb.ReleaseTaskResponse:
        async with abort_on_plait_error(context):
            token = _token(request.token)
            if not await self.cp.ask(Release(token, ask=True)):
                raise _lost(token, "ReleaseTask")
            return pb.ReleaseTaskResponse()
