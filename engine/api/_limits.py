"""The size limits of every request, and the interceptor that applies them to every RPC.

One table (:data:`LIMITS`, :data:`COUNTS`) gives each string and bytes field of every request
message a limit in bytes, and each repeated field a limit in items; ``docs/limits.md`` shows it
to users. :func:`check_request` walks a decoded request over its descriptor and raises
:class:`~plait.errors.PipelineValidationError` naming the field path
(``spec.steps[3].code.qualname``) and the limit. :class:`LimitsInterceptor` decodes every
request of ``plait.api.v1`` itself, so that an undecodable message is INVALID_ARGUMENT with one
log line (grpc would answer UNKNOWN and log a traceback), and checks each decoded message (each
element of a request stream too, when it is read) before the servicer sees it.

``tests/test_validation.py`` walks every request message of every service and asserts each
string, bytes and repeated field has its entry here: a new field cannot go unbounded.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import DecodeError, Message

from plait.engine._validate import MAX_STEPS
from plait.engine.api._artifacts import MAX_CHUNK
from plait.engine.api._errors import status_metadata
from plait.errors import PipelineValidationError
from plait.ir.canonical import is_map_entry
from plait.ir.mapping import MAX_MAP_ITEMS

log = logging.getLogger(__name__)

KiB = 1024
MiB = 1024 * KiB

NAME = 256
"""Identifiers and names: pipeline, step, input, output and parameter names, ids, request ids,
runners, flavors, modules and qualnames, stack and component names, resource names, tokens."""
PATH = 4 * KiB
"""File paths, URIs, image references, requirement specifiers, exception type names."""
TEXT = 64 * KiB
"""Messages, descriptions, type expressions, environment variable values."""
TRACEBACK = 256 * KiB
"""A failed step's traceback and error message."""
JSON = 1 * MiB
"""Literal and parameter JSON, default values, ``config_json``, metadata JSON."""
LOG = 1 * MiB
"""The text of one log message from a worker."""
CHUNK = MAX_CHUNK
"""One chunk of an artifact upload (the ArtifactService's MAX_CHUNK)."""

_IR = "plait.ir.v1."
_API = "plait.api.v1."

