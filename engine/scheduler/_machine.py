"""The scheduler's state machine: commands in, effects out, no SQL.

:meth:`Scheduler.apply` takes a batch of commands (a new run, a cancellation, workers' reports),
applies them to the in-memory view of the active runs, follows every consequence (steps become
ready, cache hits propagate, failures skip their downstream, runs end) and returns all of it as
:class:`Effects`: rows to write, tasks to start, attempts to stop, events to publish, answers.
It reads what it does not hold (a pipeline's IR, the active stack, the cache) through a
:class:`Lookups` port; the control plane binds that port to the transaction the effects are
written in, and tests bind it to dictionaries.
"""

from __future__ import annotations

import hashlib
import heapq
import json
import math
import random
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

from plait._models import ArtifactInfo, RunEvent, RunStatus, StepError, StepStatus
from plait.engine._cache import key_and_material
from plait.engine._ir import resolve_parameters, upstream_ids
from plait.engine._json import JsonText
from plait.engine.scheduler._commands import (
    CancelRun,
    Command,
    Completed,
    CreateRun,
    Expire,
    Failed,
    Heartbeat,
    Lease,
    Logs,
    Metadata,
    Release,
    Started,
    Token,
)
from plait.engine.scheduler._effects import (
    Beat,
    Effects,
    RunCreated,
    StoredOutputs,
    TaskOrder,
    Value,
)
from plait.engine.scheduler._state import RunState, Slots, StepState
from plait.errors import InUseError, PipelineError, PlaitError
from plait.ir.canonical import canonical_json
from plait.ir.mapping import MAX_MAP_ITEMS, item_name, split_item
from plait.ir.v1 import ir_pb2

Ready = list[tuple[RunState, StepState]]

INTERRUPTED = "builtins.KeyboardInterrupt"
"""The error type of a step interrupted by SIGINT (see Scheduler._fail): its run is cancelled."""

LOG_MARKER_ROOM = 1024
"""Bytes of logs an attempt may store past the limit: the lines saying what was dropped."""
LOG_MARKER_MAX = 256
"""The longest such line; a longer message past the limit is cut."""

DEFAULT_LEASE_SECONDS = 30.0
"""How long a lease lasts without a heartbeat, unless the control plane is told otherwise."""
DEFAULT_QUEUE_TIMEOUT = 3600.0
"""How long a queued attempt may wait for a worker to take it (schedule-to-start)."""
DEFAULT_CRASH_RETRIES = 3
"""Attempts a step may lose to its infrastructure (a lost worker, an expired lease) and still
be retried; they never use up the step's own retries."""
DEFAULT_RETRY_BACKOFF = 2.0
"""The growth factor of retry delays when a step's IR names none (``plait.step``'s default)."""
DEFAULT_RETRY_JITTER = 0.1
"""The jitter fraction of retry delays when a step's IR names none (``plait.step``'s default)."""
MAX_RETRY_DELAY = 86_400.0
"""The longest delay before a retry, whatever a step asks (validation allows no more)."""

RUNNER_HOLDER = "runner:"
"""The holder prefix of an attempt a runner has started a process for (``runner:docker``): that
process may claim the lease for itself."""

COMPACT_EVERY = 10_000
"""Deadline pushes between two compactions of the reaper's heap."""

# the kinds of deadline the reaper enforces, in the order they are checked at the same instant:
# those of an attempt (no one took it, its lease, its timeout), then a delayed retry coming due
_QUEUE, _LEASE, _CLOSE, _RETRY = 0, 1, 2, 3

_TIMEOUT_TYPES = (
    "builtins.TimeoutError",
    "builtins.OSError",
    "builtins.Exception",
    "builtins.BaseException",
)
"""The class chain of the TimeoutError an attempt past its timeout fails with (for retry_on)."""

Alive = Callable[[str, str | None], bool | None]
"""Whether the process a runner (or pool) has under a handle is still alive: True, False, or
None when it cannot tell (a remote worker: its heartbeats will say)."""


class Lookups(Protocol):
    """What the scheduler reads but does not hold."""

    def run_for_request(self, request_id: str) -> str | None:
        """The id of the run created for a CreateRun request id, if any."""

    def pipeline_spec(self, version: str) -> ir_pb2.PipelineSpec:
        """A registered pipeline version's IR; raises PipelineNotFoundError."""

    def active_stack(self) -> str:
        """The name of the stack new runs use."""

    def stack_runner(self, stack: str) -> str:
        """The runner flavor of a stack."""

    def cached_outputs(self, key: str) -> dict[str, ArtifactInfo] | None:
        """The outputs of the cache entry under ``key`` whose bytes are all still stored."""

    def retry_source(self, run_id: str) -> RetrySource:
        """What a retry of the run ``run_id`` (a full id) starts from; raises
        RunNotFoundError."""


@dataclass(frozen=True)
class RetrySource:
    """A run as a retry of it sees it."""

    run_id: str
    status: RunStatus
    version: str
    parameters: dict[str, Any]
    """Values by name (decoded JSON)."""
    code_archive: str
    git_commit: str
    git_dirty: bool
    outputs: dict[str, dict[str, ArtifactInfo]]
    """The outputs of its steps that SUCCEEDED or were CACHED, by step id, for the steps
    whose output bytes are all still stored."""


@dataclass(frozen=True)
class StoredStep:
    """A step of an unfinished run, as the store has it."""

    step_id: str
    status: StepStatus
    attempt: int
    cache_key: str | None
    outputs: dict[str, ArtifactInfo] | None
    metadata: dict[str, Any]
    epoch: int = 0
    """The lease epoch of the step's current attempt (0: it has none)."""
    crashes: int = 0
    """Its attempts that CRASHED."""
    runner: str = ""
    pool: str = ""
    holder: str | None = None
    handle: str | None = None
    lease_expires: float | None = None
    queue_deadline: float | None = None
    close_deadline: float | None = None
    log_batch: int = 0
    retry_at: float | None = None
    """When a RETRYING step's delayed retry is due; None: retry it now."""


@dataclass(frozen=True)
class StoredRun:
    """A run a previous control plane left unfinished, as the store has it."""

    run_id: str
    version: str
    parameters: dict[str, Any]
    no_cache: bool
    stack: str
    steps: list[StoredStep]
    code_archive: str = ""
    refresh: tuple[str, ...] = ()


def artifact_id_for(token: Token, output: str) -> str:
    """The id an attempt's output gets: known before the step runs, the same on a retry of a
    report."""
    raw = f"{token.run_id}/{token.step_id}/{token.attempt}/{output}".encode()
    return hashlib.sha256(raw).hexdigest()[:32]


def _outputs_problem(spec: ir_pb2.StepSpec, got: Mapping[str, ArtifactInfo]) -> str:
    """What is wrong with the outputs a worker reported for ``spec`` (empty: nothing): each
    declared output, and items ``name[0]``, ``name[1]``, ... only of outputs a map iterates."""
    declared = {o.name: o.items for o in spec.outputs}
    counts: dict[str, int] = {}
    plain = []
    for name in got:
        parent = split_item(name)
        if parent is not None and declared.get(parent[0]):
            counts[parent[0]] = counts.get(parent[0], 0) + 1
        else:
            plain.append(name)
    if sorted(plain) != sorted(declared):
        return f"outputs {sorted(plain)}, not {sorted(declared)}"
    for name, count in counts.items():
        if any(item_name(name, i) not in got for i in range(count)):
            return f"items of output {name!r} that are not numbered 0 to {count - 1}"
    return ""


def _when(t: float) -> datetime:
    return datetime.fromtimestamp(t, UTC)


