"""The WorkerService transport: unary calls, each retried while the lease lasts.

Remote workers (`plait worker`) and the one-shot entrypoint (``python -m plait.runners.step``)
reach the control plane over the network, which may drop a call or restart. Every WorkerService
call is safe to retry (a retried completion answers as the first did; a log batch seen before
is dropped), so a call that fails transiently (UNAVAILABLE, DEADLINE_EXCEEDED) is tried again
with backoff and jitter for as long as the task's lease lasts. A refused token
(FAILED_PRECONDITION with ErrorInfo reason ``LEASE_LOST``) is `LeaseLost`; a heartbeat whose
answer has ``cancel_requested`` is `Cancelled`; other refusals are `plait.errors.RpcError`.
"""

from __future__ import annotations

import random
import socket
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

import grpc

from plait import errors
from plait._channel import ChannelConfig, open_channel
from plait.api.v1 import task_service_pb2 as tasks
from plait.api.v1 import worker_service_pb2 as ws
from plait.api.v1 import worker_service_pb2_grpc as ws_grpc
from plait.runners.worker._lease import Cancelled, LeaseLost
from plait.runners.worker._stream import STARTED_DELAY

TRANSIENT = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})
"""Status codes that mean: try again (the control plane is down, restarting or slow)."""
REFUSED = frozenset({grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED})
"""Status codes that mean: this worker's credential is not good enough; retrying cannot help."""
CALL_SECONDS = 10.0
"""The longest one report call may take before it is tried again."""
BACKOFF_FIRST = 0.2
"""The first wait before a retry, in seconds; it doubles (with jitter) up to BACKOFF_MAX."""
BACKOFF_MAX = 5.0
"""The longest wait between two retries, in seconds."""
POLL_MARGIN = 10.0
"""How much longer than its wait a PollTask call may take before the worker gives up on it."""


_R = TypeVar("_R")


