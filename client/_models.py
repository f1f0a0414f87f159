"""The domain records: one type per concept, shared by the client, the engine and the workers.

Each record converts to and from its API message at the boundary (``to_proto`` /
``from_proto``); ``from_proto(to_proto(x)) == x`` holds for every record (a property test checks
it). Records that the metadata store keeps as JSON also have ``to_json`` / ``from_json``.

Statuses are enums tied to the API's enums by name (``StepStatus.CACHED`` is
``STEP_STATUS_CACHED``); a test checks both sides list the same names. Which statuses are final
is said here, once.

This module imports no grpc and nothing of the engine: workers and remote clients load it.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import unquote, urlparse

from plait import errors
from plait.api.v1 import build_service_pb2 as builds_pb
from plait.api.v1 import resources_pb2 as res
from plait.ir.canonical import canonical_json

if TYPE_CHECKING:
    from google.protobuf.timestamp_pb2 import Timestamp

__all__ = [
    "FINAL_RUN_STATUSES",
    "FINAL_STEP_STATUSES",
    "ArtifactInfo",
    "ArtifactReader",
    "BuildInfo",
    "CodeSource",
    "LogEntry",
    "PrunedBuilds",
    "Run",
    "RunEvent",
    "RunStatus",
    "StepError",
    "StepRun",
    "StepStatus",
    "from_timestamp",
    "to_timestamp",
]


class RunStatus(StrEnum):
    """A run's state; compares equal to its name (``run.status == "SUCCEEDED"``)."""

    PENDING = "PENDING"
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"

    @property
    def is_final(self) -> bool:
        """True once the run has ended (it changes no more)."""
        return self in FINAL_RUN_STATUSES

    def to_proto(self) -> res.RunStatus.ValueType:
        return _RUN_TO_PROTO[self]

    @classmethod
    def from_proto(cls, value: int) -> RunStatus:
        try:
            return _RUN_FROM_PROTO[value]
        except KeyError:
            raise ValueError(f"no run status numbered {value}") from None


class StepStatus(StrEnum):
    """A step's state in a run; compares equal to its name (``step.status == "CACHED"``)."""

    PENDING = "PENDING"
    """Waiting for its upstream steps."""
    QUEUED = "QUEUED"
    """Handed to a runner, not started yet."""
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    """The user's code failed, for good (no retries left)."""
    CACHED = "CACHED"
    """Served from the cache: its outputs are an earlier run's."""
    SKIPPED = "SKIPPED"
    """Not run: an upstream step did not succeed."""
    CANCELLED = "CANCELLED"
    RETRYING = "RETRYING"
    """An attempt failed and another will follow."""
    CRASHED = "CRASHED"
    """The attempt's infrastructure died (worker lost), not the user's code."""

    @property
    def is_final(self) -> bool:
        """True once the step has ended in this run (it changes no more)."""
        return self in FINAL_STEP_STATUSES

    @property
    def is_success(self) -> bool:
        """True for a step whose outputs exist (it ran and succeeded, or was cached)."""
        return self is StepStatus.SUCCEEDED or self is StepStatus.CACHED

    def to_proto(self) -> res.StepStatus.ValueType:
        return _STEP_TO_PROTO[self]

    @classmethod
    def from_proto(cls, value: int) -> StepStatus:
        try:
            return _STEP_FROM_PROTO[value]
        except KeyError:
            raise ValueError(f"no step status numbered {value}") from None


FINAL_RUN_STATUSES = frozenset({RunStatus.SUCCEEDED, RunStatus.FAILED, RunStatus.CANCELLED})
FINAL_STEP_STATUSES = frozenset(
    {
        StepStatus.SUCCEEDED,
        StepStatus.FAILED,
        StepStatus.CACHED,
        StepStatus.SKIPPED,
        StepStatus.CANCELLED,
        StepStatus.CRASHED,
    }
)

