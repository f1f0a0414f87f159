"""The scheduler's view of active runs, and the transitions it may make.

Every change of a step's or a run's status goes through :meth:`StepState.move` or
:meth:`RunState.move`, which refuse a transition the tables below do not allow.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

from plait._models import ArtifactInfo, RunStatus, StepStatus
from plait.engine._json import JsonText
from plait.errors import PlaitError
from plait.ir.v1 import ir_pb2

S = StepStatus
STEP_TRANSITIONS: dict[StepStatus, frozenset[StepStatus]] = {
    # ready: queued for a runner, served from the cache, or never run; a mapped step RUNNING
    # is one whose items were made (it has no attempt of its own: its items have theirs)
    S.PENDING: frozenset({S.QUEUED, S.CACHED, S.SKIPPED, S.CANCELLED, S.RUNNING}),
    # a failure before the start report (the runner could not start it, the worker died);
    # PENDING: the attempt died with a previous control plane and the step is queued again
    S.QUEUED: frozenset({S.RUNNING, S.FAILED, S.CRASHED, S.RETRYING, S.CANCELLED, S.PENDING}),
    S.RUNNING: frozenset({S.SUCCEEDED, S.FAILED, S.CRASHED, S.RETRYING, S.CANCELLED, S.PENDING}),
    S.RETRYING: frozenset({S.PENDING, S.CANCELLED}),
    **{final: frozenset() for final in S if final.is_final},
}
"""Which step status may follow which. Final statuses are left by nothing."""

R = RunStatus
RUN_TRANSITIONS: dict[RunStatus, frozenset[RunStatus]] = {
    R.PENDING: frozenset({R.RUNNING, R.FAILED, R.CANCELLED}),
    R.RUNNING: frozenset({R.SUCCEEDED, R.FAILED, R.CANCELLED}),
    **{final: frozenset() for final in R if final.is_final},
}


class IllegalTransitionError(PlaitError):
    """The scheduler tried a status change its transition table forbids (a bug)."""

    reason = "ILLEGAL_TRANSITION"


@dataclass(slots=True)
class StepState:
    spec: ir_pb2.StepSpec
    position: int
    status: StepStatus = StepStatus.PENDING
    attempt: int = 0
    epoch: int = 0
    waiting: int = 0
    """Upstream steps that have not succeeded yet."""
    upstream: list[str] = field(default_factory=list)
    downstream: list[str] = field(default_factory=list)
    outputs: dict[str, ArtifactInfo] | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    output_metadata: dict[str, dict[str, Any]] = field(default_factory=dict)
    material: JsonText | None = None
    """The cache key's material, as the canonical text its digest is the key of."""
    key: str | None = None
    log_attempt: int = 0
    log_bytes: int = 0
    """Bytes of logs stored for attempt `log_attempt` (the scheduler caps them per attempt)."""
    log_batch: int = 0
    """The highest log batch number the current attempt's sender used (retries are dropped)."""
    crashes: int = 0
    """Attempts that CRASHED (their infrastructure died): they draw on their own budget, not on
    the step's retries."""
    # the current attempt's lease, as the attempts table has it
    runner: str = ""
    pool: str = ""
    holder: str | None = None
    handle: str | None = None
    lease_expires: float | None = None
    queue_deadline: float | None = None
    close_deadline: float | None = None
    retry_at: float | None = None
    """When a RETRYING step's next attempt is due (a delayed retry); None otherwise."""
    mapped: bool = False
    """A mapped step (``step.map``): it never has an attempt; once its list is known it is
    RUNNING and its items (``<id>[i]``) are steps of the run, and it ends when they all have."""
    items: list[str] | None = None
    """A mapped step's item step ids, in order, once it made them."""
    open_items: int = 0
    """Its items that have not ended yet."""
    parent: str | None = None
    """An item's mapped step (``leaf`` for ``leaf[3]``)."""

    def move(self, to: StepStatus) -> None:
        if to not in STEP_TRANSITIONS[self.status]:
            raise IllegalTransitionError(
                f"step {self.spec.id!r}: {self.status} -> {to} is not a legal transition"
            )
        self.status = to


@dataclass(slots=True, eq=False)
class Slots:
    """A limit on attempts queued or running at once (a run's, or a pool's), and the ready
    steps waiting for one of its slots, first come, first served."""

    limit: int | None
    """None: no limit (only counted)."""
    used: int = 0
    """Attempts QUEUED or RUNNING now."""
    waiting: deque[tuple[RunState, StepState]] = field(default_factory=deque)
    """Ready steps held back; an entry whose step is no longer PENDING, or whose run is no
    longer the active one, is skipped when its turn comes."""

    def full(self) -> bool:
        return self.limit is not None and self.used >= self.limit

    def __eq__(self, other: object) -> bool:
        # the waiting steps are left out: which line a step waits in depends on history that a
        # view restored from the store lacks (they are PENDING steps, compared with the steps),
        # and their states refer back to this (a field-wise compare would loop)
        if not isinstance(other, Slots):
            return NotImplemented
        return (self.limit, self.used) == (other.limit, other.used)


@dataclass(slots=True)
class RunState:
    run_id: str
    pipeline: str
    version: str
    parameters: dict[str, str]
    """Canonical JSON by name, every parameter."""
    no_cache: bool
    steps: dict[str, StepState]
    open_steps: int
    """Steps not final yet; the run ends when none is left."""
    status: RunStatus = RunStatus.PENDING
    default_runner: str = "local"
    """The runner of the run's stack, for steps that name none."""
    code_archive: str = ""
    """The code archive the run's steps import from."""
    code_root: str = ""
    """With no archive, the local folder they import from (an embedded engine's runs)."""
    slots: Slots = field(default_factory=lambda: Slots(None))
    """The run's attempts at once, against its pipeline's ``max_concurrency``."""
    fail_fast: bool = False
    """The pipeline's ``fail_fast``: the first step to fail for good cancels the others."""
    refresh: frozenset[str] = frozenset()
    """Steps that run even when cached (``plait run --refresh``): step ids, or the id of a
    mapped step, which names its items (``leaf`` for ``leaf[3]``)."""
    retry_of: str = ""
    """The run this one retries (``plait runs retry``), or empty."""
    reuse: dict[str, dict[str, ArtifactInfo]] = field(default_factory=dict)
    """A retry's steps served from the retried run when they become ready: their outputs
    there, by step id (only steps whose upstream are all reused too). All of them are served in
    the batch that creates the run, so nothing of it is stored."""

    def refreshes(self, step_id: str) -> bool:
        """Whether the run asked to refresh ``step_id``."""
        return step_id in self.refresh or step_id.split("[", 1)[0] in self.refresh

    def move(self, to: RunStatus) -> None:
        if to not in RUN_TRANSITIONS[self.status]:
            raise IllegalTransitionError(
                f"run {self.run_id}: {self.status} -> {to} is not a legal transition"
            )
        self.status = to
