"""Live logs: what a step prints reaches its followers while the step runs, and stays stored when
its worker is killed. Real workers, a real daemon, real signals; every wait is on a file or a
line, never on the clock.
"""

from __future__ import annotations

import contextlib
import math
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, Any

import pytest
from processes import DEADLINE, spawned, wait_for
from test_security import Daemon

import plait
from plait._models import LogEntry
from plait.api.v1 import task_service_pb2 as tasks
from plait.runners.worker._execute import LOG_CHUNK_BYTES, _Capture, _whole_chars

PLAIT = str(Path(sys.executable).parent / "plait")

# ---- steps (module level, so that worker processes import them) ----


def _wait_for_file(path: str) -> None:
    deadline = time.monotonic() + 600  # a hang guard only: the test creates the file
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise TimeoutError(f"nobody created {path}")
        time.sleep(0.02)


@plait.step(cache=False)
def talk(gate: str) -> str:
    # no flush: stdout is block-buffered into the capture file, the worker must flush it
    print("hello from a running step")
    print("and to stderr", file=sys.stderr)
    _wait_for_file(gate)
    print("bye")
    return "done"


@plait.pipeline
def chatty(gate: str) -> None:
    talk(gate)


@plait.step(cache=False)
def doomed(pid_file: str) -> int:
    ctx = plait.get_step_context()
    print(f"attempt {ctx.attempt} was here")
    if ctx.attempt == 1:
        Path(pid_file).write_text(str(os.getpid()))
        _wait_for_file(pid_file + ".never")  # the test kills this worker instead
    return ctx.attempt


@plait.pipeline
def killed_mid_step(pid_file: str) -> None:
    doomed(pid_file)


# the same step as `talk`, in a file of its own for the daemon's runs
CHATTY = """
import os
import sys
import time
import plait

@plait.step(cache=False)
def talk(gate: str) -> str:
    print("hello from a running step")
    print("and to stderr", file=sys.stderr)
    deadline = time.monotonic() + 600  # a hang guard only: the test creates the gate
    while not os.path.exists(gate):
        if time.monotonic() > deadline:
            raise TimeoutError(f"nobody created {gate}")
        time.sleep(0.02)
    print("bye")
    return "done"

@plait.pipeline
def chatty(gate: str) -> None:
    talk(gate)
"""


# ---- fixtures ----


