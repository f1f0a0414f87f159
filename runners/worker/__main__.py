"""``python -m plait.runners.worker``: a worker process on the Connect stream (runners start it)."""

from __future__ import annotations

import argparse
import gc
import os
import sys


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
    parser.add_argument(
        "--address",
        required=True,
        help="the control plane's host:port; '-': read it, and the worker secret, from "
        'standard input as one JSON line ({"address": ..., "token": ...}) once the imports '
        "are done (a worker started before its control plane listens)",
    )
    parser.add_argument("--worker-id", required=True)
    parser.add_argument("--runner", default="local")
    parser.add_argument(
        "--fork-server",
        type=int,
        metavar="FD",
        help="with --address -: be the fork server of a local runner (Linux): fork the "
        "worker --worker-id at once, then one per request on standard input, answering on the "
        "inherited pipe FD (see plait.runners.worker._forks)",
    )
    opts = parser.parse_args(argv)
    # What the imports below allocate lives as long as the process: a collection during them
    # walks it for nothing (a tenth of a worker's start). Collections resume before any step.
    gc.disable()
    from plait.runners.worker._lease import die_with_parent
    from plait.runners.worker._stream import serve

    parent = os.environ.get("PLAIT_PARENT_PID", "")  # set by the runner that started it
    if parent.isdigit():
        die_with_parent(int(parent))
    address, worker_id = opts.address, opts.worker_id
    if address == "-" and opts.fork_server is not None:
        from plait.runners.worker._forks import serve_forks

        _import_for_steps()
        forked = serve_forks(worker_id, opts.fork_server)
        if isinstance(forked, int):  # the fork server ends, its children reaped
            sys.stderr.flush()
            os._exit(forked)  # no tearing down what it imported: the stop waits for it
        address, worker_id = forked.address, forked.worker_id  # a worker it forked
    elif address == "-":
        address = _address_from_stdin()
        if not address:
            return 0  # its control plane never came (or was not a local one)
    gc.enable()
    try:
        serve(address, worker_id=worker_id, runner=opts.runner)
    except KeyboardInterrupt:
        return 130
    return 0


def _address_from_stdin() -> str:
    """The control plane's address from standard input (the worker secret goes to
    ``PLAIT_WORKER_TOKEN``, where :func:`serve` reads it); empty when the input ends first.
    What a first step needs is imported before waiting."""
    import json

    _import_for_steps()
    line = sys.stdin.readline()
    if not line.strip():
        return ""
    try:
        given = json.loads(line)
        address, token = str(given["address"]), str(given.get("token", ""))
    except (ValueError, KeyError, TypeError) as exc:
        raise SystemExit(f"plait worker: standard input is not an address line: {exc}") from None
    if token:
        os.environ["PLAIT_WORKER_TOKEN"] = token
    return address


def _import_for_steps() -> None:
    """Imports what a first step needs beyond the transport (a worker that waits for its
    address, or a fork server, does it while it waits). A forked worker that imported one of
    these after its fork paid for it on its first step, on the run's critical path."""
    import grpc._channel  # grpc imports it with the first channel (the worker's stream)
    import grpc._simple_stubs  # noqa: F401  (and this)

    import plait._client  # the first step's import refuses pipeline runs through it
    import plait._materializers
    import plait._pipeline  # noqa: F401  (the user's module uses it)


if __name__ == "__main__":
    sys.exit(main())