_RUN_TO_PROTO = {s: res.RunStatus.Value(f"RUN_STATUS_{s.name}") for s in RunStatus}
_RUN_FROM_PROTO: dict[int, RunStatus] = {v: s for s, v in _RUN_TO_PROTO.items()}
_STEP_TO_PROTO = {s: res.StepStatus.Value(f"STEP_STATUS_{s.name}") for s in StepStatus}
_STEP_FROM_PROTO: dict[int, StepStatus] = {v: s for s, v in _STEP_TO_PROTO.items()}


# ---- time at the boundary ----------------------------------------------------------------------


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def to_timestamp(t: datetime, ts: Timestamp) -> None:
    """Writes an aware datetime into a Timestamp field (microsecond precision, exact)."""
    # by hand: Timestamp.FromDatetime costs six times as much, on the hot path of every step
    d = t - _EPOCH
    ts.seconds = d.days * 86400 + d.seconds
    ts.nanos = d.microseconds * 1000


def from_timestamp(msg: Any, name: str) -> datetime | None:
    """A Timestamp field as an aware UTC datetime, None when it is not set."""
    if not msg.HasField(name):
        return None
    ts = getattr(msg, name)
    return _EPOCH + timedelta(seconds=ts.seconds, microseconds=ts.nanos // 1000)


def from_epoch(t: float | None) -> datetime | None:
    """Seconds since the epoch (as the store keeps them) as an aware UTC datetime."""
    return None if t is None else datetime.fromtimestamp(t, UTC)


def _json_or_empty(text: str) -> dict[str, Any]:
    if not text:
        return {}
    try:
        return json.loads(text)  # type: ignore[no-any-return]
    except RecursionError:  # deeper than the parser goes: bad input, not a crash
        raise ValueError("the JSON is nested too deeply") from None


# ---- records -----------------------------------------------------------------------------------


class ArtifactReader(Protocol):
    """What can fetch an artifact's bytes when this machine cannot read its store directly
    (a :class:`plait.Client` connected to a remote control plane)."""

    embedded: bool

    def download_artifact(self, artifact_id: str) -> bytes: ...


@dataclass(frozen=True)
class ArtifactInfo:
    """A stored output: where its bytes are and how to read them."""

    artifact_id: str
    output: str
    """The name of the step output it is."""
    digest: str
    """sha256 of the stored bytes: the artifact store's key."""
    size: int
    uri: str
    materializer: str
    data_type: str
    unsafe: bool
    """True when loading it runs code (pickle)."""
    run_id: str
    step_id: str
    created_at: datetime | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    """What the step logged for this output (``log_metadata(..., output=...)``)."""
    _reader: ArtifactReader | None = field(default=None, repr=False, compare=False)

    def to_proto(self) -> res.Artifact:
        msg = res.Artifact()
        self.fill_proto(msg)
        return msg

    def fill_proto(self, msg: res.Artifact) -> None:
        """Writes this record into an empty message (a repeated field's new element: no copy)."""
        msg.name = f"artifacts/{self.artifact_id}"
        msg.artifact_id = self.artifact_id
        msg.output = self.output
        msg.digest = self.digest
        msg.size_bytes = self.size
        msg.uri = self.uri
        msg.materializer = self.materializer
        msg.data_type = self.data_type
        msg.unsafe = self.unsafe
        msg.run_id = self.run_id
        msg.step_id = self.step_id
        if self.metadata:
            msg.metadata_json = canonical_json(self.metadata)
        if self.created_at is not None:
            to_timestamp(self.created_at, msg.create_time)

    @classmethod
    def from_proto(cls, a: res.Artifact, reader: ArtifactReader | None = None) -> ArtifactInfo:
        return cls(
            artifact_id=a.artifact_id,
            output=a.output,
            digest=a.digest,
            size=a.size_bytes,
            uri=a.uri,
            materializer=a.materializer,
            data_type=a.data_type,
            unsafe=a.unsafe,
            run_id=a.run_id,
            step_id=a.step_id,
            created_at=from_timestamp(a, "create_time"),
            metadata=_json_or_empty(a.metadata_json),
            _reader=reader,
        )

    def to_json(self) -> dict[str, Any]:
        """The form the store keeps in a step's outputs and in cache entries (the metadata is
        kept with the artifact's own row, not here)."""
        return {
            "artifact_id": self.artifact_id,
            "output": self.output,
            "digest": self.digest,
            "size": self.size,
            "uri": self.uri,
            "materializer": self.materializer,
            "data_type": self.data_type,
            "unsafe": self.unsafe,
            "run_id": self.run_id,
            "step_id": self.step_id,
            "created_at": None if self.created_at is None else self.created_at.timestamp(),
        }

    @classmethod
    def from_json(cls, d: dict[str, Any], metadata: dict[str, Any] | None = None) -> ArtifactInfo:
        return cls(
            artifact_id=d["artifact_id"],
            output=d["output"],
            digest=d["digest"],
            size=d["size"],
            uri=d["uri"],
            materializer=d["materializer"],
            data_type=d["data_type"],
            unsafe=d["unsafe"],
            run_id=d["run_id"],
            step_id=d["step_id"],
            created_at=from_epoch(d.get("created_at")),
            metadata=metadata or {},
        )

    def read_bytes(self) -> bytes:
        """The stored bytes, checked against the digest: from the store when this machine
        reaches it, else streamed from the control plane."""
        from plait._artifact_store import LocalArtifactStore

        parsed = urlparse(self.uri)
        path = Path(unquote(parsed.path))
        local = parsed.scheme in ("", "file") and path.is_file()
        if not local and self._reader is not None and not self._reader.embedded:
            return self._reader.download_artifact(self.artifact_id)
        if parsed.scheme not in ("", "file"):
            raise errors.ArtifactError(f"cannot read artifact at {self.uri}: not a local file")
        try:
            return LocalArtifactStore(path.parents[2]).get(self.digest)
        except FileNotFoundError as exc:
            raise errors.ArtifactNotFoundError(
                f"artifact {self.artifact_id}: its bytes are gone from the store ({exc})"
            ) from None
        except ValueError as exc:
            raise errors.ArtifactError(f"artifact {self.artifact_id}: {exc}") from None

    def load(self) -> Any:
        """The value, read with the materializer that wrote it."""
        from plait._materializers import get_materializer

        data = self.read_bytes()
        try:
            materializer = get_materializer(self.materializer)
        except LookupError as exc:
            raise errors.ArtifactError(str(exc)) from None
        return materializer.load(data)


@dataclass(frozen=True)
class StepError:
    """What a failed step raised (or what killed its attempt)."""

    type: str
    """The qualified name of the exception type (``builtins.ValueError``)."""
    message: str
    traceback: str = ""
    types: tuple[str, ...] = ()
    """The qualified names of the exception's class and its bases, most derived first
    (``object`` left out): what a step's ``retry_on`` and ``no_retry_on`` match, subclasses
    included. Empty when no exception describes the failure (then ``type`` alone counts)."""

    @classmethod
    def of(cls, exc: BaseException, traceback: str = "") -> StepError:
        """The record of an exception."""
        chain = tuple(_qualified(c) for c in type(exc).__mro__ if c is not object)
        return cls(chain[0], str(exc), traceback, chain)

    def __str__(self) -> str:
        return f"{self.type}: {self.message}"

    def to_proto(self) -> res.StepError:
        return res.StepError(
            type=self.type, message=self.message, traceback=self.traceback, types=self.types
        )

    @classmethod
    def from_proto(cls, e: res.StepError) -> StepError:
        return cls(e.type, e.message, e.traceback, tuple(e.types))

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "type": self.type,
            "message": self.message,
            "traceback": self.traceback,
        }
        if self.types:  # left out when empty: rows of failures without them stay as they were
            d["types"] = list(self.types)
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> StepError:
        return cls(
            d.get("type", ""),
            d.get("message", ""),
            d.get("traceback", ""),
            tuple(d.get("types", ())),
        )