LIMITS: dict[str, int] = {
    # the pipeline IR (RegisterPipeline; the step inside a task)
    _IR + "PipelineSpec.name": NAME,
    _IR + "PipelineSpec.description": TEXT,
    _IR + "ParameterSpec.name": NAME,
    _IR + "TypeSpec.expr": TEXT,
    _IR + "Literal.json": JSON,
    _IR + "StepSpec.id": NAME,
    _IR + "StepSpec.name": NAME,
    _IR + "CodeRef.module": NAME,
    _IR + "CodeRef.qualname": NAME,
    _IR + "CodeRef.file": PATH,
    _IR + "CodeRef.code_digest": NAME,
    _IR + "InputSpec.name": NAME,
    _IR + "Binding.parameter": NAME,
    _IR + "OutputRef.step_id": NAME,
    _IR + "OutputRef.output": NAME,
    _IR + "BindingMapEntry.key": NAME,
    _IR + "OutputSpec.name": NAME,
    _IR + "OutputSpec.materializer": NAME,
    _IR + "StepSettings.cache_version": NAME,
    _IR + "StepSettings.runner": NAME,
    _IR + "StepSettings.pool": NAME,
    _IR + "StepSettings.retry_on": PATH,
    _IR + "StepSettings.no_retry_on": PATH,
    _IR + "Environment.parent_image": PATH,
    _IR + "Environment.python_version": NAME,
    _IR + "Environment.requirements": PATH,
    _IR + "Environment.apt_packages": NAME,
    _IR + "EnvVar.name": NAME,
    _IR + "EnvVar.value": TEXT,
    _IR + "NamedValue.name": NAME,
    _IR + "NamedValue.json": JSON,
    # PipelineService
    _API + "GetPipelineVersionRequest.name": NAME,
    _API + "ListPipelineVersionsRequest.parent": NAME,
    # RunService
    _API + "CreateRunRequest.pipeline_version": NAME,
    _API + "CreateRunRequest.request_id": NAME,
    _API + "CodeSource.archive": NAME,
    _API + "CodeSource.git_commit": NAME,
    _API + "CodeSource.local_root": PATH,
    _API + "GetRunRequest.name": NAME,
    _API + "ListRunsRequest.page_token": NAME,
    _API + "ListRunsRequest.pipeline": NAME,
    _API + "WatchRunEventsRequest.name": NAME,
    _API + "ListRunEventsRequest.name": NAME,
    _API + "ListLogsRequest.name": NAME,
    _API + "ListLogsRequest.step_id": NAME,
    _API + "CancelRunRequest.name": NAME,
    _API + "StreamLogsRequest.name": NAME,
    _API + "StreamLogsRequest.step_id": NAME,
    _API + "CreateRunRequest.refresh": NAME,
    _API + "CreateRunRequest.retry_of": NAME,
    _API + "ExplainStepRequest.name": NAME,
    _API + "ExplainStepRequest.step_id": NAME,
    # ArtifactService
    _API + "GetArtifactRequest.name": NAME,
    _API + "DownloadArtifactRequest.name": NAME,
    _API + "UploadArtifactRequest.data": CHUNK,
    _API + "UploadHeader.sha256": NAME,
    _API + "DownloadBlobRequest.digest": NAME,
    # StackService
    _API + "Component.name": NAME,
    _API + "Component.flavor": NAME,
    _API + "Component.config_json": JSON,
    _API + "DeleteComponentRequest.name": NAME,
    _API + "Stack.name": NAME,
    _API + "Stack.components": NAME,
    _API + "DeleteStackRequest.name": NAME,
    _API + "SetActiveStackRequest.name": NAME,
    # BuildService
    _API + "ListBuildsRequest.kind": NAME,
    _API + "GetBuildRequest.key": NAME,
    _API + "PruneBuildsRequest.keys": NAME,
    # TokenService
    _API + "CreateTokenRequest.display_name": NAME,
    _API + "RevokeTokenRequest.name": NAME,
    # TaskService (a worker's reports)
    _API + "WorkerHello.worker_id": NAME,
    _API + "WorkerHello.runner": NAME,
    _API + "WorkerHello.hostname": NAME,
    _API + "LeaseToken.run_id": NAME,
    _API + "LeaseToken.step_id": NAME,
    _API + "TaskLogs.stream": NAME,
    _API + "TaskLogs.text": LOG,
    _API + "TaskMetadata.output": NAME,
    _API + "TaskMetadata.json": JSON,
    _API + "Artifact.name": NAME,
    _API + "Artifact.artifact_id": NAME,
    _API + "Artifact.output": NAME,
    _API + "Artifact.digest": NAME,
    _API + "Artifact.uri": PATH,
    _API + "Artifact.materializer": NAME,
    _API + "Artifact.data_type": TEXT,
    _API + "Artifact.metadata_json": JSON,
    _API + "Artifact.run_id": NAME,
    _API + "Artifact.step_id": NAME,
    _API + "StepError.type": PATH,
    _API + "StepError.message": TRACEBACK,  # the worker cuts both to 64 Ki characters
    _API + "StepError.traceback": TRACEBACK,
    _API + "StepError.types": PATH,
    # WorkerService (remote workers; their reports reuse the TaskService messages above)
    _API + "PollTaskRequest.pool": NAME,
    _API + "PollTaskRequest.worker_id": NAME,
    _API + "PollTaskRequest.hostname": NAME,
    _API + "LogChunk.stream": NAME,
    _API + "LogChunk.text": LOG,
}
"""The largest value, in bytes (UTF-8 for strings), of each string and bytes field of every
request, by the field's full name."""

COUNTS: dict[str, int] = {
    _IR + "PipelineSpec.parameters": 1_000,
    _IR + "PipelineSpec.steps": MAX_STEPS,
    _IR + "StepSpec.inputs": 1_000,
    _IR + "StepSpec.outputs": 1_000,
    _IR + "BindingList.items": 100_000,
    _IR + "BindingMap.entries": 100_000,
    _IR + "Environment.requirements": 1_000,
    _IR + "Environment.apt_packages": 1_000,
    _IR + "Environment.env": 1_000,
    # validation allows fewer (MAX_RETRY_TYPES); a small count here would shrink _SMALL and
    # make every small request pay for a walk
    _IR + "StepSettings.retry_on": 1_000,
    _IR + "StepSettings.no_retry_on": 1_000,
    _API + "CreateRunRequest.parameters": 1_000,
    _API + "CreateRunRequest.refresh": 1_000,
    _API + "Stack.components": 1_000,
    _API + "PruneBuildsRequest.keys": 1_000,
    # its outputs, and the items of those a map iterates (MAX_MAP_ITEMS in all)
    _API + "TaskCompleted.outputs": 1_000 + MAX_MAP_ITEMS,
    _API + "AppendLogsRequest.chunks": 1_000,
    _API + "StepError.types": 1_000,  # a worker sends at most 64 (its MAX_ERROR_TYPES)
}
"""The most items of each repeated field of every request, by the field's full name."""

