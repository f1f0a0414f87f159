"""``plait worker``: a remote worker that pulls the steps of a pool from a control plane.

The worker is a supervisor process with N slots (``--concurrency``). Each slot owns one warm
child process (``python -m plait.runners.worker._remote``, started ahead of its first task,
so a task does not wait for Python and Plait to import) and loops: long-poll PollTask for a
task of the pool, hand it to the child, watch it, poll again. The child runs the task with the
one step-execution core (`StepExecutor`), reports straight to the control plane over
WorkerService (`UnaryReporter`), keeps the lease with its heartbeats and tells the supervisor
through a pipe when the step started, each time its lease was renewed, and how the task ended.

With several replicas of the control plane (``--server a:7676,b:7676``), each slot polls them
in turn (at most REPLICA_POLL_SECONDS on each), so the worker serves the runs of every replica;
a task's reports go to the replica that leased it, and to another one when that one is gone
(see replica_targets).

The supervisor is what enforces the limits a stuck step cannot enforce on itself (a step in C
code that holds the GIL sends no heartbeat and runs no Python): it SIGKILLs a child once the
step's timeout has passed, and once the child's lease has run out without a renewal, then
starts a fresh child for the slot. The control plane fails or retries the attempt on its own.

Children die with the supervisor (``PR_SET_PDEATHSIG`` on Linux; elsewhere a child finds its
pipe broken at its next heartbeat) and ignore SIGINT and SIGTERM: stopping is the supervisor's
decision. SIGTERM or SIGINT drains: polling stops, running steps finish (for at most the drain
timeout, then they are killed and their leases left to run out), a task leased but not handed
to a child is handed back (ReleaseTask), and the worker exits 0. A second signal stops at once.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import grpc

from plait._channel import ChannelConfig
from plait.api.v1 import task_service_pb2 as tasks
from plait.runners.worker._lease import (
    EXIT_CANCELLED,
    EXIT_LEASE_LOST,
    Cancelled,
    LeaseLost,
    describe,
    die_with_parent,
)
from plait.runners.worker._unary import (
    REFUSED,
    TRANSIENT,
    Backoff,
    UnaryReporter,
    WorkerClient,
    code_of,
    details,
    refused_message,
    remote_artifacts,
)

EXIT_REFUSED = 1
"""Exit code of a worker the control plane refused (credential, role, unknown service)."""
DRAIN_SECONDS = 60.0
"""How long a draining worker lets its running steps finish, by default."""
POLL_SECONDS = 20.0
"""How long one PollTask waits for a task (the control plane answers empty after it)."""
KILL_SLACK = 0.5
"""How long past a lease's end (or a step's timeout) a child gets to stop itself before the
supervisor kills it."""
_TICK = 0.5
"""The longest the supervisor's threads sleep without looking at their flags."""

# the pipes between supervisor and child carry frames: kind (1 byte), length (4 bytes), payload
_HEADER = struct.Struct(">cI")
_TASK = b"T"  # supervisor -> child: leased_at (double, monotonic clock), replica (int) + Task
_STARTED = b"S"  # child -> supervisor: the step's code starts (the task can no longer go back)
_RENEWED = b"H"  # child -> supervisor: the lease now ends at (double, monotonic clock)
_DONE = b"D"  # child -> supervisor: outcome (1 byte: 0, 1, EXIT_*) + a few words for the log
_STAMP = struct.Struct(">d")
_HANDOFF = struct.Struct(">dI")
REPLICA_POLL_SECONDS = 5.0
"""The longest PollTask wait when the worker serves several replicas: a slot waits on one of
them at a time, then moves on to the next."""


def replica_targets(server: str) -> list[str]:
    """One address list per replica of ``server`` (comma-separated), each starting with that
    replica and going on with the others: a channel to it talks to that replica while it
    answers, and to another when it is gone. A single address gives itself."""
    replicas = [a.strip() for a in server.split(",") if a.strip()]
    return [",".join(replicas[k:] + replicas[:k]) for k in range(len(replicas))] or [server]


