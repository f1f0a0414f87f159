"""The ``plait`` command line."""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any, NoReturn

import click

from plait.errors import PlaitError

EPILOG = (
    "With no PLAIT_SERVER set, commands use the embedded engine and the store under "
    "PLAIT_HOME (default: ~/.local/share/plait)."
)


def _console(stderr: bool = False) -> Any:
    from rich.console import Console

    stream = sys.stderr if stderr else sys.stdout
    # piped output (grep, files, CI logs) is not wrapped at rich's default of 80 columns
    width = None if stream.isatty() else 200
    return Console(stderr=stderr, highlight=False, width=width)


def _fail(message: str, code: int = 2) -> NoReturn:
    _console(stderr=True).print(f"[bold red]error:[/] {message}")
    sys.exit(code)


def load_pipeline(target: str) -> Any:
    """Loads ``FILE.py:NAME`` or ``package.module:NAME`` and returns the pipeline object."""
    from plait._pipeline import Pipeline

    if ":" not in target:
        _fail(
            f"expected FILE_OR_MODULE:PIPELINE, got {target!r} (e.g. examples/quickstart.py:demo)"
        )
    where, _, name = target.rpartition(":")
    path = Path(where)
    if where.endswith(".py") or path.is_file():
        if not path.is_file():
            _fail(f"no such file: {where}")
        path = path.resolve()
        module_name = path.stem
        sys.path.insert(0, str(path.parent))
        spec = importlib.util.spec_from_file_location(module_name, path)
        if spec is None or spec.loader is None:
            _fail(f"cannot load {where}")
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        spec.loader.exec_module(module)
    else:
        sys.path.insert(0, str(Path.cwd()))
        try:
            module = importlib.import_module(where)
        except ImportError as exc:
            _fail(f"cannot import {where!r}: {exc}")
    obj = getattr(module, name, None)
    if not isinstance(obj, Pipeline):
        found = sorted(k for k, v in vars(module).items() if isinstance(v, Pipeline))
        _fail(f"{where} has no pipeline {name!r}; pipelines there: {', '.join(found) or 'none'}")
    return obj