_STRICTEST = NAME
"""For a field missing from the table (the test forbids it): the smallest limit."""
_SMALL = min(NAME, *COUNTS.values())
"""A message whose encoding is no longer than this cannot exceed any limit: no walk."""

_STRING, _BYTES, _MESSAGE = (
    FieldDescriptor.TYPE_STRING,
    FieldDescriptor.TYPE_BYTES,
    FieldDescriptor.TYPE_MESSAGE,
)


def size_text(n: int) -> str:
    """``256 bytes``, ``4 KiB``, ``1 MiB``."""
    for unit, size in (("MiB", MiB), ("KiB", KiB)):
        if n >= size and n % size == 0:
            return f"{n // size} {unit}"
    return f"{n} bytes"


class _Over(Exception):
    """A value over its limit; the path is completed on the way out of the walk."""

    def __init__(self, path: str, what: str) -> None:
        self.path = path
        self.what = what


def _size(value: str | bytes, limit: int) -> int | None:
    """The value's size in bytes when it is over ``limit``, else None (cheap when far under)."""
    n = len(value)
    if isinstance(value, str):
        if n * 4 <= limit:  # at most 4 bytes a character in UTF-8
            return None
        n = len(value.encode("utf-8", "surrogatepass"))
    return n if n > limit else None


_SKIP, _TEXT, _TEXTS, _NESTED, _NESTEDS, _MAP, _COUNT = range(7)
_plans: dict[FieldDescriptor, tuple[int, int, int]] = {}
_with_limits: dict[Descriptor, bool] = {}


def _plan(field: FieldDescriptor) -> tuple[int, int, int]:
    """How to check a field: (what it is, its limit in bytes, its limit in items)."""
    plan = _plans.get(field)
    if plan is None:
        limit = LIMITS.get(field.full_name, _STRICTEST)
        count = COUNTS.get(field.full_name, _STRICTEST)
        if field.type == _MESSAGE:
            assert field.message_type is not None
            if is_map_entry(field.message_type):
                what = _MAP
            elif field.is_repeated:
                what = _NESTEDS if _has_limits(field.message_type) else _COUNT
            else:
                what = _NESTED if _has_limits(field.message_type) else _SKIP
        elif field.type in (_STRING, _BYTES):
            what = _TEXTS if field.is_repeated else _TEXT
        else:
            what = _SKIP
        plan = _plans[field] = (what, limit, count)
    return plan


def _has_limits(descriptor: Descriptor) -> bool:
    """Whether a message of this type can hold a value with a limit (a string or bytes field, a
    repeated message field or a map, at any depth): one that cannot (a Timestamp) is not
    walked, nor even sized."""
    found = _with_limits.get(descriptor)
    if found is None:
        found = False
        seen: set[Descriptor] = set()
        todo = [descriptor]
        while todo and not found:
            d = todo.pop()
            if d in seen:
                continue
            seen.add(d)
            for f in d.fields:
                if f.type in (_STRING, _BYTES) or (f.type == _MESSAGE and f.is_repeated):
                    found = True
                    break
                if f.message_type is not None:
                    todo.append(f.message_type)
        _with_limits[descriptor] = found
    return found


_Checks = tuple[tuple[str, int, int, int, FieldDescriptor], ...]
_checks: dict[Any, _Checks] = {}
"""By message descriptor (protobuf's pure Python or upb's: typed as either)."""


def _checks_of(descriptor: Any) -> _Checks:
    """Makes (and keeps) the fields of a message type that can hold a value over a limit, in
    field-number order (as ``ListFields`` gives the fields that are set): each field's name,
    its `_plan` and the field."""
    fields = sorted(descriptor.fields, key=lambda f: f.number)
    planned = [(f, _plan(f)) for f in fields]
    checks = _checks[descriptor] = tuple((f.name, *p, f) for f, p in planned if p[0] != _SKIP)
    return checks