def _qualified(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


@dataclass(frozen=True)
class StepRun:
    """One step of a run."""

    step_id: str
    status: StepStatus
    attempt: int = 0
    start_time: datetime | None = None
    end_time: datetime | None = None
    outputs: dict[str, ArtifactInfo] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)
    """What the step logged with ``log_metadata()``."""
    error: StepError | None = None
    cache_key: str = ""
    upstream: list[str] = field(default_factory=list)
    """The ids of the steps whose outputs it reads."""

    @property
    def cached(self) -> bool:
        return self.status == StepStatus.CACHED

    @property
    def cached_from(self) -> str:
        """For a CACHED step, the id of the run that made its outputs (from the cache, or
        from the run a retry reused them from); empty otherwise."""
        if self.status != StepStatus.CACHED:
            return ""
        return next((a.run_id for a in self.outputs.values() if a.run_id), "")

    @property
    def duration(self) -> float | None:
        """Seconds from start to end, when both are known."""
        if self.start_time is None or self.end_time is None:
            return None
        return (self.end_time - self.start_time).total_seconds()

    def output(self, name: str | None = None) -> Any:
        """Loads an output's value; ``name`` may be left out when the step has one output."""
        if name is None:
            from plait.ir.mapping import split_item

            # the items of an output a map iterates (output[0], ...) are not outputs of their own
            declared = [k for k in self.outputs if split_item(k) is None]
            if len(declared) != 1:
                raise errors.PlaitError(
                    f"step {self.step_id!r} has {len(declared)} outputs "
                    f"({', '.join(declared) or 'none'}): name one"
                )
            return self.outputs[declared[0]].load()
        if name not in self.outputs:
            if not self.status.is_success:
                raise errors.PlaitError(
                    f"step {self.step_id!r} is {self.status}: it has no outputs"
                )
            raise errors.PlaitError(
                f"step {self.step_id!r} has no output {name!r}; outputs: "
                f"{', '.join(self.outputs) or 'none'}"
            )
        return self.outputs[name].load()

    def to_proto(self) -> res.StepRun:
        msg = res.StepRun()
        self.fill_proto(msg)
        return msg

    def fill_proto(self, msg: res.StepRun) -> None:
        """Writes this record into an empty message (a repeated field's new element: no copy)."""
        msg.step_id = self.step_id
        msg.status = self.status.to_proto()
        msg.attempt = self.attempt
        msg.cache_key = self.cache_key
        msg.upstream.extend(self.upstream)
        if self.metadata:
            msg.metadata_json = canonical_json(self.metadata)
        for a in self.outputs.values():
            a.fill_proto(msg.outputs.add())
        if self.start_time is not None:
            to_timestamp(self.start_time, msg.start_time)
        if self.end_time is not None:
            to_timestamp(self.end_time, msg.end_time)
        if self.error is not None:
            msg.error.CopyFrom(self.error.to_proto())

    @classmethod
    def from_proto(cls, s: res.StepRun, reader: ArtifactReader | None = None) -> StepRun:
        return cls(
            step_id=s.step_id,
            status=StepStatus.from_proto(s.status),
            attempt=s.attempt,
            start_time=from_timestamp(s, "start_time"),
            end_time=from_timestamp(s, "end_time"),
            outputs={a.output: ArtifactInfo.from_proto(a, reader) for a in s.outputs},
            metadata=_json_or_empty(s.metadata_json),
            error=StepError.from_proto(s.error) if s.HasField("error") else None,
            cache_key=s.cache_key,
            upstream=list(s.upstream),
        )