def _parse_params(items: tuple[str, ...]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            _fail(f"-p takes name=value, got {item!r}")
        try:
            out[key] = json.loads(raw)
        except ValueError:
            out[key] = raw  # not JSON: a plain string
    return out


@click.group(epilog=EPILOG, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="plait")
def cli() -> None:
    """Plait: define pipelines of Python steps, run them embedded or on a shared server."""


@cli.command("run", epilog=EPILOG)
@click.argument("target")
@click.option(
    "-p",
    "--param",
    "params",
    multiple=True,
    metavar="NAME=VALUE",
    help="A pipeline parameter; VALUE is read as JSON, else as a string. Repeatable.",
)
@click.option("--no-cache", is_flag=True, help="Run every step; ignore cached results.")
@click.option("--quiet", "-q", is_flag=True, help="No live progress; print the run id only.")
@click.option(
    "--detach",
    "-d",
    is_flag=True,
    help="Return as soon as the run is accepted (needs a server: PLAIT_SERVER or "
    "`plait login`); follow it with `plait runs watch`.",
)
def run_cmd(
    target: str, params: tuple[str, ...], no_cache: bool, quiet: bool, detach: bool
) -> None:
    """Run the pipeline TARGET (FILE.py:PIPELINE or package.module:PIPELINE).

    Shows live progress and exits with status 1 when the run fails.

    \b
    Example:
      plait run examples/quickstart.py:demo -p n=1000
    """
    pipe = load_pipeline(target)
    parameters = _parse_params(params)
    from plait._client import Client

    try:
        client = Client.default()
        if detach:
            if client.embedded:
                _fail(
                    "--detach needs a server: the embedded engine stops with this process "
                    "(start one with `plait server start`, then set PLAIT_SERVER or run "
                    "`plait login HOST:PORT`)"
                )
            run = pipe.run(parameters, no_cache=no_cache, client=client, wait=False)
            click.echo(run.run_id)
            return
        if quiet:
            run = pipe.run(parameters, no_cache=no_cache, client=client)
        else:
            run = _run_with_progress(client, pipe, parameters, no_cache)
    except PlaitError as exc:
        _fail(str(exc))
    if quiet:
        click.echo(run.run_id)
    else:
        _print_run(run)
    if run.status != "SUCCEEDED":
        sys.exit(1)


def _run_with_progress(client: Any, pipe: Any, parameters: dict[str, Any], no_cache: bool) -> Any:
    from rich.live import Live
    from rich.text import Text

    compiled = pipe.compile()
    total = len(compiled.spec.steps)
    statuses: dict[str, str] = {}
    console = _console(stderr=True)
    started = time.monotonic()

    def render() -> Text:
        counts = Counter(statuses.values())
        done = sum(counts[s] for s in ("SUCCEEDED", "CACHED", "FAILED", "SKIPPED", "CRASHED"))
        parts = [
            f"{counts[s]} {s.lower()}"
            for s in ("RUNNING", "SUCCEEDED", "CACHED", "FAILED", "SKIPPED", "CRASHED")
            if counts[s]
        ]
        running = [k for k, v in statuses.items() if v == "RUNNING"][:3]
        line = Text(f"{pipe.name}: {done}/{total} steps  ", style="bold")
        line.append(", ".join(parts))
        if running:
            line.append(f"  running: {', '.join(running)}", style="dim")
        line.append(f"  {time.monotonic() - started:.1f}s", style="dim")
        return line

    with Live(render(), console=console, refresh_per_second=8, transient=True) as live:

        def on_events(events: list[Any]) -> None:
            for e in events:
                if e.step_id and e.step_status is not None:
                    statuses[e.step_id] = str(e.step_status)
            live.update(render())

        return client.run_pipeline(pipe, parameters, no_cache=no_cache, on_events=on_events)


_STYLE = {
    "SUCCEEDED": "green",
    "CACHED": "cyan",
    "FAILED": "red",
    "CRASHED": "red",
    "SKIPPED": "yellow",
    "RUNNING": "blue",
    "QUEUED": "dim",
    "PENDING": "dim",
    "RETRYING": "yellow",
    "CANCELLED": "magenta",
}


def _styled(status: str) -> str:
    """A status as rich markup, coloured by what it means."""
    return f"[{_STYLE.get(status, 'default')}]{status}[/]"


def _print_run(run: Any) -> None:
    console = _console()
    counts = Counter(s.status.value for s in run.steps.values())
    summary = ", ".join(f"{n} {k.lower()}" for k, n in sorted(counts.items()))
    took = ""
    if run.create_time and run.end_time:
        took = f" in {(run.end_time - run.create_time).total_seconds():.2f}s"
    console.print(
        f"run [bold]{run.run_id}[/] of {run.pipeline}: {_styled(run.status)}{took} ({summary})"
    )
    for s in run.steps.values():
        if s.status in ("FAILED", "CRASHED") and s.error is not None:
            console.print(
                f"\n[red]step {s.step_id} {s.status.lower()}:[/] {s.error.type}: {s.error.message}"
            )
            if s.error.traceback:
                console.print(s.error.traceback.rstrip(), markup=False)
    console.print(f"details: plait runs show {run.run_id[:12]}", style="dim")


@cli.group(epilog=EPILOG)
def runs() -> None:
    """List and inspect runs."""


@runs.command("list", epilog=EPILOG)
@click.option("--limit", "-n", default=20, show_default=True, help="How many runs to show.")
@click.option("--pipeline", default="", help="Only runs of this pipeline.")
@click.option(
    "--status",
    type=click.Choice(
        ["PENDING", "RUNNING", "SUCCEEDED", "FAILED", "CANCELLED"], case_sensitive=False
    ),
    help="Only runs in this state.",
)
def runs_list(limit: int, pipeline: str, status: str | None) -> None:
    """List runs, newest first."""
    from rich.table import Table

    from plait._client import Client

    try:
        found = Client.default().list_runs(
            limit=limit, pipeline=pipeline, status=(status or "").upper()
        )
    except PlaitError as exc:
        _fail(str(exc))
    table = Table("run", "pipeline", "status", "created", "duration")
    for r in found:
        duration = (
            f"{(r.end_time - r.create_time).total_seconds():.2f}s"
            if r.end_time and r.create_time
            else ""
        )
        table.add_row(
            r.run_id[:12],
            r.pipeline,
            _styled(r.status),
            r.create_time.strftime("%Y-%m-%d %H:%M:%S") if r.create_time else "",
            duration,
        )
    if not found:
        if pipeline:
            click.echo(f"no runs of pipeline {pipeline!r}")
        else:
            click.echo("no runs yet: try `plait run examples/quickstart.py:demo`")
        return
    _console().print(table)


@runs.command("show", epilog=EPILOG)
@click.argument("run_id")
def runs_show(run_id: str) -> None:
    """Show a run's steps: status, duration, cached, outputs and metadata.

    RUN_ID may be a unique prefix of the id.
    """
    from rich.table import Table

    from plait._client import Client

    try:
        run = Client.default().get_run(run_id)
    except PlaitError as exc:
        _fail(str(exc))
    console = _console()
    console.print(
        f"run [bold]{run.run_id}[/]  pipeline {run.pipeline}  "
        f"version {run.pipeline_version[:12]}  stack {run.stack or '-'}  {_styled(run.status)}"
    )
    if run.parameters:
        console.print("parameters: " + json.dumps(run.parameters), markup=False)
    table = Table("step", "status", "attempt", "duration", "cached", "outputs", "metadata")
    for s in run.steps.values():
        outputs = "\n".join(
            f"{name}: {a.artifact_id[:12]} ({a.data_type}"
            f"{', UNSAFE pickle' if a.unsafe else ''})"
            + (f" {json.dumps(a.metadata)}" if a.metadata else "")
            for name, a in s.outputs.items()
        )
        table.add_row(
            s.step_id,
            _styled(s.status),
            str(s.attempt),
            f"{s.duration:.3f}s" if s.duration is not None else "",
            "yes" if s.cached else "",
            outputs,
            json.dumps(s.metadata) if s.metadata else "",
        )
    console.print(table)
    for s in run.steps.values():
        if s.error is not None:
            console.print(f"[red]{s.step_id}:[/] {s.error.type}: {s.error.message}", markup=True)


@runs.command("logs", epilog=EPILOG)
@click.argument("run_id")
@click.argument("step", required=False)
@click.option("-f", "--follow", is_flag=True, help="Keep printing output live until the run ends.")
def runs_logs(run_id: str, step: str | None, follow: bool) -> None:
    """Print the captured stdout and stderr of a run's steps (or of STEP)."""
    from plait._client import Client

    try:
        client = Client.default()
        run = client.get_run(run_id)
        if step is not None and step not in run.steps:
            _fail(
                f"run {run.run_id[:12]} has no step {step!r}; steps: "
                f"{', '.join(list(run.steps)[:20])}"
            )
        entries = client.stream_logs(run.run_id, step) if follow else client.logs(run.run_id, step)
    except PlaitError as exc:
        _fail(str(exc))
    current = None
    for e in entries:
        if step is None and e.step_id != current:
            click.secho(f"--- {e.step_id} (attempt {e.attempt})", fg="cyan", err=False)
            current = e.step_id
        click.echo(e.text, nl=False, err=e.stream == "stderr")


@runs.command("watch", epilog=EPILOG)
@click.argument("run_id")
def runs_watch(run_id: str) -> None:
    """Follow a run live until it ends, printing each step's transitions.

    Exits with status 1 when the run does not succeed.
    """
    from plait._client import Client

    try:
        client = Client.default()
        run = client.get_run(run_id)
        console = _console()
        for events in client.watch(run.run_id):
            for e in events:
                when = e.time.astimezone().strftime("%H:%M:%S.%f")[:-3]
                if e.step_id:
                    what = f"step {e.step_id} {_styled(str(e.step_status))}"
                else:
                    what = f"run {_styled(str(e.run_status))}"
                detail = f"  [dim]{e.message}[/]" if e.message else ""
                console.print(f"{when}  {what}{detail}")
        run = client.get_run(run.run_id)
    except PlaitError as exc:
        _fail(str(exc))
    _print_run(run)
    if run.status != "SUCCEEDED":
        sys.exit(1)


@runs.command("cancel", epilog=EPILOG)
@click.argument("run_id")
def runs_cancel(run_id: str) -> None:
    """Cancel a run: running steps are stopped, pending ones never run."""
    from plait._client import Client

    try:
        run = Client.default().cancel_run(run_id)
    except PlaitError as exc:
        _fail(str(exc))
    click.echo(f"run {run.run_id}: {run.status}")


@cli.group(epilog=EPILOG)
def artifacts() -> None:
    """Read artifacts (step outputs)."""


@artifacts.command("get", epilog=EPILOG)
@click.argument("artifact_id")
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, writable=True),
    help="Write the stored bytes to this file instead of standard output.",
)
def artifacts_get(artifact_id: str, output: str | None) -> None:
    """Print an artifact's stored bytes, or write them to a file with -o.

    ARTIFACT_ID may be a unique prefix (see `plait runs show`). Text artifacts (JSON, str)
    print as they are; binary ones need -o when standard output is a terminal.
    """
    from plait._client import Client

    try:
        info = Client.default().get_artifact(artifact_id)
        data = info.read_bytes()
    except PlaitError as exc:
        _fail(str(exc))
    if output:
        Path(output).write_bytes(data)
        click.echo(
            f"wrote {len(data)} bytes ({info.materializer}, {info.data_type}) to {output}", err=True
        )
        return
    try:
        text = data.decode()
    except UnicodeDecodeError:
        if sys.stdout.isatty():
            _fail(
                f"artifact {info.artifact_id[:12]} is binary ({info.materializer}, "
                f"{info.size} bytes): write it to a file with -o FILE"
            )
        sys.stdout.buffer.write(data)
        return
    click.echo(text)


