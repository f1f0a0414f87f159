"""The step-execution core: runs one task in this process and reports through a Reporter.

Nothing here knows how the task arrived or how reports leave (a stream, a long-poll, a command
line): that is the transport's business, behind `Reporter`.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import importlib
import importlib.util
import inspect
import os
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, Protocol

from plait import _context
from plait._artifact_store import LocalArtifactStore
from plait._file import load_json
from plait._materializers import get_materializer, materializer_for, type_name
from plait._models import StepError
from plait._step import code_digest
from plait._types import conform
from plait.api.v1 import resources_pb2 as res
from plait.api.v1 import task_service_pb2 as tasks
from plait.ir.mapping import MAX_MAP_ITEMS, item_artifact_id, item_name
from plait.ir.v1 import ir_pb2 as ir
from plait.runners.worker._blobs import BlobStore, RemoteBlobStore
from plait.runners.worker._code import (
    SCRIPT_MODULE,
    CodeCache,
    CodeRoots,
    refusing_pipeline_runs,
)
from plait.runners.worker._lease import EXIT_CANCELLED as EXIT_CANCELLED
from plait.runners.worker._lease import EXIT_LEASE_LOST as EXIT_LEASE_LOST
from plait.runners.worker._lease import Cancelled as Cancelled
from plait.runners.worker._lease import LeaseLost as LeaseLost
from plait.runners.worker._lease import lease_keeper

if TYPE_CHECKING:
    from google.protobuf.internal.containers import RepeatedCompositeFieldContainer

_SCRIPT_MODULE = "__plait_main__"

DEFAULT_LOG_LIMIT = 4 * 1024 * 1024
"""The bytes of stdout and stderr kept per attempt when the task names no limit."""
LOG_CHUNK_BYTES = 256 * 1024
"""The most bytes of output one TaskLogs carries (far below gRPC's message limit)."""
LOG_INTERVAL = 0.25
"""How often a running step's new output is sent (a step that ends sooner sends it once)."""
IDLE_TICKS = 8
"""Intervals with no step after which the log tail thread sleeps until a step wakes it."""
MAX_METADATA_BYTES = 1024 * 1024
"""The largest metadata one ``log_metadata`` call may attach."""
MAX_ERROR_BYTES = 64 * 1024
"""The most UTF-8 bytes of a failure's message, and of its traceback, that are reported (the
control plane refuses a report over its limits: a cut here keeps the report whole)."""
MAX_ERROR_TYPES = 64
"""The most names of a failure's class chain that are reported (the control plane's limit):
the most derived ones, which are what retry_on and no_retry_on name."""


_NOT_AWAITABLE = frozenset(
    {int, float, str, bytes, bool, list, tuple, dict, set, frozenset, type(None)}
)
"""Exact types whose values are never awaitable: a step's result of one of them is not put
through `inspect.isawaitable` (an ABC check, the slow part of a no-op step's call)."""


class Reporter(Protocol):
    """Where the reports about one task go. Each transport implements it.

    For one task the executor calls `started` first, `metadata` any number of times while the
    step runs, `logs` any number of times (while the step runs, from the capture's thread and
    never two calls at once, and after it ends; each call carries the attempt's next `batch`
    number and a transport must keep that order), and finally one of `completed` or `failed`.
    Both of those carry the start time, so a transport may leave out a TaskStarted it has not
    sent yet when `completed` or `failed` arrives, and may keep logs behind a TaskStarted it
    holds. Meanwhile `heartbeat` keeps the lease (from another thread). A report may raise
    `LeaseLost`: it goes up to the transport, out of `StepExecutor.run`.
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

    def heartbeat(self, token: tasks.LeaseToken) -> float:
        """Extends the attempt's lease; returns how long it lasts, in seconds, counted from
        when this call was made (``math.inf``: it cannot run out while this process lives).

        Called only for a task with ``lease_seconds`` set, from the executor's lease thread
        (not the step's), while the step runs: first a third of the lease after the step
        started (a step that ends sooner gets none), then about every third of the lease the
        last call returned. It may run at the same time as `metadata`. It should answer (or
        raise) before the lease runs out.

        Args:
            token: the attempt's lease.

        Raises:
            Cancelled: the control plane asked the attempt to stop (its run was cancelled or
                its timeout passed); the lease is not extended.
            LeaseLost: the token is no longer current (the attempt was leased again, or it
                ended); nothing the attempt reports counts any more.
            Exception: anything else means this heartbeat did not get through: the executor
                tries again soon, and stops the process (``EXIT_LEASE_LOST``) once the lease
                runs out without one getting through.
        """
        ...


class _Capture:
    """Captures what the step writes to file descriptors 1 and 2 (print, C code, children) and
    reports it while the step runs.

    The output goes to two temporary files. A step that ends within LOG_INTERVAL seconds sends
    its output once, after it ends (`report`). For a longer step, one thread per process (made
    on first use, asleep while no step runs) tails the files every LOG_INTERVAL seconds and
    reports what is new. Every report is one `tasks.TaskLogs` of one stream, at most
    LOG_CHUNK_BYTES, numbered from 1 per attempt in ``batch``; a batch ends at a line end when
    there is one (a line that stays unfinished for an interval goes as it is), and never inside
    a UTF-8 character.

    At most ``limit`` bytes of the two streams together are sent per attempt, shared as
    `_shares` says; a stream cut short ends with a line saying how much of it was dropped. While
    the step runs a stream sends at most half the limit (its share is never less, whatever the
    other stream writes later), the rest of its share once the step has ended.

    Between steps, fds 1 and 2 are the process's own: copies of them are taken on first use and
    kept, and every step ends by putting them back from those copies (a step that replaces
    either fd is undone so too). A process that points fd 1 or 2 elsewhere between steps must
    use a new capture.
    """

    def __init__(self) -> None:
        # kept open for the process's life and reused by every step (closed at process exit)
        self._files = {fd: tempfile.TemporaryFile(mode="w+b") for fd in (1, 2)}  # noqa: SIM115
        self._fds = tuple((fd, f.fileno()) for fd, f in self._files.items())
        for _, fileno in self._fds:
            # every write goes to the end, wherever the offset is: emptied between steps, a
            # file needs no seek back to its start (nor does a step that moved the offset)
            fcntl.fcntl(fileno, fcntl.F_SETFL, fcntl.fcntl(fileno, fcntl.F_GETFL) | os.O_APPEND)
        self._saved: dict[int, int] = {}
        """Copies of the process's fds 1 and 2 (made on first use, then kept)."""
        # guards _live and every send: the tail thread and the step's thread both send
        self._cond = threading.Condition(threading.Lock())
        self._live: _Live | None = None
        self._armed: _Live | None = None
        self._tail: threading.Thread | None = None
        self._idle = False  # the tail thread waits for a step (and must be woken)

    def follow(self, token: tasks.LeaseToken, limit: int, reporter: Reporter) -> _Capture:
        """Arms the capture for one attempt: use as ``with capture.follow(...):``, then call
        `report` once the step has ended."""
        self._armed = _Live(token, limit, reporter)
        return self

    def __enter__(self) -> _Capture:
        sys.stdout.flush()
        sys.stderr.flush()
        if not self._saved:
            # once, not a dup and a close of each per step (see the class)
            self._saved = {fd: os.dup(fd) for fd, _ in self._fds}
        for fd, fileno in self._fds:
            # through the descriptor: the files are only written through fds 1 and 2, so the
            # file objects buffer nothing; most steps print nothing, and truncating an empty
            # file costs more than asking its size
            if os.fstat(fileno).st_size:
                os.ftruncate(fileno, 0)
            os.dup2(fileno, fd)
        live, self._armed = self._armed, None
        if live is not None:
            live.due = time.monotonic() + LOG_INTERVAL
            with self._cond:
                self._live = live
                if self._tail is None:
                    self._tail = threading.Thread(
                        target=self._follow, name="plait-log-tail", daemon=True
                    )
                    self._tail.start()
                elif self._idle:
                    self._cond.notify()
        return self

    def __exit__(self, *exc: object) -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        for fd, saved in self._saved.items():
            os.dup2(saved, fd)

    def report(self) -> None:
        """Reports what the step wrote and was not sent yet, and what was dropped; the tail
        thread sends nothing more for this attempt. Call it after the ``with`` block."""
        with self._cond:
            live, self._live = self._live, None
            if live is not None:
                self._send(live, final=True)

    def _follow(self) -> None:
        """The tail thread: while steps run, it wakes every LOG_INTERVAL and sends the new output
        of a step that has run for longer than that. A short step costs it nothing: nobody wakes
        the thread when a step starts or ends (a wake-up per step would cost the step two
        thread switches). After IDLE_TICKS intervals with no step it sleeps until the next step
        wakes it, so an idle worker costs nothing either."""
        quiet = 0
        while True:
            with self._cond:
                if self._live is None:
                    quiet += 1
                    if quiet > IDLE_TICKS:
                        self._idle = True
                        while self._live is None:
                            self._cond.wait()
                        self._idle = False
                        quiet = 0
                else:
                    quiet = 0
            time.sleep(LOG_INTERVAL)
            with self._cond:
                live = self._live
                if live is None or live.due > time.monotonic():
                    continue
            # what the step printed may still sit in Python's buffer (stdout is block-buffered
            # into a file); flushed outside the lock, as the step's own flush may wait for it
            for stream in (sys.__stdout__, sys.__stderr__):
                if stream is not None:
                    with contextlib.suppress(Exception):  # a closed or broken stream
                        stream.flush()
            with self._cond:
                if self._live is live:
                    live.due = time.monotonic() + LOG_INTERVAL
                    with contextlib.suppress(Exception):  # a transport gone: the step goes on
                        self._send(live, final=False)

    def _send(self, live: _Live, *, final: bool) -> None:
        """Sends the stream's output that is due (holding the lock)."""
        sizes = [os.fstat(self._files[fd].fileno()).st_size for fd in (1, 2)]
        if final and sizes == live.sent:
            return  # all of it was sent (most steps print nothing): nothing to send, nor to cut
        if final:
            # the shares of the whole output (never below what was sent live: see the class)
            shares = _shares(live.limit, sizes)
            ends = [max(share, sent) for share, sent in zip(shares, live.sent, strict=True)]
        else:
            ends = [min(size, live.limit // 2) for size in sizes]
        for i, (fd, name) in enumerate(((1, "stdout"), (2, "stderr"))):
            fileno = self._files[fd].fileno()
            while live.sent[i] < ends[i]:
                data = os.pread(fileno, min(LOG_CHUNK_BYTES, ends[i] - live.sent[i]), live.sent[i])
                if not data:
                    break
                if final and live.sent[i] + len(data) == ends[i]:
                    # the end of what is kept: all of the stream (a torn last character shows
                    # as U+FFFD), or its share cut between two characters
                    n = len(data) if ends[i] == sizes[i] else _whole_chars(data)
                else:
                    n = data.rfind(b"\n") + 1  # whole lines when there are any
                    if not n and (
                        final or len(data) == LOG_CHUNK_BYTES or live.waiting[i] == live.sent[i]
                    ):
                        # one long line, or one left unfinished for an interval: it goes as it
                        # is, cut between two characters
                        n = _whole_chars(data)
                if not n:
                    break
                live.waiting[i] = -1
                live.batch += 1
                # counted as sent before it is: a transport that fails owns the retry (with the
                # same batch number), never a second batch of the same text
                live.sent[i] += n
                live.last[i] = data[n - 1 : n]
                live.reporter.logs(
                    tasks.TaskLogs(
                        token=live.token,
                        stream=name,
                        text=data[:n].decode("utf-8", "replace"),
                        batch=live.batch,
                    )
                )
            if not final:
                live.waiting[i] = live.sent[i] if live.sent[i] < sizes[i] else -1
            elif live.sent[i] < sizes[i]:
                kept = live.sent[i]
                marker = (
                    f"[plait: {_size(sizes[i] - kept)} of {name} dropped; "
                    f"the log keeps the first {_size(kept)}]\n"
                )
                if live.last[i] != b"\n":
                    marker = "\n" + marker
                live.batch += 1
                live.reporter.logs(
                    tasks.TaskLogs(token=live.token, stream=name, text=marker, batch=live.batch)
                )


@dataclass(eq=False)
class _Live:
    """One attempt's output as `_Capture` sends it."""

    token: tasks.LeaseToken
    limit: int
    """The most bytes of the two streams together to send."""
    reporter: Reporter
    due: float = 0.0
    """When the tail thread next sends (time.monotonic)."""
    batch: int = 0
    """The number of the last TaskLogs sent."""
    sent: list[int] = field(default_factory=lambda: [0, 0])
    """Bytes of stdout and of stderr sent."""
    waiting: list[int] = field(default_factory=lambda: [-1, -1])
    """Where an unfinished line of each stream was held back at the last tick (-1: none)."""
    last: list[bytes] = field(default_factory=lambda: [b"\n", b"\n"])
    """The last byte sent of each stream."""


def _whole_chars(data: bytes) -> int:
    """The length of the longest start of `data` that does not end inside a UTF-8 character
    (bytes that are not UTF-8 there may be cut anywhere)."""
    for back in range(1, min(4, len(data)) + 1):
        byte = data[-back]
        if byte < 0x80 or byte >= 0xF8:  # ASCII, or no UTF-8 at all
            return len(data)
        if byte >= 0xC0:  # the lead byte of the last character: is all of it there?
            need = 2 if byte < 0xE0 else 3 if byte < 0xF0 else 4
            return len(data) if back >= need else len(data) - back
    return len(data)


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
    message = error.message
    if isinstance(failure, MemoryError) and not message:
        message = "the step ran out of memory"
    # a script's classes load here under SCRIPT_MODULE; the pipeline's retry_on and
    # no_retry_on name them as the script did, from __main__
    script = SCRIPT_MODULE + "."
    types = tuple(
        "__main__." + t.removeprefix(script) if t.startswith(script) else t
        for t in error.types[:MAX_ERROR_TYPES]
    )
    return StepError(error.type, _cut(message), error.traceback, types).to_proto()


class StepExecutor:
    """Runs tasks one at a time in this process.

    Keep one per process: it caches imported step modules, code digests and artifact stores
    across tasks, reuses one capture of fds 1 and 2, and runs async steps on its own event loop.
    """

    def __init__(
        self,
        *,
        channel: Any = None,
        metadata: Sequence[tuple[str, str]] | None = None,
        home: str | os.PathLike[str] | None = None,
        remote_artifacts: bool = False,
    ) -> None:
        """Args:
        channel: a ``grpc.Channel`` to the control plane, to download what the artifact
            store named by a task cannot give (a code archive); None: the store only.
        metadata: the call metadata (the token) for calls on ``channel``.
        home: where code archives are unpacked (``<home>/code/<digest>/``); the worker's
            ``PLAIT_HOME`` by default.
        remote_artifacts: read and write every artifact through the control plane's
            ArtifactService over ``channel`` (a worker that cannot reach its store).
        """
        if remote_artifacts and channel is None:
            raise ValueError("remote_artifacts needs a channel to the control plane")
        self._modules: dict[tuple[str, str, str], ModuleType] = {}
        self._digests: dict[Any, str] = {}
        self._stores: dict[str, BlobStore] = {}
        self._fresh = _Fresh()
        """The bytes of the last step's outputs (a chain's next step reads them here)."""
        self._channel = channel
        self._metadata = metadata
        self._home = Path(home) if home is not None else None
        self._remote: RemoteBlobStore | None = (
            RemoteBlobStore(channel, metadata) if channel is not None else None
        )
        self._remote_artifacts = remote_artifacts
        self._roots = CodeRoots()
        self._code: CodeCache | None = None
        self._loop = asyncio.new_event_loop()
        self._capture = _Capture()

    def run(self, task: tasks.Task, reporter: Reporter) -> None:
        """Runs one task and reports on it; the step's own failure is reported, not raised.

        Args:
            task: the task, as the control plane assigned it.
            reporter: where the reports go.

        While the step runs, its lease is kept (`Reporter.heartbeat`, for a task with
        ``lease_seconds``); when the attempt must stop (cancelled, timed out, lease lost or not
        renewable) the process exits with ``EXIT_CANCELLED`` or ``EXIT_LEASE_LOST``: the step
        cannot be stopped otherwise.

        Raises:
            KeyboardInterrupt: the step was interrupted (re-raised after `Reporter.failed`).
            SystemExit: the step called ``sys.exit`` (re-raised after `Reporter.failed`).
            LeaseLost: a report was refused: the attempt is no longer this worker's.
        """
        token = task.token
        lease = lease_keeper() if task.lease_seconds > 0 else None
        if lease is not None:
            lease.begin(token, task.lease_seconds, reporter)
        try:
            failure, done, start = self._run_step(task, reporter)
        finally:
            if lease is not None:
                lease.end()
        self._capture.report()
        if failure is None:
            done.token.CopyFrom(token)
            done.start_time.CopyFrom(start.start_time)
            reporter.completed(done)
            return
        reporter.failed(
            tasks.TaskFailed(token=token, error=_error(failure), start_time=start.start_time)
        )
        if isinstance(failure, KeyboardInterrupt | SystemExit):
            raise failure

    def _run_step(
        self, task: tasks.Task, reporter: Reporter
    ) -> tuple[BaseException | None, tasks.TaskCompleted, tasks.TaskStarted]:
        """The part of `run` under the lease: start, call the step, store its outputs (into the
        TaskCompleted returned, which `run` completes)."""
        token = task.token
        start = tasks.TaskStarted(token=token)
        # by hand: Timestamp.GetCurrentTime costs five times as much
        stamp = start.start_time
        stamp.seconds, stamp.nanos = divmod(time.time_ns(), 1_000_000_000)
        reporter.started(start)

        def report_metadata(lease: tasks.LeaseToken, output: str, text: str) -> None:
            if len(text) > MAX_METADATA_BYTES:
                raise ValueError(
                    f"log_metadata: {_size(len(text))} of metadata is more than the "
                    f"{_size(MAX_METADATA_BYTES)} allowed; store large values as outputs"
                )
            reporter.metadata(tasks.TaskMetadata(token=lease, output=output, json=text))

        def make_context() -> _context.StepContext:
            return _context.StepContext(
                run_id=token.run_id,
                step_id=token.step_id,
                attempt=token.attempt,
                pipeline=task.pipeline,
                output_locations={o.name: f"artifacts/{o.artifact_id}" for o in task.outputs},
                artifact_store_uri=task.artifact_store_uri,
                _report=report_metadata,
                _token=token,
            )

        env_before: dict[str, str | None] = {}
        failure: BaseException | None = None
        done = tasks.TaskCompleted()
        # made when the step (or a hook) first asks for it: most never do
        ctx = _context.LazyContext(make_context)
        for var in task.step.settings.environment.env:
            env_before[var.name] = os.environ.get(var.name)
            os.environ[var.name] = var.value
        fresh, self._fresh = self._fresh, _Fresh()  # what this step stores replaces it
        with self._capture.follow(token, task.log_limit_bytes or DEFAULT_LOG_LIMIT, reporter):
            reset = _context.set_context(ctx)
            try:
                try:
                    store = self._store(task.artifact_store_uri)
                    fn = self._function(
                        task.step.code, task.code_archive, task.artifact_store_uri, task.code_root
                    )
                    kwargs = {i.name: input_value(i.value, store, fresh) for i in task.inputs}
                    result = fn(**kwargs)
                    if type(result) not in _NOT_AWAITABLE and inspect.isawaitable(result):
                        result = self._loop.run_until_complete(result)
                    self._store_outputs(task, result, store, done)
                except LeaseLost:
                    raise  # a report the step made found the attempt no longer this worker's
                except BaseException as exc:  # the step's own failure is data, whatever it is
                    failure = exc
                # in the step's context and log capture: a hook may read the context, log
                # metadata, and what it prints (or its traceback) is in the step's logs
                if failure is None and task.step.settings.HasField("on_success"):
                    self._call_hook(task, "on_success", ctx.get())
                elif (
                    failure is not None
                    and not isinstance(failure, KeyboardInterrupt)
                    and task.step.settings.HasField("on_failure")
                ):
                    self._call_hook(task, "on_failure", ctx.get(), failure)
            finally:
                _context.reset_context(reset)
                for name, old in env_before.items():
                    if old is None:
                        os.environ.pop(name, None)
                    else:
                        os.environ[name] = old
        return failure, done, start

    def _call_hook(self, task: tasks.Task, what: str, *args: Any) -> None:
        """Calls the step's ``on_success`` or ``on_failure`` hook (found as step code is); what
        it raises, or a hook that cannot be loaded, is written with its traceback to stderr
        (the step's log) and changes nothing else. Only an interrupt or a lost lease goes up."""
        code: ir.CodeRef = getattr(task.step.settings, what)
        name = f"{code.module}.{code.qualname}"
        try:
            root = (
                self._code_root(task.code_archive, task.artifact_store_uri)
                if task.code_archive
                else None
            )
            hook = self._lookup(code, root, "" if task.code_archive else task.code_root)
            result = hook(*args)
            if inspect.isawaitable(result):
                self._loop.run_until_complete(result)
        except (LeaseLost, KeyboardInterrupt):
            raise
        except BaseException:  # a hook never changes the step's outcome, whatever it raises
            sys.stdout.flush()
            print(
                f"plait: the {what} hook {name} of step {task.step.id!r} raised (the step's "
                f"outcome is unchanged):\n{traceback.format_exc()}",
                file=sys.stderr,
                end="",
                flush=True,
            )

    def _module(self, code: ir.CodeRef, root: Path | None = None, local: str = "") -> ModuleType:
        """The step's module: from the unpacked code archive ``root``, else from this process's
        own path (``code.file`` relative to the ``local`` source root when given, else to the
        working folder, or absolute in older IR)."""
        key = (str(root or local), code.module, code.file)
        module = self._modules.get(key)
        if module is not None:
            return module
        file = os.path.join(local, code.file) if local and code.file else code.file
        if root is not None or self._roots.current is not None:
            self._roots.activate(root)
            # modules of another archive are gone from sys.modules: so from this cache too
            for other in [k for k in self._modules if k[0] != key[0]]:
                del self._modules[other]
        with refusing_pipeline_runs(code.file, root or (Path(local) if local else None)):
            module = self._import(code, root, file)
        self._modules[key] = module
        return module

    def _import(self, code: ir.CodeRef, root: Path | None, file: str) -> ModuleType:
        """Imports the step's module (see `_module`)."""
        if root is not None:
            return self._roots.load(code)
        if code.module == "__main__":
            if not file:
                raise RuntimeError("the step is defined in __main__ without a source file")
            spec = importlib.util.spec_from_file_location(SCRIPT_MODULE, file)
            if spec is None or spec.loader is None:
                raise ImportError(f"cannot load {file}")
        else:
            try:
                return importlib.import_module(code.module)
            except ImportError:
                if not file:
                    raise
                spec = importlib.util.spec_from_file_location(code.module, file)
                if spec is None or spec.loader is None:
                    raise
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            sys.modules.pop(spec.name, None)  # half a module is not left for the next task
            raise
        return module

    def _function(
        self, code: ir.CodeRef, archive: str = "", store_uri: str = "", code_root: str = ""
    ) -> Any:
        """The step function, checked against ``code.code_digest``.

        Args:
            code: the step's code reference.
            archive: the sha256 of the run's code archive (``Task.code_archive``); empty: the
                code comes from this process's own path.
            store_uri: the task's artifact store, where the archive is read from when it can
                be (else it is downloaded over the executor's channel).
            code_root: with no archive, the local folder the code is imported from as the
                source root (an embedded engine's own client's); empty: this process's path.
        """
        root = self._code_root(archive, store_uri) if archive else None
        # a local root is this process's own path, not an archive: nothing is unloaded for it
        local = "" if archive else code_root
        try:
            fn = self._lookup(code, root, local)
        except AttributeError:
            fn = None  # a step added to the file since this process imported it
        if fn is None or self._digest(fn) != code.code_digest:
            # the module changed since this process imported it: import it afresh, once
            self._modules.pop((str(root or local), code.module, code.file), None)
            sys.modules.pop(SCRIPT_MODULE if code.module == "__main__" else code.module, None)
            fn = self._lookup(code, root, local)
            if self._digest(fn) != code.code_digest:
                where = f"code archive {archive}" if archive else "this worker"
                raise RuntimeError(
                    f"the code of {code.module}.{code.qualname} in {where} differs from the "
                    f"code the pipeline was compiled from (was the file edited during the run?)"
                )
        return fn

    def _code_root(self, archive: str, store_uri: str) -> Path:
        """The folder the archive is unpacked in, fetched and unpacked first when needed."""
        if self._code is None:
            if self._home is None:
                from plait._settings import plait_home

                self._home = plait_home()
            self._code = CodeCache(self._home)

        def fetch(digest: str) -> bytes:
            failure: Exception | None = None
            if not self._remote_artifacts:
                try:
                    return self._store(store_uri).get(digest)
                except (OSError, ValueError) as exc:  # not here, or not a store we can read
                    failure = exc
            if self._remote is None:
                raise RuntimeError(
                    f"code archive {digest} cannot be read from the artifact store "
                    f"{store_uri or '(none)'} ({failure}), and this worker has no channel to "
                    f"download it from the control plane"
                )
            return self._remote.get(digest)

        return self._code.root(archive, fetch)

    def _lookup(self, code: ir.CodeRef, root: Path | None = None, local: str = "") -> Any:
        obj: Any = self._module(code, root, local)
        for part in code.qualname.split("."):
            obj = getattr(obj, part)
        return getattr(obj, "fn", obj)

    def _digest(self, fn: Any) -> str:
        digest = self._digests.get(fn)
        if digest is None:
            digest = self._digests[fn] = code_digest(fn)
        return digest

    def _store(self, uri: str) -> BlobStore:
        """The task's artifact store: the local one its URI names, or the control plane's
        over gRPC for a worker made with ``remote_artifacts``."""
        if self._remote_artifacts and self._remote is not None:
            return self._remote
        store = self._stores.get(uri)
        if store is None:
            store = self._stores[uri] = LocalArtifactStore.from_uri(uri)
        return store

    def _store_outputs(
        self, task: tasks.Task, result: Any, store: BlobStore, done: tasks.TaskCompleted
    ) -> None:
        """Stores the step's outputs, and records them in ``done``."""
        specs = task.step.outputs
        if not specs:
            return
        if len(specs) == 1:
            values = (result,)
        else:
            if not isinstance(result, tuple) or len(result) != len(specs):
                raise TypeError(
                    f"step {task.step.id!r} declares {len(specs)} outputs "
                    f"({', '.join(o.name for o in specs)}) and must return a tuple of that "
                    f"length, not {type(result).__name__}"
                )
            values = result
        locations = {o.name: o.artifact_id for o in task.outputs}
        out = done.outputs
        # the records' create_time, to the microsecond (as a datetime would carry it)
        seconds, micros = divmod(time.time_ns() // 1000, 1_000_000)
        saved = _Saved(task, store, seconds, micros * 1000, out, self._fresh)
        for spec, value in zip(specs, values, strict=True):
            value = conform(value, spec.type.expr)  # a numpy scalar declared -> float: a float
            _check_type(task.step.id, spec, value)
            artifact_id = locations[spec.name]
            saved.put(spec.name, value, spec.materializer, artifact_id)
            if spec.items:  # a map iterates it: each item is an artifact of its own too
                item_materializer = "pickle" if spec.materializer == "pickle" else ""
                items = _items(task.step.id, spec, value, MAX_MAP_ITEMS - len(out) + 1)
                for i, item in enumerate(items):
                    name, item_id = item_name(spec.name, i), item_artifact_id(artifact_id, i)
                    saved.put(name, item, item_materializer, item_id)


@dataclass
class _Saved:
    """Stores a step's outputs as artifacts of its attempt."""

    task: tasks.Task
    store: BlobStore
    seconds: int
    nanos: int
    """When the outputs were stored (the records' create_time)."""
    records: RepeatedCompositeFieldContainer[res.Artifact]
    """Where each output's record goes (a TaskCompleted's: filled in place, never copied)."""
    fresh: _Fresh | None = None
    """Where the stored bytes are kept for the next step, if anywhere."""

    def put(self, name: str, value: Any, materializer: str, artifact_id: str) -> None:
        """Stores ``value`` as output ``name`` (with the named materializer, or the one its type
        takes) and adds its record."""
        task = self.task
        m = materializer_for(value, materializer)
        try:
            data = m.save(value)
            blob = self.store.put(data)
        except MemoryError:
            raise MemoryError(
                f"step {task.step.id!r}: output {name!r} ({type_name(value)}) is too "
                f"large: this worker ran out of memory saving it with the {m.name} "
                f"materializer; return a smaller value, or write the data to a file and "
                f"return its path"
            ) from None
        # the record ArtifactInfo.fill_proto writes (a test holds them equal), written here
        # without the dataclass in between: this runs for every output of every step
        record = self.records.add()
        record.name = f"artifacts/{artifact_id}"
        record.artifact_id = artifact_id
        record.output = name
        record.digest = blob.digest
        record.size_bytes = blob.size
        record.uri = blob.uri
        record.materializer = m.name
        record.data_type = type_name(value)
        record.unsafe = m.unsafe
        token = task.token
        record.run_id = token.run_id
        record.step_id = token.step_id
        stamp = record.create_time
        stamp.seconds = self.seconds
        stamp.nanos = self.nanos
        if self.fresh is not None:
            self.fresh.keep(blob.digest, data)


def input_value(v: tasks.Value, store: BlobStore, fresh: _Fresh) -> Any:
    """An input's value: a JSON literal, or an artifact's bytes (``fresh``'s, else the store's)
    loaded by its materializer, or a list or dict of such values."""
    kind = v.WhichOneof("kind")
    if kind == "json":
        return load_json(v.json)  # a plait.File parameter comes back as a Path
    if kind == "artifact":
        artifact = v.artifact
        data = fresh.blobs.get(artifact.digest)
        if data is None:
            data = store.get(artifact.digest)
        return get_materializer(artifact.materializer).load(data)
    if kind == "list":
        return [input_value(i, store, fresh) for i in v.list.items]
    return {e.key: input_value(e.value, store, fresh) for e in v.map.entries}


FRESH_BYTES = 1024 * 1024
"""The most bytes of a step's outputs a worker keeps for the next step."""


class _Fresh:
    """The bytes of one step's outputs, by digest, for the next step this worker runs: a
    chain's next step is handed to the worker that ran the last (runners/_local.py), and reads
    its inputs here, not from the store (an open, a read and a check of the digest that its
    bytes match by construction; over gRPC for a remote store). At most FRESH_BYTES."""

    __slots__ = ("blobs", "room")

    def __init__(self) -> None:
        self.blobs: dict[str, bytes] = {}
        self.room = FRESH_BYTES

    def keep(self, digest: str, data: bytes) -> None:
        if len(data) <= self.room:
            self.blobs[digest] = data
            self.room -= len(data)


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


def _items(step_id: str, spec: ir.OutputSpec, value: Any, room: int) -> list[Any]:
    """The items of an output a map iterates: a list (or tuple) of at most ``room`` items
    (MAX_MAP_ITEMS for a step's outputs together)."""
    if not isinstance(value, list | tuple):
        raise TypeError(
            f"step {step_id!r}: output {spec.name!r} is mapped over (step.map), so it must be "
            f"a list, but the step returned {type_name(value)}"
        )
    if len(value) > room:
        raise ValueError(
            f"step {step_id!r}: output {spec.name!r} is mapped over (step.map) and has "
            f"{len(value)} items; a step's outputs that maps iterate hold at most "
            f"{MAX_MAP_ITEMS} items together, and one map runs at most that: return fewer (batch "
            f"several items into one), or split the list and map over each part"
        )
    return list(value)


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
