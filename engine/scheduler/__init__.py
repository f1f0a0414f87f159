"""The scheduler: a state machine over active runs, with no SQL in it.

Commands go in (:mod:`._commands`), effects come out (:mod:`._effects`); the transitions a step
or a run may make are tabled in :mod:`._state`; :mod:`._machine` holds the logic. The control
plane commits the effects' rows in one transaction, then acts on the rest.
"""

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
    Report,
    Started,
    Token,
)
from plait.engine.scheduler._effects import Beat, Effects, RunCreated, TaskOrder, Value
from plait.engine.scheduler._machine import (
    Lookups,
    RetrySource,
    Scheduler,
    StoredRun,
    StoredStep,
    artifact_id_for,
    retry_delay,
)
from plait.engine.scheduler._state import (
    RUN_TRANSITIONS,
    STEP_TRANSITIONS,
    IllegalTransitionError,
    RunState,
    StepState,
)

__all__ = [
    "RUN_TRANSITIONS",
    "STEP_TRANSITIONS",
    "Beat",
    "CancelRun",
    "Command",
    "Completed",
    "CreateRun",
    "Effects",
    "Expire",
    "Failed",
    "Heartbeat",
    "IllegalTransitionError",
    "Lease",
    "Logs",
    "Lookups",
    "Metadata",
    "Release",
    "Report",
    "RetrySource",
    "RunCreated",
    "RunState",
    "Scheduler",
    "Started",
    "StepState",
    "StoredRun",
    "StoredStep",
    "TaskOrder",
    "Token",
    "Value",
    "artifact_id_for",
    "retry_delay",
]
