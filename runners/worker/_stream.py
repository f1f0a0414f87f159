"""The TaskService.Connect transport: one bidirectional stream per worker process.

Tasks arrive as ConnectResponses; every report leaves as a ConnectRequest on the same stream,
which costs far less than a unary call per report (see DESIGN.md, "Performance budget").
"""

from __future__ import annotations

import math
import os
import queue
import socket
import time
from collections.abc import Iterator

import grpc

from plait.api.v1 import task_service_pb2 as tasks
from plait.api.v1 import task_service_pb2_grpc as tasks_grpc
from plait.runners.worker._execute import StepExecutor

STARTED_DELAY = 0.005
"""How long a step's TaskStarted report waits for the step to end (and be left out)."""

# the reports that end a step (see Reporter): each carries the step's start time
_ENDS_STEP = frozenset({"completed", "failed"})


class StreamReporter:
    """A Reporter that queues ConnectRequests for `requests` to send on the stream.

    The executor runs in the thread that reads the stream's responses while grpc pulls the
    requests from another thread: the queue is what hands reports from one to the other.
    """

    def __init__(self) -> None:
        self._out: queue.SimpleQueue[tasks.ConnectRequest | None] = queue.SimpleQueue()

    def send(self, request: tasks.ConnectRequest) -> None:
        """Queues a request to send on the stream."""
        self._out.put(request)

    def close(self) -> None:
        """Ends the stream of requests once the queued ones are sent."""
        self._out.put(None)

    def started(self, report: tasks.TaskStarted) -> None:
        self.send(tasks.ConnectRequest(started=report))

    def metadata(self, report: tasks.TaskMetadata) -> None:
        self.send(tasks.ConnectRequest(metadata=report))

    def logs(self, report: tasks.TaskLogs) -> None:
        self.send(tasks.ConnectRequest(logs=report))

    def completed(self, report: tasks.TaskCompleted) -> None:
        self.send(tasks.ConnectRequest(completed=report))

    def failed(self, report: tasks.TaskFailed) -> None:
        self.send(tasks.ConnectRequest(failed=report))

    def heartbeat(self, token: tasks.LeaseToken) -> float:
        """Sends a TaskHeartbeat. The stream has no answer to it: a cancellation arrives on the
        stream, and this process dies with the control plane that started it, so the lease
        never has to be given up from here (an infinite lease)."""
        self.send(tasks.ConnectRequest(heartbeat=tasks.TaskHeartbeat(token=token)))
        return math.inf

    def requests(self) -> Iterator[tasks.ConnectRequest]:
        """The stream's messages, until `close`.

        A step's TaskStarted waits STARTED_DELAY seconds: a step done by then sends only its
        completion, which carries the start time (one commit on the control plane, not two).
        Its logs wait behind it (they never force it out): they go just before the completion,
        or just after the TaskStarted once the delay is over.
        """
        held: tasks.ConnectRequest | None = None
        behind: list[tasks.ConnectRequest] = []  # the logs that came while `held` waits
        deadline = 0.0
        while True:
            try:
                timeout = None if held is None else max(0.0, deadline - time.monotonic())
                request = self._out.get(timeout=timeout)
            except queue.Empty:
                assert held is not None
                yield held
                yield from behind
                held, behind = None, []
                continue
            if request is None:
                return
            kind = request.WhichOneof("kind")
            if kind == "started":
                held, deadline = request, time.monotonic() + STARTED_DELAY
                continue
            if held is not None:
                if kind == "logs":
                    behind.append(request)
                    continue
                if kind not in _ENDS_STEP:
                    yield held  # anything else (metadata) is reported after the start
                # else the step ended in time: its TaskStarted is left out
                yield from behind
                held, behind = None, []
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
