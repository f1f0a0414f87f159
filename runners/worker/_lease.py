"""Keeping a task's lease alive while its step runs, and stopping the step when it cannot be.

A leased attempt lasts ``Task.lease_seconds`` without a heartbeat. While a step runs, one
long-lived thread of the process (`LeaseKeeper`, shared by every task the process runs, so a
step pays no thread start) sends a heartbeat through the task's `Reporter` about every third of
the lease. A step that ends within the first third sends none.

The step runs in the main thread and cannot be interrupted from another one, so when the
attempt must stop (the control plane cancelled it or its time ran out; its lease went to
another worker; or the lease ran out because no heartbeat got through, the control plane being
gone) the keeper stops the whole process with ``os._exit``: `EXIT_CANCELLED` or
`EXIT_LEASE_LOST`, after one line on the process's standard error. Whoever started the process
(a runner, the remote worker's supervisor, a container's restart policy) sees the exit code.
Once the step has returned (its reports are being sent) the keeper no longer stops anything:
the transport learns of a lost lease from the reports themselves.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import threading
import time
from typing import Protocol

from plait.api.v1 import task_service_pb2 as tasks

EXIT_LEASE_LOST = 4
"""Exit code of a step process that stopped because its lease was lost or could not be renewed."""
EXIT_CANCELLED = 5
"""Exit code of a step process that stopped because the control plane asked it to (the run was
cancelled or the step's timeout passed)."""

IDLE_ROUNDS = 3
"""Waits of one heartbeat interval with no task after which the lease thread sleeps until a
task wakes it."""
RETRY_SECONDS = 1.0
"""The longest wait before another try after a heartbeat that did not get through."""


class LeaseLost(Exception):
    """The attempt must stop: its lease is no longer this process's.

    Raised by `Reporter.heartbeat` when the control plane refuses the token (FAILED_PRECONDITION,
    ErrorInfo reason ``LEASE_LOST``), and by a transport's reports when the lease ran out
    before a report got through. Whatever the attempt reports afterwards changes nothing.
    """

    exit_code = EXIT_LEASE_LOST


class Cancelled(LeaseLost):
    """The control plane asked the attempt to stop: its run was cancelled or its timeout passed.

    Raised by `Reporter.heartbeat` when the answer has ``cancel_requested``; the lease is not
    extended.
    """

    exit_code = EXIT_CANCELLED


class Heartbeater(Protocol):
    """The part of a Reporter the keeper uses."""

    def heartbeat(self, token: tasks.LeaseToken) -> float:
        """Extends the lease; see `plait.runners.worker.Reporter.heartbeat`."""
        ...


def describe(token: tasks.LeaseToken) -> str:
    """An attempt for people: ``run 3f2a…/step stats, attempt 2``."""
    return f"run {token.run_id}/step {token.step_id}, attempt {token.attempt}"


class _Held:
    """The lease of the task that runs now."""

    __slots__ = ("due", "expires", "interval", "reporter", "token", "warned")

    def __init__(self, token: tasks.LeaseToken, lease: float, reporter: Heartbeater) -> None:
        now = time.monotonic()
        self.token = token
        self.reporter = reporter
        self.interval = lease / 3
        self.due = now + self.interval
        self.expires = now + lease
        self.warned = False


class LeaseKeeper:
    """Heartbeats the lease of the task this process runs, from one thread started on first use.

    `begin` and `end` cost a lock: nothing else happens for a step that ends within the first
    third of its lease. The thread is not woken per task (two thread switches a step): while
    tasks come, it wakes on its own once an interval and finds the task that runs then; only
    after a while with none does it sleep until `begin` wakes it.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._held: _Held | None = None
        self._thread: threading.Thread | None = None
        self._stderr = -1
        self._wake_at = math.inf
        """When the thread wakes on its own (-inf: it is awake; inf: only when woken)."""

    def begin(self, token: tasks.LeaseToken, lease_seconds: float, reporter: Heartbeater) -> None:
        """Keeps `token`'s lease, `lease_seconds` long from now, through `reporter`.

        Call it before the step's output is captured: the keeper's own messages go to the
        standard error the process had then.
        """
        held = _Held(token, lease_seconds, reporter)
        with self._cond:
            if self._thread is None:
                # the process's standard error, kept apart from the step's captured one
                self._stderr = os.dup(sys.stderr.fileno())
                self._thread = threading.Thread(target=self._loop, name="plait-lease", daemon=True)
                self._thread.start()
            self._held = held
            if self._wake_at > held.due:  # it would not look in time by itself
                self._cond.notify()

    def end(self) -> None:
        """The step is over: stop heartbeating (a heartbeat in flight is ignored)."""
        with self._cond:
            self._held = None

    def _loop(self) -> None:
        idle, interval = 0, 1.0
        while True:
            with self._cond:
                held = self._held
                if held is None:
                    if idle < IDLE_ROUNDS:
                        idle += 1
                        self._wake_at = time.monotonic() + interval
                        self._cond.wait(interval)
                    else:
                        self._wake_at = math.inf
                        self._cond.wait()
                    self._wake_at = -math.inf
                    continue
                idle, interval = 0, min(held.interval, 60.0)
                now = time.monotonic()
                if now >= held.expires:
                    self._stop(
                        held,
                        LeaseLost(
                            "no heartbeat got through before the lease ran out "
                            "(is the control plane gone?)"
                        ),
                    )
                    continue
                if now < held.due:
                    wake = min(held.due, held.expires)
                    # an infinite lease (a stream that dies with its control plane) needs none
                    self._wake_at = wake
                    self._cond.wait(None if math.isinf(wake) else wake - now)
                    self._wake_at = -math.inf
                    continue
            sent = time.monotonic()
            try:
                lease = held.reporter.heartbeat(held.token)
            except LeaseLost as exc:
                with self._cond:
                    if self._held is held:
                        self._stop(held, exc)
                continue
            except Exception as exc:  # not renewed this time: try again while the lease lasts
                with self._cond:
                    if self._held is held:
                        held.due = time.monotonic() + min(RETRY_SECONDS, held.interval / 2)
                        if not held.warned:
                            held.warned = True
                            self._say(
                                f"heartbeat of {describe(held.token)} failed ({_short(exc)}); "
                                f"retrying while the lease lasts "
                                f"({max(0.0, held.expires - time.monotonic()):.1f} s)"
                            )
                continue
            with self._cond:
                if self._held is held:
                    if held.warned:
                        held.warned = False
                        self._say(f"heartbeat of {describe(held.token)} got through again")
                    held.expires = sent + lease
                    held.due = sent + lease / 3

    def _stop(self, held: _Held, exc: LeaseLost) -> None:
        """Ends the process: the step in the main thread cannot be stopped otherwise. Called
        holding the lock, so that `end` cannot race it."""
        what = "cancelled" if isinstance(exc, Cancelled) else "lease lost"
        self._say(f"{describe(held.token)}: {what}: {exc}; stopping this process")
        os._exit(exc.exit_code)

    def _say(self, line: str) -> None:
        with contextlib.suppress(OSError):
            os.write(self._stderr, f"plait: {line}\n".encode(errors="replace"))


PR_SET_PDEATHSIG = 1


def die_with_parent(parent: int) -> None:
    """Asks the kernel to SIGKILL this process when its parent (the control plane, or a
    worker's supervisor) dies (Linux), so that no step goes on beside its own retry; exits now
    if ``parent`` is gone already (it died before the request took effect)."""
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:
        os._exit(1)


def _short(exc: BaseException) -> str:
    """An exception in a few words: a gRPC status code's name when it has one."""
    code = getattr(exc, "code", None)
    if callable(code):
        with contextlib.suppress(Exception):
            return str(code().name)
    return f"{type(exc).__name__}: {exc}"


_keeper: LeaseKeeper | None = None
_keeper_lock = threading.Lock()


def lease_keeper() -> LeaseKeeper:
    """The process's one keeper (its thread starts with the first leased task)."""
    global _keeper
    keeper = _keeper
    if keeper is None:
        with _keeper_lock:
            if _keeper is None:
                _keeper = LeaseKeeper()
            keeper = _keeper
    return keeper
