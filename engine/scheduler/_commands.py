"""What the scheduler is told: commands from clients and reports from workers."""

from __future__ import annotations

from dataclasses import dataclass

from plait._models import ArtifactInfo, StepError


@dataclass(frozen=True, slots=True)
class Token:
    """A leased attempt: a worker's report about it counts only while this is current."""

    run_id: str
    step_id: str
    attempt: int
    epoch: int


@dataclass(frozen=True, eq=False)
class CreateRun:
    """Start a run of a registered pipeline version (a retry with the same ``request_id``
    answers with the run it made first). Compared by identity: it is answered by identity."""

    version: str
    parameters: dict[str, str]
    """Canonical JSON by name, as sent; defaults are filled in by the scheduler."""
    no_cache: bool = False
    request_id: str = ""


@dataclass(frozen=True, eq=False)
class CancelRun:
    """End an active run CANCELLED; its running attempts are stopped."""

    run_id: str


@dataclass(frozen=True)
class Started:
    token: Token
    start_time: float | None = None


@dataclass(frozen=True)
class Completed:
    token: Token
    outputs: tuple[ArtifactInfo, ...]
    start_time: float | None = None
    """When the step started (a short step reports its start only with its end)."""


@dataclass(frozen=True)
class Failed:
    token: Token
    error: StepError
    crashed: bool = False
    """True when the infrastructure died (worker lost), not the user's code."""
    start_time: float | None = None


@dataclass(frozen=True)
class Logs:
    token: Token
    stream: str
    text: str


@dataclass(frozen=True)
class Metadata:
    token: Token
    output: str
    """The output the values describe; empty for the step itself."""
    values: dict[str, object]


Report = Started | Completed | Failed | Logs | Metadata
Command = CreateRun | CancelRun | Report