_OK, _ERROR = 0, 1


def _write_frame(fd: int, kind: bytes, payload: bytes = b"") -> None:
    data = _HEADER.pack(kind, len(payload)) + payload
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _read_exactly(fd: int, n: int) -> bytes | None:
    parts, left = [], n
    while left:
        chunk = os.read(fd, left)
        if not chunk:
            return None
        parts.append(chunk)
        left -= len(chunk)
    return b"".join(parts)


def _read_frame(fd: int) -> tuple[bytes, bytes] | None:
    """The next frame, or None at the end of the pipe."""
    header = _read_exactly(fd, _HEADER.size)
    if header is None:
        return None
    kind, size = _HEADER.unpack(header)
    payload = _read_exactly(fd, size) if size else b""
    if payload is None:
        return None
    return bytes(kind), payload


def _log(line: str) -> None:
    """One line on standard error: ``plait worker 12:00:01 LINE``."""
    sys.stderr.write(f"plait worker {time.strftime('%H:%M:%S')} {line}\n")
    sys.stderr.flush()


def default_worker_id() -> str:
    """``HOSTNAME-PID``: unique among the workers of a pool."""
    return f"{socket.gethostname()}-{os.getpid()}"


@dataclass(frozen=True)
class WorkerOptions:
    """What ``plait worker`` was asked to do."""

    server: str
    """The control plane's ``HOST:PORT``."""
    pool: str
    """The pool whose steps this worker runs."""
    concurrency: int = 1
    """The most steps at once (one child process each)."""
    worker_id: str = ""
    """The lease holder's name (default: `default_worker_id`)."""
    drain_timeout: float = DRAIN_SECONDS
    """How long running steps may finish after SIGTERM."""
    poll_seconds: float = POLL_SECONDS
    """How long one PollTask waits."""
    artifacts: str = "auto"
    """Where artifacts are read and written: ``remote`` (through the control plane),
    ``local`` (the store path a task names), ``auto`` (local for a control plane on loopback)."""


# ---- the supervisor ----


class _Child:
    """A warm child process and the two pipes to it."""

    def __init__(self, options: WorkerOptions, worker_id: str) -> None:
        task_read, self.tasks = os.pipe()
        self.events, event_write = os.pipe()
        env = {**os.environ, "PLAIT_WORKER_ID": worker_id}
        try:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "plait.runners.worker._remote",
                    "--server",
                    options.server,
                    "--tasks",
                    str(task_read),
                    "--events",
                    str(event_write),
                    "--parent",
                    str(os.getpid()),
                    "--artifacts",
                    options.artifacts,
                ],
                pass_fds=(task_read, event_write),
                stdin=subprocess.DEVNULL,
                env=env,
            )
        finally:
            os.close(task_read)
            os.close(event_write)
        self.pid = self.proc.pid

    def send(self, task: tasks.Task, leased_at: float, replica: int) -> bool:
        """Hands the child a task (leased from the replica of that index); False when the
        child is gone."""
        try:
            payload = _HANDOFF.pack(leased_at, replica) + task.SerializeToString()
            _write_frame(self.tasks, _TASK, payload)
        except OSError:
            return False
        return True

    def event(self, timeout: float) -> tuple[bytes, bytes] | bool | None:
        """The child's next message; False when none came within `timeout` seconds; None
        when the child is gone."""
        ready, _, _ = select.select([self.events], [], [], max(0.0, timeout))
        if not ready:
            return False
        try:
            return _read_frame(self.events)
        except OSError:
            return None

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.proc.kill()

    def close(self, grace: float) -> int:
        """Ends the child: it exits when its task pipe closes; killed after `grace` seconds.
        Returns its exit code."""
        with contextlib.suppress(OSError):
            os.close(self.tasks)
        try:
            code = self.proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            self.kill()
            code = self.proc.wait()
        with contextlib.suppress(OSError):
            os.close(self.events)
        return code


