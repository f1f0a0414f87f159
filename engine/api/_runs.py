"""RunService: create, read, watch and cancel runs; read their events and logs."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from google.protobuf.timestamp_pb2 import Timestamp

from plait._models import CodeSource
from plait.api.v1 import run_service_pb2 as pb
from plait.api.v1 import run_service_pb2_grpc
from plait.engine._events import follow_logs, watch_events
from plait.engine.api._convert import name_id, run_status_from_proto, version_id
from plait.engine.api._errors import abort_on_plait_error
from plait.engine.scheduler import CreateRun, RunCreated
from plait.engine.store import _runs
from plait.errors import ArtifactNotFoundError, PipelineError, PipelineValidationError

if TYPE_CHECKING:
    from plait.engine._control_plane import ControlPlane

Ctx = Any  # grpc.aio.ServicerContext: grpc ships no types

DEFAULT_RUNS_PAGE, MAX_RUNS_PAGE = 50, 1000
DEFAULT_PAGE, MAX_PAGE = 1000, 10000
"""Page sizes of ListRuns, and of ListRunEvents and ListLogs: 0 means the default, larger
values are clamped to the maximum."""


def _epoch(request: pb.ListRunsRequest, name: str) -> float | None:
    """A Timestamp field of the request in epoch seconds, None when unset."""
    if not request.HasField(name):  # type: ignore[arg-type]
        return None
    ts: Timestamp = getattr(request, name)
    return float(ts.seconds) + float(ts.nanos) / 1e9


_SHA256 = re.compile(r"[0-9a-f]{64}")
_COMMIT = re.compile(r"[0-9a-f]{40}|[0-9a-f]{64}")


def _code_source(request: pb.CreateRunRequest) -> CodeSource | None:
    """The request's code source, checked: an archive digest and a commit in hex, or empty."""
    if not request.HasField("code"):
        return None
    code = CodeSource.from_proto(request.code)
    if code.archive and not _SHA256.fullmatch(code.archive):
        raise PipelineValidationError(
            f"code.archive must be the sha256 of an archive, in hex (64 lowercase hex digits), "
            f"not {code.archive[:80]!r}"
        )
    if code.git_commit and not _COMMIT.fullmatch(code.git_commit):
        raise PipelineValidationError(
            f"code.git_commit must be a commit id in lowercase hex (40 or 64 digits), "
            f"not {code.git_commit[:80]!r}"
        )
    return code


def _page_size(value: int, default: int, maximum: int) -> int:
    if value < 0:
        raise PipelineError("page_size must not be negative")
    return min(value or default, maximum)


