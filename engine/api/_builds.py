"""BuildService: the records of builds (images, virtualenvs), and their removal."""

from __future__ import annotations

import dataclasses
import logging
import math
import re
import time
from typing import TYPE_CHECKING, Any

import grpc

from plait._models import FINAL_RUN_STATUSES, BuildInfo
from plait.api.v1 import build_service_pb2 as pb
from plait.api.v1 import build_service_pb2_grpc
from plait.engine._lazy import lazy_module
from plait.engine.api._errors import abort_on_plait_error, status_metadata
from plait.engine.store import _builds
from plait.engine.store._builds import BuildRecord
from plait.errors import InUseError, PipelineError

if TYPE_CHECKING:
    import sqlalchemy as sa
    from sqlalchemy.engine import Connection

    from plait.engine.store import _schema as db
else:
    sa = lazy_module("sqlalchemy")
    db = lazy_module("plait.engine.store._schema")

if TYPE_CHECKING:
    from plait.engine._control_plane import ControlPlane

Ctx = Any  # grpc.aio.ServicerContext: grpc ships no types

log = logging.getLogger("plait.builds")

DEFAULT_LIMIT, MAX_LIMIT = 100, 1000
"""ListBuilds' limit: 0 means the default, larger values are clamped to the maximum."""
MIN_PREFIX = 6
"""The fewest characters of a key that name a build."""
KINDS = ("image", "venv")

_HEX = re.compile(r"[0-9a-f]+")


def build_to_proto(b: BuildRecord) -> pb.Build:
    """A stored build as the API shows it (through the client's record of a build)."""
    names = {f.name for f in dataclasses.fields(BuildInfo)}
    values = {k: v for k, v in dataclasses.asdict(b).items() if k in names}
    return BuildInfo(**{**values, "run_ids": tuple(b.run_ids)}).to_proto()


def _key(value: str, field: str) -> str:
    """A key or a prefix of one: lowercase hex, at least MIN_PREFIX characters."""
    key = value.strip().lower()
    if len(key) < MIN_PREFIX or not _HEX.fullmatch(key):
        shown = value if len(value) <= 80 else f"{value[:80]}..."
        raise PipelineError(
            f"{field}: a build key, or at least {MIN_PREFIX} of its first hex digits "
            f"(see `plait builds list`), not {shown!r}"
        )
    return key


def _limit(value: int) -> int:
    if value < 0:
        raise PipelineError("limit must not be negative")
    return min(value or DEFAULT_LIMIT, MAX_LIMIT)


def _kind(value: str) -> str:
    if value and value not in KINDS:
        raise PipelineError(f"kind: {value[:80]!r} is not a kind of build; valid: image, venv")
    return value


def _runs_going(conn: Connection, keys: list[str]) -> dict[str, list[str]]:
    """The runs not ended yet that used each of ``keys`` (a step may be running in the build)."""
    if not keys:
        return {}
    q = (
        sa.select(db.build_runs.c.key, db.build_runs.c.run_id)
        .join(db.runs, db.runs.c.id == db.build_runs.c.run_id)
        .where(
            db.build_runs.c.key.in_(keys),
            db.runs.c.status.not_in([str(s) for s in FINAL_RUN_STATUSES]),
        )
        .order_by(db.build_runs.c.run_id)
    )
    out: dict[str, list[str]] = {}
    for key, run_id in conn.execute(q):
        out.setdefault(key, []).append(run_id)
    return out


def _prunable(
    conn: Connection, keys: list[str], unused_for: float, now: float
) -> list[BuildRecord]:
    """What PruneBuilds removes: the builds named (each one or an error saying why not), or
    every build unused for ``unused_for`` seconds; never one being built or used by a run that
    has not ended."""
    unused_before = now - unused_for if unused_for > 0 else math.inf
    if keys:
        found: dict[str, BuildRecord] = {}
        for k in keys:
            b = _builds.get_build(conn, k)
            if b.status == _builds.BUILDING:
                raise InUseError(f"build {b.key[:12]} is being built; prune it once it is done")
            found[b.key] = b
        picked = [b for b in found.values() if b.last_used_at < unused_before]
        going = _runs_going(conn, [b.key for b in picked])
        if going:
            key, runs = min(going.items())
            raise InUseError(
                f"build {key[:12]} is used by run(s) not ended yet: {', '.join(runs[:5])}; "
                f"prune it once they end"
            )
        return picked
    candidates = _builds.prunable_builds(conn, unused_before=unused_before, keys=[])
    going = _runs_going(conn, [b.key for b in candidates])
    return [b for b in candidates if b.key not in going]


class BuildServicer(build_service_pb2_grpc.BuildServiceServicer):
    """Lists, shows and prunes builds; a build's image or folder is removed by the control
    plane's :class:`~plait.engine.builds._service.Builds`."""

    def __init__(self, cp: ControlPlane) -> None:
        self.cp = cp

    async def ListBuilds(
        self, request: pb.ListBuildsRequest, context: Ctx
    ) -> pb.ListBuildsResponse:
        async with abort_on_plait_error(context):
            limit, kind = _limit(request.limit), _kind(request.kind)
            found = await self.cp.store.read(_builds.list_builds, limit, kind)
        return pb.ListBuildsResponse(builds=[build_to_proto(b) for b in found])

    async def GetBuild(self, request: pb.GetBuildRequest, context: Ctx) -> pb.GetBuildResponse:
        async with abort_on_plait_error(context):
            key = _key(request.key, "key")
            found = await self.cp.store.read(_builds.get_build, key)
        return pb.GetBuildResponse(build=build_to_proto(found))

    async def PruneBuilds(
        self, request: pb.PruneBuildsRequest, context: Ctx
    ) -> pb.PruneBuildsResponse:
        async with abort_on_plait_error(context):
            unused_for = request.unused_for_seconds
            if not (math.isfinite(unused_for) and unused_for >= 0):
                raise PipelineError(
                    f"unused_for_seconds must be a number of seconds, 0 or more, not {unused_for}"
                )
            keys = list(dict.fromkeys(_key(k, "keys") for k in request.keys))
            found = await self.cp.store.read(_prunable, keys, unused_for, time.time())
        if request.dry_run:
            return _response(found)
        removed: list[BuildRecord] = []
        failure = ""
        try:
            for b in found:
                # used (or claimed to be rebuilt) since it was picked: it stays
                now = await self.cp.store.read(_builds.find_build, b.key)
                if now is None or now.status == _builds.BUILDING:
                    continue
                if now.last_used_at != b.last_used_at:
                    continue
                try:
                    await self.cp.builds.remove(now)
                except Exception as exc:  # the image or folder stays, and so does its record
                    log.warning("could not remove build %s: %s", b.key, exc)
                    failure = (
                        f"could not remove build {b.key[:12]} ({b.reference or b.kind}): {exc}; "
                        f"{len(removed)} removed before it"
                    )
                    break
                removed.append(b)
        finally:
            if removed:
                await self.cp.store.write(_builds.delete_builds, [b.key for b in removed])
        if failure:
            code = grpc.StatusCode.FAILED_PRECONDITION
            await context.abort(
                code, failure, trailing_metadata=status_metadata(code, failure, "PRUNE_FAILED")
            )
        return _response(removed)


def _response(builds: list[BuildRecord]) -> pb.PruneBuildsResponse:
    return pb.PruneBuildsResponse(
        builds=[build_to_proto(b) for b in builds],
        freed_bytes=sum(b.size_bytes for b in builds),
    )