def _how_it_ended(code: int) -> str:
    if code == EXIT_LEASE_LOST:
        return "it stopped itself: its lease was lost or could not be renewed"
    if code == EXIT_CANCELLED:
        return (
            "it stopped itself: the control plane cancelled the step (run cancelled or timed out)"
        )
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"it was killed by {signal.Signals(-code).name}"
        return f"it was killed by signal {-code}"
    return f"it exited with code {code}"


class _Fatal(Exception):
    """The worker cannot go on (refused, or the control plane does not serve workers)."""


class Supervisor:
    """Runs ``plait worker``: see the module's docstring.

    Args:
        options: the command line's options.
        config: how to reach the control plane (address, token, TLS).
    """

    def __init__(self, options: WorkerOptions, config: ChannelConfig) -> None:
        self.options = options
        self.worker_id = options.worker_id or default_worker_id()
        self.clients = [
            WorkerClient(replace(config, address=target))
            for target in replica_targets(config.address)
        ]
        """One client per replica of the control plane (see replica_targets): a slot polls
        them in turn, and a task's reports go through the client that leased it."""
        self.client = self.clients[0]
        self.draining = False
        self.hard: int = 0  # the signal that stopped the worker at once
        self._drain_end = float("inf")
        self._forced = False  # the drain timed out: the running steps were killed
        self._fatal = ""
        self._wake = threading.Event()
        self._lock = threading.Lock()
        self._reachable: bool | None = None
        self._slots: list[_Slot] = []

    def run(self) -> int:
        """Serves until drained; returns the exit code (0 drained, 1 refused, 128 + the
        signal number after a second signal)."""
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._on_signal)
        _log(
            f"{self.worker_id}: pool {self.options.pool!r}, {self.options.concurrency} step(s) "
            f"at once, control plane {self.client.address}"
        )
        self.client.channel.subscribe(self._on_connectivity, try_to_connect=True)
        self._slots = [_Slot(self, i) for i in range(self.options.concurrency)]
        for slot in self._slots:
            slot.thread.start()
        try:
            while any(slot.thread.is_alive() for slot in self._slots):
                self._wake.wait(_TICK)
                self._wake.clear()
                if self._fatal and not self.draining:
                    self.draining = True
                    self._cancel_polls()
                if self.draining and not self._forced and time.monotonic() > self._drain_end:
                    self._forced = True
                    running = sum(1 for slot in self._slots if slot.running)
                    _log(
                        f"drain timeout ({self.options.drain_timeout:g} s) reached: killing "
                        f"{running} running step(s); their leases will run out and the control "
                        f"plane will retry them"
                    )
                    self._stop_now(0)
        finally:
            for signum in (signal.SIGTERM, signal.SIGINT):
                signal.signal(signum, signal.SIG_DFL)
            self.client.channel.unsubscribe(self._on_connectivity)
            for client in self.clients:
                client.close()
        if self._fatal:
            _log(f"error: {self._fatal}")
            return EXIT_REFUSED
        if self.hard:
            _log("stopped")
            return 128 + self.hard
        _log("drained; exiting")
        return 0

    # -- events from the threads and signals

    def _on_signal(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if self.draining:
            _log(f"{name} again: stopping now, killing the running steps")
            self._stop_now(signum)
            return
        self.draining = True
        self._drain_end = time.monotonic() + self.options.drain_timeout
        running = sum(1 for slot in self._slots if slot.running)
        _log(
            f"{name}: draining: no more polling; waiting for {running} running step(s) "
            f"(up to {self.options.drain_timeout:g} s); send it again to stop now"
        )
        self._cancel_polls()
        self._wake.set()

    def _stop_now(self, signum: int) -> None:
        self.draining = True
        self.hard = signum or self.hard
        for slot in self._slots:
            slot.stop_now = True
            child = slot.child
            if child is not None:
                child.kill()
        self._cancel_polls()
        self._wake.set()

    def _cancel_polls(self) -> None:
        for slot in self._slots:
            slot.cancel_poll()

    def fatal(self, message: str) -> None:
        """A slot found that the worker cannot go on."""
        with self._lock:
            self._fatal = self._fatal or message
        self._wake.set()

    def _on_connectivity(self, state: grpc.ChannelConnectivity) -> None:
        if state == grpc.ChannelConnectivity.READY:
            self.reachable()
        elif state == grpc.ChannelConnectivity.TRANSIENT_FAILURE:
            self.unreachable("the connection failed")

    def reachable(self) -> None:
        """A call got through (logged once per outage)."""
        with self._lock:
            if self._reachable:
                return
            again = self._reachable is False
            self._reachable = True
        what = "reconnected to" if again else "connected to"
        _log(f"{what} {self.client.address}; polling pool {self.options.pool!r}")

    def unreachable(self, why: str) -> None:
        """A call did not get through (logged once per outage)."""
        with self._lock:
            if self._reachable is False:
                return
            self._reachable = False
        _log(f"cannot reach the control plane at {self.client.address} ({why}); retrying")

    def sleep(self, seconds: float) -> None:
        """Sleeps, waking early when the worker starts draining."""
        end = time.monotonic() + seconds
        while not self.draining and (left := end - time.monotonic()) > 0:
            time.sleep(min(left, _TICK))


class _Slot:
    """One task at a time, in one child process."""

    def __init__(self, supervisor: Supervisor, index: int) -> None:
        self.sup = supervisor
        self.index = index
        self.child: _Child | None = None
        self.turn = index
        """The replica (an index into the supervisor's clients) this slot polls next."""
        self.running = False
        self.stop_now = False
        self._poll: Any = None
        self._poll_lock = threading.Lock()
        self.thread = threading.Thread(target=self._run, name=f"plait-slot-{index}", daemon=True)

    def _run(self) -> None:
        try:
            self.child = _Child(self.sup.options, self.sup.worker_id)
            while not self.sup.draining:
                polled = self._next_task()
                if polled is None:
                    continue
                task, leased_at, replica = polled
                if self.sup.draining:
                    self._release(task, replica)
                    break
                self._execute(task, leased_at, replica)
        except _Fatal as exc:
            self.sup.fatal(str(exc))
        except Exception as exc:  # a bug: say it, and let the worker end
            self.sup.fatal(f"slot {self.index} failed: {type(exc).__name__}: {exc}")
        finally:
            child, self.child = self.child, None
            if child is not None:
                child.close(grace=5.0)
            self.sup._wake.set()

    def cancel_poll(self) -> None:
        """Cancels the PollTask in flight, if any (draining)."""
        with self._poll_lock:
            if self._poll is not None:
                self._poll.cancel()

    def _on_poll(self, future: Any) -> None:
        with self._poll_lock:
            self._poll = future
            if self.sup.draining:
                future.cancel()

    def _next_task(self) -> tuple[tasks.Task, float, int] | None:
        """One PollTask, with backoff after a failure; None when nothing came. With several
        replicas, each call goes to the next one in turn (waiting at most
        REPLICA_POLL_SECONDS); the task comes with the index of the replica that leased it."""
        backoff = Backoff(first=0.5, most=10.0)
        clients = self.sup.clients
        wait = self.sup.options.poll_seconds
        if len(clients) > 1:
            wait = min(wait, REPLICA_POLL_SECONDS)
        while not self.sup.draining:
            child = self.child
            assert child is not None
            replica = self.turn % len(clients)
            self.turn += 1
            try:
                task = clients[replica].poll(
                    self.sup.options.pool,
                    self.sup.worker_id,
                    wait=wait,
                    pid=child.pid,
                    on_call=self._on_poll,
                )
            except grpc.FutureCancelledError:
                return None
            except grpc.RpcError as exc:
                code = code_of(exc)
                if code == grpc.StatusCode.CANCELLED and self.sup.draining:
                    return None
                if code in REFUSED:
                    raise _Fatal(refused_message(exc, self.sup.client.address)) from None
                if code == grpc.StatusCode.UNIMPLEMENTED:
                    raise _Fatal(
                        f"the control plane at {self.sup.client.address} does not serve remote "
                        f"workers (WorkerService): is it an older Plait?"
                    ) from None
                if code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND):
                    raise _Fatal(f"PollTask refused: {code.name}: {details(exc)}") from None
                if code in TRANSIENT:
                    self.sup.unreachable(f"{code.name}: {details(exc)}")
                else:
                    _log(f"PollTask failed ({code.name}: {details(exc)}); retrying")
                self.sup.sleep(backoff.next())
                continue
            finally:
                with self._poll_lock:
                    self._poll = None
            self.sup.reachable()
            # the lease began when the control plane answered (it commits, then answers): a
            # long poll may have waited long before that
            return None if task is None else (task, time.monotonic(), replica)
        return None

    def _release(self, task: tasks.Task, replica: int) -> None:
        ok = self.sup.clients[replica].release(task.token)
        _log(
            f"handed back {describe(task.token)} (not started)"
            if ok
            else f"could not hand back {describe(task.token)}: its lease will run out"
        )

    def _replace_child(self) -> None:
        old, self.child = self.child, None
        if old is not None:
            old.kill()
            old.close(grace=5.0)
        if not self.sup.draining:
            self.child = _Child(self.sup.options, self.sup.worker_id)

    def _execute(self, task: tasks.Task, leased_at: float, replica: int) -> None:
        child = self.child
        assert child is not None
        what = describe(task.token)
        step = task.step.name or task.step.id
        if not child.send(task, leased_at, replica):
            _log(f"process {child.pid} of slot {self.index} is gone; a fresh one takes its place")
            self._replace_child()
            self._release(task, replica)
            return
        self.running = True
        try:
            self._watch(child, task, what, step, leased_at)
        finally:
            self.running = False

    def _watch(
        self, child: _Child, task: tasks.Task, what: str, step: str, leased_at: float
    ) -> None:
        _log(f"task started: {what} ({step}) in process {child.pid}")
        inf = float("inf")
        expires = leased_at + task.lease_seconds if task.lease_seconds > 0 else inf
        timeout = task.step.settings.timeout_seconds
        deadline = time.monotonic() + timeout + KILL_SLACK if timeout > 0 else inf
        while True:
            now = time.monotonic()
            if self.stop_now:
                _log(f"task stopped: {what}: process {child.pid} killed")
                self._replace_child()
                return
            if now > expires + KILL_SLACK:
                child.kill()
                _log(
                    f"lost lease: {what}: no renewal came from process {child.pid} before its "
                    f"lease ran out (stuck, or the control plane unreachable); killed it"
                )
                self._replace_child()
                return
            if now > deadline:
                child.kill()
                _log(
                    f"task timed out: {what} ran past its timeout of {timeout:g} s; "
                    f"killed process {child.pid}"
                )
                self._replace_child()
                return
            event = child.event(min(expires + KILL_SLACK, deadline, now + _TICK) - now)
            if event is False:
                continue
            if event is None:
                code = child.proc.wait()
                if code == EXIT_LEASE_LOST:
                    _log(f"lost lease: {what}: {_how_it_ended(code)}")
                else:
                    _log(f"task ended: {what}: process {child.pid} ended: {_how_it_ended(code)}")
                self._replace_child()
                return
            assert not isinstance(event, bool)
            kind, payload = event
            if kind == _RENEWED:
                (expires,) = _STAMP.unpack(payload)
            elif kind == _DONE:
                outcome, text = payload[0], payload[1:].decode(errors="replace")
                if outcome == _OK:
                    _log(f"task finished: {what}: {text}")
                elif outcome == EXIT_LEASE_LOST:
                    _log(f"lost lease: {what}: {text}; nothing more it reported counted")
                elif outcome == EXIT_CANCELLED:
                    _log(f"task cancelled: {what}: {text}")
                else:
                    _log(f"task not reported: {what}: {text}")
                return