class RunServicer(run_service_pb2_grpc.RunServiceServicer):
    def __init__(self, cp: ControlPlane) -> None:
        self.cp = cp

    async def _run_id(self, name: str) -> str:
        return await self.cp.store.read(_runs.resolve_run_id, name_id(name, "runs"))

    async def CreateRun(self, request: pb.CreateRunRequest, context: Ctx) -> pb.CreateRunResponse:
        async with abort_on_plait_error(context):
            params = {}
            for p in request.parameters:
                if p.name in params:
                    raise PipelineValidationError(f"parameters: {p.name!r} given twice")
                params[p.name] = p.json
            code = _code_source(request)
            if code is not None and code.local_root and self.cp.config.api_tokens:
                # a path on some client's machine: only the embedded engine of that very
                # process may run code from it (a daemon's workers never do)
                code = dataclasses.replace(code, local_root="")
            if code is not None and code.archive and not self.cp.artifacts.exists(code.archive):
                # the client uploads it and asks again (it may remember an upload to another
                # server that had this address)
                raise ArtifactNotFoundError(
                    f"code archive {code.archive} is not in the control plane's store: "
                    f"upload it (ArtifactService.UploadArtifact) before CreateRun"
                )
            if request.refresh or request.retry_of:
                created = await self._create_with_options(request, params, code)
            else:
                created = await self.cp.create_run(
                    version_id(request.pipeline_version),
                    params,
                    request.no_cache,
                    request.request_id,
                    code=code,
                )
            # a new run's steps are all PENDING: the response carries the run alone
            run = await self.cp.store.read(_runs.get_run, created.run_id, False)
        return pb.CreateRunResponse(run=run.to_proto(), created=created.created)

    async def _create_with_options(
        self, request: pb.CreateRunRequest, params: dict[str, str], code: CodeSource | None
    ) -> RunCreated:
        """CreateRun with steps to refresh or a run to retry (ControlPlane.create_run takes
        neither)."""
        retry_of = ""
        if request.retry_of:
            retry_of = await self._run_id(request.retry_of)  # NOT_FOUND for an unknown run
        answer = await self.cp.ask(
            CreateRun(
                version_id(request.pipeline_version)
                if request.pipeline_version or not retry_of
                else "",
                params,
                request.no_cache,
                request.request_id,
                code_archive=code.archive if code is not None else "",
                git_commit=code.git_commit if code is not None else "",
                git_dirty=code.git_dirty if code is not None else False,
                code_root=code.local_root if code is not None else "",
                refresh=tuple(request.refresh),
                retry_of=retry_of,
            )
        )
        if isinstance(answer, Exception):
            raise answer
        assert isinstance(answer, RunCreated)
        return answer

    async def ExplainStep(
        self, request: pb.ExplainStepRequest, context: Ctx
    ) -> pb.ExplainStepResponse:
        async with abort_on_plait_error(context):
            explanation = await self.cp.store.read(
                _runs.explain_step, name_id(request.name, "runs"), request.step_id
            )
        return explanation.to_proto()

    async def GetRun(self, request: pb.GetRunRequest, context: Ctx) -> pb.GetRunResponse:
        async with abort_on_plait_error(context):
            run = await self.cp.store.read(_runs.get_run, name_id(request.name, "runs"))
        return pb.GetRunResponse(run=run.to_proto())

    async def ListRuns(self, request: pb.ListRunsRequest, context: Ctx) -> pb.ListRunsResponse:
        async with abort_on_plait_error(context):
            size = _page_size(request.page_size, DEFAULT_RUNS_PAGE, MAX_RUNS_PAGE)
            runs, token = await self.cp.store.read(
                _runs.list_runs,
                size,
                request.page_token,
                request.pipeline,
                run_status_from_proto(request.status),
                _epoch(request, "created_after"),
                _epoch(request, "created_before"),
            )
        return pb.ListRunsResponse(runs=[r.to_proto() for r in runs], next_page_token=token)

    async def WatchRunEvents(
        self, request: pb.WatchRunEventsRequest, context: Ctx
    ) -> AsyncIterator[pb.WatchRunEventsResponse]:
        async with abort_on_plait_error(context):
            run_id = await self._run_id(request.name)
        async for events in watch_events(
            self.cp.store,
            self.cp.hub,
            run_id,
            request.after_sequence,
            request.run_events_only,
            scheduled_here=lambda: run_id in self.cp.scheduler.runs,
        ):
            yield pb.WatchRunEventsResponse(events=[e.to_proto() for e in events])

    async def ListRunEvents(
        self, request: pb.ListRunEventsRequest, context: Ctx
    ) -> pb.ListRunEventsResponse:
        async with abort_on_plait_error(context):
            size = _page_size(request.page_size, DEFAULT_PAGE, MAX_PAGE)
            run_id = await self._run_id(request.name)
            events = await self.cp.store.read(
                _runs.list_events, run_id, request.after_sequence, size
            )
        return pb.ListRunEventsResponse(
            events=[e.to_proto() for e in events],
            next_after_sequence=events[-1].sequence if len(events) == size else 0,
        )

    async def ListLogs(self, request: pb.ListLogsRequest, context: Ctx) -> pb.ListLogsResponse:
        async with abort_on_plait_error(context):
            size = _page_size(request.page_size, DEFAULT_PAGE, MAX_PAGE)
            run_id = await self._run_id(request.name)
            entries = await self.cp.store.read(
                _runs.list_logs, run_id, request.step_id, request.after_sequence, size
            )
        return pb.ListLogsResponse(
            entries=[e.to_proto() for e in entries],
            next_after_sequence=entries[-1].sequence if len(entries) == size else 0,
        )

    async def CancelRun(self, request: pb.CancelRunRequest, context: Ctx) -> pb.CancelRunResponse:
        async with abort_on_plait_error(context):
            run_id = await self._run_id(request.name)
            cancelled = await self.cp.cancel_run(run_id)
            run = await self.cp.store.read(_runs.get_run, run_id)
        return pb.CancelRunResponse(run=run.to_proto(), cancelled=cancelled)

    async def StreamLogs(
        self, request: pb.StreamLogsRequest, context: Ctx
    ) -> AsyncIterator[pb.StreamLogsResponse]:
        async with abort_on_plait_error(context):
            run_id = await self._run_id(request.name)
        async for entries in follow_logs(
            self.cp.store, self.cp.hub, run_id, request.step_id, request.after_sequence
        ):
            yield pb.StreamLogsResponse(entries=[e.to_proto() for e in entries])
