"""The dashboard's HTTP server: static pages, sign-in, and JSON endpoints that call the daemon's
own gRPC API with the session's token.

Every ``/api/`` request goes through the same doors as a gRPC call: it is made as a gRPC call,
on the daemon's loopback address, with the API token its session signed in with, so the same
interceptors check the token, the role and every field's limit. Around that, this server bounds
what HTTP adds (the path, the query, the body, open streams), refuses a state-changing request
without its session's CSRF secret and a same-origin ``Origin``, and answers every error as JSON
with a status a person can act on. docs/dashboard-api.md lists the endpoints.
"""

from __future__ import annotations

import asyncio
import json
import logging
import mimetypes
import re
import ssl
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from html import escape
from pathlib import Path
from typing import Any

import anyio
import grpc
from aiohttp import web
from anyio.abc import TaskStatus
from google.protobuf import json_format
from google.protobuf.timestamp_pb2 import Timestamp

from plait._models import ArtifactInfo, Run, RunEvent, RunStatus
from plait._settings import DEFAULT_DASHBOARD_PORT as DEFAULT_DASHBOARD_PORT
from plait.api.v1 import artifact_service_pb2 as artifacts_pb
from plait.api.v1 import artifact_service_pb2_grpc as artifacts_grpc
from plait.api.v1 import build_service_pb2 as builds_pb
from plait.api.v1 import build_service_pb2_grpc as builds_grpc
from plait.api.v1 import pipeline_service_pb2 as pipelines_pb
from plait.api.v1 import pipeline_service_pb2_grpc as pipelines_grpc
from plait.api.v1 import run_service_pb2 as runs_pb
from plait.api.v1 import run_service_pb2_grpc as runs_grpc
from plait.api.v1 import stack_service_pb2 as stacks_pb
from plait.api.v1 import stack_service_pb2_grpc as stacks_grpc
from plait.engine.dashboard import _views as views
from plait.engine.dashboard._sessions import Session, Sessions
from plait.ir.v1 import ir_pb2

log = logging.getLogger("plait.dashboard")

STATIC = Path(__file__).parent / "static"
COOKIE = "plait_session"
CSRF_HEADER = "X-Plait-CSRF"

MAX_PATH = 2_048
"""The longest request path, in characters."""
MAX_QUERY = 4_096
"""The longest query string."""
MAX_VALUE = 1_024
"""The longest value of one query parameter, form field or path segment."""
MAX_BODY = 16 * 1024
"""The largest request body (a sign-in form)."""
MAX_STREAMS = 256
"""Event and log streams open at once, for all sessions."""
MAX_SESSION_STREAMS = 32
"""Event and log streams one session may have open at once."""
MAX_PAGE = 500
"""The largest page of runs."""
MAX_VERSIONS = 200
"""The most versions of a pipeline listed."""
CALL_SECONDS = 60.0
"""How long one call to the control plane may take."""
SPEC_CACHE = 64
"""Pipeline versions (immutable) kept in memory with their layouts."""

RoleOf = Callable[[str], Awaitable[str | None]]
"""The role of an API token (``admin``, ``user``, ``worker``), None when it is refused."""

_STATUS_OF_CODE = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.FAILED_PRECONDITION: 409,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 413,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}
_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
        "img-src 'self' data:; connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; "
        "form-action 'self'"
    ),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}
_STATIC_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
_UNSAFE_FILENAME = re.compile(r"[^A-Za-z0-9._-]+")


