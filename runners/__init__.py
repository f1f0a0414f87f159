"""Runners: where steps execute. The protocol, the local process runner and the Docker runner.

A runner never talks to the database: the step code it starts reports over gRPC to the control
plane's TaskService, wherever it runs. Importing this package never imports aiodocker: the
Docker runner loads it when it starts (``pip install 'plait[docker]'``).
"""

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from plait.runners._docker import ContainerOptions, DockerRunner
    from plait.runners._local import LocalRunner
    from plait.runners._protocol import Runner, RunnerContext, WorkerGone, WorkerPool

__all__ = [
    "ContainerOptions",
    "DockerRunner",
    "LocalRunner",
    "Runner",
    "RunnerContext",
    "WorkerGone",
    "WorkerPool",
]


_LAZY = {
    "ContainerOptions": "_docker",
    "DockerRunner": "_docker",
    "LocalRunner": "_local",
    "Runner": "_protocol",
    "RunnerContext": "_protocol",
    "WorkerGone": "_protocol",
    "WorkerPool": "_protocol",
}


def __getattr__(name: str) -> Any:
    # each runner's module is loaded on first use: a worker process (plait.runners.worker)
    # imports none of them, nor anyio and asyncio with them (half of its imports)
    module = _LAZY.get(name)
    if module is not None:
        import importlib

        return getattr(importlib.import_module(f"plait.runners.{module}"), name)
    raise AttributeError(f"module 'plait.runners' has no attribute {name!r}")
