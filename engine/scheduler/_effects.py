"""What a scheduler step decided, as data: rows to write, tasks to start, attempts to stop,
events to publish, answers to give. The caller commits the rows in one transaction and acts on
the rest only after that commit; a failed commit leaves nothing half done outside the store."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from plait._models import ArtifactInfo, RunEvent
from plait.engine._json import JsonText, plain
from plait.engine.scheduler._commands import Token
from plait.ir.v1 import ir_pb2

Value = tuple[str, Any]
"""A resolved input value: ``("json", text)``, ``("artifact", ArtifactInfo)``,
``("list", [Value, ...])`` or ``("map", {key: Value})``."""


class StoredOutputs(dict[str, ArtifactInfo]):
    """A step's outputs as read from the store (a cache entry's), with the JSON text they were
    read from: a cache hit writes that text to its step's row as it is."""

    __slots__ = ("text",)

    def __init__(self, outputs: dict[str, ArtifactInfo], text: JsonText) -> None:
        super().__init__(outputs)
        self.text = text


@dataclass(frozen=True)
class TaskOrder:
    """An attempt to hand to a runner once the transaction has committed."""

    runner: str
    token: Token
    pipeline: str
    step: ir_pb2.StepSpec
    inputs: list[tuple[str, Value]]
    outputs: list[tuple[str, str]]
    """(output name, artifact id)."""
    timeout: float | None
    pool: str = ""
    """The remote worker pool it waits in; empty: the runner's own."""
    code_archive: str = ""
    code_root: str = ""
    lease_seconds: float = 0.0
    """How long a lease on it lasts without a heartbeat."""


@dataclass(frozen=True)
class Beat:
    """The answer to a Heartbeat."""

    alive: bool
    """False: the lease is lost (the token is not the attempt's current one)."""
    cancel: bool = False
    """Stop the attempt: it was cancelled or timed out (the lease is not extended)."""
    lease_seconds: float = 0.0


@dataclass(frozen=True)
class RunCreated:
    """The answer to a CreateRun."""

    run_id: str
    created: bool
    """False when the request id named a run made before (an idempotent retry)."""


@dataclass
class Effects:
    """Rows by table (column -> value), and what follows once they are committed. A JSON
    column's value may be given as its text already (`plait.engine._json.JsonText`)."""

    run_inserts: list[dict[str, Any]] = field(default_factory=list)
    step_inserts: list[dict[str, Any]] = field(default_factory=list)
    attempt_inserts: list[dict[str, Any]] = field(default_factory=list)
    run_updates: dict[str, dict[str, Any]] = field(default_factory=dict)
    step_updates: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    attempt_updates: dict[tuple[str, str, int], dict[str, Any]] = field(default_factory=dict)
    artifacts: list[dict[str, Any]] = field(default_factory=list)
    cache_entries: list[dict[str, Any]] = field(default_factory=list)
    cache_replacements: list[dict[str, Any]] = field(default_factory=list)
    """Cache entries that replace the one under their key (a refreshed step's outputs)."""
    logs: list[dict[str, Any]] = field(default_factory=list)
    events: list[RunEvent] = field(default_factory=list)
    """To publish; their sequence numbers are given when they are written."""
    tasks: list[TaskOrder] = field(default_factory=list)
    cancels: list[Token] = field(default_factory=list)
    """Attempts to stop."""
    replies: dict[int, RunCreated | Beat | bool | Exception] = field(default_factory=dict)
    """Answers by ``id(command)``: RunCreated or an error for CreateRun, found for CancelRun,
    applied or not for a report or lease command that asked, a Beat for a Heartbeat."""

    def step(self, run_id: str, step_id: str, **values: Any) -> None:
        self.step_updates.setdefault((run_id, step_id), {}).update(values)

    def attempt(self, run_id: str, step_id: str, attempt: int, **values: Any) -> None:
        self.attempt_updates.setdefault((run_id, step_id, attempt), {}).update(values)

    def cached_outputs(self, key: str) -> dict[str, ArtifactInfo] | None:
        """Outputs of a cache entry made earlier in this very batch."""
        for entries in (self.cache_replacements, self.cache_entries):
            for entry in entries:
                if entry["key"] == key:
                    outputs = plain(entry["outputs"])
                    return {k: ArtifactInfo.from_json(v) for k, v in outputs.items()}
        return None

    def created_run(self, request_id: str) -> str | None:
        """The run made earlier in this batch for ``request_id``."""
        for row in self.run_inserts:
            if row["request_id"] == request_id:
                return str(row["id"])
        return None
