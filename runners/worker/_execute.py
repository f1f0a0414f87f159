"""The step-execution core: runs one task in this process and reports through a Reporter.

Nothing here knows how the task arrived or how reports leave (a stream, a long-poll, a command
line): that is the transport's business, behind `Reporter`.
"""

from __future__ import annotations

import asyncio
import codecs
import importlib
import importlib.util
import inspect
import json
import os
import sys
import tempfile
import traceback
from datetime import UTC, datetime
from types import ModuleType
from typing import Any, Protocol

from plait import _context
from plait._artifact_store import LocalArtifactStore
from plait._materializers import get_materializer, materializer_for, type_name
from plait._models import ArtifactInfo, StepError
from plait._step import code_digest
from plait.api.v1 import resources_pb2 as res
from plait.api.v1 import task_service_pb2 as tasks
from plait.ir.v1 import ir_pb2 as ir

_SCRIPT_MODULE = "__plait_main__"

DEFAULT_LOG_LIMIT = 4 * 1024 * 1024
"""The bytes of stdout and stderr kept per attempt when the task names no limit."""
LOG_CHUNK_BYTES = 256 * 1024
"""The most bytes of output one TaskLogs carries (far below gRPC's message limit)."""
MAX_METADATA_BYTES = 1024 * 1024
"""The largest metadata one ``log_metadata`` call may attach."""
MAX_ERROR_BYTES = 64 * 1024
"""The most UTF-8 bytes of a failure's message, and of its traceback, that are reported (the
control plane refuses a report over its limits: a cut here keeps the report whole)."""


class Reporter(Protocol):
    """Where the reports about one task go. Each transport implements it.

    For one task the executor calls `started` first, `metadata` any number of times while the
    step runs, then, once the step has ended, `logs` once per non-empty stream and finally one
    of `completed` or `failed`. Both of those carry the start time, so a transport may leave out
    a TaskStarted it has not sent yet when `logs`, `completed` or `failed` arrives.
    """

    def started(self, report: tasks.TaskStarted) -> None:
        """The step's code is about to run."""

    def metadata(self, report: tasks.TaskMetadata) -> None:
        """The step logged metadata (called from the step, while it runs)."""

    def logs(self, report: tasks.TaskLogs) -> None:
        """What the step wrote to one of stdout or stderr."""

    def completed(self, report: tasks.TaskCompleted) -> None:
        """The step returned and its outputs are stored."""

    def failed(self, report: tasks.TaskFailed) -> None:
        """The step, or loading it, or storing its outputs, raised."""


class _Capture:
    """Captures what the step writes to file descriptors 1 and 2 (print, C code, children)."""

    def __init__(self) -> None:
        # kept open for the process's life and reused by every step (closed at process exit)
        self._files = {fd: tempfile.TemporaryFile(mode="w+b") for fd in (1, 2)}  # noqa: SIM115
        self._saved: dict[int, int] = {}

    def __enter__(self) -> _Capture:
        sys.stdout.flush()
        sys.stderr.flush()
        for fd, f in self._files.items():
            f.seek(0)
            f.truncate()
            self._saved[fd] = os.dup(fd)
            os.dup2(f.fileno(), fd)
        return self

    def __exit__(self, *exc: object) -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        for fd, saved in self._saved.items():
            os.dup2(saved, fd)
            os.close(saved)
        self._saved.clear()

    def report(self, token: tasks.LeaseToken, limit: int, reporter: Reporter) -> None:
        """Reports what was captured, in chunks of at most LOG_CHUNK_BYTES, keeping at most
        `limit` bytes of the two streams together; a stream cut short ends with a line saying
        how much of it was dropped. Only what is kept is read back."""
        sizes = {
            name: os.fstat(self._files[fd].fileno()).st_size
            for fd, name in ((1, "stdout"), (2, "stderr"))
        }
        for (fd, name), keep in zip(
            ((1, "stdout"), (2, "stderr")), _shares(limit, list(sizes.values())), strict=True
        ):
            size = sizes[name]
            if not size:
                continue
            f = self._files[fd]
            f.seek(0)
            decoder = codecs.getincrementaldecoder("utf-8")("replace")
            left = keep
            last = "\n"
            while left > 0:
                data = f.read(min(LOG_CHUNK_BYTES, left))
                if not data:
                    break
                left -= len(data)
                text = decoder.decode(data, final=left == 0 and keep == size)
                if text:
                    last = text[-1]
                    reporter.logs(tasks.TaskLogs(token=token, stream=name, text=text))
            if keep < size:
                marker = (
                    f"[plait: {_size(size - keep)} of {name} dropped; "
                    f"the log keeps the first {_size(keep)}]\n"
                )
                if last != "\n":
                    marker = "\n" + marker
                reporter.logs(tasks.TaskLogs(token=token, stream=name, text=marker))