@pytest.fixture
def client(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[plait.Client]:
    monkeypatch.setenv("PLAIT_WORKERS", "1")
    monkeypatch.delenv("PLAIT_SERVER", raising=False)
    c = plait.Client(home=tmp_path / "home")
    try:
        yield c
    finally:
        c.shutdown()


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    d = Daemon(tmp_path / "server-home")
    try:
        yield d
    finally:
        d.stop()


class Lines:
    """The lines a child writes to a pipe, read by a thread (which closes the pipe at its end):
    `until` waits for one."""

    def __init__(self, pipe: IO[str]) -> None:
        self.seen: list[str] = []
        self._queue: queue.SimpleQueue[str | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._read, args=(pipe,), daemon=True)
        self._thread.start()

    def _read(self, pipe: IO[str]) -> None:
        with pipe:
            for line in pipe:
                self._queue.put(line)
        self._queue.put(None)

    def until(self, text: str) -> None:
        """Reads lines until one contains `text` (a hang guard fails the test)."""
        end = time.monotonic() + DEADLINE
        while not any(text in line for line in self.seen):
            try:
                line = self._queue.get(timeout=max(0.0, end - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"no line with {text!r} in {self.seen}") from None
            if line is None:
                raise AssertionError(f"the output ended without {text!r}: {self.seen}")
            self.seen.append(line)

    def rest(self) -> str:
        """Everything, once the child has closed the pipe."""
        self._thread.join(DEADLINE)
        while True:
            try:
                line = self._queue.get_nowait()
            except queue.Empty:
                break
            if line is not None:
                self.seen.append(line)
        return "".join(self.seen)


class Child:
    """A command in a process group of its own, its stdout and stderr read line by line; on
    exit the group is killed and the pipes are read to their end, whatever happened."""

    def __init__(self, args: Sequence[str | Path], **kwargs: Any) -> None:
        self._spawned = spawned(
            args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs
        )

    def __enter__(self) -> Child:
        self.proc = self._spawned.__enter__()
        assert self.proc.stdout is not None and self.proc.stderr is not None
        self.stdout = Lines(self.proc.stdout)
        self.stderr = Lines(self.proc.stderr)
        return self

    def __exit__(self, *exc: Any) -> None:
        try:
            self._spawned.__exit__(*exc)
        finally:
            self.stdout.rest()
            self.stderr.rest()

    def wait(self) -> int:
        """The exit status (a hang guard fails the test, with the child's Python stacks when it
        registered faulthandler for SIGUSR1, as the scripts of these tests do)."""
        try:
            return self.proc.wait(timeout=DEADLINE)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGUSR1)
            time.sleep(1)
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(
                f"{self.proc.args} hung; its stderr:\n{self.stderr.rest()}"
            ) from None


# ---- the step's output reaches followers while it runs ----


def test_a_running_steps_output_reaches_the_sdk_follower(
    client: plait.Client, tmp_path: Path
) -> None:
    gate = tmp_path / "gate"
    run = chatty.run({"gate": str(gate)}, client=client, wait=False)
    entries: list[LogEntry] = []
    for entry in client.stream_logs(run.run_id, "talk"):
        entries.append(entry)
        if "hello from a running step" in entry.text:
            # the step cannot end before the gate exists: it was running when the line came
            gate.touch()
    assert gate.exists(), entries
    assert client.wait(run.run_id).status == "SUCCEEDED"
    stdout = "".join(e.text for e in entries if e.stream == "stdout")
    stderr = "".join(e.text for e in entries if e.stream == "stderr")
    assert stdout == "hello from a running step\nbye\n"
    assert stderr == "and to stderr\n"
    assert all(e.text.endswith("\n") for e in entries)  # whole lines
    sequences = [e.sequence for e in entries]
    assert sequences == sorted(set(sequences))
    # the store holds the same entries: following and reading agree
    assert [e.text for e in client.logs(run.run_id, "talk")] == [e.text for e in entries]
    # resuming after an entry gives what came after it, nothing before
    resumed = list(client.stream_logs(run.run_id, "talk", after_sequence=entries[0].sequence))
    assert [e.sequence for e in resumed] == sequences[1:]


def test_runs_logs_follow_and_plait_run_print_lines_while_the_step_runs(
    daemon: Daemon, tmp_path: Path
) -> None:
    env = daemon.client_env()
    script = tmp_path / "chatty.py"
    script.write_text(CHATTY, encoding="utf-8")
    gate = tmp_path / "gate"
    started = subprocess.run(
        [PLAIT, "run", f"{script}:chatty", "-p", f"gate={gate}", "--detach"],
        env=env,
        capture_output=True,
        text=True,
        timeout=DEADLINE,
    )
    assert started.returncode == 0, started.stderr
    run_id = started.stdout.strip()
    client = plait.Client(daemon.address, token=daemon.credential)
    try:
        with Child([PLAIT, "runs", "logs", run_id, "--follow"], env=env) as follower:
            follower.stdout.until("hello from a running step")
            gate.touch()  # the step may end only now
            assert follower.wait() == 0
            text = follower.stdout.rest()
            assert text == "--- talk (attempt 1)\nhello from a running step\nbye\n", text
            assert "and to stderr" in follower.stderr.rest()
        assert client.wait(run_id).status == "SUCCEEDED"

        # `plait run` prints each step's lines, prefixed by the step, while the step runs
        gate2 = tmp_path / "gate2"
        with Child(
            [PLAIT, "run", f"{script}:chatty", "-p", f"gate={gate2}"], env=env, cwd=tmp_path
        ) as runner:
            runner.stdout.until("talk | hello from a running step")
            gate2.touch()
            assert runner.wait() == 0, runner.stderr.rest()
            text = runner.stdout.rest()
            assert "talk | bye\n" in text and "SUCCEEDED" in text
            assert text.index("talk | bye") < text.index("SUCCEEDED")  # logs before the summary
            assert "talk | and to stderr" in runner.stderr.rest()
    finally:
        client.close()


# ---- a killed worker's output stays ----


def test_a_worker_killed_mid_step_leaves_what_it_printed(
    client: plait.Client, tmp_path: Path
) -> None:
    pid_file = tmp_path / "pid"
    run = killed_mid_step.run({"pid_file": str(pid_file)}, client=client, wait=False)
    for entry in client.stream_logs(run.run_id, "doomed"):
        if "attempt 1 was here" in entry.text:
            # stored while the step runs; now its worker dies mid-step
            wait_for(pid_file.exists, "the step writing its pid")
            os.kill(int(pid_file.read_text()), signal.SIGKILL)
            break
    done = client.wait(run.run_id)
    assert done.status == "SUCCEEDED"
    assert done.steps["doomed"].attempt == 2
    by_attempt: dict[int, str] = {}
    for e in client.logs(run.run_id, "doomed"):
        by_attempt[e.attempt] = by_attempt.get(e.attempt, "") + e.text
    assert by_attempt == {1: "attempt 1 was here\n", 2: "attempt 2 was here\n"}


# ---- the capture itself: batches, lines, characters, the limit ----


class Collect:
    """A Reporter that keeps the TaskLogs it is given (from any thread)."""

    def __init__(self) -> None:
        self.got: list[tasks.TaskLogs] = []
        self.lock = threading.Lock()

    def started(self, report: Any) -> None: ...
    def metadata(self, report: Any) -> None: ...
    def completed(self, report: Any) -> None: ...
    def failed(self, report: Any) -> None: ...
    def heartbeat(self, token: Any) -> float:
        return math.inf

    def logs(self, report: tasks.TaskLogs) -> None:
        with self.lock:
            self.got.append(report)

    def text(self, stream: str) -> str:
        with self.lock:
            return "".join(r.text for r in self.got if r.stream == stream)


_CAPTURES: list[_Capture] = []


def _capture(write: Any, limit: int, *, live: Any = None) -> Collect:
    """Runs `write()` and then `live(reporter)` under a capture of this process's fds 1 and 2,
    as a step would, and reports; returns what was reported."""
    reporter = Collect()
    if not _CAPTURES:  # one per process, as the executor keeps it (its thread lives on)
        _CAPTURES.append(_Capture())
    capture = _CAPTURES[0]
    token = tasks.LeaseToken(run_id="r", step_id="s", attempt=1)
    with capture.follow(token, limit, reporter):
        write()
        if live is not None:
            live(reporter)
    capture.report()
    return reporter


def test_a_short_steps_output_is_one_batch_per_stream_numbered_from_one() -> None:
    def write() -> None:
        os.write(1, b"one\ntwo\n")
        os.write(2, b"oops\n")

    got = _capture(write, 1000)
    assert [(r.stream, r.text, r.batch) for r in got.got] == [
        ("stdout", "one\ntwo\n", 1),
        ("stderr", "oops\n", 2),
    ]


def test_a_running_steps_output_is_sent_live_in_whole_lines() -> None:
    euro = "\N{EURO SIGN}".encode()
    sent: list[str] = []

    def live(reporter: Collect) -> None:
        os.write(1, b"first line\nhalf a li")
        # the tail thread sends the whole line, and holds the unfinished one back
        wait_for(lambda: bool(reporter.text("stdout")), "output sent while the step runs")
        sent.append(reporter.text("stdout"))
        # a line left unfinished goes as it is, after an interval
        wait_for(lambda: reporter.text("stdout").endswith("li"), "the unfinished line sent")
        os.write(1, b"ne\nhalf a character: " + euro[:1])
        wait_for(lambda: reporter.text("stdout").endswith(": "), "all but the torn character")
        os.write(1, euro[1:] + b"\n")

    got = _capture(lambda: None, 10_000, live=live)
    assert sent == ["first line\n"]
    assert got.text("stdout") == "first line\nhalf a line\nhalf a character: \N{EURO SIGN}\n"
    assert "\ufffd" not in "".join(r.text for r in got.got)  # no batch split the character
    assert [r.batch for r in got.got] == list(range(1, len(got.got) + 1))


def test_the_limit_holds_for_output_sent_live_and_after() -> None:
    big = b"x" * 99 + b"\n"

    def live(reporter: Collect) -> None:
        for _ in range(30):
            os.write(1, big)  # 3,000 bytes of stdout: past half the limit of 2,000
        wait_for(lambda: len(reporter.text("stdout")) >= 1000, "stdout sent live")
        os.write(2, b"the end\n")

    got = _capture(lambda: None, 2000, live=live)
    stdout, stderr = got.text("stdout"), got.text("stderr")
    assert stderr == "the end\n"  # the small stream is kept whole
    kept = stdout[: stdout.index("\n[plait:")]
    assert len(kept) + len(stderr) == 2000
    assert kept == ("x" * 99 + "\n") * 19 + "x" * 92
    assert stdout.endswith("\n[plait: 1008 B of stdout dropped; the log keeps the first 1.9 KiB]\n")
    assert [r.batch for r in got.got] == list(range(1, len(got.got) + 1))
    assert max(len(r.text.encode()) for r in got.got) <= LOG_CHUNK_BYTES


def test_cuts_never_split_a_character() -> None:
    euro = "\N{EURO SIGN}".encode()  # 3 bytes
    assert _whole_chars(b"ab" + euro) == 5
    assert _whole_chars(b"ab" + euro[:2]) == 2
    assert _whole_chars(b"ab" + euro[:1]) == 2
    assert _whole_chars(b"\xff\xfe") == 2  # not UTF-8: cut anywhere
    assert _whole_chars(b"") == 0

    def write() -> None:
        os.write(1, euro * 1000)  # 3,000 bytes, no line end; the limit cuts inside a character

    got = _capture(write, 1000)
    text = got.text("stdout")
    assert text.startswith("\N{EURO SIGN}" * 333 + "\n[plait:")  # 999 bytes, not 1,000
    assert "\ufffd" not in text