class _DeferredStarts:
    """One thread per process that sends StartTask reports STARTED_DELAY after the step
    started, unless the step ended first (its completion or failure then implies the start)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._due: dict[int, tuple[float, Callable[[], None]]] = {}
        self._thread: threading.Thread | None = None

    def hold(self, key: int, send: Callable[[], None]) -> None:
        with self._cond:
            self._due[key] = (time.monotonic() + STARTED_DELAY, send)
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="plait-deferred-starts", daemon=True
                )
                self._thread.start()
            self._cond.notify()

    def drop(self, key: int) -> None:
        """The step ended: its StartTask, if still held, is not sent."""
        with self._cond:
            self._due.pop(key, None)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._due:
                    self._cond.wait()
                key, (when, send) = min(self._due.items(), key=lambda kv: kv[1][0])
                left = when - time.monotonic()
                if left > 0:
                    self._cond.wait(left)
                    continue
                del self._due[key]
            try:
                send()
            except Exception:  # a start report lost changes nothing that matters
                continue


_STARTS = _DeferredStarts()


def reason(exc: grpc.RpcError) -> str:
    """The ErrorInfo reason of a failed call (``LEASE_LOST``, ...), or ``""``."""
    from google.rpc import error_details_pb2
    from grpc_status import rpc_status

    if not isinstance(exc, grpc.Call):
        return ""
    try:
        status = rpc_status.from_call(exc)
    except ValueError:  # a status whose details contradict the call's code
        return ""
    if status is None:
        return ""
    for detail in status.details:
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            return str(info.reason)
    return ""


def code_of(exc: grpc.RpcError) -> grpc.StatusCode:
    """The status code of a failed call."""
    code = exc.code() if isinstance(exc, grpc.Call) else None
    return code if isinstance(code, grpc.StatusCode) else grpc.StatusCode.UNKNOWN


def details(exc: grpc.RpcError) -> str:
    """The message of a failed call."""
    return str(exc.details() if isinstance(exc, grpc.Call) else exc)


def refused_message(exc: grpc.RpcError, address: str) -> str:
    """What to tell a person whose worker the control plane refused."""
    code = code_of(exc)
    hint = ""
    if code == grpc.StatusCode.UNAUTHENTICATED:
        hint = (
            "; set PLAIT_TOKEN to a worker token (an admin makes one with "
            "`plait token create NAME --role worker`)"
        )
    elif code == grpc.StatusCode.PERMISSION_DENIED:
        hint = "; a worker needs a token of role worker (`plait token create NAME --role worker`)"
    return f"the control plane at {address} refused this worker: {code.name}: {details(exc)}{hint}"


class Backoff:
    """Waits that double from BACKOFF_FIRST up to BACKOFF_MAX, each with ±25 % jitter (so
    that workers that lost the control plane together do not come back together)."""

    def __init__(self, first: float = BACKOFF_FIRST, most: float = BACKOFF_MAX) -> None:
        self._first = first
        self._most = most
        self._next = first

    def next(self) -> float:
        """The next wait, in seconds."""
        wait = self._next * random.uniform(0.75, 1.25)
        self._next = min(self._most, self._next * 2)
        return wait

    def reset(self) -> None:
        """A call got through: start again from the shortest wait."""
        self._next = self._first


def remote_artifacts(mode: str, address: str) -> bool:
    """Whether a worker reads and writes artifacts through the control plane (ArtifactService)
    rather than the store path a task names: ``remote``, ``local``, or ``auto`` (remote unless
    the control plane is on this machine, where its store can be read directly)."""
    if mode in ("remote", "local"):
        return mode == "remote"
    from plait._settings import is_loopback, parse_server

    try:
        servers = parse_server(address)
    except Exception:  # not ours to refuse here: the channel says what is wrong with it
        return True
    return not all(is_loopback(s.host.strip("[]")) for s in servers)


def lease_token(text: str) -> tasks.LeaseToken:
    """Parses ``RUN/STEP/ATTEMPT/EPOCH`` (what `format_lease` writes).

    Raises:
        ValueError: the text is not of that form.
    """
    parts = text.split("/")
    if len(parts) != 4 or not all(parts) or not parts[2].isdigit() or not parts[3].isdigit():
        raise ValueError(f"expected RUN/STEP/ATTEMPT/EPOCH, got {text!r}")
    return tasks.LeaseToken(
        run_id=parts[0], step_id=parts[1], attempt=int(parts[2]), epoch=int(parts[3])
    )


def format_lease(token: tasks.LeaseToken) -> str:
    """``RUN/STEP/ATTEMPT/EPOCH``: a lease token on a command line."""
    return f"{token.run_id}/{token.step_id}/{token.attempt}/{token.epoch}"


class WorkerClient:
    """The WorkerService of one control plane, over one channel (TLS and token as
    `plait._channel` makes them).

    Args:
        config: where the control plane is and how to authenticate.
    """

    def __init__(self, config: ChannelConfig) -> None:
        self.address = config.address
        self.channel: Any = open_channel(config)
        self.metadata = config.metadata
        """The call metadata that carries the worker's token."""
        self.stub = ws_grpc.WorkerServiceStub(self.channel)

    def close(self) -> None:
        """Closes the channel."""
        self.channel.close()

    def call(self, method: Callable[..., _R], request: Any, timeout: float) -> _R:
        """One call with the worker's credential.

        Raises:
            grpc.RpcError: the call failed.
        """
        return method(request, timeout=timeout, metadata=self.metadata)

    def poll(
        self,
        pool: str,
        worker_id: str,
        *,
        wait: float = 20.0,
        lease: tasks.LeaseToken | None = None,
        pid: int = 0,
        on_call: Callable[[Any], None] | None = None,
    ) -> tasks.Task | None:
        """One PollTask: the next task of `pool` (or the task `lease` names), or None when none
        came within `wait` seconds.

        Args:
            pool: the pool to take a task from.
            worker_id: the lease's holder.
            wait: the longest wait, in seconds (the control plane caps it at 60).
            lease: claim this queued task instead.
            pid: the process that will run the task (the lease's handle).
            on_call: gets the call's future before it is waited on (to cancel it).

        Raises:
            grpc.RpcError: the call failed (transient or not: the caller decides).
        """
        request = ws.PollTaskRequest(
            pool=pool,
            worker_id=worker_id,
            wait_seconds=wait,
            lease=lease,
            hostname=socket.gethostname(),
            pid=pid,
        )
        future = self.stub.PollTask.future(
            request, timeout=wait + POLL_MARGIN, metadata=self.metadata
        )
        if on_call is not None:
            on_call(future)
        response: ws.PollTaskResponse = future.result()
        return response.task if response.HasField("task") else None

    def release(self, token: tasks.LeaseToken, *, within: float = 10.0) -> bool:
        """Hands back a task whose code has not started (ReleaseTask), retrying transient
        failures for up to `within` seconds. False when it did not get through (the lease then
        runs out and the task is leased again)."""
        end = time.monotonic() + within
        backoff = Backoff()
        while True:
            try:
                self.call(self.stub.ReleaseTask, ws.ReleaseTaskRequest(token=token), CALL_SECONDS)
                return True
            except grpc.RpcError as exc:
                if reason(exc) == "LEASE_LOST":
                    return True  # not ours any more: nothing to hand back
                wait = backoff.next()
                if code_of(exc) not in TRANSIENT or time.monotonic() + wait > end:
                    return False
                time.sleep(wait)

    def reporter(
        self, task: tasks.Task, *, leased_at: float, on_renewed: Callable[[float], None] | None
    ) -> UnaryReporter:
        """A Reporter for one task, leased at `leased_at` (``time.monotonic()``)."""
        return UnaryReporter(self, task, leased_at=leased_at, on_renewed=on_renewed)


