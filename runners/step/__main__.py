"""``python -m plait.runners.step``: claim one task, run it in this process, report, exit."""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence

import grpc

from plait.runners.step import EXIT_ERROR, EXIT_NO_TASK, EXIT_OK
from plait.runners.worker._lease import Cancelled, LeaseLost, describe, die_with_parent

_EPILOG = """\
exit codes:
  0  the step's completion or failure was reported
  1  the control plane refused the worker or a report
  2  usage error
  3  no task came (--pool: none within --wait seconds)
  4  the lease was lost or could not be renewed: nothing reported counted
  5  cancelled: the run was cancelled or the step's timeout passed

The token comes from PLAIT_TOKEN (a worker token: `plait token create NAME --role worker`);
PLAIT_TLS_CA, PLAIT_TLS_CERT and PLAIT_TLS_KEY set up TLS.

examples:
  python -m plait.runners.step --server cp:7676 --lease 3f2a.../train/1/1
  python -m plait.runners.step --server cp:7676 --pool gpu --wait 60
"""


def _say(line: str) -> None:
    sys.stderr.write(f"plait step: {line}\n")
    sys.stderr.flush()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m plait.runners.step",
        description=(
            "Run one leased step of a Plait pipeline in this process and exit: claim it from "
            "the control plane, run it, keep its lease, report its logs, metadata, outputs "
            "and result."
        ),
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--server",
        default=os.environ.get("PLAIT_SERVER") or None,
        required=not os.environ.get("PLAIT_SERVER"),
        metavar="HOST:PORT",
        help="the control plane [env PLAIT_SERVER]",
    )
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument(
        "--lease",
        metavar="RUN/STEP/ATTEMPT/EPOCH",
        help="claim this task (the lease token a runner was given for it)",
    )
    which.add_argument("--pool", metavar="NAME", help="take the next task of this pool")
    parser.add_argument(
        "--wait",
        type=float,
        default=20.0,
        metavar="SECONDS",
        help="with --pool: how long to wait for a task, at most 60 (default: 20)",
    )
    parser.add_argument(
        "--artifacts",
        choices=("auto", "local", "remote"),
        default="auto",
        help="read and write artifacts through the control plane (remote) or at the store path "
        "the task names (local); auto: local when the control plane is on this machine",
    )
    parser.add_argument(
        "--worker-id",
        default="",
        help="the lease's holder, for people (default: step-HOSTNAME-PID)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the entrypoint; returns its exit code (see `plait.runners.step`)."""
    from plait._channel import ChannelConfig
    from plait.runners.worker._remote import default_worker_id
    from plait.runners.worker._unary import (
        REFUSED,
        TRANSIENT,
        Backoff,
        UnaryReporter,
        WorkerClient,
        code_of,
        details,
        lease_token,
        reason,
        refused_message,
        remote_artifacts,
    )

    parser = _parser()
    opts = parser.parse_args(argv)
    lease = None
    if opts.lease is not None:
        try:
            lease = lease_token(opts.lease)
        except ValueError as exc:
            parser.error(f"--lease: {exc}")
    if not 0 < opts.wait <= 60:
        parser.error(f"--wait: expected more than 0 and at most 60 seconds, got {opts.wait:g}")
    parent = os.environ.get("PLAIT_PARENT_PID", "")  # a local runner's process: dies with it
    if parent.isdigit():
        die_with_parent(int(parent))
    worker_id = opts.worker_id or f"step-{default_worker_id()}"
    config = ChannelConfig.from_env(opts.server, token=os.environ.get("PLAIT_TOKEN", ""))
    client = WorkerClient(config)

    # claim the task, retrying while the control plane is unreachable, up to the wait
    end = time.monotonic() + opts.wait
    backoff = Backoff()
    while True:
        try:
            task = client.poll(
                opts.pool or "",
                worker_id,
                wait=max(0.1, end - time.monotonic()) if lease is None else opts.wait,
                lease=lease,
                pid=os.getpid(),
            )
            leased_at = time.monotonic()  # committed just before the answer came
            break
        except grpc.RpcError as exc:
            code = code_of(exc)
            if code in REFUSED:
                _say(f"error: {refused_message(exc, client.address)}")
                return EXIT_ERROR
            if reason(exc) == "LEASE_LOST":
                _say(f"lease lost: {details(exc)}")
                return LeaseLost.exit_code
            wait = backoff.next()
            if code not in TRANSIENT or time.monotonic() + wait > end:
                _say(f"error: PollTask failed: {code.name}: {details(exc)}")
                return EXIT_ERROR
            time.sleep(wait)
    if task is None:
        _say(f"no task of pool {opts.pool!r} came within {opts.wait:g} s")
        return EXIT_NO_TASK

    from plait.runners.worker._execute import StepExecutor

    what = describe(task.token)
    _say(f"running {what} ({task.step.name or task.step.id})")
    reporter = UnaryReporter(client, task, leased_at=leased_at)
    try:
        executor = StepExecutor(
            channel=client.channel,
            metadata=client.metadata,
            remote_artifacts=remote_artifacts(opts.artifacts, opts.server),
        )
        executor.run(task, reporter)
    except (SystemExit, KeyboardInterrupt) as exc:  # reported as the step's failure
        _say(f"{what}: the step raised {type(exc).__name__} (reported)")
        return 130 if isinstance(exc, KeyboardInterrupt) else EXIT_OK
    except Cancelled as exc:
        _say(f"{what}: cancelled: {exc}")
        return Cancelled.exit_code
    except LeaseLost as exc:
        _say(f"{what}: lease lost: {exc}")
        return LeaseLost.exit_code
    except Exception as exc:
        _say(f"{what}: not reported: {type(exc).__name__}: {exc}")
        return EXIT_ERROR
    _say(f"{what}: reported")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