@dataclass(frozen=True)
class CodeSource:
    """Where a run's code comes from: the archive of the source root it was started from."""

    archive: str = ""
    """The sha256 of the code archive (see ``docs/code-archives.md``); empty when workers
    import the steps from their own path."""
    git_commit: str = ""
    """The commit checked out in the source root, when it is in a git work tree."""
    git_dirty: bool = False
    """True when the source root had changes that commit does not hold."""
    local_root: str = ""
    """The source root's path on the client's machine, for an embedded control plane, whose
    workers run the code in place (no archive); a daemon ignores it."""

    def to_proto(self) -> res.CodeSource:
        return res.CodeSource(
            archive=self.archive,
            git_commit=self.git_commit,
            git_dirty=self.git_dirty,
            local_root=self.local_root,
        )

    @classmethod
    def from_proto(cls, c: res.CodeSource) -> CodeSource:
        return cls(
            archive=c.archive,
            git_commit=c.git_commit,
            git_dirty=c.git_dirty,
            local_root=c.local_root,
        )


class _StepsOf(Mapping[str, StepRun]):
    """A run's steps, read from its message on first use.

    Converting a step costs ~80 us (its outputs, their times): a run of a thousand steps would
    spend ~80 ms after it ended before `Pipeline.run` returns it, for callers most of whom read
    only its status. The message is kept (not its repeated field, which cannot be pickled)
    until then; after, the steps are a plain dict."""

    __slots__ = ("_client", "_msg", "_steps")

    def __init__(self, msg: res.Run, client: Any) -> None:
        self._msg: res.Run | None = msg
        self._client = client
        self._steps: dict[str, StepRun] | None = None

    def _all(self) -> dict[str, StepRun]:
        steps = self._steps
        if steps is None:
            assert self._msg is not None
            client = self._client
            steps = {s.step_id: StepRun.from_proto(s, client) for s in self._msg.steps}
            self._steps, self._msg, self._client = steps, None, None
        return steps

    def __getitem__(self, step_id: str) -> StepRun:
        return self._all()[step_id]

    def __iter__(self) -> Iterator[str]:
        return iter(self._all())

    def __len__(self) -> int:
        if self._steps is None and self._msg is not None:
            return len(self._msg.steps)
        return len(self._all())

    def __contains__(self, step_id: object) -> bool:
        return step_id in self._all()

    def __eq__(self, other: object) -> bool:
        if isinstance(other, _StepsOf):
            other = other._all()
        return self._all() == other

    __hash__ = None  # type: ignore[assignment]  # as a dict's

    def __repr__(self) -> str:
        return repr(self._all())

    def __reduce__(self) -> Any:
        return dict, (self._all(),)