def retry_delay(settings: ir_pb2.StepSettings, k: int) -> float:
    """The delay before retry ``k`` (1, 2, ...) of a failed step, before jitter:
    ``min(retry_max_delay, retry_delay * retry_backoff ** (k - 1))``."""
    base = settings.retry_delay_seconds
    if base <= 0:
        return 0.0
    cap = MAX_RETRY_DELAY
    if settings.HasField("retry_max_delay_seconds"):
        cap = min(cap, settings.retry_max_delay_seconds)
    backoff = (
        settings.retry_backoff if settings.HasField("retry_backoff") else DEFAULT_RETRY_BACKOFF
    )
    # compared in logarithms: backoff ** (k - 1) may overflow a float long before the cap
    if backoff > 1 and (k - 1) * math.log(backoff) >= math.log(cap / base):
        return cap
    return min(cap, base * backoff ** (k - 1))


def _seconds(t: float) -> str:
    return f"{t:.1f}" if t >= 1 else f"{t:.2g}"


class Scheduler:
    """The in-memory view of active runs and the transition logic. Used from one thread."""

    def __init__(
        self,
        runners: frozenset[str] = frozenset({"local"}),
        log_limit_bytes: int | None = None,
        *,
        lease_seconds: float = DEFAULT_LEASE_SECONDS,
        queue_timeout: float | None = DEFAULT_QUEUE_TIMEOUT,
        crash_retries: int = DEFAULT_CRASH_RETRIES,
        pool_limits: Mapping[str, int] | None = None,
    ) -> None:
        self._runners = runners
        for pool, limit in (pool_limits or {}).items():
            if limit < 1:
                raise ValueError(f"pool {pool!r}: a limit of {limit} steps at once is below 1")
        self._pools = {pool: Slots(limit) for pool, limit in (pool_limits or {}).items()}
        """The limited pools (a runner's name, or a remote pool's) and their slots."""
        self._freed: list[Slots] = []
        """Limits a slot of which came free while steps wait for one: the next schedule
        hands their turns out."""
        self._requeue: Ready = []
        """Ready steps of runs restore rebuilt, waiting for a slot: the next apply schedules
        them again."""
        self._random = random.Random()
        self.lease_seconds = lease_seconds
        self._queue_timeout = queue_timeout
        self._crash_retries = crash_retries
        self._deadlines: list[tuple[float, int, str, str, int, int]] = []
        """A heap of (when, kind, run, step, attempt, epoch): the deadlines of current attempts
        (as the attempts table has them); an entry that no longer matches its step is skipped."""
        self._pushes = 0
        self._log_limit = log_limit_bytes
        """The most bytes of logs stored per attempt (plus LOG_MARKER_ROOM); None: no limit."""
        self.runs: dict[str, RunState] = {}
        # what apply and abort did since the caller last said it was committed (committed), so
        # that rollback can undo it in memory when its transaction fails: the active runs they
        # changed (the state objects, by id) and the runs they created
        self._touched: dict[str, RunState] = {}
        self._created: list[str] = []
        self._saved_metadata: dict[tuple[str, str], dict[str, dict[str, Any]]] = {}
        """Steps' output metadata as it was at the last commit (it lives in memory only)."""
        self._detached: dict[str, RunState] = {}
        """Runs rolled back and not restored yet (restore carries their in-memory state)."""

    # ---- the entry points ----

    def apply(self, commands: Iterable[Command], now: float, lookups: Lookups) -> Effects:
        """Applies a batch of commands; returns what to write and do."""
        fx = Effects()
        ready: Ready = []
        if self._requeue:
            ready, self._requeue = self._requeue, []
            for waiting, _ in ready:
                self._touched[waiting.run_id] = waiting
        for cmd in commands:
            if isinstance(cmd, CancelRun):
                cancelled = self.runs.get(cmd.run_id)
                # not one that ended earlier in this very batch (it is forgotten at the end)
                found = cancelled is not None and not cancelled.status.is_final
                fx.replies[id(cmd)] = found
                if found:
                    self._abort(fx, [cmd.run_id], now, "cancelled on request", RunStatus.CANCELLED)
                continue
            if isinstance(cmd, CreateRun):
                try:
                    fx.replies[id(cmd)] = self._create_run(cmd, lookups, fx, now, ready)
                except PlaitError as exc:
                    fx.replies[id(cmd)] = exc
                continue
            if isinstance(cmd, Expire):
                self._expire(fx, now, ready)
                continue
            run = self.runs.get(cmd.token.run_id)
            st = run.steps.get(cmd.token.step_id) if run else None
            if isinstance(cmd, Heartbeat):
                beat = self._heartbeat(run, st, cmd.token, fx, now)
                if cmd.ask:
                    fx.replies[id(cmd)] = beat
                continue
            if run is None or st is None or not self._current(st, cmd.token):
                if cmd.ask:  # a stale report (lease lost): it changes nothing
                    fx.replies[id(cmd)] = False
                continue
            if cmd.ask:
                fx.replies[id(cmd)] = True
            self._touched[run.run_id] = run
            if isinstance(cmd, Lease):
                granted = self._lease(run, st, cmd, fx, now)
                if cmd.ask:
                    fx.replies[id(cmd)] = granted
            elif isinstance(cmd, Release):
                released = (
                    st.status is StepStatus.QUEUED
                    and st.holder is not None
                    and cmd.holder in ("", st.holder)
                )
                if released:
                    self._release(run, st, fx)
                if cmd.ask:
                    fx.replies[id(cmd)] = released
            elif isinstance(cmd, Started):
                self._mark_running(run, st, fx, cmd.start_time or now)
            elif isinstance(cmd, Logs):
                if cmd.batch:
                    if cmd.batch <= st.log_batch:
                        continue  # a batch sent again (its first try took effect)
                    st.log_batch = cmd.batch
                    fx.attempt(run.run_id, st.spec.id, st.attempt, log_batch=cmd.batch)
                self._log(run, st, cmd.stream, cmd.text, fx, now)
                for stream, text in cmd.more:
                    self._log(run, st, stream, text, fx, now)
            elif isinstance(cmd, Metadata):
                if cmd.output:
                    # replaced, not changed in place: rollback gives back what the batch found
                    self._saved_metadata.setdefault((run.run_id, st.spec.id), st.output_metadata)
                    st.output_metadata = {
                        **st.output_metadata,
                        cmd.output: {**st.output_metadata.get(cmd.output, {}), **cmd.values},
                    }
                else:
                    st.metadata.update(cmd.values)
                    fx.step(run.run_id, st.spec.id, step_metadata=dict(st.metadata))
            elif isinstance(cmd, Completed):
                # a short step's completion implies its start: both transitions commit together
                self._mark_running(run, st, fx, cmd.start_time or now)
                self._complete(run, st, cmd, fx, now, ready)
            elif isinstance(cmd, Failed):
                if cmd.start_time is not None:
                    self._mark_running(run, st, fx, cmd.start_time)
                self._fail(run, st, cmd, fx, now, ready)
        self._schedule(ready, fx, now, lookups)
        self._forget_finished()
        return fx

    def abort(self, run_ids: list[str], now: float, reason: str, status: RunStatus) -> Effects:
        """Ends active runs at once with ``status`` (their open steps CANCELLED) and forgets
        them; the effects say which attempts to stop."""
        fx = Effects()
        self._abort(fx, run_ids, now, reason, status)
        return fx

    def cancel_all(self, now: float, reason: str) -> Effects:
        """Cancels every active run (the control plane stops and will not resume them)."""
        return self.abort(list(self.runs), now, reason, RunStatus.CANCELLED)

    def recover(
        self,
        stored: list[StoredRun],
        now: float,
        lookups: Lookups,
        alive: Alive = lambda runner, handle: False,
    ) -> Effects:
        """Rebuilds the view of the runs a previous control plane left unfinished, and goes on.

        The queue is in the store, so nothing queued is lost: an attempt no one held is handed
        out again, the same attempt. An attempt with a holder is re-attached when its runner
        says its handle is alive, or cannot tell (a remote worker: it goes on heartbeating, and
        its lease expires if it does not); one whose process is gone is CRASHED and retried on
        the crash budget. Outputs already stored stay; nothing that succeeded runs again.
        A retry waiting for its delay keeps waiting until it is due.
        """
        self._touched.clear()
        self._created.clear()
        self._saved_metadata.clear()
        fx = Effects()
        ready: Ready = []
        rebuilt = [self._rebuild(row, lookups) for row in stored]
        for run in rebuilt:
            self.runs[run.run_id] = run
        self._recount()
        for run in rebuilt:
            for st in run.steps.values():
                if st.status is StepStatus.RETRYING and st.retry_at is None:
                    st.move(StepStatus.PENDING)
                    fx.step(run.run_id, st.spec.id, status=StepStatus.PENDING)
                elif st.mapped:
                    pass  # no attempt of its own: its items are steps of the run
                elif st.status is StepStatus.QUEUED and st.holder is None:
                    fx.tasks.append(self._order(run, st))  # still queued: hand it out again
                elif st.status in (StepStatus.QUEUED, StepStatus.RUNNING):
                    gone = st.holder is None or alive(st.pool or st.runner, st.handle) is False
                    if gone:
                        token = Token(run.run_id, st.spec.id, st.attempt, st.epoch)
                        error = StepError(
                            "plait.WorkerLost",
                            f"the control plane restarted and the attempt's worker "
                            f"({st.holder or 'none'}) is gone",
                        )
                        self._fail(run, st, Failed(token, error, crashed=True), fx, now, ready)
                if st.status is StepStatus.PENDING and st.waiting == 0:
                    ready.append((run, st))
            if run.open_steps == 0 and not run.status.is_final:
                # everything ended, but the run's end was not written (a failure just above
                # may have ended it)
                self._end_run(run, fx, now)
        self._schedule(ready, fx, now, lookups)
        self._forget_finished()
        return fx

    def committed(self) -> None:
        """Says that the effects of every :meth:`apply` and :meth:`abort` so far are committed:
        :meth:`rollback` has nothing of theirs to undo. Call it after each commit."""
        self._touched.clear()
        self._created.clear()
        self._saved_metadata.clear()

    def rollback(self) -> set[str]:
        """Undoes in memory what :meth:`apply` and :meth:`abort` did since :meth:`committed`,
        after the transaction of their effects failed (the store has none of it).

        The runs they created are forgotten; the active runs they changed are taken out of the
        view until :meth:`restore` rebuilds them from the store. Returns the ids of those runs
        (what to load for ``restore``). Calling it twice in a row changes nothing the second
        time.
        """
        for run_id in self._created:
            self.runs.pop(run_id, None)
            self._touched.pop(run_id, None)
        self._created.clear()
        for (run_id, step_id), saved in self._saved_metadata.items():
            if run_id in self._touched:
                self._touched[run_id].steps[step_id].output_metadata = saved
        self._saved_metadata.clear()
        for run_id, run in self._touched.items():
            self.runs.pop(run_id, None)
            self._detached.setdefault(run_id, run)
        self._touched.clear()
        self._recount()
        return set(self._detached)

    def restore(self, stored: list[StoredRun], lookups: Lookups) -> None:
        """Rebuilds the runs :meth:`rollback` took out of the view, from their stored rows.

        Unlike :meth:`recover`, nothing died: a queued or running step keeps its attempt and
        lease epoch (its worker's reports stay current), and its cache key material is
        computed again from its inputs, as when it was queued. What only memory held (metadata
        reported for outputs not stored yet, the log bytes of the attempt) is carried over from
        the view before. A rolled-back run missing from ``stored`` (the store has it ended, or
        never had it) is forgotten. Produces no effects: the view becomes the store's again;
        ready steps that waited for a slot wait again from the next :meth:`apply`.
        """
        for row in stored:
            run = self._rebuild(row, lookups)
            old = self._detached.get(row.run_id) or self.runs.get(row.run_id)
            if old is not None:
                run.code_archive, run.code_root = old.code_archive, old.code_root
            for st in run.steps.values():
                if st.key is not None and all(
                    run.steps[u].outputs is not None for u in st.upstream
                ):
                    values = {i.name: self._resolve(run, i.binding) for i in st.spec.inputs}
                    st.key, st.material = key_and_material(st.spec, values)
                before = old.steps.get(st.spec.id) if old is not None else None
                if before is not None:
                    st.output_metadata = before.output_metadata
                    st.log_attempt, st.log_bytes = before.log_attempt, before.log_bytes
                if st.status is StepStatus.RETRYING and st.retry_at is None:
                    st.move(StepStatus.PENDING)  # a store's row from before delayed retries
            self.runs[run.run_id] = run
        self._detached.clear()
        self._recount()
        for row in stored:
            run = self.runs[row.run_id]
            for st in run.steps.values():
                if st.status is StepStatus.PENDING and st.waiting == 0:
                    # committed ready and not queued: it waited for a slot, and waits again
                    held = self._full(run, st)
                    if held is not None:
                        self._wait(held, run, st)
                    else:
                        self._requeue.append((run, st))

    def forget(self, run_ids: Iterable[str]) -> None:
        """Drops runs from the view (active or rolled back) without a word to the store: what
        is left when even ending them could not be committed."""
        for run_id in run_ids:
            self.runs.pop(run_id, None)
            self._detached.pop(run_id, None)
        self._recount()

    # ---- runs ----

    def _rebuild(self, row: StoredRun, lookups: Lookups) -> RunState:
        """A run's view from its stored rows (steps as stored, attempts and epochs included)."""
        spec = lookups.pipeline_spec(row.version)
        steps = self._step_states(spec)
        items: dict[str, dict[str, StoredStep]] = {}
        for s in row.steps:
            if s.step_id in steps:
                self._load(row.run_id, steps[s.step_id], s)
            else:  # an item of a mapped step: made again below, from what its list was
                parent = split_item(s.step_id)
                items.setdefault(parent[0] if parent else "", {})[s.step_id] = s
        for st in steps.values():
            st.waiting = sum(1 for u in st.upstream if not steps[u].status.is_success)
        limit = spec.max_concurrency if spec.HasField("max_concurrency") else None
        run = RunState(
            row.run_id,
            spec.name,
            row.version,
            {k: canonical_json(v) for k, v in row.parameters.items()},
            row.no_cache,
            steps,
            open_steps=sum(1 for s in steps.values() if not s.status.is_final),
            status=RunStatus.RUNNING,
            default_runner=lookups.stack_runner(row.stack or "default"),
            code_archive=row.code_archive,
            slots=Slots(limit),
            fail_fast=spec.fail_fast,
            refresh=frozenset(row.refresh),
        )
        for st in list(steps.values()):  # upstream first: a map over a map's items
            stored = items.get(st.spec.id)
            if st.mapped and stored is not None:
                st.items = []
                for i, binding in enumerate(self._item_bindings(run, st)):
                    item = self._item_state(st, i, binding)
                    run.steps[item.spec.id] = item
                    st.items.append(item.spec.id)
                    if item.spec.id in stored:
                        self._load(row.run_id, item, stored[item.spec.id])
                    if not item.status.is_final:
                        st.open_items += 1
                        run.open_steps += 1
        run.slots.used = sum(
            1
            for st in run.steps.values()
            if not st.mapped and st.status in (StepStatus.QUEUED, StepStatus.RUNNING)
        )
        return run

    def _load(self, run_id: str, st: StepState, s: StoredStep) -> None:
        """Sets a step's view to its stored row (and arms its deadlines)."""
        st.status, st.attempt, st.epoch = s.status, s.attempt, s.epoch
        st.key = s.cache_key
        st.outputs = s.outputs
        st.metadata = dict(s.metadata)
        st.crashes, st.log_batch = s.crashes, s.log_batch
        st.runner, st.pool, st.holder, st.handle = s.runner, s.pool, s.holder, s.handle
        st.lease_expires = s.lease_expires
        st.queue_deadline, st.close_deadline = s.queue_deadline, s.close_deadline
        if st.mapped:
            return
        if st.status in (StepStatus.QUEUED, StepStatus.RUNNING):
            self._arm(run_id, st)
        elif st.status is StepStatus.RETRYING and s.retry_at is not None:
            st.retry_at = s.retry_at
            self._push(s.retry_at, _RETRY, run_id, st)

    @staticmethod
    def _step_states(spec: ir_pb2.PipelineSpec) -> dict[str, StepState]:
        steps: dict[str, StepState] = {}
        for pos, s in enumerate(spec.steps):
            st = StepState(spec=s, position=pos, mapped=any(i.mapped for i in s.inputs))
            for up in upstream_ids(s):
                st.upstream.append(up)
                steps[up].downstream.append(s.id)
            steps[s.id] = st
        return steps

    def _create_run(
        self, cmd: CreateRun, lookups: Lookups, fx: Effects, now: float, ready: Ready
    ) -> RunCreated:
        if cmd.request_id:
            existing = fx.created_run(cmd.request_id) or lookups.run_for_request(cmd.request_id)
            if existing is not None:
                return RunCreated(existing, created=False)
        version, parameters = cmd.version, cmd.parameters
        code_archive, git_commit, git_dirty = cmd.code_archive, cmd.git_commit, cmd.git_dirty
        retried: RetrySource | None = None
        if cmd.retry_of:
            retried = lookups.retry_source(cmd.retry_of)
            if retried.run_id in self.runs or not retried.status.is_final:
                raise InUseError(
                    f"run {retried.run_id} has not ended (it is {retried.status.lower()}): "
                    f"a run can be retried once it has ended (wait for it, or cancel it)"
                )
            version = version or retried.version
            if not parameters:
                parameters = {k: canonical_json(v) for k, v in retried.parameters.items()}
            if not (code_archive or git_commit or cmd.code_root):
                code_archive = retried.code_archive
                git_commit, git_dirty = retried.git_commit, retried.git_dirty
        spec = lookups.pipeline_spec(version)
        params = resolve_parameters(spec, parameters)
        stack = lookups.active_stack()
        stack_runner = lookups.stack_runner(stack)
        for s in spec.steps:
            runner = s.settings.runner or stack_runner
            if runner not in self._runners:
                raise PipelineError(
                    f"step {s.id!r} asks for runner {runner!r}, which this control plane does "
                    f"not have (it has: {', '.join(sorted(self._runners))})"
                )
        ids = {s.id for s in spec.steps} | {s.id.split("[", 1)[0] for s in spec.steps}
        unknown = sorted(set(cmd.refresh) - ids)
        if unknown:
            raise PipelineError(
                f"refresh names {', '.join(map(repr, unknown))}, not a step of pipeline "
                f"{spec.name!r}; its steps are: {', '.join(s.id for s in spec.steps)}"
            )
        run_id = uuid.uuid4().hex
        steps = self._step_states(spec)
        for st in steps.values():
            st.waiting = len(st.upstream)
        run = RunState(
            run_id,
            spec.name,
            version,
            params,
            cmd.no_cache,
            steps,
            open_steps=len(steps),
            default_runner=stack_runner,
            code_archive=code_archive,
            code_root=cmd.code_root,
            slots=Slots(spec.max_concurrency if spec.HasField("max_concurrency") else None),
            fail_fast=spec.fail_fast,
            refresh=frozenset(cmd.refresh),
            retry_of=retried.run_id if retried is not None else "",
            reuse=self._reusable(spec, version, retried) if retried is not None else {},
        )
        run.move(RunStatus.RUNNING)
        fx.run_inserts.append(
            {
                "id": run_id,
                "pipeline": spec.name,
                "version": version,
                "status": RunStatus.RUNNING,
                "parameters": {k: json.loads(v) for k, v in params.items()},
                "no_cache": cmd.no_cache,
                "request_id": cmd.request_id or None,
                "created_at": now,
                "ended_at": None,
                "stack": stack,
                "code_archive": code_archive or None,
                "git_commit": git_commit or None,
                "git_dirty": git_dirty if git_commit else None,
                "refresh": sorted(set(cmd.refresh)) or None,
                "retry_of": run.retry_of or None,
            }
        )
        fx.step_inserts.extend(
            {
                "run_id": run_id,
                "step_id": st.spec.id,
                "position": st.position,
                "status": StepStatus.PENDING,
                "attempt": 0,
            }
            for st in steps.values()
        )
        self.runs[run_id] = run
        self._created.append(run_id)
        self._event(fx, run, None, now)
        ready.extend((run, st) for st in steps.values() if st.waiting == 0)
        return RunCreated(run_id, created=True)

    @staticmethod
    def _reusable(
        spec: ir_pb2.PipelineSpec, version: str, retried: RetrySource
    ) -> dict[str, dict[str, ArtifactInfo]]:
        """The steps of ``spec`` a retry of ``retried`` reuses: those that succeeded there
        (with the outputs the step declares now) and whose upstream steps are all reused too.
        A step the retried run did not have, or that failed, was skipped or cancelled there,
        runs, and so does everything downstream of it."""
        reuse: dict[str, dict[str, ArtifactInfo]] = {}
        for s in spec.steps:  # upstream first
            if not all(u in reuse for u in upstream_ids(s)):
                continue
            names = sorted(o.name for o in s.outputs)
            outputs = retried.outputs.get(s.id)
            if any(i.mapped for i in s.inputs):
                # its list is what it was in the retried run: each item that succeeded there
                # is reused (by its index), and the mapped step too when they all did
                for step_id, item_outputs in retried.outputs.items():
                    parent = split_item(step_id)
                    if parent and parent[0] == s.id and sorted(item_outputs) == names:
                        reuse[step_id] = item_outputs
                if outputs is not None:
                    reuse[s.id] = outputs
                continue
            if outputs is None or sorted(n for n in outputs if not split_item(n)) != names:
                continue
            if any(o.items for o in s.outputs) and retried.version != version:
                continue  # stored before a map iterated them: their items may be missing
            reuse[s.id] = outputs
        return reuse

    def _end_run(self, run: RunState, fx: Effects, now: float) -> None:
        failed = any(not s.status.is_success for s in run.steps.values())
        run.move(RunStatus.FAILED if failed else RunStatus.SUCCEEDED)
        fx.run_updates[run.run_id] = {"status": run.status, "ended_at": now}
        self._event(fx, run, None, now)

    def _forget_finished(self) -> None:
        for run_id in [r for r, run in self.runs.items() if run.status.is_final]:
            del self.runs[run_id]

    def _abort(
        self, fx: Effects, run_ids: list[str], now: float, reason: str, status: RunStatus
    ) -> None:
        for run_id in run_ids:
            run = self.runs.pop(run_id, None)
            if run is None:
                continue
            self._touched[run_id] = run
            for st in run.steps.values():
                if st.status.is_final:
                    continue
                self._cancel_step(run, st, fx, now, reason)
            run.move(status)
            fx.run_updates[run.run_id] = {"status": status, "ended_at": now}
            self._event(fx, run, None, now, reason)

    def _cancel_step(
        self, run: RunState, st: StepState, fx: Effects, now: float, reason: str
    ) -> None:
        """Ends an open step CANCELLED; its attempt, if one is queued or running, is stopped."""
        if not st.mapped and (st.status is StepStatus.QUEUED or st.status is StepStatus.RUNNING):
            fx.cancels.append(Token(run.run_id, st.spec.id, st.attempt, st.epoch))
            fx.attempt(
                run.run_id, st.spec.id, st.attempt, status=StepStatus.CANCELLED, ended_at=now
            )
            self._free(run, st)
        st.move(StepStatus.CANCELLED)
        fx.step(run.run_id, st.spec.id, status=StepStatus.CANCELLED, ended_at=now)
        if st.retry_at is not None:
            st.retry_at = None
            fx.step(run.run_id, st.spec.id, retry_at=None)
        self._event(fx, run, st, now, reason)

    def _fail_fast(self, run: RunState, failed: StepState, fx: Effects, now: float) -> None:
        """Cancels the open steps of a fail_fast run whose step ``failed`` for good; the run
        ends FAILED."""
        reason = (
            f"cancelled: step {failed.spec.id!r} {failed.status.lower()} and the pipeline "
            f"is fail_fast"
        )
        for st in run.steps.values():
            if not st.status.is_final:
                self._cancel_step(run, st, fx, now, reason)
                run.open_steps -= 1
        self._end_run(run, fx, now)

    # ---- maps (step.map) ----

    def _expand(self, run: RunState, st: StepState, fx: Effects, now: float, ready: Ready) -> None:
        """A mapped step whose list is known makes one step of the run per item (``leaf[i]``),
        all ready; with no item it succeeds at once. A list that is none fails it."""
        st.move(StepStatus.RUNNING)
        fx.step(run.run_id, st.spec.id, status=StepStatus.RUNNING, started_at=now)
        try:
            bindings = self._item_bindings(run, st)
        except PlaitError as exc:
            self._event(fx, run, st, now)
            self._end_map(run, st, fx, now, ready, StepError("plait.MapError", str(exc)))
            return
        self._event(fx, run, st, now, f"mapped over {len(bindings)} item(s)")
        st.items = []
        made = []
        for i, binding in enumerate(bindings):
            item = self._item_state(st, i, binding)
            run.steps[item.spec.id] = item
            st.items.append(item.spec.id)
            made.append((run, item))
            fx.step_inserts.append(
                {
                    "run_id": run.run_id,
                    "step_id": item.spec.id,
                    "position": item.position,
                    "status": StepStatus.PENDING,
                    "attempt": 0,
                }
            )
        st.open_items = len(made)
        run.open_steps += len(made)
        if not made:
            self._end_map(run, st, fx, now, ready)
            return
        ready.extend(reversed(made))  # the first item is scheduled first

    def _item_bindings(self, run: RunState, st: StepState) -> list[ir_pb2.Binding]:
        """The binding of each item of a mapped step's list (which is known)."""
        mapped = next(i for i in st.spec.inputs if i.mapped)
        b = mapped.binding
        where = f"step {st.spec.id!r} maps over its input {mapped.name!r}"
        kind = b.WhichOneof("kind")
        items: list[ir_pb2.Binding]
        if kind == "output":
            up, name = run.steps[b.output.step_id], b.output.output
            if up.items is not None:  # a map over a mapped step's results
                items = [
                    ir_pb2.Binding(output=ir_pb2.OutputRef(step_id=i, output=name))
                    for i in up.items
                ]
            else:
                assert up.outputs is not None
                count = 0
                while item_name(name, count) in up.outputs:
                    count += 1
                items = [
                    ir_pb2.Binding(
                        output=ir_pb2.OutputRef(step_id=up.spec.id, output=item_name(name, i))
                    )
                    for i in range(count)
                ]
        elif kind == "list":
            items = list(b.list.items)
        elif kind in ("parameter", "literal"):
            text = run.parameters[b.parameter] if kind == "parameter" else b.literal.json
            value = json.loads(text)
            if not isinstance(value, list):
                source = f"parameter {b.parameter!r}" if kind == "parameter" else "a constant"
                raise PipelineError(
                    f"{where}, {source}, whose value is a {type(value).__name__}, not a list"
                )
            items = [ir_pb2.Binding(literal=ir_pb2.Literal(json=canonical_json(v))) for v in value]
        else:
            raise PipelineError(f"{where}, a dict: a map goes over a list")
        if len(items) > MAX_MAP_ITEMS:
            raise PipelineError(
                f"{where}, a list of {len(items)} items: one map runs at most {MAX_MAP_ITEMS}; "
                f"split the list (a map over a map's results), or batch items in a step"
            )
        return items

    @staticmethod
    def _item_state(st: StepState, index: int, binding: ir_pb2.Binding) -> StepState:
        """Item ``index`` of mapped step ``st``: the step with the mapped input bound to it."""
        spec = ir_pb2.StepSpec()
        spec.CopyFrom(st.spec)
        spec.id = item_name(st.spec.id, index)
        for i in spec.inputs:
            if i.mapped:
                i.mapped = False
                i.binding.CopyFrom(binding)
        return StepState(spec=spec, position=st.position, parent=st.spec.id)

    def _end_map(
        self,
        run: RunState,
        st: StepState,
        fx: Effects,
        now: float,
        ready: Ready,
        error: StepError | None = None,
    ) -> None:
        """Ends a mapped step whose items all ended: SUCCEEDED when they all succeeded (its
        outputs, read downstream, are theirs), FAILED otherwise (its downstream is skipped)."""
        if error is None:
            failed = [run.steps[i] for i in st.items or () if not run.steps[i].status.is_success]
            if failed:
                error = StepError(
                    "plait.MapItemFailed",
                    f"{len(failed)} of its {len(st.items or ())} items did not succeed: "
                    f"{failed[0].spec.id} {failed[0].status.lower()}"
                    + (f", and {len(failed) - 1} more" if len(failed) > 1 else ""),
                )
        if error is None:
            st.move(StepStatus.SUCCEEDED)
            st.outputs = {}
            fx.step(run.run_id, st.spec.id, status=StepStatus.SUCCEEDED, outputs={}, ended_at=now)
            self._event(fx, run, st, now)
        else:
            st.move(StepStatus.FAILED)
            fx.step(
                run.run_id,
                st.spec.id,
                status=StepStatus.FAILED,
                error=error.to_json(),
                ended_at=now,
            )
            self._event(fx, run, st, now, str(error))
        self._close_step(run, st, fx, now, ready)
        if error is not None and run.fail_fast and not run.status.is_final:
            self._fail_fast(run, st, fx, now)

    # ---- slots (concurrency limits) ----

    def _full(self, run: RunState, st: StepState, turn: bool = False) -> Slots | None:
        """The first of a ready step's limits (its run's, its pool's) with no slot free for
        it: none free, or (unless it is the step's ``turn``) steps that came first wait for
        the free ones."""
        if (run.slots.waiting and not turn) or run.slots.full():
            return run.slots
        if self._pools:
            s = st.spec.settings
            pool = self._pools.get(s.pool or s.runner or run.default_runner)
            if pool is not None and ((pool.waiting and not turn) or pool.full()):
                return pool
        return None

    def _wait(self, held: Slots, run: RunState, st: StepState) -> None:
        held.waiting.append((run, st))
        if not held.full():  # behind others: their turns come in this very schedule
            self._freed.append(held)

    def _admit(self, run: RunState, st: StepState, fx: Effects, turn: bool) -> bool:
        """Whether a ready step may have an attempt queued now, within its run's and its pool's
        limits; if not, it waits in line for a slot of the first one that holds it back."""
        held = self._full(run, st, turn)
        if held is None:
            return True
        self._wait(held, run, st)
        if st.attempt:  # a retry: the store has it RETRYING, and it waits PENDING
            fx.step(run.run_id, st.spec.id, status=StepStatus.PENDING)
        else:  # as the store has it (no key yet): computed again when its turn comes
            st.material = st.key = None
        return False

    def _take(self, run: RunState, st: StepState) -> None:
        """A queued attempt takes a slot of its run and of its pool (st.pool or st.runner)."""
        run.slots.used += 1
        if self._pools:
            pool = self._pools.get(st.pool or st.runner)
            if pool is not None:
                pool.used += 1

    def _free(self, run: RunState, st: StepState) -> None:
        """A queued or running attempt ended: its slots are free for a waiting step."""
        run.slots.used -= 1
        if run.slots.waiting:
            self._freed.append(run.slots)
        if self._pools:
            pool = self._pools.get(st.pool or st.runner)
            if pool is not None:
                pool.used -= 1
                if pool.waiting:
                    self._freed.append(pool)

    def _next_waiting(self) -> tuple[RunState, StepState] | None:
        """The next step whose turn for a freed slot has come, or None."""
        while self._freed:
            slots = self._freed[-1]
            if slots.full() or not slots.waiting:
                self._freed.pop()
                continue
            run, st = slots.waiting.popleft()
            if self.runs.get(run.run_id) is run and st.status is StepStatus.PENDING:
                self._touched[run.run_id] = run
                return run, st
        return None

    def _recount(self) -> None:
        """Counts the limited pools' slots again from the view (after runs came or went
        without their attempts ending: recover, rollback, restore, forget)."""
        if not self._pools:
            return
        for pool in self._pools.values():
            pool.used = 0
        for run in self.runs.values():
            for st in run.steps.values():
                if st.mapped:
                    continue
                if st.status is StepStatus.QUEUED or st.status is StepStatus.RUNNING:
                    slots = self._pools.get(st.pool or st.runner)
                    if slots is not None:
                        slots.used += 1
        self._freed.extend(p for p in self._pools.values() if p.waiting)

    # ---- steps ----

    @staticmethod
    def _current(st: StepState, token: Token) -> bool:
        return (
            (st.status is StepStatus.QUEUED or st.status is StepStatus.RUNNING)
            and st.attempt == token.attempt
            and st.epoch == token.epoch
        )

    @staticmethod
    def _event(
        fx: Effects, run: RunState, st: StepState | None, t: float, message: str = ""
    ) -> None:
        if st is None:
            fx.events.append(RunEvent(run.run_id, "", run.status, None, 0, message, _when(t)))
        else:
            fx.events.append(
                RunEvent(run.run_id, st.spec.id, None, st.status, st.attempt, message, _when(t))
            )

    def _mark_running(self, run: RunState, st: StepState, fx: Effects, start: float) -> None:
        if st.status is not StepStatus.QUEUED:
            return
        st.move(StepStatus.RUNNING)
        fx.step(run.run_id, st.spec.id, status=StepStatus.RUNNING, started_at=start)
        fx.attempt(run.run_id, st.spec.id, st.attempt, status=StepStatus.RUNNING, started_at=start)
        self._event(fx, run, st, start)

    def _resolve(self, run: RunState, b: ir_pb2.Binding) -> Value:
        kind = b.WhichOneof("kind")
        if kind == "output":
            up = run.steps[b.output.step_id]
            if up.items is not None:  # a mapped step's output: its items' outputs, in order
                name = b.output.output
                return ("list", [self._resolve_item(run, item, name) for item in up.items])
            assert up.outputs is not None
            return ("artifact", up.outputs[b.output.output])
        if kind == "parameter":
            return ("json", run.parameters[b.parameter])
        if kind == "literal":
            return ("json", b.literal.json)
        if kind == "list":
            return ("list", [self._resolve(run, i) for i in b.list.items])
        return ("map", {e.key: self._resolve(run, e.value) for e in b.map.entries})

    def _resolve_item(self, run: RunState, step_id: str, output: str) -> Value:
        item = run.steps[step_id]
        if item.items is not None:
            return ("list", [self._resolve_item(run, i, output) for i in item.items])
        assert item.outputs is not None
        return ("artifact", item.outputs[output])

    def _schedule(self, ready: Ready, fx: Effects, now: float, lookups: Lookups) -> None:
        """Serves ready steps from the cache (following hits downstream) or queues them, as
        their run's and pool's limits allow; then hands freed slots to steps that wait."""
        while True:
            turn = False
            if not ready:
                waiting = self._next_waiting() if self._freed else None
                if waiting is None:
                    return
                ready.append(waiting)
                turn = True  # first in line: only a limit with no slot free holds it back
            run, st = ready.pop()
            if run.status.is_final or st.status is not StepStatus.PENDING:
                continue
            if st.mapped:
                self._expand(run, st, fx, now, ready)
                continue
            values = {i.name: self._resolve(run, i.binding) for i in st.spec.inputs}
            st.key, st.material = key_and_material(st.spec, values)
            reused = run.reuse.get(st.spec.id) if run.reuse else None
            if reused is not None:  # a retry's step that succeeded in the retried run
                self._serve(run, st, reused, fx, now, ready, f"reused from run {run.retry_of}")
                continue
            cacheable = st.spec.settings.cache if st.spec.settings.HasField("cache") else True
            if cacheable and not run.no_cache and not (run.refresh and run.refreshes(st.spec.id)):
                outputs = fx.cached_outputs(st.key) or lookups.cached_outputs(st.key)
                if outputs is not None:
                    self._serve(run, st, outputs, fx, now, ready)
                    continue
            if not self._admit(run, st, fx, turn):
                continue
            fx.step(run.run_id, st.spec.id, cache_key=st.key)
            self._queue(run, st, fx, now, values)

    def _serve(
        self,
        run: RunState,
        st: StepState,
        outputs: dict[str, ArtifactInfo],
        fx: Effects,
        now: float,
        ready: Ready,
        message: str = "",
    ) -> None:
        """Ends a ready step CACHED with outputs it did not make (a cache hit, or a retry's
        reuse): nothing runs, its downstream may become ready."""
        st.move(StepStatus.CACHED)
        st.outputs = outputs
        fx.step(
            run.run_id,
            st.spec.id,
            status=StepStatus.CACHED,
            cache_key=st.key,
            outputs=outputs.text
            if type(outputs) is StoredOutputs
            else {k: v.to_json() for k, v in outputs.items()},
            started_at=now,
            ended_at=now,
        )
        self._event(fx, run, st, now, message)
        self._close_step(run, st, fx, now, ready)

    def _queue(
        self, run: RunState, st: StepState, fx: Effects, now: float, values: dict[str, Value]
    ) -> None:
        """A new attempt, in the queue (the attempts table) until a holder leases it."""
        st.move(StepStatus.QUEUED)
        st.attempt += 1
        st.epoch = 1
        st.log_batch = 0
        st.runner = st.spec.settings.runner or run.default_runner
        st.pool = st.spec.settings.pool
        st.holder = st.handle = None
        st.lease_expires = st.close_deadline = None
        st.queue_deadline = now + self._queue_timeout if self._queue_timeout else None
        self._take(run, st)
        fx.step(run.run_id, st.spec.id, status=StepStatus.QUEUED, attempt=st.attempt)
        fx.attempt_inserts.append(
            {
                "run_id": run.run_id,
                "step_id": st.spec.id,
                "attempt": st.attempt,
                "epoch": st.epoch,
                "status": StepStatus.QUEUED,
                "runner": st.runner,
                "pool": st.pool or None,
                "queue_deadline": st.queue_deadline,
                "created_at": now,
            }
        )
        self._arm(run.run_id, st)
        self._event(fx, run, st, now)
        fx.tasks.append(self._order(run, st, values))

    def _order(
        self, run: RunState, st: StepState, values: dict[str, Value] | None = None
    ) -> TaskOrder:
        """The task of a step's current attempt (the same whenever it is asked for again)."""
        if values is None:
            values = {i.name: self._resolve(run, i.binding) for i in st.spec.inputs}
        token = Token(run.run_id, st.spec.id, st.attempt, st.epoch)
        settings = st.spec.settings
        return TaskOrder(
            runner=st.runner,
            token=token,
            pipeline=run.pipeline,
            step=st.spec,
            inputs=[(i.name, values[i.name]) for i in st.spec.inputs],
            outputs=[(o.name, artifact_id_for(token, o.name)) for o in st.spec.outputs],
            timeout=settings.timeout_seconds if settings.HasField("timeout_seconds") else None,
            pool=st.pool,
            code_archive=run.code_archive,
            code_root=run.code_root,
            lease_seconds=self.lease_seconds,
        )

    def _log(
        self, run: RunState, st: StepState, stream: str, text: str, fx: Effects, now: float
    ) -> None:
        if self._log_limit is not None:
            # workers keep to the limit and say what they dropped (LOG_MARKER_ROOM is for those
            # lines); this holds a worker that does not to it
            if st.log_attempt != st.attempt:
                st.log_attempt, st.log_bytes = st.attempt, 0
            hard = self._log_limit + LOG_MARKER_ROOM
            before = st.log_bytes
            after = before + (len(text) if text.isascii() else len(text.encode()))
            if before > hard:
                text = ""  # cut already
            elif after > self._log_limit and (after - before > LOG_MARKER_MAX or after > hard):
                keep = max(0, self._log_limit - before)
                text = (
                    text.encode()[:keep].decode("utf-8", "ignore")
                    + f"\n[plait: this attempt's log passed its limit of "
                    f"{self._log_limit} bytes; the rest of it is dropped]\n"
                )
                st.log_bytes = hard + 1
            else:
                st.log_bytes = after
        if text:
            fx.logs.append(
                {
                    "run_id": run.run_id,
                    "step_id": st.spec.id,
                    "attempt": st.attempt,
                    "stream": stream,
                    "text": text,
                    "ts": now,
                }
            )

    # ---- leases and deadlines ----

    def next_deadline(self) -> float | None:
        """The earliest deadline of a current attempt or a delayed retry (an :class:`Expire`
        at or after it ends or retries what is due), or None."""
        if self._freed:
            return 0.0  # slots came free outside apply (abort): the next batch hands them out
        return self._deadlines[0][0] if self._deadlines else None

    def _arm(self, run_id: str, st: StepState) -> None:
        """Puts the current attempt's deadlines on the reaper's heap."""
        for kind, when in enumerate((st.queue_deadline, st.lease_expires, st.close_deadline)):
            if when is not None:
                self._push(when, kind, run_id, st)

    def _push(self, when: float, kind: int, run_id: str, st: StepState) -> None:
        self._pushes += 1
        if self._pushes >= COMPACT_EVERY:
            self._compact()
        heapq.heappush(self._deadlines, (when, kind, run_id, st.spec.id, st.attempt, st.epoch))

    @staticmethod
    def _still_due(
        entry: tuple[float, int, str, str, int, int], runs: Mapping[str, RunState]
    ) -> tuple[RunState, StepState] | None:
        """The run and step of a heap entry that is still the deadline of its kind of the
        step's current, open attempt; None for an entry left behind."""
        when, kind, run_id, step_id, attempt, epoch = entry
        run = runs.get(run_id)
        st = run.steps.get(step_id) if run is not None else None
        if run is None or st is None or (st.attempt, st.epoch) != (attempt, epoch):
            return None
        if kind == _RETRY:
            return (run, st) if st.status is StepStatus.RETRYING and st.retry_at == when else None
        if st.status is not StepStatus.QUEUED and st.status is not StepStatus.RUNNING:
            return None
        if when != (st.queue_deadline, st.lease_expires, st.close_deadline)[kind]:
            return None
        return run, st

    def _compact(self) -> None:
        """Drops the heap's entries that no longer match a current attempt's deadline (most
        attempts end long before their queue deadline), so that it holds about what is due."""
        self._pushes = 0
        runs = {**self._detached, **self.runs}
        kept = [entry for entry in self._deadlines if self._still_due(entry, runs)]
        heapq.heapify(kept)
        self._deadlines = kept

    def _lease(self, run: RunState, st: StepState, cmd: Lease, fx: Effects, now: float) -> bool:
        if st.status is not StepStatus.QUEUED:
            return False
        # free, or held by the runner that started the process now claiming it
        if st.holder not in (None, cmd.holder) and not st.holder.startswith(RUNNER_HOLDER):
            return False
        if st.handle and (cmd.handle == "" or (st.holder or "").startswith(RUNNER_HOLDER)):
            # the runner's handle stays (a process it started claims the lease): it is what
            # the runner is asked about after a restart
            cmd = Lease(cmd.token, cmd.holder, st.handle)
        st.holder, st.handle = cmd.holder, cmd.handle
        st.lease_expires = now + self.lease_seconds
        settings = st.spec.settings
        # start-to-close runs from the hand-off, whether or not the worker says it started
        if settings.HasField("timeout_seconds"):
            st.close_deadline = now + settings.timeout_seconds
        fx.attempt(
            run.run_id,
            st.spec.id,
            st.attempt,
            holder=st.holder,
            handle=st.handle,
            leased_at=now,
            lease_expires_at=st.lease_expires,
            close_deadline=st.close_deadline,
        )
        self._arm(run.run_id, st)
        return True

    def _heartbeat(
        self, run: RunState | None, st: StepState | None, token: Token, fx: Effects, now: float
    ) -> Beat:
        if run is None or st is None or st.attempt != token.attempt or st.epoch != token.epoch:
            return Beat(alive=False)
        if not self._current(st, token):
            if st.status is StepStatus.CRASHED:
                return Beat(alive=False)  # its lease expired: lost, not cancelled
            return Beat(alive=True, cancel=True)  # the attempt ended: timed out, cancelled
        self._touched[run.run_id] = run
        st.lease_expires = now + self.lease_seconds
        fx.attempt(run.run_id, st.spec.id, st.attempt, lease_expires_at=st.lease_expires)
        self._push(st.lease_expires, _LEASE, run.run_id, st)
        return Beat(alive=True, lease_seconds=self.lease_seconds)

    def _release(self, run: RunState, st: StepState, fx: Effects) -> None:
        """Takes a leased attempt back into the queue under the next epoch (the old holder's
        token is fenced off) and hands it out again."""
        st.holder = st.handle = None
        st.lease_expires = st.close_deadline = None
        st.epoch += 1
        fx.attempt(
            run.run_id,
            st.spec.id,
            st.attempt,
            epoch=st.epoch,
            holder=None,
            handle=None,
            leased_at=None,
            lease_expires_at=None,
            close_deadline=None,
        )
        self._arm(run.run_id, st)
        fx.tasks.append(self._order(run, st))

    def _expire(self, fx: Effects, now: float, ready: Ready) -> None:
        """Ends the current attempts whose deadline has passed: one no one took in time, one
        whose lease was not renewed (CRASHED, retried on the crash budget), one that ran past
        its timeout (FAILED, a TimeoutError). Runners are told to stop the last two. A delayed
        retry that is due becomes ready."""
        heap = self._deadlines
        while heap and heap[0][0] <= now:
            entry = heapq.heappop(heap)
            found = self._still_due(entry, self.runs)
            if found is None:
                continue
            run, st = found
            kind, run_id = entry[1], entry[2]
            self._touched[run_id] = run
            if kind == _RETRY:
                st.retry_at = None
                st.move(StepStatus.PENDING)
                fx.step(run_id, st.spec.id, retry_at=None)
                ready.append((run, st))
                continue
            token = Token(run_id, st.spec.id, st.attempt, st.epoch)
            where = f"of pool {st.pool!r}" if st.pool else f"of runner {st.runner!r}"
            if kind == _QUEUE:
                if st.holder is not None:
                    continue
                error = StepError(
                    "plait.QueueTimeout",
                    f"no worker {where} took the step within {self._queue_timeout:g} s",
                )
                failed = Failed(token, error, crashed=True)
            elif kind == _LEASE:
                if st.holder is None:
                    continue
                error = StepError(
                    "plait.LeaseExpired",
                    f"the lease expired: no heartbeat from worker {st.holder} {where} "
                    f"for {self.lease_seconds:g} s",
                )
                failed = Failed(token, error, crashed=True)
                fx.cancels.append(token)
            else:
                limit = st.spec.settings.timeout_seconds
                error = StepError(
                    "builtins.TimeoutError",
                    f"the attempt ran longer than its timeout of {limit:g} s",
                    types=_TIMEOUT_TYPES,
                )
                failed = Failed(token, error)
                fx.cancels.append(token)
            self._fail(run, st, failed, fx, now, ready, retry=kind != _QUEUE)

    def _complete(
        self, run: RunState, st: StepState, cmd: Completed, fx: Effects, now: float, ready: Ready
    ) -> None:
        got = {o.output: o for o in cmd.outputs}
        problem = _outputs_problem(st.spec, got)
        if problem:
            error = StepError("plait.errors.ArtifactError", f"the worker reported {problem}")
            self._fail(run, st, Failed(cmd.token, error), fx, now, ready)
            return
        self._free(run, st)
        st.move(StepStatus.SUCCEEDED)
        st.outputs = got
        for o in cmd.outputs:
            fx.artifacts.append(
                {
                    "id": o.artifact_id,
                    "run_id": o.run_id,
                    "step_id": o.step_id,
                    "output": o.output,
                    "digest": o.digest,
                    "size": o.size,
                    "uri": o.uri,
                    "materializer": o.materializer,
                    "data_type": o.data_type,
                    "unsafe": o.unsafe,
                    "artifact_metadata": st.output_metadata.get(o.output) or None,
                    "created_at": o.created_at.timestamp() if o.created_at else now,
                }
            )
        outputs_json: Any = {k: v.to_json() for k, v in got.items()}
        cacheable = st.spec.settings.cache if st.spec.settings.HasField("cache") else True
        entry_due = cacheable and st.key is not None and st.material is not None
        if entry_due:  # written to two rows: encoded once
            outputs_json = JsonText(json.dumps(outputs_json))
        fx.step(
            run.run_id, st.spec.id, status=StepStatus.SUCCEEDED, outputs=outputs_json, ended_at=now
        )
        fx.attempt(run.run_id, st.spec.id, st.attempt, status=StepStatus.SUCCEEDED, ended_at=now)
        if entry_due:
            entry = {
                "key": st.key,
                "material": st.material,
                "outputs": outputs_json,
                "run_id": run.run_id,
                "step_id": st.spec.id,
                "created_at": now,
            }
            if run.no_cache or (run.refresh and run.refreshes(st.spec.id)):
                fx.cache_replacements.append(entry)  # fresh outputs replace the entry's
            else:
                fx.cache_entries.append(entry)
        self._event(fx, run, st, now)
        self._close_step(run, st, fx, now, ready)

    def _fail(
        self,
        run: RunState,
        st: StepState,
        cmd: Failed,
        fx: Effects,
        now: float,
        ready: Ready,
        *,
        retry: bool = True,
    ) -> None:
        """Ends the current attempt FAILED (the step's code) or CRASHED (its infrastructure).

        The step is retried while its budget for that kind lasts: its own ``retries`` for
        failures whose exception its ``retry_on`` and ``no_retry_on`` allow (after the delay
        its policy gives), the control plane's crash budget for crashes (at once). A step that
        ends for good cancels the rest of a fail_fast run.

        A step interrupted (``KeyboardInterrupt``: a Ctrl-C at the terminal reaches the workers
        of the engine a script or ``plait run`` embeds, in its process group) is no failure of
        its code: its run is cancelled, as that Ctrl-C cancels it, whichever of the two the
        control plane hears of first."""
        if not cmd.crashed and cmd.error.type == INTERRUPTED:
            reason = f"interrupted: step {st.spec.id!r} got {cmd.error.type} (Ctrl-C)"
            self._abort(fx, [run.run_id], now, reason, RunStatus.CANCELLED)
            return
        final = StepStatus.CRASHED if cmd.crashed else StepStatus.FAILED
        fx.attempt(run.run_id, st.spec.id, st.attempt, status=final, ended_at=now)
        self._free(run, st)
        message = str(cmd.error)
        delay = 0.0
        if cmd.crashed:
            st.crashes += 1
            again = st.crashes <= self._crash_retries
        else:
            failures = st.attempt - st.crashes
            again = failures <= st.spec.settings.retries
            if again and retry:
                refused = self._not_retried(st.spec.settings, cmd.error)
                if refused:
                    again = False
                    message = f"{message} (not retried: {refused})"
                else:
                    delay = self._jittered(st.spec.settings, failures)
        if retry and again:
            st.move(StepStatus.RETRYING)
            if delay > 0:
                st.retry_at = now + delay
                self._event(fx, run, st, now, f"retrying in {_seconds(delay)} s: {message}")
                fx.step(
                    run.run_id,
                    st.spec.id,
                    status=StepStatus.RETRYING,
                    error=cmd.error.to_json(),
                    retry_at=st.retry_at,
                )
                self._push(st.retry_at, _RETRY, run.run_id, st)
                return
            self._event(fx, run, st, now, message)
            st.move(StepStatus.PENDING)
            fx.step(run.run_id, st.spec.id, status=StepStatus.RETRYING, error=cmd.error.to_json())
            ready.append((run, st))
            return
        st.move(final)
        fx.step(run.run_id, st.spec.id, status=final, error=cmd.error.to_json(), ended_at=now)
        self._event(fx, run, st, now, message)
        self._close_step(run, st, fx, now, ready)
        if run.fail_fast and not run.status.is_final:
            self._fail_fast(run, st, fx, now)

    @staticmethod
    def _not_retried(settings: ir_pb2.StepSettings, error: StepError) -> str:
        """Why a failure's exception is not retried under the step's retry_on and no_retry_on
        (its class or a base of it named in no_retry_on, or none in retry_on); empty: it is."""
        if not settings.retry_on and not settings.no_retry_on:
            return ""
        chain = error.types or (error.type,)
        for name in chain:
            if name in settings.no_retry_on:
                return f"{error.type} is {'' if name == error.type else 'a '}{name}, in no_retry_on"
        if settings.retry_on and not any(name in settings.retry_on for name in chain):
            return f"{error.type} matches nothing in retry_on ({', '.join(settings.retry_on)})"
        return ""

    def _jittered(self, settings: ir_pb2.StepSettings, k: int) -> float:
        """The delay before retry ``k``, moved at random by up to the step's jitter fraction."""
        delay = retry_delay(settings, k)
        if delay <= 0:
            return 0.0
        jitter = (
            settings.retry_jitter if settings.HasField("retry_jitter") else DEFAULT_RETRY_JITTER
        )
        return max(0.0, delay * (1 + self._random.uniform(-jitter, jitter)))

    def _close_step(
        self, run: RunState, st: StepState, fx: Effects, now: float, ready: Ready
    ) -> None:
        run.open_steps -= 1
        if st.status.is_success:
            for d in st.downstream:
                ds = run.steps[d]
                ds.waiting -= 1
                if ds.waiting == 0:
                    ready.append((run, ds))
        else:
            self._skip_downstream(run, st, fx, now)
        if st.parent is not None:
            mapped = run.steps[st.parent]
            mapped.open_items -= 1
            if mapped.open_items == 0 and mapped.status is StepStatus.RUNNING:
                self._end_map(run, mapped, fx, now, ready)
                return  # closing the mapped step ended the run if it was the last
        if run.open_steps == 0:
            self._end_run(run, fx, now)

    def _skip_downstream(self, run: RunState, st: StepState, fx: Effects, now: float) -> None:
        stack = list(st.downstream)
        while stack:
            ds = run.steps[stack.pop()]
            if ds.status is not StepStatus.PENDING:
                continue
            ds.move(StepStatus.SKIPPED)
            run.open_steps -= 1
            fx.step(run.run_id, ds.spec.id, status=StepStatus.SKIPPED, ended_at=now)
            self._event(fx, run, ds, now, f"upstream step {st.spec.id!r} {st.status.lower()}")
            stack.extend(ds.downstream)
