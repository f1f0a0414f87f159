"""``python -m plait.runners.worker``: a worker process on the Connect stream (runners start it)."""

from __future__ import annotations

import argparse
import os
import signal
import sys

from plait.runners.worker._stream import serve

PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """Asks the kernel to SIGKILL this process when the control plane that started it dies
    (Linux), so that no step of a killed control plane goes on beside its own retry. The
    parent's pid comes from ``PLAIT_PARENT_PID``; if it is gone already, exit now."""
    parent = os.environ.get("PLAIT_PARENT_PID", "")
    if not parent.isdigit():
        return
    if sys.platform.startswith("linux"):
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != int(parent):  # the parent died before the request took effect
        os._exit(1)


def main(argv: list[str] | None = None) -> int:
    """Runs the worker until its stream ends.

    Args:
        argv: the command-line arguments (default: ``sys.argv[1:]``).

    Returns:
        The process's exit code: 0, or 130 when interrupted.
    """
    parser = argparse.ArgumentParser(
        prog="python -m plait.runners.worker",
        description="A Plait worker process (started by a runner).",
    )
    parser.add_argument("--address", required=True, help="the control plane's host:port")
    parser.add_argument("--worker-id", required=True)
    parser.add_argument("--runner", default="local")
    opts = parser.parse_args(argv)
    die_with_parent()
    try:
        serve(opts.address, worker_id=opts.worker_id, runner=opts.runner)
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