# ---- the server ----


def _server_files() -> tuple[Any, Any]:
    from plait._settings import plait_home

    home = plait_home()
    return home / "server.pid", home / "server.log"


def _server_pid() -> tuple[int, str] | None:
    """(pid, address) of the running server of this PLAIT_HOME, or None."""
    pid_file, _ = _server_files()
    try:
        pid_text, address = pid_file.read_text().split()
        pid = int(pid_text)
        os.kill(pid, 0)
    except (FileNotFoundError, ValueError, ProcessLookupError):
        return None
    return pid, address


def _healthy(address: str, timeout: float = 2.0) -> bool:
    from plait._channel import ChannelConfig, is_serving

    return is_serving(ChannelConfig.from_env(address), timeout)


@cli.group(epilog=EPILOG)
def server() -> None:
    """Run the control plane as a daemon that clients share (PLAIT_SERVER=HOST:PORT)."""


_CONFIG_KEYS = (
    "host",
    "port",
    "database_url",
    "artifact_store",
    "auth",
    "tls_cert",
    "tls_key",
    "tls_client_ca",
)


def _server_config(path: str | None) -> dict[str, Any]:
    """Settings from a TOML file: --config, else PLAIT_HOME/server.toml when it exists."""
    import tomllib

    from plait._settings import plait_home

    file = Path(path) if path else plait_home() / "server.toml"
    if not file.exists():
        if path:
            _fail(f"no config file {path}")
        return {}
    try:
        data = tomllib.loads(file.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        _fail(f"{file}: {exc}")
    unknown = sorted(set(data) - set(_CONFIG_KEYS))
    if unknown:
        _fail(f"{file}: unknown setting(s) {', '.join(unknown)}; known: {', '.join(_CONFIG_KEYS)}")
    return data


_SERVER_OPTIONS = [
    click.option(
        "--config",
        "config_file",
        default=None,
        envvar="PLAIT_SERVER_CONFIG",
        type=click.Path(dir_okay=False),
        help="A TOML file of these settings (keys: host, port, database_url, "
        "artifact_store, auth, tls_cert, tls_key, tls_client_ca) [default: "
        "PLAIT_HOME/server.toml if it exists]; flags and variables win over it.",
    ),
    click.option(
        "--host",
        default=None,
        envvar="PLAIT_SERVER_HOST",
        help="Address to bind [default: 127.0.0.1; env PLAIT_SERVER_HOST].",
    ),
    click.option(
        "--port",
        type=int,
        default=None,
        envvar="PLAIT_SERVER_PORT",
        help="Port [default: 7676; env PLAIT_SERVER_PORT].",
    ),
    click.option(
        "--database-url",
        default="",
        envvar="PLAIT_DATABASE_URL",
        help="SQLAlchemy URL of the store [default: SQLite in PLAIT_HOME].",
    ),
    click.option(
        "--artifact-store",
        default="",
        envvar="PLAIT_ARTIFACT_STORE",
        help="Artifact store URL [default: PLAIT_HOME/artifacts].",
    ),
    click.option(
        "--foreground",
        is_flag=True,
        help="Run in this process (for containers and supervisors); logs go to stderr.",
    ),
    click.option(
        "--auth/--no-auth",
        default=None,
        help="Require API tokens [default: on unless bound to loopback].",
    ),
    click.option(
        "--tls-cert",
        default="",
        envvar="PLAIT_TLS_SERVER_CERT",
        type=click.Path(dir_okay=False),
        help="PEM certificate: serve TLS.",
    ),
    click.option(
        "--tls-key",
        default="",
        envvar="PLAIT_TLS_SERVER_KEY",
        type=click.Path(dir_okay=False),
        help="PEM private key of --tls-cert.",
    ),
    click.option(
        "--tls-client-ca",
        default="",
        envvar="PLAIT_TLS_CLIENT_CA",
        type=click.Path(dir_okay=False),
        help="PEM CA bundle: require client certificates it signed (mutual TLS).",
    ),
]


def _server_options(fn: Any) -> Any:
    for option in reversed(_SERVER_OPTIONS):
        fn = option(fn)
    return fn


@server.command("start", epilog=EPILOG)
@_server_options
def server_start(
    host: str | None,
    port: int | None,
    database_url: str,
    artifact_store: str,
    foreground: bool,
    auth: bool | None = None,
    tls_cert: str = "",
    tls_key: str = "",
    tls_client_ca: str = "",
    config_file: str | None = None,
) -> None:
    """Start the control-plane daemon (in the background unless --foreground).

    Unfinished runs of its store resume at start; SIGTERM (`plait server stop`) shuts it down
    gracefully and leaves them resumable. PID and log files live in PLAIT_HOME.

    \b
    Example:
      plait server start --port 7676
      PLAIT_SERVER=127.0.0.1:7676 plait run examples/quickstart.py:demo
    """
    import subprocess
    import time

    from plait._settings import plait_home
    from plait.engine._daemon import DEFAULT_PORT, run_daemon

    cfg = _server_config(config_file)
    host = host or str(cfg.get("host", "127.0.0.1"))
    port = port if port is not None else int(cfg.get("port", DEFAULT_PORT))
    database_url = database_url or str(cfg.get("database_url", ""))
    artifact_store = artifact_store or str(cfg.get("artifact_store", ""))
    auth = auth if auth is not None else cfg.get("auth")
    tls_cert = tls_cert or str(cfg.get("tls_cert", ""))
    tls_key = tls_key or str(cfg.get("tls_key", ""))
    tls_client_ca = tls_client_ca or str(cfg.get("tls_client_ca", ""))
    if foreground:
        try:
            run_daemon(
                plait_home(),
                host,
                port,
                database_url,
                artifact_store,
                auth=auth,
                tls_cert=tls_cert,
                tls_key=tls_key,
                tls_client_ca=tls_client_ca,
            )
        except PlaitError as exc:
            _fail(str(exc))
        return
    running = _server_pid()
    if running is not None:
        _fail(
            f"a server is already running (pid {running[0]}, {running[1]}); "
            f"`plait server stop` first"
        )
    _, log_file = _server_files()
    log_file.parent.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "plait",
        "server",
        "start",
        "--foreground",
        "--host",
        host,
        "--port",
        str(port),
    ]
    if database_url:
        cmd += ["--database-url", database_url]
    if artifact_store:
        cmd += ["--artifact-store", artifact_store]
    if auth is not None:
        cmd += ["--auth" if auth else "--no-auth"]
    for flag, value in (
        ("--tls-cert", tls_cert),
        ("--tls-key", tls_key),
        ("--tls-client-ca", tls_client_ca),
    ):
        if value:
            cmd += [flag, str(Path(value).resolve())]
    with open(log_file, "ab") as log:
        proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True
        )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log_file.read_text(errors="replace").splitlines()[-5:]
            _fail("the server exited at start:\n" + "\n".join(tail))
        found = _server_pid()
        # the pid file is written once the server listens; TLS servers can't be probed here
        if found is not None and (tls_cert or _healthy(found[1], timeout=0.5)):
            click.echo(f"plait server running at {found[1]} (pid {found[0]}); log: {log_file}")
            click.echo(f"use it with: export PLAIT_SERVER={found[1]}  (or plait login {found[1]})")
            return
        time.sleep(0.1)
    proc.kill()
    _fail(f"the server did not become healthy within 30 s; see {log_file}")


