"""The Connect stream's reporter: which reports go out, in which order, and when a TaskStarted is
held back (no process, no control plane: the test reads the requests as grpc would)."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator

from plait.api.v1 import task_service_pb2 as tasks
from plait.runners.worker._stream import StreamReporter

TOKEN = tasks.LeaseToken(run_id="r", step_id="s", attempt=1)
HANG = 30.0
"""A guard against a hang, not an expectation of speed."""


def _start() -> tasks.TaskStarted:
    report = tasks.TaskStarted(token=TOKEN)
    report.start_time.seconds = 1
    return report


def _logs(text: str, batch: int) -> tasks.TaskLogs:
    return tasks.TaskLogs(token=TOKEN, stream="stdout", text=text, batch=batch)


def _done() -> tasks.TaskCompleted:
    return tasks.TaskCompleted(token=TOKEN, start_time=_start().start_time)


def _kinds(requests: list[tasks.ConnectRequest]) -> list[str]:
    return [str(r.WhichOneof("kind")) for r in requests]


class Reader:
    """Reads `requests()` in a thread of its own, as grpc does."""

    def __init__(self, reporter: StreamReporter) -> None:
        self.got: queue.Queue[tasks.ConnectRequest] = queue.Queue()
        self._requests: Iterator[tasks.ConnectRequest] = reporter.requests()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        for request in self._requests:
            self.got.put(request)

    def next(self) -> tasks.ConnectRequest:
        return self.got.get(timeout=HANG)

    def join(self) -> None:
        self._thread.join(HANG)
        assert not self._thread.is_alive()


def test_a_step_that_ends_before_its_start_is_due_sends_its_logs_and_completion_only() -> None:
    reporter = StreamReporter()
    reporter.started(_start())
    reporter.logs(_logs("hello\n", 1))
    reporter.completed(_done())
    reporter.close()
    sent = list(reporter.requests())
    assert _kinds(sent) == ["logs", "completed"]
    assert sent[0].logs.text == "hello\n"


def test_a_longer_step_sends_its_start_then_the_logs_held_behind_it() -> None:
    reporter = StreamReporter()
    reader = Reader(reporter)
    reporter.started(_start())  # the reader sleeps: this wakes it
    reporter.logs(_logs("early\n", 1))
    assert _kinds([reader.next(), reader.next()]) == ["started", "logs"]
    reporter.logs(_logs("late\n", 2))  # the start is out: logs go at once
    assert reader.next().logs.text == "late\n"
    reporter.completed(_done())
    assert _kinds([reader.next()]) == ["completed"]
    reporter.close()
    reader.join()


def test_the_next_steps_start_is_sent_when_the_reader_was_not_woken_for_it() -> None:
    reporter = StreamReporter()
    reader = Reader(reporter)
    reporter.started(_start())
    reporter.completed(_done())  # in time: its start is left out
    assert _kinds([reader.next()]) == ["completed"]
    # the reader now looks by itself for a while after a step's end; either way the next
    # step's start goes out once due
    for _ in range(3):
        reporter.started(_start())
        assert _kinds([reader.next()]) == ["started"]
        reporter.completed(_done())
        assert _kinds([reader.next()]) == ["completed"]
    reporter.close()
    reader.join()


def test_metadata_and_heartbeats_send_the_held_start_first() -> None:
    reporter = StreamReporter()
    reporter.started(_start())
    reporter.logs(_logs("a\n", 1))
    reporter.metadata(tasks.TaskMetadata(token=TOKEN, output="out", json="{}"))
    reporter.heartbeat(TOKEN)
    reporter.failed(tasks.TaskFailed(token=TOKEN, start_time=_start().start_time))
    reporter.close()
    assert _kinds(list(reporter.requests())) == [
        "started",
        "logs",
        "metadata",
        "heartbeat",
        "failed",
    ]