@dataclass(frozen=True)
class Run:
    """A run of a pipeline: its state, its steps, their outputs."""

    run_id: str
    pipeline: str
    pipeline_version: str
    status: RunStatus
    parameters: dict[str, Any] = field(default_factory=dict)
    """Every parameter's value, defaults included."""
    create_time: datetime | None = None
    end_time: datetime | None = None
    steps: Mapping[str, StepRun] = field(default_factory=dict)
    """Step runs by step id, in topological order (empty in listings). A read-only mapping
    (a run read from the control plane converts its steps on first use)."""
    no_cache: bool = False
    stack: str = ""
    """The stack the run used."""
    request_id: str = ""
    """The client's idempotency key of the CreateRun that made it."""
    last_sequence: int = 0
    """The sequence number of the run's newest event, to resume watching after it."""
    code: CodeSource | None = None
    """The code archive the run executes, and the git state it was packed from; None when
    its steps are imported from the workers' own path."""
    retry_of: str = ""
    """The id of the run this one retries (``plait runs retry``), or empty."""
    _client: Any = field(default=None, repr=False, compare=False)
    """The :class:`plait.Client` it was read through."""

    def to_proto(self) -> res.Run:
        msg = res.Run(
            name=f"runs/{self.run_id}",
            run_id=self.run_id,
            pipeline=self.pipeline,
            pipeline_version=self.pipeline_version,
            status=self.status.to_proto(),
            no_cache=self.no_cache,
            request_id=self.request_id,
            stack=f"stacks/{self.stack}" if self.stack else "",
            last_sequence=self.last_sequence,
            retry_of=self.retry_of,
        )
        for s in self.steps.values():
            s.fill_proto(msg.steps.add())
        for k, v in self.parameters.items():
            msg.parameters.add(name=k, json=canonical_json(v))
        if self.create_time is not None:
            to_timestamp(self.create_time, msg.create_time)
        if self.end_time is not None:
            to_timestamp(self.end_time, msg.end_time)
        if self.code is not None:
            msg.code.SetInParent()
            msg.code.CopyFrom(self.code.to_proto())
        return msg

    @classmethod
    def from_proto(cls, r: res.Run, client: Any = None) -> Run:
        return cls(
            run_id=r.run_id,
            pipeline=r.pipeline,
            pipeline_version=r.pipeline_version,
            status=RunStatus.from_proto(r.status),
            parameters={p.name: json.loads(p.json) for p in r.parameters},
            create_time=from_timestamp(r, "create_time"),
            end_time=from_timestamp(r, "end_time"),
            steps=_StepsOf(r, client) if r.steps else {},
            no_cache=r.no_cache,
            stack=r.stack.removeprefix("stacks/"),
            request_id=r.request_id,
            last_sequence=r.last_sequence,
            code=CodeSource.from_proto(r.code) if r.HasField("code") else None,
            retry_of=r.retry_of,
            _client=client,
        )

    def raise_for_status(self) -> Run:
        """Raises StepFailedError naming the first failed step when the run did not succeed."""
        if self.status == RunStatus.SUCCEEDED:
            return self
        for s in self.steps.values():
            if s.status in (StepStatus.FAILED, StepStatus.CRASHED):
                err = s.error or StepError("", "", "")
                raise errors.StepFailedError(s.step_id, err.type, err.message, err.traceback)
        raise errors.PlaitError(f"run {self.run_id} is {self.status}")

    def refresh(self) -> Run:
        """A fresh copy of this run from the control plane."""
        return self._client_or_default().get_run(self.run_id)  # type: ignore[no-any-return]

    def wait(self) -> Run:
        """Blocks until the run ends; returns the final state."""
        return self._client_or_default().wait(self.run_id)  # type: ignore[no-any-return]

    def output(self, step: str, name: str | None = None) -> Any:
        """Loads an output of a step of this run (as :meth:`StepRun.output`); for a mapped
        step (``step.map``), the list of its items' outputs, in order.

        Args:
            step: the step's id.
            name: the output's name; may be left out when the step has one output.

        Raises:
            PlaitError: no such step or output, or the step (or one of its items) did not
                succeed.
        """
        if step not in self.steps:
            raise errors.PlaitError(
                f"run {self.run_id} has no step {step!r}; its steps: "
                f"{', '.join(k for k in self.steps if '[' not in k)}"
            )
        from plait.ir.mapping import split_item

        items = {}
        for k, s in self.steps.items():
            item = split_item(k)
            if item is not None and item[0] == step:
                items[item[1]] = s
        if not items:
            return self.steps[step].output(name)
        if not self.steps[step].status.is_success:
            raise errors.PlaitError(f"mapped step {step!r} is {self.steps[step].status}")
        return [items[i].output(name) for i in sorted(items)]

    def logs(self, step: str | None = None) -> str:
        """The captured output of the run's steps (or one step), as text."""
        return "".join(e.text for e in self._client_or_default().logs(self.run_id, step))

    def _client_or_default(self) -> Any:
        if self._client is not None:
            return self._client
        from plait._client import Client

        return Client.default()


