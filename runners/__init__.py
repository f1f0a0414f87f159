"""Runners: where steps execute. The protocol, the local process runner and the Docker runner.

A runner never talks to the database: the step code it starts reports over gRPC to the control
plane's TaskService, wherever it runs. Importing this package never imports aiodocker: the
Docker runner loads it when it starts (``pip install 'plait[docker]'``).
"""

from typing import TYPE_CHECKING, Any

from plait.runners._local import LocalRunner
from plait.runners._protocol import Runner, RunnerContext, WorkerPool

if TYPE_CHECKING:
    from plait.runners._docker import ContainerOptions, DockerRunner

__all__ = [
    "ContainerOptions",
    "DockerRunner",
    "LocalRunner",
    "Runner",
    "RunnerContext",
    "WorkerPool",
]


def __getattr__(name: str) -> Any:
    # the Docker runner's module is loaded on first use: a worker process never pays for it
    if name in ("ContainerOptions", "DockerRunner"):
        from plait.runners import _docker

        return getattr(_docker, name)
    raise AttributeError(f"module 'plait.runners' has no attribute {name!r}")
