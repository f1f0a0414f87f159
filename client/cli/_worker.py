"""``plait worker``: run the steps of a pool, pulled from a control plane over the network."""

from __future__ import annotations

import sys

import click

_EPILOG = """\b
Examples:
  PLAIT_TOKEN=<worker token> plait worker --server cp.example.com:7676 --pool gpu
  plait worker --server 127.0.0.1:7676 --pool default --concurrency 4

\b
Exit codes: 0 drained after SIGTERM or SIGINT; 1 the control plane refused the worker
(no token, a token of another role, no WorkerService); 2 a usage error; 128 + the signal's
number when a second signal stopped it at once.
"""


def _server_option(ctx: click.Context, param: click.Parameter, value: str) -> str:
    """A click callback: the --server address normalized, or a usage error listing the forms."""
    from plait._settings import normalize_server
    from plait.errors import PlaitError

    try:
        return normalize_server(value)
    except PlaitError as exc:
        raise click.BadParameter(str(exc), ctx, param) from None


@click.command("worker", epilog=_EPILOG)
@click.option(
    "--server",
    envvar="PLAIT_SERVER",
    required=True,
    metavar="ADDRESS",
    callback=_server_option,
    help="The control plane to pull steps from: HOST:PORT, HOST (port 7676), "
    "grpc://HOST[:PORT] (plain text) or grpcs://HOST[:PORT] (TLS), or its replicas "
    "comma-separated (the first that answers is used, the next when it goes away) "
    "[env PLAIT_SERVER].",
)
@click.option("--pool", required=True, help='The pool to run: steps declared with pool="NAME".')
@click.option(
    "--concurrency",
    type=click.IntRange(1, 256),
    default=1,
    show_default=True,
    help="The most steps at once (one process each).",
)
@click.option(
    "--worker-id",
    default="",
    help="This worker's name among the pool's workers, shown as the holder of its leases "
    "[default: HOSTNAME-PID].",
)
@click.option(
    "--drain-timeout",
    type=click.FloatRange(0),
    default=60.0,
    show_default=True,
    help="Seconds running steps may take to finish after SIGTERM before they are killed.",
)
@click.option(
    "--artifacts",
    type=click.Choice(["auto", "local", "remote"]),
    default="auto",
    show_default=True,
    help="Where steps read inputs and write outputs: through the control plane (remote), or at "
    "the store path it names (local: the same machine or a shared file system); auto is local "
    "for a control plane on loopback, else remote.",
)
def worker(
    server: str,
    pool: str,
    concurrency: int,
    worker_id: str,
    drain_timeout: float,
    artifacts: str,
) -> None:
    """Run the steps of a pool on this machine, in its own Python environment.

    The worker long-polls the control plane at ADDRESS for steps of POOL, runs each in a
    child process of its own (at most --concurrency at once), keeps its lease with heartbeats
    and reports logs, metadata, outputs and the result. Several workers may share a pool. It
    needs only `pip install plait`, the step's code importable here (or shipped as a code
    archive), and network access to the control plane.

    The token comes from PLAIT_TOKEN and must have the worker role (an admin makes one with
    `plait token create NAME --role worker`); PLAIT_TLS_CA, PLAIT_TLS_CERT and PLAIT_TLS_KEY
    set up TLS as for every client.

    A step is killed when its timeout passes or when its lease can no longer be renewed (its
    attempt is then retried by the control plane). SIGTERM or Ctrl-C drains: no more polling,
    running steps finish (up to --drain-timeout), then the worker exits 0; a second signal
    stops it at once. When the control plane is unreachable the worker retries with backoff.
    """
    import os

    from plait._channel import ChannelConfig
    from plait.runners.worker._remote import Supervisor, WorkerOptions

    options = WorkerOptions(
        server=server,
        pool=pool,
        concurrency=concurrency,
        worker_id=worker_id,
        drain_timeout=drain_timeout,
        artifacts=artifacts,
    )
    # a worker sends only PLAIT_TOKEN: never a saved login or the local admin credential
    config = ChannelConfig.from_env(server, token=os.environ.get("PLAIT_TOKEN", ""))
    sys.exit(Supervisor(options, config).run())