# ---- the child ----


class _ChildReporter(UnaryReporter):
    """A UnaryReporter that also tells the supervisor of the step's start and each renewal."""

    def __init__(self, client: WorkerClient, task: tasks.Task, leased_at: float, fd: int) -> None:
        super().__init__(client, task, leased_at=leased_at, on_renewed=self._renewed)
        self._fd = fd
        self.outcome = ""

    def _tell(self, kind: bytes, payload: bytes = b"") -> None:
        try:
            _write_frame(self._fd, kind, payload)
        except OSError:  # the supervisor is gone: nobody would watch this step
            raise LeaseLost("the worker that started this process is gone") from None

    def _renewed(self, expires: float) -> None:
        self._tell(_RENEWED, _STAMP.pack(expires))

    def started(self, report: tasks.TaskStarted) -> None:
        self._tell(_STARTED)
        super().started(report)

    def completed(self, report: tasks.TaskCompleted) -> None:
        super().completed(report)
        self.outcome = "succeeded"

    def failed(self, report: tasks.TaskFailed) -> None:
        super().failed(report)
        self.outcome = f"failed: {report.error.type or 'error'}"


def child_main(argv: Sequence[str] | None = None) -> int:
    """A slot's child process: runs the tasks the supervisor hands it, one at a time, until
    its task pipe closes."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m plait.runners.worker._remote")
    parser.add_argument("--server", required=True)
    parser.add_argument("--tasks", type=int, required=True)
    parser.add_argument("--events", type=int, required=True)
    parser.add_argument("--parent", type=int, required=True)
    parser.add_argument("--artifacts", choices=("auto", "local", "remote"), default="auto")
    opts = parser.parse_args(argv)
    die_with_parent(opts.parent)
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.SIG_IGN)  # stopping is the supervisor's decision

    from plait.runners.worker._execute import StepExecutor

    config = ChannelConfig.from_env(opts.server, token=os.environ.get("PLAIT_TOKEN", ""))
    targets = replica_targets(opts.server)
    clients = {0: WorkerClient(replace(config, address=targets[0]))}
    client = clients[0]
    executor = StepExecutor(
        channel=client.channel,
        metadata=client.metadata,
        remote_artifacts=remote_artifacts(opts.artifacts, opts.server),
    )
    while True:
        frame = _read_frame(opts.tasks)
        if frame is None:
            return 0
        kind, payload = frame
        if kind != _TASK:
            continue
        leased_at, replica = _HANDOFF.unpack(payload[: _HANDOFF.size])
        task = tasks.Task.FromString(payload[_HANDOFF.size :])
        if replica not in clients:  # reports go to the replica that leased the task
            clients[replica] = WorkerClient(replace(config, address=targets[replica]))
        reporter = _ChildReporter(clients[replica], task, leased_at, opts.events)
        outcome, text = _OK, ""
        try:
            executor.run(task, reporter)
            text = reporter.outcome
        except (SystemExit, KeyboardInterrupt):  # reported as the step's failure
            text = reporter.outcome
        except Cancelled as exc:
            outcome, text = EXIT_CANCELLED, str(exc)
        except LeaseLost as exc:
            outcome, text = EXIT_LEASE_LOST, str(exc)
        except Exception as exc:
            outcome, text = _ERROR, f"{type(exc).__name__}: {exc}"
        try:
            _write_frame(opts.events, _DONE, bytes([outcome]) + text.encode(errors="replace"))
        except OSError:
            return 1


if __name__ == "__main__":
    sys.exit(child_main())
