"""Runners: where steps execute. The protocol, the local process runner and the Docker runner.

A runner never talks to the database: the step code it starts reports over gRPC to the control
plane's TaskService, wherever it runs. Importing this package never imports aiodocker: the
Docker runner loads it when it starts (``pip install 'plait[docker]'``).
"""

from plait.runners._docker import ContainerOptions, DockerRunner
from plait.runners._local import LocalRunner
from plait.runners._protocol import Runner, RunnerContext, WorkerPool

__all__ = [
    "ContainerOptions",
    "DockerRunner",
    "LocalRunner",
    "Runner",
    "RunnerContext",
    "WorkerPool",
]
