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

from plait._client import ArtifactInfo, Client, Run, Status, StepError, StepRun
from plait._context import StepContext, get_step_context, log_metadata
from plait._environment import Environment
from plait._materializers import Materializer, register_materializer
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

__all__ = [
    "ArtifactError",
    "ArtifactInfo",
    "ArtifactNotFoundError",
    "Client",
    "Environment",
    "Materializer",
    "NotInStepError",
    "ParameterError",
    "Pipeline",
    "PipelineDefinitionError",
    "PipelineError",
    "PipelineValidationError",
    "PlaitError",
    "RpcError",
    "Run",
    "RunNotFoundError",
    "Status",
    "Step",
    "StepContext",
    "StepError",
    "StepFailedError",
    "StepRun",
    "StepSettings",
    "__version__",
    "get_step_context",
    "log_metadata",
    "pipeline",
    "register_materializer",
    "step",
]
