"""The worker: one step-execution core, several transports around it.

`StepExecutor` runs one task in this process: it imports the step's code (and re-imports it
when its digest changed), resolves the inputs, sets the step's environment variables and
context, captures fds 1 and 2, calls the function (async ones on its own event loop), checks and
stores the outputs, and turns an exception into a StepError. It reports what happens to a
`Reporter` and never learns where the task came from or where the reports go.

A transport gets tasks and carries reports; there are three, around the same core, so every
transport runs a step the same way and reports the same messages with the same lease token:

- the TaskService.Connect stream (`serve`, `StreamReporter`), one per process of the local
  warm pool, run as ``python -m plait.runners.worker --address HOST:PORT --worker-id ID``;
- the unary WorkerService (`_unary.UnaryReporter`), used by remote workers (``plait worker``,
  `_remote.py`: a supervisor that long-polls and runs each task in a warm child process);
- the one-shot entrypoint ``python -m plait.runners.step`` (containers, cluster jobs), which
  claims one leased task and exits.

While a step runs, `_lease.py` keeps its lease: heartbeats every third of it, and the step's
process stops itself (exit `EXIT_LEASE_LOST`, or `EXIT_CANCELLED`) when the lease is lost,
cannot be renewed, or the control plane asks it to stop. A worker holds no state the control
plane cannot recover: if it dies, its attempt is CRASHED and retried. It never imports the
engine.
"""

from plait.runners.worker._execute import Reporter, StepExecutor
from plait.runners.worker._lease import EXIT_CANCELLED, EXIT_LEASE_LOST, Cancelled, LeaseLost
from plait.runners.worker._stream import STARTED_DELAY, StreamReporter, serve

__all__ = [
    "EXIT_CANCELLED",
    "EXIT_LEASE_LOST",
    "STARTED_DELAY",
    "Cancelled",
    "LeaseLost",
    "Reporter",
    "StepExecutor",
    "StreamReporter",
    "serve",
]