def _walk(msg: Message) -> None:
    # each field that can be over a limit, read by its name: an unset one reads as empty (a
    # string, a list, a map) or is not set (a message); listing the set fields (ListFields)
    # and looking each one's plan up cost twice as much, on every report of every step
    checks = _checks.get(msg.DESCRIPTOR)
    if checks is None:
        checks = _checks_of(msg.DESCRIPTOR)
    for name, what, limit, count, field in checks:
        if what == _TEXT:
            value = getattr(msg, name)
            if len(value) * 4 > limit:  # else far under (at most 4 bytes a character)
                n = _size(value, limit)
                if n is not None:
                    raise _Over(name, _over(n, limit))
        elif what == _NESTED:
            if not msg.HasField(name):
                continue
            value = getattr(msg, name)
            if value.ByteSize() <= _SMALL:  # too small to exceed any limit inside
                continue
            try:
                _walk(value)
            except _Over as over:
                over.path = f"{name}.{over.path}"
                raise
        else:
            value = getattr(msg, name)
            if len(value) > count:
                raise _Over(name, f"{len(value)} items; the limit is {count}")
            if what == _NESTEDS:
                for i, item in enumerate(value):
                    if item.ByteSize() <= _SMALL:  # too small to exceed any limit inside
                        continue
                    try:
                        _walk(item)
                    except _Over as over:
                        over.path = f"{name}[{i}].{over.path}"
                        raise
            elif what == _TEXTS:
                for i, item in enumerate(value):
                    n = _size(item, limit)
                    if n is not None:
                        raise _Over(f"{name}[{i}]", _over(n, limit))
            elif what == _MAP:
                _walk_map(field, value)


def _walk_map(field: FieldDescriptor, value: Any) -> None:
    """A map field: its keys and values by the limits of its entry's ``key`` and ``value``."""
    entry = field.message_type
    assert entry is not None
    key_limit = LIMITS.get(entry.fields_by_name["key"].full_name, _STRICTEST)
    value_limit = LIMITS.get(entry.fields_by_name["value"].full_name, _STRICTEST)
    for key, item in value.items():
        where = f"{field.name}[{str(key)[:32]!r}]"
        n = _size(key, key_limit) if isinstance(key, str | bytes) else None
        if n is not None:
            raise _Over(f"{where} (the key)", _over(n, key_limit))
        if isinstance(item, Message):
            try:
                _walk(item)
            except _Over as over:
                over.path = f"{where}.{over.path}"
                raise
        elif isinstance(item, str | bytes):
            n = _size(item, value_limit)
            if n is not None:
                raise _Over(where, _over(n, value_limit))


def _over(n: int, limit: int) -> str:
    return f"{n} bytes; the limit is {size_text(limit)}"


def check_request(msg: Message) -> None:
    """Raises PipelineValidationError naming the first field of ``msg`` over its limit."""
    try:
        _walk(msg)
    except _Over as over:
        raise PipelineValidationError(f"{over.path}: {over.what}") from None


def request_fields(descriptor: Descriptor) -> list[FieldDescriptor]:
    """Every field reachable from a request message (for the tests and the docs)."""
    seen: set[str] = set()
    out: list[FieldDescriptor] = []

    def visit(d: Descriptor) -> None:
        if d.full_name in seen:
            return
        seen.add(d.full_name)
        for f in d.fields:
            out.append(f)
            if f.message_type is not None:
                visit(f.message_type)

    visit(descriptor)
    return out


# ---- the interceptor ----


class _Refused:
    """What the decoder hands on instead of a message it refused; the handler aborts with it."""

    __slots__ = ("error", "undecodable")

    def __init__(self, error: str, undecodable: bool) -> None:
        self.error = error
        self.undecodable = undecodable


def _decoder(cls: type[Message]) -> Callable[[bytes], Any]:
    name = cls.DESCRIPTOR.name
    from_string = cls.FromString

    def decode(raw: bytes) -> Any:
        try:
            msg = from_string(raw)
        except DecodeError:
            return _Refused(f"the request is not a valid {name}", True)
        if len(raw) > _SMALL:
            try:
                _walk(msg)
            except _Over as over:
                return _Refused(f"{over.path}: {over.what}", False)
        return msg

    return decode