@server.command("stop", epilog=EPILOG)
@click.option(
    "--timeout",
    default=30.0,
    show_default=True,
    help="Seconds to wait for a graceful stop before killing it.",
)
def server_stop(timeout: float) -> None:
    """Stop the daemon gracefully (SIGTERM); its unfinished runs resume at the next start."""
    import signal
    import time

    running = _server_pid()
    if running is None:
        click.echo("no server is running")
        return
    pid, address = running
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            click.echo(f"stopped the server at {address} (pid {pid})")
            return
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)
    click.echo(f"the server did not stop within {timeout:g} s: killed pid {pid}", err=True)


@server.command("status", epilog=EPILOG)
def server_status() -> None:
    """Say whether the daemon of this PLAIT_HOME runs and answers; exit 1 when it does not."""
    running = _server_pid()
    if running is None:
        click.echo("no server is running")
        sys.exit(1)
    pid, address = running
    healthy = _healthy(address)
    click.echo(f"server at {address} (pid {pid}): {'SERVING' if healthy else 'NOT SERVING'}")
    if not healthy:
        sys.exit(1)


@server.command("logs", epilog=EPILOG)
@click.option("-n", "--lines", default=50, show_default=True, help="How many last lines.")
@click.option("-f", "--follow", is_flag=True, help="Keep printing new lines (Ctrl-C stops).")
def server_logs(lines: int, follow: bool) -> None:
    """Print the end of the daemon's log file."""
    import time

    _, log_file = _server_files()
    if not log_file.exists():
        _fail(f"no server log at {log_file}")
    with open(log_file, errors="replace") as fh:
        for line in fh.readlines()[-lines:]:
            click.echo(line, nl=False)
        while follow:
            line = fh.readline()
            if line:
                click.echo(line, nl=False)
            else:
                time.sleep(0.2)