def _shares(limit: int, sizes: list[int]) -> list[int]:
    """How many bytes of each stream to keep: all of them when they fit in `limit` together;
    else `limit` shared evenly, a small stream's unused share going to the others."""
    if sum(sizes) <= limit:
        return sizes
    shares = [0] * len(sizes)
    left, streams = max(0, limit), len(sizes)
    for i in sorted(range(len(sizes)), key=sizes.__getitem__):
        shares[i] = min(sizes[i], left // streams)
        left -= shares[i]
        streams -= 1
    return shares


def _size(n: int) -> str:
    """A byte count for people, in binary units: ``97.3 MiB``, ``4 MiB`` (no trailing ``.0``)."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            text = f"{value:.1f}".removesuffix(".0")
            return f"{text} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def _cut(text: str, keep_end: bool = False) -> str:
    """At most MAX_ERROR_BYTES of `text` in UTF-8 (its start, or its end), saying how much was
    cut. Lone surrogates, which protobuf strings cannot carry, become U+FFFD."""
    data = text.encode("utf-8", "replace")
    if len(data) <= MAX_ERROR_BYTES:
        return data.decode()
    note = f"[plait: {len(data) - MAX_ERROR_BYTES} bytes cut]"
    # "ignore" drops the one character a byte cut may split at the edge
    if keep_end:
        return f"{note}\n{data[-MAX_ERROR_BYTES:].decode('utf-8', 'ignore')}"
    return f"{data[:MAX_ERROR_BYTES].decode('utf-8', 'ignore')}\n{note}"


def _error(failure: BaseException) -> res.StepError:
    """The report of a failure, its message and traceback bounded (a step's exception may carry
    a huge message; the report must still fit in one message)."""
    try:
        tb = "".join(traceback.format_exception(failure))
    except MemoryError:
        tb = ""
    error = StepError.of(failure, _cut(tb, keep_end=True))
    if isinstance(failure, MemoryError) and not error.message:
        error = StepError(error.type, "the step ran out of memory", error.traceback)
    return StepError(error.type, _cut(error.message), error.traceback).to_proto()


class StepExecutor:
    """Runs tasks one at a time in this process.

    Keep one per process: it caches imported step modules, code digests and artifact stores
    across tasks, reuses one capture of fds 1 and 2, and runs async steps on its own event loop.
    """

    def __init__(self) -> None:
        self._modules: dict[tuple[str, str], ModuleType] = {}
        self._digests: dict[Any, str] = {}
        self._stores: dict[str, LocalArtifactStore] = {}
        self._loop = asyncio.new_event_loop()
        self._capture = _Capture()

    def run(self, task: tasks.Task, reporter: Reporter) -> None:
        """Runs one task and reports on it; the step's own failure is reported, not raised.

        Args:
            task: the task, as the control plane assigned it.
            reporter: where the reports go.

        Raises:
            KeyboardInterrupt: the step was interrupted (re-raised after `Reporter.failed`).
            SystemExit: the step called ``sys.exit`` (re-raised after `Reporter.failed`).
        """
        token = task.token
        start = tasks.TaskStarted(token=token)
        start.start_time.GetCurrentTime()
        reporter.started(start)

        def report_metadata(lease: tasks.LeaseToken, output: str, text: str) -> None:
            if len(text) > MAX_METADATA_BYTES:
                raise ValueError(
                    f"log_metadata: {_size(len(text))} of metadata is more than the "
                    f"{_size(MAX_METADATA_BYTES)} allowed; store large values as outputs"
                )
            reporter.metadata(tasks.TaskMetadata(token=lease, output=output, json=text))

        env_before: dict[str, str | None] = {}
        failure: BaseException | None = None
        outputs: list[res.Artifact] = []
        ctx = _context.StepContext(
            run_id=token.run_id,
            step_id=token.step_id,
            attempt=token.attempt,
            pipeline=task.pipeline,
            output_locations={o.name: f"artifacts/{o.artifact_id}" for o in task.outputs},
            artifact_store_uri=task.artifact_store_uri,
            _report=report_metadata,
            _token=token,
        )
        for var in task.step.settings.environment.env:
            env_before[var.name] = os.environ.get(var.name)
            os.environ[var.name] = var.value
        with self._capture:
            reset = _context.set_context(ctx)
            try:
                store = self._store(task.artifact_store_uri)
                fn = self._function(task.step.code)
                kwargs = {i.name: self._value(i.value, store) for i in task.inputs}
                result = fn(**kwargs)
                if inspect.isawaitable(result):
                    result = self._loop.run_until_complete(result)
                outputs = self._store_outputs(task, result, store)
            except BaseException as exc:  # the step's own failure is data, whatever it is
                failure = exc
            finally:
                _context.reset_context(reset)
                for name, old in env_before.items():
                    if old is None:
                        os.environ.pop(name, None)
                    else:
                        os.environ[name] = old
        self._capture.report(token, task.log_limit_bytes or DEFAULT_LOG_LIMIT, reporter)
        if failure is None:
            reporter.completed(
                tasks.TaskCompleted(token=token, outputs=outputs, start_time=start.start_time)
            )
            return
        reporter.failed(
            tasks.TaskFailed(token=token, error=_error(failure), start_time=start.start_time)
        )
        if isinstance(failure, KeyboardInterrupt | SystemExit):
            raise failure

    def _module(self, code: ir.CodeRef) -> ModuleType:
        key = (code.module, code.file)
        module = self._modules.get(key)
        if module is not None:
            return module
        if code.module == "__main__":
            if not code.file:
                raise RuntimeError("the step is defined in __main__ without a source file")
            spec = importlib.util.spec_from_file_location(_SCRIPT_MODULE, code.file)
            if spec is None or spec.loader is None:
                raise ImportError(f"cannot load {code.file}")
            module = importlib.util.module_from_spec(spec)
            sys.modules[_SCRIPT_MODULE] = module
            spec.loader.exec_module(module)
        else:
            try:
                module = importlib.import_module(code.module)
            except ImportError:
                if not code.file:
                    raise
                spec = importlib.util.spec_from_file_location(code.module, code.file)
                if spec is None or spec.loader is None:
                    raise
                module = importlib.util.module_from_spec(spec)
                sys.modules[code.module] = module
                spec.loader.exec_module(module)
        self._modules[key] = module
        return module

    def _function(self, code: ir.CodeRef) -> Any:
        fn = self._lookup(code)
        if self._digest(fn) != code.code_digest:
            # the module changed since this process imported it: import it afresh, once
            self._modules.pop((code.module, code.file), None)
            sys.modules.pop(_SCRIPT_MODULE if code.module == "__main__" else code.module, None)
            fn = self._lookup(code)
            if self._digest(fn) != code.code_digest:
                raise RuntimeError(
                    f"the code of {code.module}.{code.qualname} in this worker differs from the "
                    f"code the pipeline was compiled from (was the file edited during the run?)"
                )
        return fn

    def _lookup(self, code: ir.CodeRef) -> Any:
        obj: Any = self._module(code)
        for part in code.qualname.split("."):
            obj = getattr(obj, part)
        return getattr(obj, "fn", obj)

    def _digest(self, fn: Any) -> str:
        digest = self._digests.get(fn)
        if digest is None:
            digest = self._digests[fn] = code_digest(fn)
        return digest

    def _store(self, uri: str) -> LocalArtifactStore:
        store = self._stores.get(uri)
        if store is None:
            store = self._stores[uri] = LocalArtifactStore.from_uri(uri)
        return store

    def _value(self, v: tasks.Value, store: LocalArtifactStore) -> Any:
        kind = v.WhichOneof("kind")
        if kind == "json":
            return json.loads(v.json)
        if kind == "artifact":
            data = store.get(v.artifact.digest)
            return get_materializer(v.artifact.materializer).load(data)
        if kind == "list":
            return [self._value(i, store) for i in v.list.items]
        return {e.key: self._value(e.value, store) for e in v.map.entries}

    def _store_outputs(
        self, task: tasks.Task, result: Any, store: LocalArtifactStore
    ) -> list[res.Artifact]:
        specs = list(task.step.outputs)
        if not specs:
            return []
        if len(specs) == 1:
            values = [result]
        else:
            if not isinstance(result, tuple) or len(result) != len(specs):
                raise TypeError(
                    f"step {task.step.id!r} declares {len(specs)} outputs "
                    f"({', '.join(o.name for o in specs)}) and must return a tuple of that "
                    f"length, not {type(result).__name__}"
                )
            values = list(result)
        locations = {o.name: o.artifact_id for o in task.outputs}
        out = []
        now = datetime.now(UTC)
        for spec, value in zip(specs, values, strict=True):
            _check_type(task.step.id, spec, value)
            m = materializer_for(value, spec.materializer)
            try:
                blob = store.put(m.save(value))
            except MemoryError:
                raise MemoryError(
                    f"step {task.step.id!r}: output {spec.name!r} ({type_name(value)}) is too "
                    f"large: this worker ran out of memory saving it with the {m.name} "
                    f"materializer; return a smaller value, or write the data to a file and "
                    f"return its path"
                ) from None
            artifact = ArtifactInfo(
                artifact_id=locations[spec.name],
                output=spec.name,
                digest=blob.digest,
                size=blob.size,
                uri=blob.uri,
                materializer=m.name,
                data_type=type_name(value),
                unsafe=m.unsafe,
                run_id=task.token.run_id,
                step_id=task.token.step_id,
                created_at=now,
            )
            out.append(artifact.to_proto())
        return out


_BUILTIN_TYPES: dict[str, type | tuple[type, ...]] = {
    "int": int,
    "float": (int, float),
    "str": str,
    "bytes": bytes,
    "bool": bool,
    "list": list,
    "dict": dict,
    "tuple": tuple,
    "set": set,
    "None": type(None),
}


def _check_type(step_id: str, spec: ir.OutputSpec, value: Any) -> None:
    """A step that returns what it did not declare fails, naming the output."""
    expr = spec.type.expr
    base = expr.split("[", 1)[0]
    expected = _BUILTIN_TYPES.get(base)
    if expected is not None and not isinstance(value, expected):
        raise TypeError(
            f"step {step_id!r}: output {spec.name!r} is declared {expr} but the "
            f"step returned {type(value).__name__}"
        )