class UnaryReporter:
    """A Reporter over WorkerService, for one task.

    Each report is one call, retried with backoff while transient failures last and the lease
    has not run out (the lease's end is known from when the task was leased and from each
    heartbeat's answer). Log reports become AppendLogs batches numbered from 1 per attempt (the
    capture's own numbers when it numbers them), so a retried batch is dropped, not doubled.

    Args:
        client: the control plane.
        task: the task reported on.
        leased_at: when the task was leased (``time.monotonic()`` when PollTask answered).
        on_renewed: called with the lease's new end (``time.monotonic()`` clock) after each
            heartbeat that extended it; it may raise `LeaseLost` to stop the step.
    """

    def __init__(
        self,
        client: WorkerClient,
        task: tasks.Task,
        *,
        leased_at: float,
        on_renewed: Callable[[float], None] | None = None,
    ) -> None:
        self._client = client
        self._stub = client.stub
        self._token = task.token
        self._lease = task.lease_seconds
        self.expires = leased_at + task.lease_seconds if task.lease_seconds > 0 else float("inf")
        """When the lease runs out unless renewed (``time.monotonic()`` clock)."""
        self._on_renewed = on_renewed
        self._lock = threading.Lock()  # numbers log batches: the tail thread and the step's
        self._batch = 0
        self._lost = ""
        """Why the lease was found lost, once a report found it so (refused, or not through
        before the lease ran out): every later report raises `LeaseLost` again. Nothing the
        attempt reports afterwards counts, and a step that failed because a report it made
        (``log_metadata``) raised `LeaseLost` did not fail: its attempt crashed."""

    def started(self, report: tasks.TaskStarted) -> None:
        """Held STARTED_DELAY: a step that ends sooner sends no StartTask at all."""
        request = ws.StartTaskRequest(started=report)
        _STARTS.hold(id(self), lambda: self._report(self._stub.StartTask, request))

    def metadata(self, report: tasks.TaskMetadata) -> None:
        self._report(self._stub.LogMetadata, ws.LogMetadataRequest(metadata=report))

    def logs(self, report: tasks.TaskLogs) -> None:
        with self._lock:
            self._batch = report.batch or self._batch + 1
            batch = self._batch
        chunk = ws.LogChunk(stream=report.stream, text=report.text)
        self._report(
            self._stub.AppendLogs,
            ws.AppendLogsRequest(token=report.token, batch=batch, chunks=[chunk]),
        )

    def completed(self, report: tasks.TaskCompleted) -> None:
        _STARTS.drop(id(self))
        self._report(self._stub.CompleteTask, ws.CompleteTaskRequest(completed=report))

    def failed(self, report: tasks.TaskFailed) -> None:
        _STARTS.drop(id(self))
        self._report(self._stub.FailTask, ws.FailTaskRequest(failed=report))

    def heartbeat(self, token: tasks.LeaseToken) -> float:
        """One Heartbeat call (the executor's lease thread retries): the lease's new length.

        Raises:
            Cancelled: the answer says stop.
            LeaseLost: the token is stale.
            grpc.RpcError: the call did not get through.
        """
        sent = time.monotonic()
        timeout = max(0.5, min(CALL_SECONDS, self.expires - sent))
        try:
            answer = self._client.call(
                self._stub.Heartbeat, ws.HeartbeatRequest(token=token), timeout
            )
        except grpc.RpcError as exc:
            self._refused(exc)
            raise
        if answer.cancel_requested:
            raise Cancelled("the control plane asked it to stop (run cancelled or timed out)")
        lease = answer.lease_seconds or self._lease
        self.expires = sent + lease
        if self._on_renewed is not None:
            self._on_renewed(self.expires)
        return float(lease)

    def _report(self, method: Callable[..., Any], request: Any) -> None:
        if self._lost:
            raise LeaseLost(self._lost)
        backoff = Backoff()
        while True:
            try:
                self._client.call(method, request, CALL_SECONDS)
                return
            except grpc.RpcError as exc:
                self._refused(exc)
                if code_of(exc) not in TRANSIENT:
                    raise errors.RpcError(
                        f"{code_of(exc).name}: {details(exc)}", code_of(exc).name
                    ) from None
                wait = backoff.next()
                if time.monotonic() + wait >= self.expires:
                    self._lost = (
                        f"the control plane at {self._client.address} could not be reached "
                        f"({code_of(exc).name}) before the lease ran out"
                    )
                    raise LeaseLost(self._lost) from None
                time.sleep(wait)

    def _refused(self, exc: grpc.RpcError) -> None:
        if code_of(exc) == grpc.StatusCode.FAILED_PRECONDITION and reason(exc) == "LEASE_LOST":
            self._lost = details(exc) or "the lease token is no longer current"
            raise LeaseLost(self._lost) from None