@dataclass(frozen=True)
class RunEvent:
    """A change of a run or of one of its steps, numbered in commit order."""

    run_id: str
    step_id: str
    """Empty for an event of the run itself."""
    run_status: RunStatus | None
    """The run's new status, on a run event."""
    step_status: StepStatus | None
    """The step's new status, on a step event."""
    attempt: int
    message: str
    time: datetime
    sequence: int = 0
    """Assigned when the event is committed; increases within a run."""

    def to_proto(self) -> res.RunEvent:
        msg = res.RunEvent(
            sequence=self.sequence,
            run_id=self.run_id,
            step_id=self.step_id,
            attempt=self.attempt,
            message=self.message,
        )
        if self.run_status is not None:
            msg.run_status = self.run_status.to_proto()
        if self.step_status is not None:
            msg.step_status = self.step_status.to_proto()
        to_timestamp(self.time, msg.time)
        return msg

    @classmethod
    def from_proto(cls, e: res.RunEvent) -> RunEvent:
        return cls(
            run_id=e.run_id,
            step_id=e.step_id,
            run_status=RunStatus.from_proto(e.run_status) if e.run_status else None,
            step_status=StepStatus.from_proto(e.step_status) if e.step_status else None,
            attempt=e.attempt,
            message=e.message,
            time=from_timestamp(e, "time") or datetime.fromtimestamp(0, UTC),
            sequence=e.sequence,
        )


