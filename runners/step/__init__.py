"""``python -m plait.runners.step``: run one leased task and exit (containers, cluster jobs).

The third transport around the one step-execution core, beside the local pool's stream and
``plait worker``: a process started for exactly one task. It claims the task from the control
plane over WorkerService (the lease it was started for, ``--lease RUN/STEP/ATTEMPT/EPOCH``, or
the next task of a pool, ``--pool NAME``), runs it in this process with the unary reporter,
keeps its lease with heartbeats, and exits. The token comes from ``PLAIT_TOKEN`` (role
``worker``); ``PLAIT_TLS_CA``, ``PLAIT_TLS_CERT`` and ``PLAIT_TLS_KEY`` set up TLS.

Exit codes (a runner that starts this process reads them):

====  ==================================================================================
0     the step's completion or its failure was reported (the step's own failure is data)
1     the control plane refused the worker or a report (credential, role, bad request), or
      could not be reached before the lease ran out when nothing says the lease was lost
2     usage error
3     no task came: the pool had none within ``--wait`` seconds
4     the lease was lost: the task is not (or no longer) this process's, or the lease could
      not be renewed (the control plane unreachable too long); nothing reported counted
5     cancelled: the run was cancelled or the step's timeout passed
====  ==================================================================================
"""

from plait.runners.worker._lease import EXIT_CANCELLED, EXIT_LEASE_LOST

EXIT_OK = 0
"""The step's completion or failure was reported."""
EXIT_ERROR = 1
"""The control plane refused the worker or a report."""
EXIT_USAGE = 2
"""The command line is wrong."""
EXIT_NO_TASK = 3
"""No task of the pool came within the wait."""

__all__ = [
    "EXIT_CANCELLED",
    "EXIT_ERROR",
    "EXIT_LEASE_LOST",
    "EXIT_NO_TASK",
    "EXIT_OK",
    "EXIT_USAGE",
]