@cli.command("up", epilog=EPILOG)
@_server_options
@click.pass_context
def up(ctx: click.Context, /, **kwargs: Any) -> None:
    """Start the daemon: the same as `plait server start`."""
    ctx.invoke(server_start, **kwargs)


@cli.command("down", epilog=EPILOG)
@click.pass_context
def down(ctx: click.Context) -> None:
    """Stop the daemon: the same as `plait server stop`."""
    ctx.invoke(server_stop)


@cli.group(epilog=EPILOG)
def token() -> None:
    """Manage the API tokens a server accepts (run these where the server's store is)."""


def _token_store(database_url: str) -> Any:
    from plait._settings import plait_home
    from plait.engine._control_plane import ControlPlaneConfig
    from plait.engine._store import Store

    return Store(ControlPlaneConfig(home=plait_home(), database_url=database_url).db_url())


_DB_OPTION = click.option(
    "--database-url",
    default="",
    envvar="PLAIT_DATABASE_URL",
    help="The server's store [default: SQLite in PLAIT_HOME].",
)


def _with_store(database_url: str, fn: Any, *args: Any) -> Any:
    import anyio

    async def go() -> Any:
        store = _token_store(database_url)
        try:
            await store.open()
            return await store.write(fn, *args)
        finally:
            await store.aclose()

    try:
        return anyio.run(go)
    except PlaitError as exc:
        _fail(str(exc))


