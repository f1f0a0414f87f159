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
    code_archive: str = ""
    """The sha256 of the code archive the run's steps import from; empty: their own path."""
    git_commit: str = ""
    git_dirty: bool = False
    code_root: str = ""
    """With no archive: the folder an embedded engine's workers import the code from (the
    source root of its own client, on this machine). Not stored: embedded runs never resume."""
    refresh: tuple[str, ...] = ()
    """Steps that run even when cached (step ids; a mapped step's id names its items)."""
    retry_of: str = ""
    """The id of an ended run this one retries: its steps that succeeded are reused. An empty
    ``version``, ``parameters`` or code mean the retried run's."""


@dataclass(frozen=True, eq=False)
class CancelRun:
    """End an active run CANCELLED; its running attempts are stopped."""

    run_id: str


# Reports from workers. A report is applied only while its token is the step's current lease;
# one made with ``ask=True`` (eq=False: answered by identity) gets an answer: True when it was
# applied, False when its lease is lost (the unary protocol's LEASE_LOST).


@dataclass(frozen=True, eq=False)
class Started:
    token: Token
    start_time: float | None = None
    ask: bool = False


@dataclass(frozen=True, eq=False)
class Completed:
    token: Token
    outputs: tuple[ArtifactInfo, ...]
    start_time: float | None = None
    """When the step started (a short step reports its start only with its end)."""
    ask: bool = False


@dataclass(frozen=True, eq=False)
class Failed:
    token: Token
    error: StepError
    crashed: bool = False
    """True when the infrastructure died (worker lost, lease expired), not the user's code."""
    start_time: float | None = None
    ask: bool = False


@dataclass(frozen=True, eq=False)
class Logs:
    token: Token
    stream: str
    text: str
    batch: int = 0
    """The sender's batch number for the attempt (from 1); a number seen before is a retry and
    is dropped. 0: not numbered."""
    more: tuple[tuple[str, str], ...] = ()
    """Further (stream, text) chunks of the same batch, in order."""
    ask: bool = False


@dataclass(frozen=True, eq=False)
class Metadata:
    token: Token
    output: str
    """The output the values describe; empty for the step itself."""
    values: dict[str, object]
    ask: bool = False


@dataclass(frozen=True, eq=False)
class Lease:
    """A holder (a worker) takes a queued attempt: its lease runs from now, and so does its
    start-to-close timeout. Answered True when granted, False when the attempt is no longer
    queued or someone else holds it."""

    token: Token
    holder: str
    handle: str
    """The runner's handle for the process that runs it (a pid, a container id)."""
    ask: bool = False


@dataclass(frozen=True, eq=False)
class Heartbeat:
    """The attempt is alive: extend its lease. Answered with a :class:`Beat`."""

    token: Token
    ask: bool = False


@dataclass(frozen=True, eq=False)
class Release:
    """A holder hands back an attempt whose code has not started: it is leased again (the same
    attempt, the next epoch). Answered True when it was taken back."""

    token: Token
    holder: str = ""
    """Only if this holder has it (empty: whoever has it)."""
    ask: bool = False


@dataclass(frozen=True, eq=False)
class Expire:
    """The reaper's tick: attempts past a deadline (queue, lease, timeout) end."""


Report = Started | Completed | Failed | Logs | Metadata
LeaseCommand = Lease | Heartbeat | Release
Command = CreateRun | CancelRun | Report | LeaseCommand | Expire