class HttpError(Exception):
    """An error answered as ``{"error": message, "code": code}`` with an HTTP status."""

    def __init__(self, status: int, message: str, code: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.code = code or {
            400: "INVALID_ARGUMENT",
            401: "UNAUTHENTICATED",
            403: "PERMISSION_DENIED",
            404: "NOT_FOUND",
            409: "FAILED_PRECONDITION",
            413: "TOO_LARGE",
            429: "TOO_MANY_REQUESTS",
            503: "UNAVAILABLE",
        }.get(status, "INTERNAL")


def _from_rpc(exc: grpc.aio.AioRpcError) -> HttpError:
    status = _STATUS_OF_CODE.get(exc.code(), 500)
    message = exc.details() or exc.code().name
    if exc.code() is grpc.StatusCode.UNAVAILABLE:
        message = f"the control plane is not answering: {message}"
    return HttpError(status, message, exc.code().name)


def _json(doc: Any, status: int = 200) -> web.Response:
    return web.Response(
        text=json.dumps(doc, ensure_ascii=False, allow_nan=False, default=str),
        status=status,
        content_type="application/json",
    )


def _param(request: web.Request, name: str, default: str = "") -> str:
    value = request.query.get(name, default)
    if len(value) > MAX_VALUE:
        raise HttpError(400, f"query parameter {name!r} is longer than {MAX_VALUE} characters")
    return value


def _segment(request: web.Request, name: str) -> str:
    value = request.match_info[name]
    if not value or len(value) > MAX_VALUE or "\x00" in value:
        raise HttpError(400, f"{name} must have 1 to {MAX_VALUE} characters")
    return value


def _time_param(request: web.Request, name: str) -> Timestamp | None:
    text = _param(request, name)
    if not text:
        return None
    try:
        when = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise HttpError(
            400, f"{name} must be an ISO 8601 time (2026-11-26T10:00:00Z), not {text[:40]!r}"
        ) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    ts = Timestamp()
    ts.FromDatetime(when.astimezone(UTC))
    return ts


class Dashboard:
    """The dashboard of a control plane whose gRPC API listens on ``grpc_address``.

    Args:
        grpc_address: where to call the API (the daemon's own, on loopback).
        role_of: the role of an API token, as the API's interceptor decides it.
        auth: False when the API takes no credential (``--no-auth``, loopback only): every
            browser is signed in, as an admin.
        ssl_context: serve HTTPS with it (the daemon's TLS certificate).
    """

    def __init__(
        self,
        grpc_address: str,
        role_of: RoleOf,
        *,
        auth: bool = True,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.grpc_address = grpc_address
        self._role_of = role_of
        self._auth = auth
        self._ssl = ssl_context
        self.sessions = Sessions()
        self._streams = 0
        self._specs: dict[str, ir_pb2.PipelineSpec] = {}
        self._layouts: dict[str, dict[str, Any]] = {}
        self._channel: grpc.aio.Channel | None = None
        self._stopping: anyio.Event | None = None

    # ---- serving ----

    def app(self) -> web.Application:
        """The aiohttp application (routes and middlewares)."""
        app = web.Application(client_max_size=MAX_BODY, middlewares=[self._guard])
        r = app.router
        r.add_get("/", self._index)
        r.add_get("/static/{name}", self._static)
        r.add_get("/login", self._login_page)
        r.add_post("/login", self._login)
        r.add_post("/logout", self._logout)
        r.add_post("/api/login-codes", self._login_code)
        r.add_get("/api/session", self._session)
        r.add_get("/api/runs", self._runs)
        r.add_get("/api/runs/{run_id}", self._run)
        r.add_get("/api/runs/{run_id}/events", self._events)
        r.add_get("/api/runs/{run_id}/logs", self._logs)
        r.add_get("/api/runs/{run_id}/steps/{step_id}", self._step)
        r.add_post("/api/runs/{run_id}/cancel", self._cancel)
        r.add_post("/api/runs/{run_id}/retry", self._retry)
        r.add_get("/api/artifacts/{artifact_id}/preview", self._preview)
        r.add_get("/api/artifacts/{artifact_id}/download", self._download)
        r.add_get("/api/pipelines", self._pipelines)
        r.add_get("/api/pipelines/{name}/versions", self._versions)
        r.add_get("/api/versions/{version}", self._version)
        r.add_get("/api/versions/{a}/diff/{b}", self._diff)
        r.add_get("/api/stacks", self._stacks)
        r.add_get("/api/builds", self._builds)
        return app

    async def serve(
        self, host: str, port: int, *, task_status: TaskStatus[int] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Serves until :meth:`stop` (or cancelled); reports the bound port when it listens."""
        self._stopping = anyio.Event()
        self._channel = grpc.aio.insecure_channel(self.grpc_address)
        runner = web.AppRunner(
            self.app(), access_log=None, handle_signals=False, shutdown_timeout=2.0
        )
        await runner.setup()
        try:
            site = web.TCPSite(runner, host, port, ssl_context=self._ssl, reuse_address=True)
            try:
                await site.start()
            except OSError as exc:
                raise OSError(
                    f"cannot serve the dashboard on {host}:{port}: {exc.strerror or exc} "
                    f"(choose another --dashboard-port, or --no-dashboard)"
                ) from None
            bound = port
            for address in runner.addresses:  # (host, port, ...) of each listening socket
                bound = int(address[1])
            task_status.started(bound)
            await self._stopping.wait()
        finally:
            with anyio.CancelScope(shield=True):
                await runner.cleanup()
                await self._channel.close()

    def stop(self) -> None:
        """Asks :meth:`serve` to stop (open streams are closed); call it on its event loop."""
        if self._stopping is not None:
            self._stopping.set()

    # ---- the doors ----

    @web.middleware
    async def _guard(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        api = request.path.startswith("/api/")
        try:
            if len(request.raw_path) > MAX_PATH + MAX_QUERY or len(request.path) > MAX_PATH:
                raise HttpError(414, f"the path is longer than {MAX_PATH} characters", "TOO_LONG")
            if len(request.query_string) > MAX_QUERY:
                raise HttpError(414, f"the query is longer than {MAX_QUERY} characters", "TOO_LONG")
            if request.method == "POST" and request.path not in ("/login", "/api/login-codes"):
                self._same_origin(request)
                session = self._signed_in(request)
                sent = request.headers.get(CSRF_HEADER, "")
                if sent != session.csrf:
                    raise HttpError(403, f"a state-changing request needs the {CSRF_HEADER} header")
            response = await handler(request)
        except HttpError as exc:
            response = self._error(request, api, exc.status, str(exc), exc.code)
        except web.HTTPRequestEntityTooLarge:
            response = self._error(request, api, 413, f"the body is larger than {MAX_BODY} bytes")
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            response = self._error(request, api, exc.status, exc.reason)
        except grpc.aio.AioRpcError as exc:
            err = _from_rpc(exc)
            response = self._error(request, api, err.status, str(err), err.code)
        except (asyncio.CancelledError, ConnectionResetError):
            raise
        except Exception:
            log.exception("dashboard: %s %s failed", request.method, request.path[:200])
            response = self._error(
                request, api, 500, "the dashboard failed to answer; see the server log"
            )
        if not response.prepared:
            response.headers.update(_HEADERS)
        return response

    def _error(
        self, request: web.Request, api: bool, status: int, message: str, code: str = ""
    ) -> web.Response:
        if api or status != 401:
            err = HttpError(status, message, code)
            doc = {"error": message, "code": err.code}
            if status == 401:
                doc["login"] = "/login"
            return _json(doc, status)
        raise web.HTTPFound("/login")

    def _same_origin(self, request: web.Request) -> None:
        """Refuses a request whose Origin (or Referer) is not this dashboard."""
        own = f"{request.scheme}://{request.host}"
        origin = request.headers.get("Origin")
        if origin is None:
            referer = request.headers.get("Referer", "")
            origin = "/".join(referer.split("/")[:3]) if referer else ""
        if origin != own:
            raise HttpError(
                403, f"cross-origin request refused: it came from {origin[:80] or 'nowhere'!r}"
            )

    def _signed_in(self, request: web.Request) -> Session:
        if not self._auth:
            return self.sessions.anyone()
        session = self.sessions.get(request.cookies.get(COOKIE, "")[:128])
        if session is None:
            raise HttpError(401, "sign in first: open a link `plait dashboard` prints, or a token")
        return session

    def _metadata(self, session: Session) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {session.token}"),) if session.token else ()

    async def _call(self, session: Session, method: Any, message: Any) -> Any:
        try:
            return await method(message, metadata=self._metadata(session), timeout=CALL_SECONDS)
        except grpc.aio.AioRpcError as exc:
            raise _from_rpc(exc) from None

    def _stub(self, kind: Any) -> Any:
        assert self._channel is not None
        return kind(self._channel)

    # ---- pages and sign-in ----

    async def _index(self, request: web.Request) -> web.StreamResponse:
        if self._auth and self.sessions.get(request.cookies.get(COOKIE, "")[:128]) is None:
            raise web.HTTPFound("/login")
        return web.FileResponse(STATIC / "index.html", headers={"Content-Type": "text/html"})

    async def _static(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        path = STATIC / name
        if not _STATIC_NAME.fullmatch(name) or not path.is_file():
            raise HttpError(404, f"no file {name[:80]!r}")
        kind = mimetypes.guess_type(name)[0] or "application/octet-stream"
        return web.FileResponse(path, headers={"Content-Type": kind})

    async def _login_page(self, request: web.Request) -> web.StreamResponse:
        code = _param(request, "code")
        if code:
            session = self.sessions.redeem(code)
            if session is None:
                return _login_html(
                    "This login link was used already or has expired: run `plait dashboard` "
                    "for a new one, or sign in with a token.",
                    401,
                )
            return self._signed(session)
        return _login_html()

    async def _login(self, request: web.Request) -> web.StreamResponse:
        self._same_origin(request)
        form = await request.post()
        token = str(form.get("token", "")).strip()
        if not token or len(token) > MAX_VALUE:
            return _login_html("Paste an API token (`plait token create NAME` makes one).", 400)
        role = await self._role_of(token)
        if role is None:
            return _login_html("That token is unknown or revoked.", 401)
        if role == "worker":
            return _login_html("A worker token cannot use the dashboard: use a user token.", 403)
        return self._signed(self.sessions.start(token, role, f"{role} token"))

    def _signed(self, session: Session) -> web.StreamResponse:
        response = web.HTTPFound("/")
        response.set_cookie(
            COOKIE,
            session.id,
            httponly=True,
            samesite="Strict",
            secure=self._ssl is not None,
            path="/",
        )
        response.headers.update(_HEADERS)
        return response

    async def _logout(self, request: web.Request) -> web.StreamResponse:
        self.sessions.end(request.cookies.get(COOKIE, "")[:128])
        response = _json({"signed_out": True})
        response.del_cookie(COOKIE, path="/")
        return response

    async def _login_code(self, request: web.Request) -> web.StreamResponse:
        """A one-time login link for the bearer of an API token (what `plait dashboard` asks)."""
        header = request.headers.get("Authorization", "")
        token = header[len("Bearer ") :].strip() if header.startswith("Bearer ") else ""
        if not token or len(token) > MAX_VALUE:
            raise HttpError(401, "send 'Authorization: Bearer <token>' to get a login link")
        role = await self._role_of(token)
        if role is None:
            raise HttpError(401, "the API token is unknown or revoked")
        if role == "worker":
            raise HttpError(403, "a worker token cannot use the dashboard: use a user token")
        code = self.sessions.login_code(token, role, f"{role} token")
        return _json({"code": code, "path": f"/login?code={code}"})

    async def _session(self, request: web.Request) -> web.StreamResponse:
        s = self._signed_in(request)
        return _json({"role": s.role, "name": s.name, "csrf": s.csrf})

    # ---- runs ----

    async def _runs(self, request: web.Request) -> web.StreamResponse:
        session = self._signed_in(request)
        size_text = _param(request, "page_size", "50")
        if not size_text.isdigit() or not 1 <= int(size_text) <= MAX_PAGE:
            raise HttpError(400, f"page_size must be a number from 1 to {MAX_PAGE}")
        message = runs_pb.ListRunsRequest(
            page_size=int(size_text),
            page_token=_param(request, "page_token"),
            pipeline=_param(request, "pipeline"),
        )
        status = _param(request, "status").upper()
        if status:
            if status not in RunStatus.__members__:
                known = ", ".join(RunStatus.__members__)
                raise HttpError(400, f"status must be one of {known}, not {status[:40]!r}")
            message.status = RunStatus(status).to_proto()
        for field, name in (("created_after", "since"), ("created_before", "until")):
            ts = _time_param(request, name)
            if ts is not None:
                getattr(message, field).CopyFrom(ts)
        resp = await self._call(session, self._stub(runs_grpc.RunServiceStub).ListRuns, message)
        from plait.cli._common import run_json

        return _json(
            {
                "runs": [run_json(Run.from_proto(r), steps=False) for r in resp.runs],
                "next_page_token": resp.next_page_token,
            }
        )

    async def _get_run(self, session: Session, run_id: str) -> Run:
        resp = await self._call(
            session,
            self._stub(runs_grpc.RunServiceStub).GetRun,
            runs_pb.GetRunRequest(name=f"runs/{run_id}"),
        )
        return Run.from_proto(resp.run)

    async def _spec(self, session: Session, version: str) -> ir_pb2.PipelineSpec:
        spec = self._specs.get(version)
        if spec is None:
            resp = await self._call(
                session,
                self._stub(pipelines_grpc.PipelineServiceStub).GetPipelineVersion,
                pipelines_pb.GetPipelineVersionRequest(name=f"pipelines/-/versions/{version}"),
            )
            spec = resp.spec
            if len(self._specs) >= SPEC_CACHE:
                oldest = next(iter(self._specs))
                self._specs.pop(oldest)
                self._layouts.pop(oldest, None)
            self._specs[version] = spec
        return spec

    async def _layout(self, session: Session, version: str) -> dict[str, Any]:
        spec = await self._spec(session, version)
        found = self._layouts.get(version)
        if found is None:
            found = self._layouts[version] = views.layout(spec)
        return found

    async def _run(self, request: web.Request) -> web.StreamResponse:
        from plait.cli._common import run_json

        session = self._signed_in(request)
        run = await self._get_run(session, _segment(request, "run_id"))
        graph = await self._layout(session, run.pipeline_version)
        ids = {n["id"] for n in graph["nodes"]}
        may = session.role in ("admin", "user")
        return _json(
            {
                "run": run_json(run, steps=False),
                "steps": [views.step_view(s, ids) for s in run.steps.values()],
                "last_sequence": run.last_sequence,
                "graph": graph,
                "can_cancel": may and not run.status.is_final,
                "can_retry": may and run.status.is_final,
            }
        )

    async def _step(self, request: web.Request) -> web.StreamResponse:
        from plait._explain import CacheExplanation
        from plait.ir.mapping import split_item

        session = self._signed_in(request)
        run_id, step_id = _segment(request, "run_id"), _segment(request, "step_id")
        run = await self._get_run(session, run_id)
        if step_id not in run.steps:
            raise HttpError(404, f"run {run.run_id} has no step {step_id[:100]!r}")
        spec = await self._spec(session, run.pipeline_version)
        step = views.step_spec(spec, step_id)
        stub = self._stub(runs_grpc.RunServiceStub)
        events: list[RunEvent] = []
        after = 0
        for _ in range(50):  # 50,000 events at most
            page = await self._call(
                session,
                stub.ListRunEvents,
                runs_pb.ListRunEventsRequest(name=f"runs/{run.run_id}", after_sequence=after),
            )
            events.extend(RunEvent.from_proto(e) for e in page.events)
            after = page.next_after_sequence
            if not after:
                break
        explained = await self._call(
            session,
            stub.ExplainStep,
            runs_pb.ExplainStepRequest(name=f"runs/{run.run_id}", step_id=step_id),
        )
        ids = {s.id for s in spec.steps}
        return _json(
            {
                "step": views.step_view(run.steps[step_id], ids),
                "inputs": views.inputs_view(step, split_item(step_id) is not None)
                if step is not None
                else [],
                "attempts": views.attempts_view(events, step_id),
                "explain": views.explain_view(CacheExplanation.from_proto(explained)),
            }
        )

    async def _cancel(self, request: web.Request) -> web.StreamResponse:
        session = self._signed_in(request)
        resp = await self._call(
            session,
            self._stub(runs_grpc.RunServiceStub).CancelRun,
            runs_pb.CancelRunRequest(name=f"runs/{_segment(request, 'run_id')}"),
        )
        return _json({"cancelled": resp.cancelled, "run_id": resp.run.run_id})

    async def _retry(self, request: web.Request) -> web.StreamResponse:
        session = self._signed_in(request)
        resp = await self._call(
            session,
            self._stub(runs_grpc.RunServiceStub).CreateRun,
            runs_pb.CreateRunRequest(
                retry_of=f"runs/{_segment(request, 'run_id')}", request_id=uuid.uuid4().hex
            ),
        )
        return _json({"run_id": resp.run.run_id})

    # ---- live streams ----

    async def _stream(
        self,
        request: web.Request,
        session: Session,
        messages: AsyncIterator[list[dict[str, Any]]],
    ) -> web.StreamResponse:
        """Sends ``messages`` as server-sent events, then an ``end`` event."""
        if self._streams >= MAX_STREAMS or session.streams >= MAX_SESSION_STREAMS:
            raise HttpError(429, "too many live streams are open; close some pages")
        self._streams += 1
        session.streams += 1
        try:
            response = web.StreamResponse(
                headers={
                    **_HEADERS,
                    "Content-Type": "text/event-stream",
                    "X-Accel-Buffering": "no",
                }
            )
            await response.prepare(request)
            try:
                async for batch in messages:
                    data = "".join(
                        f"data: {json.dumps(doc, ensure_ascii=False, default=str)}\n\n"
                        for doc in batch
                    )
                    await response.write(data.encode())
                await response.write(b"event: end\ndata: {}\n\n")
            except HttpError as exc:
                doc = {"error": str(exc), "code": exc.code}
                await response.write(f"event: error\ndata: {json.dumps(doc)}\n\n".encode())
            except ConnectionResetError:
                pass  # the browser left the page: the call is cancelled, nothing to say
            return response
        finally:
            self._streams -= 1
            session.streams -= 1

    async def _events(self, request: web.Request) -> web.StreamResponse:
        session = self._signed_in(request)
        run_id = _segment(request, "run_id")
        after_text = _param(request, "after", "0")
        if not after_text.isdigit():
            raise HttpError(400, "after must be a sequence number")
        stub = self._stub(runs_grpc.RunServiceStub)
        # a missing run is a 404, not an empty stream
        await self._call(
            session,
            stub.ListRunEvents,
            runs_pb.ListRunEventsRequest(name=f"runs/{run_id}", page_size=1),
        )

        def call() -> Any:
            return stub.WatchRunEvents(
                runs_pb.WatchRunEventsRequest(
                    name=f"runs/{run_id}", after_sequence=int(after_text[:18])
                ),
                metadata=self._metadata(session),
            )

        def events(msg: Any) -> list[dict[str, Any]]:
            return [_event_json(RunEvent.from_proto(e)) for e in msg.events]

        return await self._stream(request, session, _relay(call, events))

    async def _logs(self, request: web.Request) -> web.StreamResponse:
        from plait._models import LogEntry

        session = self._signed_in(request)
        run_id = _segment(request, "run_id")
        step_id = _param(request, "step")
        stub = self._stub(runs_grpc.RunServiceStub)
        await self._call(
            session,
            stub.ListLogs,
            runs_pb.ListLogsRequest(name=f"runs/{run_id}", step_id=step_id, page_size=1),
        )

        def call() -> Any:
            return stub.StreamLogs(
                runs_pb.StreamLogsRequest(name=f"runs/{run_id}", step_id=step_id),
                metadata=self._metadata(session),
            )

        def entries(msg: Any) -> list[dict[str, Any]]:
            return [_log_json(LogEntry.from_proto(e)) for e in msg.entries]

        return await self._stream(request, session, _relay(call, entries))

    # ---- artifacts ----

    async def _artifact(self, session: Session, artifact_id: str) -> ArtifactInfo:
        resp = await self._call(
            session,
            self._stub(artifacts_grpc.ArtifactServiceStub).GetArtifact,
            artifacts_pb.GetArtifactRequest(name=f"artifacts/{artifact_id}"),
        )
        return ArtifactInfo.from_proto(resp.artifact)

    async def _chunks(self, session: Session, artifact_id: str) -> AsyncIterator[bytes]:
        call = self._stub(artifacts_grpc.ArtifactServiceStub).DownloadArtifact(
            artifacts_pb.DownloadArtifactRequest(name=f"artifacts/{artifact_id}"),
            metadata=self._metadata(session),
        )
        try:
            async for msg in call:
                if msg.data:
                    yield msg.data
        except grpc.aio.AioRpcError as exc:
            raise _from_rpc(exc) from None
        finally:
            call.cancel()

    async def _preview(self, request: web.Request) -> web.StreamResponse:
        session = self._signed_in(request)
        info = await self._artifact(session, _segment(request, "artifact_id"))
        if info.unsafe:
            return _json(_no_preview(f"pickled ({info.materializer}): loading it runs code"))
        if info.size > views.PREVIEW_MAX_BYTES:
            return _json(_no_preview(f"{info.size} bytes: too large to preview, download it"))
        data = b"".join([chunk async for chunk in self._chunks(session, info.artifact_id)])
        return _json(await anyio.to_thread.run_sync(_load_preview, info.materializer, data))

    async def _download(self, request: web.Request) -> web.StreamResponse:
        session = self._signed_in(request)
        info = await self._artifact(session, _segment(request, "artifact_id"))
        chunks = self._chunks(session, info.artifact_id)
        first = await anext(chunks, b"")  # an error comes before any byte is sent
        name = _UNSAFE_FILENAME.sub("_", f"{info.step_id}-{info.output}")[:120]
        response = web.StreamResponse(
            headers={
                **_HEADERS,
                "Content-Type": "application/octet-stream",
                "Content-Disposition": f'attachment; filename="{name}.{_extension(info)}"',
                "Content-Length": str(info.size),
            }
        )
        await response.prepare(request)
        await response.write(first)
        async for chunk in chunks:
            await response.write(chunk)
        await response.write_eof()
        return response

    # ---- pipelines, stacks, builds ----

    async def _pipelines(self, request: web.Request) -> web.StreamResponse:
        session = self._signed_in(request)
        resp = await self._call(
            session,
            self._stub(pipelines_grpc.PipelineServiceStub).ListPipelines,
            pipelines_pb.ListPipelinesRequest(),
        )
        out = []
        for p in resp.pipelines:
            latest = p.latest_version.rsplit("/", 1)[-1]
            spec = await self._spec(session, latest) if latest else None
            out.append(
                {
                    "name": p.name.split("/", 1)[-1],
                    "version_count": p.version_count,
                    "latest_version": latest,
                    "description": spec.description if spec is not None else "",
                }
            )
        return _json({"pipelines": out})

    async def _versions(self, request: web.Request) -> web.StreamResponse:
        session = self._signed_in(request)
        name = _segment(request, "name")
        resp = await self._call(
            session,
            self._stub(pipelines_grpc.PipelineServiceStub).ListPipelineVersions,
            pipelines_pb.ListPipelineVersionsRequest(parent=f"pipelines/{name}"),
        )
        out = []
        for full in resp.versions[:MAX_VERSIONS]:
            version = full.rsplit("/", 1)[-1]
            spec = await self._spec(session, version)
            out.append(
                {
                    "version": version,
                    "description": spec.description,
                    "steps": len(spec.steps),
                    "structural": {
                        p.name: json.loads(p.structural_value.json)
                        for p in spec.parameters
                        if p.HasField("structural_value")
                    },
                }
            )
        return _json({"pipeline": name, "versions": out})

    async def _version(self, request: web.Request) -> web.StreamResponse:
        session = self._signed_in(request)
        version = _segment(request, "version")
        spec = await self._spec(session, version)
        return _json(
            {
                "version": version,
                "pipeline": spec.name,
                "ir": json_format.MessageToDict(spec, preserving_proto_field_name=True),
                "graph": await self._layout(session, version),
            }
        )

    async def _diff(self, request: web.Request) -> web.StreamResponse:
        session = self._signed_in(request)
        a, b = _segment(request, "a"), _segment(request, "b")
        diff = views.diff_versions(await self._spec(session, a), await self._spec(session, b))
        return _json({"a": a, "b": b, **diff})

    async def _stacks(self, request: web.Request) -> web.StreamResponse:
        session = self._signed_in(request)
        stub = self._stub(stacks_grpc.StackServiceStub)
        stacks = await self._call(session, stub.ListStacks, stacks_pb.ListStacksRequest())
        comps = await self._call(session, stub.ListComponents, stacks_pb.ListComponentsRequest())
        kinds = {}
        components = []
        for c in comps.components:
            name = c.name.split("/", 1)[-1]
            kind = stacks_pb.ComponentKind.Name(c.kind).removeprefix("COMPONENT_KIND_").lower()
            kinds[name] = kind
            try:
                config = json.loads(c.config_json or "{}")
            except ValueError:
                config = {}
            components.append(
                {"name": name, "kind": kind, "flavor": c.flavor, "config": views.masked(config)}
            )
        return _json(
            {
                "stacks": [
                    {
                        "name": s.name.split("/", 1)[-1],
                        "active": s.active,
                        "components": {
                            kinds.get(c.split("/", 1)[-1], "?"): c.split("/", 1)[-1]
                            for c in s.components
                        },
                    }
                    for s in stacks.stacks
                ],
                "components": components,
            }
        )

    async def _builds(self, request: web.Request) -> web.StreamResponse:
        import time

        session = self._signed_in(request)
        resp = await self._call(
            session,
            self._stub(builds_grpc.BuildServiceStub).ListBuilds,
            builds_pb.ListBuildsRequest(limit=1000),
        )
        now = time.time()
        return _json(
            {
                "builds": [
                    {
                        "key": b.key,
                        "kind": b.kind,
                        "digest": b.build_digest,
                        "image": b.reference,
                        "image_id": b.image_id,
                        "size_bytes": b.size_bytes,
                        "source": b.source,
                        "status": b.status,
                        "error": b.error,
                        "create_time": datetime.fromtimestamp(b.created_at, UTC).isoformat()
                        if b.created_at
                        else None,
                        "age_seconds": max(0.0, now - b.created_at) if b.created_at else None,
                        "duration_seconds": b.duration_seconds,
                        "runs": list(b.run_ids),
                    }
                    for b in resp.builds
                ]
            }
        )


async def _relay(
    start: Callable[[], Any], convert: Callable[[Any], list[dict[str, Any]]]
) -> AsyncIterator[list[dict[str, Any]]]:
    """The messages of a server-streaming call (started on the first iteration, cancelled at
    the end), each converted to the documents of one batch of events."""
    call = start()
    try:
        async for msg in call:
            yield convert(msg)
    except grpc.aio.AioRpcError as exc:
        raise _from_rpc(exc) from None
    finally:
        call.cancel()


def _event_json(e: RunEvent) -> dict[str, Any]:
    return {
        "sequence": e.sequence,
        "step_id": e.step_id,
        "run_status": str(e.run_status) if e.run_status is not None else None,
        "step_status": str(e.step_status) if e.step_status is not None else None,
        "attempt": e.attempt,
        "message": e.message,
        "time": e.time.isoformat() if e.time else None,
    }


def _log_json(e: Any) -> dict[str, Any]:
    return {
        "step_id": e.step_id,
        "attempt": e.attempt,
        "stream": e.stream,
        "text": e.text,
        "time": e.time.isoformat() if e.time else None,
        "sequence": e.sequence,
    }


def _no_preview(note: str) -> dict[str, Any]:
    return {"kind": "none", "data": None, "truncated": False, "note": note}


def _load_preview(materializer: str, data: bytes) -> dict[str, Any]:
    """Loads an artifact's bytes with their (safe) materializer and previews the value."""
    from plait._materializers import get_materializer

    try:
        m = get_materializer(materializer)
    except LookupError:
        return _no_preview(f"materializer {materializer!r} is not known to this server")
    if m.unsafe:
        return _no_preview(f"pickled ({materializer}): loading it runs code")
    try:
        value = m.load(data)
    except ImportError as exc:
        return _no_preview(f"this server cannot load it: {exc}")
    except Exception as exc:
        return _no_preview(f"could not load it: {type(exc).__name__}: {str(exc)[:200]}")
    return views.preview(value)


def _extension(info: ArtifactInfo) -> str:
    name = info.materializer.lower()
    for word, ext in (("json", "json"), ("numpy", "npy"), ("parquet", "parquet"), ("text", "txt")):
        if word in name:
            return ext
    return "bin"


def _login_html(message: str = "", status: int = 200) -> web.Response:
    note = f'<p class="error" id="login-error">{escape(message)}</p>' if message else ""
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Plait: sign in</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body {{ font: 15px/1.45 system-ui, sans-serif; background: #f6f7f9; color: #1d2330; }}
main {{ max-width: 26rem; margin: 12vh auto; background: #fff; padding: 2rem;
  border-radius: 10px; box-shadow: 0 1px 4px #0002; }}
h1 {{ font-size: 1.3rem; margin: 0 0 1rem; }}
input {{ width: 100%; box-sizing: border-box; padding: .55rem; font: inherit;
  border: 1px solid #bbc; border-radius: 6px; }}
button {{ margin-top: .8rem; padding: .5rem 1.1rem; font: inherit; border: 0;
  border-radius: 6px; background: #2d5bd1; color: #fff; cursor: pointer; }}
.error {{ color: #b3261e; }} code {{ background: #eef; padding: 0 .25rem; }}
</style></head>
<body><main>
<h1>Plait dashboard</h1>
{note}
<p>Open the link that <code>plait dashboard</code> prints, or paste an API token
(<code>plait token create NAME</code>).</p>
<form id="token-form" method="post" action="/login">
<input name="token" type="password" autocomplete="off" placeholder="API token" required>
<button type="submit">Sign in</button>
</form>
</main></body></html>
"""
    return web.Response(text=page, status=status, content_type="text/html", headers=_HEADERS)
