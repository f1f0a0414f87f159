"""``python -m plait.runners.worker``: a worker process on the Connect stream (runners start it)."""

from __future__ import annotations

import argparse
import os
import sys

from plait.runners.worker._lease import die_with_parent
from plait.runners.worker._stream import serve


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
    parent = os.environ.get("PLAIT_PARENT_PID", "")  # set by the runner that started it
    if parent.isdigit():
        die_with_parent(int(parent))
    try:
        serve(opts.address, worker_id=opts.worker_id, runner=opts.runner)
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
