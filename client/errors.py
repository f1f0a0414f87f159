"""Plait's exceptions.

Every error Plait raises on purpose is a :class:`PlaitError`::

    PlaitError
    ├── StepFailedError            the user's code failed (raised ``from`` the original)
    ├── PipelineError              the engine refused what it was given
    │   ├── PipelineDefinitionError    a pipeline or step is written wrong (at decoration/trace)
    │   ├── PipelineValidationError    the traced graph or the IR is invalid
    │   └── ParameterError             a run's parameter values are wrong
    ├── NotFoundError
    │   ├── RunNotFoundError
    │   ├── ArtifactNotFoundError
    │   └── PipelineNotFoundError
    ├── ArtifactError              an artifact cannot be stored or loaded
    ├── LeaseLostError             a report carried a stale lease token (FAILED_PRECONDITION)
    ├── NotInStepError             step-only API used outside a running step
    ├── InUseError                 still used by something else (a component by a stack)
    └── RpcError                   the control plane could not be reached or answered an error
"""

from __future__ import annotations

__all__ = [
    "ArtifactError",
    "ArtifactNotFoundError",
    "InUseError",
    "LeaseLostError",
    "NotFoundError",
    "NotInStepError",
    "ParameterError",
    "PipelineDefinitionError",
    "PipelineError",
    "PipelineNotFoundError",
    "PipelineValidationError",
    "PlaitError",
    "RpcError",
    "RunNotFoundError",
    "StepFailedError",
    "UnavailableError",
]


class PlaitError(Exception):
    """Base of every error Plait raises on purpose."""

    reason: str = "PLAIT_ERROR"
    """A stable, upper-case reason a caller can branch on (gRPC ``ErrorInfo.reason``)."""


class StepFailedError(PlaitError):
    """A step's code raised; the run failed.

    Attributes:
        step_id: the failed step's id.
        error_type: the qualified type name of what the step raised.
        traceback: the formatted traceback, as the step's process saw it.
    """

    reason = "STEP_FAILED"

    def __init__(
        self, step_id: str, error_type: str = "", message: str = "", traceback: str = ""
    ) -> None:
        self.step_id = step_id
        self.error_type = error_type
        self.traceback = traceback
        detail = f"{error_type}: {message}" if error_type else message
        super().__init__(f"step {step_id!r} failed: {detail}")


class PipelineError(PlaitError):
    """The engine refused a pipeline, a step or a run request."""

    reason = "INVALID_PIPELINE"


class PipelineDefinitionError(PipelineError):
    """A step or pipeline is written in a way Plait cannot trace or run."""

    reason = "INVALID_DEFINITION"


class PipelineValidationError(PipelineError):
    """The traced graph or a received IR is invalid (names the step and the input)."""

    reason = "INVALID_PIPELINE"


class ParameterError(PipelineError):
    """A run's parameter values are missing, unknown or not JSON."""

    reason = "INVALID_PARAMETER"


class NotFoundError(PlaitError):
    """Something asked for by id does not exist."""

    reason = "NOT_FOUND"


class RunNotFoundError(NotFoundError):
    """No run has that id (or the prefix is ambiguous)."""

    reason = "RUN_NOT_FOUND"


class ArtifactNotFoundError(NotFoundError):
    """No artifact has that id, or its bytes are gone from the store."""

    reason = "ARTIFACT_NOT_FOUND"


class PipelineNotFoundError(NotFoundError):
    """No pipeline version has that name."""

    reason = "PIPELINE_NOT_FOUND"


class ArtifactError(PlaitError):
    """An artifact cannot be stored or loaded."""

    reason = "ARTIFACT_ERROR"


class LeaseLostError(PlaitError):
    """A task report carried a lease token that is no longer current."""

    reason = "LEASE_LOST"


class NotInStepError(PlaitError):
    """A step-only function (``get_step_context``, ``log_metadata``) ran outside a step."""

    reason = "NOT_IN_STEP"


class InUseError(PlaitError):
    """Something cannot be deleted or changed while others use it (FAILED_PRECONDITION)."""

    reason = "IN_USE"


class UnavailableError(PlaitError):
    """The control plane cannot serve the call now, but another try may succeed: the run is
    scheduled by another control-plane replica, or by one that is gone and not yet taken over."""

    reason = "UNAVAILABLE"


class RpcError(PlaitError):
    """The control plane could not be reached, or answered with an error Plait does not map.

    Attributes:
        code: the gRPC status code's name ("UNAVAILABLE", ...).
    """

    reason = "RPC_ERROR"

    def __init__(self, message: str, code: str = "UNKNOWN") -> None:
        self.code = code
        super().__init__(message)