@token.command("create", epilog=EPILOG)
@click.argument("name")
@_DB_OPTION
def token_create(name: str, database_url: str) -> None:
    """Create a token called NAME and print it (once: only its hash is stored).

    Clients send it with PLAIT_TOKEN=<token>.
    """
    import time as _time

    from plait.engine._auth import create_token

    click.echo(_with_store(database_url, create_token, name, _time.time()))
    click.echo("store it now: it is not shown again", err=True)


@token.command("list", epilog=EPILOG)
@_DB_OPTION
def token_list(database_url: str) -> None:
    """List tokens: id, name, created, revoked."""
    from datetime import datetime

    from rich.table import Table

    from plait.engine._auth import list_tokens

    tokens = _with_store(database_url, list_tokens)
    if not tokens:
        click.echo("no tokens: create one with `plait token create NAME`")
        return
    table = Table("id", "name", "created", "revoked")
    for t in tokens:
        table.add_row(
            t.id,
            t.name,
            datetime.fromtimestamp(t.created_at).strftime("%Y-%m-%d %H:%M:%S"),
            datetime.fromtimestamp(t.revoked_at).strftime("%Y-%m-%d %H:%M:%S")
            if t.revoked_at
            else "",
        )
    _console().print(table)


@token.command("revoke", epilog=EPILOG)
@click.argument("token_id")
@_DB_OPTION
def token_revoke(token_id: str, database_url: str) -> None:
    """Revoke the token TOKEN_ID (see `plait token list`); servers refuse it within seconds."""
    import time as _time

    from plait.engine._auth import revoke_token

    _with_store(database_url, revoke_token, token_id, _time.time())
    click.echo(f"revoked token {token_id}")


# ---- stacks ----

_KINDS = ("runner", "artifact_store", "image_builder", "container_registry", "secrets")


def _stack_pb() -> Any:
    from plait.api.v1 import stack_service_pb2

    return stack_service_pb2


def _stack_call(method: str, request: Any) -> Any:
    """Calls StackService; an error ends the command with its message."""
    from plait._client import Client

    try:
        return Client.default().stacks(method, request)
    except PlaitError as exc:
        _fail(str(exc))


def _component_row(c: Any, pb: Any) -> tuple[str, str, str, str]:
    kind = pb.ComponentKind.Name(c.kind).removeprefix("COMPONENT_KIND_").lower()
    return c.name.removeprefix("components/"), kind, c.flavor, c.config_json


@cli.group(epilog=EPILOG)
def component() -> None:
    """Register the parts stacks are made of: runner, artifact store, image builder, ..."""