async def _abort(context: Any, refused: _Refused, method: str) -> None:
    if refused.undecodable:
        log.warning("%s from %s: %s", method, _peer(context), refused.error)
    reason = PipelineValidationError.reason
    code = grpc.StatusCode.INVALID_ARGUMENT
    await context.abort(
        code, refused.error, trailing_metadata=status_metadata(code, refused.error, reason)
    )


def _peer(context: Any) -> str:
    try:
        return str(context.peer())
    except Exception:  # only for the log line
        return "?"


class _CheckedContext:
    """A servicer context whose ``read()`` refuses what the decoder refused."""

    def __init__(self, context: Any, method: str) -> None:
        self._context = context
        self._method = method

    async def read(self) -> Any:
        msg = await self._context.read()
        if type(msg) is _Refused:
            await _abort(self._context, msg, self._method)
        return msg

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)


async def _checked(requests: AsyncIterator[Any], context: Any, method: str) -> AsyncIterator[Any]:
    async for msg in requests:
        if type(msg) is _Refused:
            await _abort(context, msg, method)
        yield msg


def _wrap(handler: Any, method: str) -> Any:
    """The handler, with requests decoded by :func:`_decoder` and refusals turned to aborts."""
    cls = getattr(handler.request_deserializer, "__self__", None)
    if not (isinstance(cls, type) and issubclass(cls, Message)):
        return handler
    decode = _decoder(cls)
    serialize = handler.response_serializer

    if not handler.request_streaming:
        inner = handler.unary_stream if handler.response_streaming else handler.unary_unary

        async def first(request: Any, context: Any) -> None:
            await _abort(context, request, method)

        if not handler.response_streaming:

            async def unary_unary(request: Any, context: Any) -> Any:
                if type(request) is _Refused:
                    await first(request, context)
                return await inner(request, context)

            return grpc.unary_unary_rpc_method_handler(unary_unary, decode, serialize)
        if inspect.isasyncgenfunction(inner):

            async def unary_stream_gen(request: Any, context: Any) -> AsyncIterator[Any]:
                if type(request) is _Refused:
                    await first(request, context)
                async for response in inner(request, context):
                    yield response

            return grpc.unary_stream_rpc_method_handler(unary_stream_gen, decode, serialize)

        async def unary_stream(request: Any, context: Any) -> None:
            if type(request) is _Refused:
                await first(request, context)
            await inner(request, context)

        return grpc.unary_stream_rpc_method_handler(unary_stream, decode, serialize)

    if not handler.response_streaming:
        inner = handler.stream_unary

        async def stream_unary(requests: AsyncIterator[Any], context: Any) -> Any:
            checked = _CheckedContext(context, method)
            return await inner(_checked(requests, context, method), checked)

        return grpc.stream_unary_rpc_method_handler(stream_unary, decode, serialize)
    inner = handler.stream_stream
    if inspect.isasyncgenfunction(inner):

        async def stream_stream_gen(requests: AsyncIterator[Any], context: Any) -> Any:
            checked = _CheckedContext(context, method)
            async for response in inner(_checked(requests, context, method), checked):
                yield response

        return grpc.stream_stream_rpc_method_handler(stream_stream_gen, decode, serialize)

    async def stream_stream(requests: AsyncIterator[Any], context: Any) -> None:
        await inner(_checked(requests, context, method), _CheckedContext(context, method))

    return grpc.stream_stream_rpc_method_handler(stream_stream, decode, serialize)


class LimitsInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Decodes and checks every request of ``plait.api.v1`` (see the module docstring).

    Goes after the auth interceptor: an unauthenticated call is refused before it is read.
    """

    PREFIX = "/plait.api.v1."

    def __init__(self) -> None:
        self._wrapped: dict[str, tuple[Any, Any]] = {}

    async def intercept_service(
        self, continuation: Callable[[Any], Awaitable[Any]], details: Any
    ) -> Any:
        handler = await continuation(details)
        method = details.method
        if handler is None or not method.startswith(self.PREFIX):
            return handler
        cached = self._wrapped.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        wrapped = _wrap(handler, method)
        self._wrapped[method] = (handler, wrapped)
        return wrapped
