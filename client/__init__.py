"""Plait: an async workflow engine for Python, embedded as a library, with a gRPC control plane.

Define steps with :func:`step`, compose them in a :func:`pipeline`, call the pipeline::

    @plait.step
    def load(n: int) -> list[int]:
        return list(range(n))

    @plait.pipeline
    def demo(n: int = 10):
        load(n)

    run = demo(n=100)          # a plait.Run, finished
"""

from typing import TYPE_CHECKING, Any

from plait._grpc_tuning import tune as _tune_grpc

_tune_grpc()  # before anything imports grpc (see plait._grpc_tuning)
del _tune_grpc

if TYPE_CHECKING:  # what type checkers see; at run time each name is imported on first use
    from plait._client import Client
    from plait._context import StepContext, get_step_context, log_metadata
    from plait._environment import Environment, Resources
    from plait._file import File
    from plait._materializers import Materializer, register_materializer
    from plait._models import ArtifactInfo, Run, RunEvent, RunStatus, StepError, StepRun, StepStatus
    from plait._models import StepStatus as Status
    from plait._pipeline import Pipeline, pipeline
    from plait._step import Step, StepSettings, step
    from plait.errors import (
        ArtifactError,
        ArtifactNotFoundError,
        NotInStepError,
        ParameterError,
        PipelineDefinitionError,
        PipelineError,
        PipelineValidationError,
        PlaitError,
        RpcError,
        RunNotFoundError,
        StepFailedError,
    )

__version__ = "0.1.0"

# name -> the module that defines it. `import plait` stays cheap (no grpc, no engine): a worker,
# `import plait.errors` or a CLI command loads only what it uses.
_LAZY = {
    "Client": "plait._client",
    "StepContext": "plait._context",
    "get_step_context": "plait._context",
    "log_metadata": "plait._context",
    "Environment": "plait._environment",
    "Resources": "plait._environment",
    "File": "plait._file",
    "Materializer": "plait._materializers",
    "register_materializer": "plait._materializers",
    "ArtifactInfo": "plait._models",
    "Run": "plait._models",
    "RunEvent": "plait._models",
    "RunStatus": "plait._models",
    "StepError": "plait._models",
    "StepRun": "plait._models",
    "StepStatus": "plait._models",
    "Pipeline": "plait._pipeline",
    "pipeline": "plait._pipeline",
    "Step": "plait._step",
    "StepSettings": "plait._step",
    "step": "plait._step",
    **{
        name: "plait.errors"
        for name in (
            "ArtifactError",
            "ArtifactNotFoundError",
            "NotInStepError",
            "ParameterError",
            "PipelineDefinitionError",
            "PipelineError",
            "PipelineValidationError",
            "PlaitError",
            "RpcError",
            "RunNotFoundError",
            "StepFailedError",
        )
    },
}
_ALIASES = {"Status": ("plait._models", "StepStatus")}
"""``Status`` is the step status, a superset of the run statuses (kept for older code)."""


def __getattr__(name: str) -> Any:
    import importlib

    if name in _ALIASES:
        module, attr = _ALIASES[name]
    elif name in _LAZY:
        module, attr = _LAZY[name], name
    else:
        raise AttributeError(f"module 'plait' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), attr)
    globals()[name] = value  # the next access is a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


__all__ = [
    "ArtifactError",
    "ArtifactInfo",
    "ArtifactNotFoundError",
    "Client",
    "Environment",
    "File",
    "Materializer",
    "NotInStepError",
    "ParameterError",
    "Pipeline",
    "PipelineDefinitionError",
    "PipelineError",
    "PipelineValidationError",
    "PlaitError",
    "Resources",
    "RpcError",
    "Run",
    "RunEvent",
    "RunNotFoundError",
    "RunStatus",
    "Status",
    "Step",
    "StepContext",
    "StepError",
    "StepFailedError",
    "StepRun",
    "StepSettings",
    "StepStatus",
    "__version__",
    "get_step_context",
    "log_metadata",
    "pipeline",
    "register_materializer",
    "step",
]