@component.command("register", epilog=EPILOG)
@click.argument("name")
@click.option("--kind", required=True, type=click.Choice(_KINDS), help="What it is.")
@click.option("--flavor", required=True, help='Its implementation ("local", "docker", ...).')
@click.option(
    "-c",
    "--config",
    "config",
    multiple=True,
    metavar="KEY=VALUE",
    help="A configuration entry; VALUE is read as JSON, else as a string.",
)
def component_register(name: str, kind: str, flavor: str, config: tuple[str, ...]) -> None:
    """Register the component NAME, or replace its configuration.

    \b
    Example:
      plait component register gpu-docker --kind runner --flavor docker -c gpus=1
    """
    pb = _stack_pb()
    req = pb.RegisterComponentRequest(
        component=pb.Component(
            name=f"components/{name}",
            kind=pb.ComponentKind.Value(f"COMPONENT_KIND_{kind.upper()}"),
            flavor=flavor,
            config_json=json.dumps(_parse_params(config)),
        )
    )
    c = _stack_call("RegisterComponent", req).component
    click.echo(f"registered component {c.name.removeprefix('components/')} ({kind}, {flavor})")


@component.command("list", epilog=EPILOG)
@click.option("--kind", type=click.Choice(_KINDS), help="Only components of this kind.")
def component_list(kind: str | None) -> None:
    """List components."""
    from rich.table import Table

    pb = _stack_pb()
    value = pb.ComponentKind.Value(f"COMPONENT_KIND_{kind.upper()}") if kind else 0
    found = _stack_call("ListComponents", pb.ListComponentsRequest(kind=value)).components
    table = Table("component", "kind", "flavor", "config")
    for c in found:
        table.add_row(*_component_row(c, pb))
    _console().print(table)


@component.command("describe", epilog=EPILOG)
@click.argument("name")
def component_describe(name: str) -> None:
    """Show one component and the stacks that use it."""
    pb = _stack_pb()
    found = [
        c
        for c in _stack_call("ListComponents", pb.ListComponentsRequest()).components
        if c.name == f"components/{name}"
    ]
    stacks = _stack_call("ListStacks", pb.ListStacksRequest()).stacks
    if not found:
        _fail(f"no component {name!r} (see `plait component list`)")
    cname, kind, flavor, config = _component_row(found[0], pb)
    users = [s.name.removeprefix("stacks/") for s in stacks if f"components/{name}" in s.components]
    click.echo(
        f"component {cname}\n  kind: {kind}\n  flavor: {flavor}\n  config: {config}\n"
        f"  used by: {', '.join(users) or 'no stack'}"
    )


@component.command("delete", epilog=EPILOG)
@click.argument("name")
def component_delete(name: str) -> None:
    """Delete a component that no stack uses."""
    pb = _stack_pb()
    _stack_call("DeleteComponent", pb.DeleteComponentRequest(name=f"components/{name}"))
    click.echo(f"deleted component {name}")


@cli.group(epilog=EPILOG)
def stack() -> None:
    """Compose components into named stacks; every run records the active stack."""


@stack.command("register", epilog=EPILOG)
@click.argument("name")
@click.option(
    "-c",
    "--component",
    "components",
    multiple=True,
    required=True,
    metavar="COMPONENT",
    help="A component of the stack (one per kind). Repeatable.",
)
@click.option("--set", "activate", is_flag=True, help="Also make it the active stack.")
def stack_register(name: str, components: tuple[str, ...], activate: bool) -> None:
    """Register the stack NAME from components (a runner among them), or replace it.

    \b
    Example:
      plait stack register gpu -c gpu-docker -c local-artifacts --set
    """
    pb = _stack_pb()
    s = _stack_call(
        "RegisterStack",
        pb.RegisterStackRequest(
            stack=pb.Stack(
                name=f"stacks/{name}", components=[f"components/{c}" for c in components]
            )
        ),
    ).stack
    if activate:
        s = _stack_call("SetActiveStack", pb.SetActiveStackRequest(name=s.name)).stack
    click.echo(f"registered stack {name}{' (active)' if s.active else ''}")


@stack.command("list", epilog=EPILOG)
def stack_list() -> None:
    """List stacks; the active one is marked."""
    from rich.table import Table

    pb = _stack_pb()
    stacks = _stack_call("ListStacks", pb.ListStacksRequest()).stacks
    table = Table("stack", "active", "components")
    for s in stacks:
        table.add_row(
            s.name.removeprefix("stacks/"),
            "*" if s.active else "",
            ", ".join(c.removeprefix("components/") for c in s.components),
        )
    _console().print(table)


