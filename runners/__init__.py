"""Runners: where steps execute. The protocol, and the local process runner.

A runner never talks to the database: the step code it starts reports over gRPC to the control
plane's TaskService, wherever it runs.
"""

from plait.runners._local import LocalRunner
from plait.runners._protocol import Runner, RunnerContext, WorkerPool

__all__ = ["LocalRunner", "Runner", "RunnerContext", "WorkerPool"]