@dataclass(frozen=True)
class LogEntry:
    """A chunk of what a step wrote to stdout or stderr."""

    step_id: str
    attempt: int
    stream: str
    """``stdout`` or ``stderr``."""
    text: str
    time: datetime
    sequence: int = 0

    def to_proto(self) -> res.LogEntry:
        msg = res.LogEntry(
            sequence=self.sequence,
            step_id=self.step_id,
            attempt=self.attempt,
            stream=self.stream,
            text=self.text,
        )
        to_timestamp(self.time, msg.time)
        return msg

    @classmethod
    def from_proto(cls, e: res.LogEntry) -> LogEntry:
        return cls(
            step_id=e.step_id,
            attempt=e.attempt,
            stream=e.stream,
            text=e.text,
            time=from_timestamp(e, "time") or datetime.fromtimestamp(0, UTC),
            sequence=e.sequence,
        )


@dataclass(frozen=True)
class BuildInfo:
    """A build of an environment (a container image or a virtualenv), addressed by its key."""

    key: str
    """The sha256 of its key material."""
    kind: str
    """``image`` or ``venv``."""
    status: str
    """``BUILDING``, ``READY`` or ``FAILED``."""
    build_digest: str = ""
    """The environment's build digest: what it declares goes into the build."""
    reference: str = ""
    """An image reference (REPOSITORY:TAG) or a virtualenv's folder."""
    image_id: str = ""
    size_bytes: int = 0
    duration_seconds: float = 0.0
    """How long making it took."""
    created_at: float = 0.0
    """Seconds since the epoch."""
    last_used_at: float = 0.0
    """Seconds since the epoch."""
    run_ids: tuple[str, ...] = ()
    """The runs that used it, newest first (at most 100)."""
    material: dict[str, Any] = field(default_factory=dict)
    """What the key is the digest of, component by component (``plait builds explain``)."""
    error: str = ""
    source: str = ""
    """How it came to be usable the last time: ``built``, ``local`` or ``pulled``."""
    pushed_to: str = ""
    """The registry it was pushed to, if any."""

    def to_proto(self) -> builds_pb.Build:
        return builds_pb.Build(
            key=self.key,
            kind=self.kind,
            status=self.status,
            build_digest=self.build_digest,
            reference=self.reference,
            image_id=self.image_id,
            size_bytes=self.size_bytes,
            duration_seconds=self.duration_seconds,
            created_at=self.created_at,
            last_used_at=self.last_used_at,
            run_ids=self.run_ids,
            key_material_json=canonical_json(self.material),
            error=self.error,
            source=self.source,
            pushed_to=self.pushed_to,
        )

    @classmethod
    def from_proto(cls, b: builds_pb.Build) -> BuildInfo:
        return cls(
            key=b.key,
            kind=b.kind,
            status=b.status,
            build_digest=b.build_digest,
            reference=b.reference,
            image_id=b.image_id,
            size_bytes=b.size_bytes,
            duration_seconds=b.duration_seconds,
            created_at=b.created_at,
            last_used_at=b.last_used_at,
            run_ids=tuple(b.run_ids),
            material=_json_or_empty(b.key_material_json),
            error=b.error,
            source=b.source,
            pushed_to=b.pushed_to,
        )


@dataclass(frozen=True)
class PrunedBuilds:
    """What ``Client.prune_builds`` removed (or, for a dry run, would remove)."""

    builds: tuple[BuildInfo, ...]
    freed_bytes: int
    dry_run: bool = False