@stack.command("describe", epilog=EPILOG)
@click.argument("name", required=False)
def stack_describe(name: str | None) -> None:
    """Show a stack's components (the active stack when NAME is left out)."""
    pb = _stack_pb()
    stacks = _stack_call("ListStacks", pb.ListStacksRequest()).stacks
    comps = {
        c.name: c for c in _stack_call("ListComponents", pb.ListComponentsRequest()).components
    }
    chosen = [s for s in stacks if (s.active if name is None else s.name == f"stacks/{name}")]
    if not chosen:
        _fail(f"no stack {name!r} (see `plait stack list`)")
    s = chosen[0]
    click.echo(f"stack {s.name.removeprefix('stacks/')}{' (active)' if s.active else ''}")
    for c in s.components:
        cname, kind, flavor, config = _component_row(comps[c], pb)
        click.echo(f"  {kind}: {cname} ({flavor}) {config}")


@stack.command("set", epilog=EPILOG)
@click.argument("name")
def stack_set(name: str) -> None:
    """Make NAME the active stack: new runs use it, and record it."""
    pb = _stack_pb()
    _stack_call("SetActiveStack", pb.SetActiveStackRequest(name=f"stacks/{name}"))
    click.echo(f"active stack: {name}")


@stack.command("delete", epilog=EPILOG)
@click.argument("name")
def stack_delete(name: str) -> None:
    """Delete a stack that is not active."""
    pb = _stack_pb()
    _stack_call("DeleteStack", pb.DeleteStackRequest(name=f"stacks/{name}"))
    click.echo(f"deleted stack {name}")


@cli.command("login", epilog=EPILOG)
@click.argument("address")
def login(address: str) -> None:
    """Use the server at ADDRESS (HOST:PORT) from now on, when PLAIT_SERVER is not set."""
    from plait._settings import config_path, read_config, write_config

    if not _healthy(address):
        _fail(f"no Plait server answers at {address}")
    write_config({**read_config(), "server": address})
    click.echo(f"using the server at {address} (saved in {config_path()})")


@cli.command("logout", epilog=EPILOG)
def logout() -> None:
    """Forget the server saved by `plait login`: back to the embedded engine."""
    from plait._settings import read_config, write_config

    config = read_config()
    config.pop("server", None)
    write_config(config)
    click.echo("using the embedded engine")


@cli.group(epilog=EPILOG)
def pipeline() -> None:
    """Compile and inspect pipelines."""


@pipeline.command("list", epilog=EPILOG)
def pipeline_list() -> None:
    """List registered pipelines: versions and the newest one."""
    from rich.table import Table

    from plait._client import Client

    try:
        found = Client.default().list_pipelines()
    except PlaitError as exc:
        _fail(str(exc))
    if not found:
        click.echo("no pipelines yet: running one registers it")
        return
    table = Table("pipeline", "versions", "latest version")
    for name, count, latest in found:
        table.add_row(name, str(count), latest.rsplit("/", 1)[-1][:12])
    _console().print(table)


@pipeline.command("compile", epilog=EPILOG)
@click.argument("target")
@click.option(
    "-o",
    "--output-dir",
    default=".",
    show_default=True,
    type=click.Path(file_okay=False),
    help="Where to write the files.",
)
def pipeline_compile(target: str, output_dir: str) -> None:
    """Compile TARGET to its IR: NAME.pb (binary), NAME.json, and NAME.dot (the graph).

    The version printed is the sha256 of the canonical IR.
    """
    from google.protobuf.json_format import MessageToJson

    pipe = load_pipeline(target)
    try:
        compiled = pipe.compile()
    except PlaitError as exc:
        _fail(str(exc))
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    name = compiled.spec.name
    (out / f"{name}.pb").write_bytes(compiled.spec.SerializeToString())
    (out / f"{name}.json").write_text(
        MessageToJson(compiled.spec, preserving_proto_field_name=True) + "\n"
    )
    (out / f"{name}.dot").write_text(to_dot(compiled))
    click.echo(f"{name} {compiled.version}")
    for ext in ("pb", "json", "dot"):
        click.echo(f"  {out / f'{name}.{ext}'}")


def to_dot(compiled: Any) -> str:
    """The step graph in Graphviz DOT: nodes are steps, edges carry the inputs they bind."""

    def q(s: str) -> str:
        return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'

    lines = [f"digraph {q(compiled.spec.name)} {{", "  rankdir=LR;", "  node [shape=box];"]
    for s in compiled.spec.steps:
        lines.append(f"  {q(s.id)} [label={q(s.id + chr(10) + s.code.qualname)}];")
    for u, v in compiled.graph.edges:
        lines.append(f"  {q(u)} -> {q(v)};")
    lines.append("}")
    return "\n".join(lines) + "\n"


def main() -> None:
    """Entry point of the ``plait`` command."""
    cli(prog_name="plait")
