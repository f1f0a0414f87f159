"""The TaskService.Connect transport: one bidirectional stream per worker process.

Tasks arrive as ConnectResponses; every report leaves as a ConnectRequest on the same stream,
which costs far less than a unary call per report (see DESIGN.md, "Performance budget").
"""

from __future__ import annotations

import math
import os
import queue
import socket
import threading
import time
from collections.abc import Iterator

import grpc

from plait.api.v1 import task_service_pb2 as tasks
from plait.api.v1 import task_service_pb2_grpc as tasks_grpc
from plait.runners.worker._execute import StepExecutor

STARTED_DELAY = 0.005
"""How long a step's TaskStarted report waits for the step to end (and be left out)."""
IDLE_POLLS = 20
"""Looks, STARTED_DELAY apart, that the request thread takes after a step ends before it sleeps
until a report wakes it (see `StreamReporter.requests`)."""

_WAKE = tasks.ConnectRequest()
"""Queued to wake the request thread for a held TaskStarted; never sent."""


class StreamReporter:
    """A Reporter that queues ConnectRequests for `requests` to send on the stream.

    The executor runs in the thread that reads the stream's responses while grpc pulls the
    requests from another thread: the queue is what hands reports from one to the other.

    A step's TaskStarted is held here, not queued: a step done within STARTED_DELAY sends only
    its completion, which carries the start time (one commit on the control plane, not two).
    The logs that come meanwhile wait behind it (they never force it out); any other report
    sends it first, and a completion or failure drops it.
    """

    def __init__(self) -> None:
        self._out: queue.SimpleQueue[tasks.ConnectRequest | None] = queue.SimpleQueue()
        # guards what follows, and every put, so that reports from the step's, the log tail's
        # and the lease's threads keep their order
        self._lock = threading.Lock()
        self._held: tasks.TaskStarted | None = None
        """The TaskStarted held (made a ConnectRequest only if it is sent: most are not)."""
        self._deadline = 0.0
        """When the held TaskStarted goes out (time.monotonic)."""
        self._behind: list[tasks.ConnectRequest] = []
        """The logs that came while the TaskStarted is held."""
        self._wake_at = math.inf
        """When the request thread looks for a held TaskStarted by itself (inf: only when
        something is queued)."""
        self._polls = 0
        """Looks the request thread has left before it sleeps (it alone uses this)."""

    def send(self, request: tasks.ConnectRequest) -> None:
        """Queues a request to send on the stream (after the held TaskStarted, if any)."""
        self._put(request)

    def close(self) -> None:
        """Ends the stream of requests once the queued ones are sent."""
        self._out.put(None)

    def started(self, report: tasks.TaskStarted) -> None:
        with self._lock:
            self._release(send_held=True)  # never two held: a step starts after the last ended
            self._held, self._deadline = report, time.monotonic() + STARTED_DELAY
            if self._wake_at > self._deadline:  # it would not look in time by itself
                self._out.put(_WAKE)

    def metadata(self, report: tasks.TaskMetadata) -> None:
        self._put(tasks.ConnectRequest(metadata=report))

    def logs(self, report: tasks.TaskLogs) -> None:
        request = tasks.ConnectRequest(logs=report)
        with self._lock:
            if self._held is not None:
                self._behind.append(request)
            else:
                self._out.put(request)

    def completed(self, report: tasks.TaskCompleted) -> None:
        self._put(tasks.ConnectRequest(completed=report), ends_step=True)

    def failed(self, report: tasks.TaskFailed) -> None:
        self._put(tasks.ConnectRequest(failed=report), ends_step=True)

    def heartbeat(self, token: tasks.LeaseToken) -> float:
        """Sends a TaskHeartbeat. The stream has no answer to it: a cancellation arrives on the
        stream, and this process dies with the control plane that started it, so the lease
        never has to be given up from here (an infinite lease)."""
        self._put(tasks.ConnectRequest(heartbeat=tasks.TaskHeartbeat(token=token)))
        return math.inf

    def _put(self, request: tasks.ConnectRequest, *, ends_step: bool = False) -> None:
        with self._lock:
            # the step ended in time: its TaskStarted is left out
            self._release(send_held=not ends_step)
            self._out.put(request)

    def _release(self, *, send_held: bool) -> None:
        """Queues the held TaskStarted (or drops it) and the logs behind it (holding the lock)."""
        if self._held is not None:
            if send_held:
                self._out.put(tasks.ConnectRequest(started=self._held))
            for request in self._behind:
                self._out.put(request)
            self._held, self._behind = None, []

    def requests(self) -> Iterator[tasks.ConnectRequest]:
        """The stream's messages, until `close`.

        The thread that runs this (grpc's) sends a held TaskStarted once its STARTED_DELAY is
        over. It is not woken when a step starts (that would cost every step two thread
        switches): for IDLE_POLLS looks after a step ends it waits at most STARTED_DELAY for the
        next report, so it finds a step that started meanwhile in time by itself; after that it
        sleeps until `started` wakes it.
        """
        while True:
            due: list[tasks.ConnectRequest] = []
            timeout: float | None = None
            with self._lock:
                now = time.monotonic()
                if self._held is not None:
                    # a step runs: the next can only start after its end, which is queued
                    self._polls = 0
                    if now >= self._deadline:
                        due = [tasks.ConnectRequest(started=self._held), *self._behind]
                        self._held, self._behind = None, []
                    timeout = max(0.0, self._deadline - now)
                elif self._polls > 0:
                    self._polls -= 1
                    timeout = STARTED_DELAY
                self._wake_at = math.inf if timeout is None else now + timeout
            if due:
                yield from due
                continue
            try:
                request = self._out.get(timeout=timeout)
            except queue.Empty:
                continue
            if request is None:
                return
            if request is _WAKE:
                continue
            if request.HasField("completed") or request.HasField("failed"):
                self._polls = IDLE_POLLS  # the next step may start any moment
            yield request


def serve(address: str, *, worker_id: str, runner: str) -> None:
    """Connects to the control plane and runs the tasks it assigns until the stream ends.

    The bearer token, when there is one, comes from ``PLAIT_WORKER_TOKEN`` (set by the runner
    that started this process), so it never shows on a command line.

    Args:
        address: the control plane's ``host:port``.
        worker_id: the id the runner gave this worker.
        runner: the name of the runner this worker belongs to.

    Raises:
        grpc.RpcError: the stream failed other than by being cancelled or unavailable.
    """
    reporter = StreamReporter()
    executor = StepExecutor()
    reporter.send(
        tasks.ConnectRequest(
            hello=tasks.WorkerHello(
                worker_id=worker_id,
                runner=runner,
                pid=os.getpid(),
                hostname=socket.gethostname(),
            )
        )
    )
    with grpc.insecure_channel(address) as channel:
        stub = tasks_grpc.TaskServiceStub(channel)
        try:
            token = os.environ.get("PLAIT_WORKER_TOKEN", "")
            metadata = [("authorization", f"Bearer {token}")] if token else None
            for response in stub.Connect(reporter.requests(), metadata=metadata):
                if response.HasField("assign"):
                    executor.run(response.assign, reporter)
        except grpc.RpcError as exc:
            if exc.code() not in (grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE):
                raise
        finally:
            reporter.close()
