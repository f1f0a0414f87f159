"""Why a step ran or was served from the cache (``plait runs explain``, Client.explain_step)."""

from __future__ import annotations

from dataclasses import dataclass, field

from plait._models import StepStatus
from plait.api.v1 import run_service_pb2 as pb


@dataclass(frozen=True)
class KeyDifference:
    """One component of a step's cache key that differs from an earlier entry's."""

    component: str
    """``code``, ``outputs``, ``parameter``, ``input``, ``environment``, ``cache_version`` or
    ``key_scheme``."""
    name: str
    """The parameter's or input's name; empty for the other components."""
    value: str
    """Its value in this run (canonical JSON or a digest); empty when it has none."""
    earlier_value: str
    """Its value in the earlier entry; empty when it has none."""

    def describe(self) -> str:
        what = f"{self.component} {self.name!r}" if self.name else self.component
        if not self.earlier_value:
            return f"{what}: {self.value} (the earlier entry has none)"
        if not self.value:
            return f"{what}: none (was {self.earlier_value})"
        return f"{what}: {self.value} (was {self.earlier_value})"


@dataclass(frozen=True)
class CacheExplanation:
    """Why a step of a run ran or was cached: its key compared with the nearest earlier cache
    entry of the same step (same pipeline name and step id)."""

    run_id: str
    step_id: str
    status: StepStatus
    cache_key: str
    reason: str
    """One line: why it ran or was cached."""
    cached_from_run: str = ""
    """For a CACHED step, the run whose outputs it reuses."""
    earlier_run: str = ""
    """The run of the earlier entry compared with; empty when there is none."""
    differences: list[KeyDifference] = field(default_factory=list)

    def to_proto(self) -> pb.ExplainStepResponse:
        return pb.ExplainStepResponse(
            run_id=self.run_id,
            step_id=self.step_id,
            status=self.status.to_proto(),
            cache_key=self.cache_key,
            reason=self.reason,
            cached_from_run=self.cached_from_run,
            earlier_run=self.earlier_run,
            differences=[
                pb.CacheKeyDifference(
                    component=d.component, name=d.name, value=d.value, earlier_value=d.earlier_value
                )
                for d in self.differences
            ],
        )

    @classmethod
    def from_proto(cls, p: pb.ExplainStepResponse) -> CacheExplanation:
        return cls(
            run_id=p.run_id,
            step_id=p.step_id,
            status=StepStatus.from_proto(p.status),
            cache_key=p.cache_key,
            reason=p.reason,
            cached_from_run=p.cached_from_run,
            earlier_run=p.earlier_run,
            differences=[
                KeyDifference(d.component, d.name, d.value, d.earlier_value) for d in p.differences
            ],
        )
