"""``plait server …``, ``plait up`` and ``plait down``: run the control plane as a daemon.

The daemon of a PLAIT_HOME writes ``server.pid`` (its pid and address, once it listens) and
``server.log`` there, and holds a lock on ``server.lock`` for its life: a pid file whose lock
nobody holds is stale, and no command signals the process it names. ``server.toml`` there holds
default settings.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import click

from plait._settings import private_dir
from plait.cli._common import EPILOG, fail, healthy
from plait.errors import PlaitError

MAX_CRASH_RETRIES = 100
"""The largest crash budget ``--crash-retries`` takes (engine/_daemon.py's MAX_CRASH_RETRIES:
this module loads no engine until a command runs)."""


def dashboard_url() -> str:
    """The URL of the dashboard of this PLAIT_HOME's daemon, or empty when it serves none."""
    import json

    from plait._settings import plait_home

    try:
        return str(json.loads((plait_home() / "dashboard.json").read_text())["url"])
    except (OSError, ValueError, KeyError, TypeError):
        return ""


def _server_files() -> tuple[Path, Path]:
    """The pid file and the log file of this PLAIT_HOME's daemon."""
    from plait._settings import plait_home

    home = plait_home()
    return home / "server.pid", home / "server.log"


def _lock_file() -> Path:
    """The file a running daemon holds a lock on (engine/_daemon.py, LOCK_FILE)."""
    pid_file, _ = _server_files()
    return pid_file.with_name("server.lock")


def _lock_held() -> bool:
    """Whether a daemon of this PLAIT_HOME is alive: it holds the lock for its whole life."""
    import fcntl

    try:
        fd = os.open(_lock_file(), os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # closing releases a lock taken here
    return False


def _server_pid() -> tuple[int, str] | None:
    """(pid, address) of the running server of this PLAIT_HOME, or None.

    The pid file is trusted only while the daemon's lock is held; a stale one (its server died
    without removing it) is removed, saying so, and the process it names is left alone.
    """
    pid_file, _ = _server_files()
    try:
        fields = pid_file.read_text().split()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        fail(f"cannot read {pid_file}: {exc}")
    if _lock_held():
        if len(fields) == 2 and fields[0].isdigit():
            return int(fields[0]), fields[1]
        return None  # a daemon is starting (it writes the file once it listens)
    _remove_stale(pid_file, fields)
    return None


def _remove_stale(pid_file: Path, fields: list[str]) -> None:
    """Removes a pid file no daemon holds the lock of, holding that lock meanwhile (so a daemon
    starting now cannot write a new file that this would remove)."""
    import fcntl

    fd = os.open(_lock_file(), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return  # a daemon took it just now: its file is not ours to remove
        try:
            if pid_file.read_text().split() != fields:
                return
        except FileNotFoundError:
            return
        pid_file.unlink()
    finally:
        os.close(fd)
    pid = fields[0] if fields else "?"
    why = "is not a Plait server"
    if pid.isdigit():
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            why = "is not running"
        except PermissionError:
            pass
    click.echo(f"removed a stale {pid_file.name} (process {pid} {why})", err=True)


@click.group("server", epilog=EPILOG)
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
    "max_log_bytes",
    "heartbeat_timeout",
    "crash_retries",
    "pool_limits",
    "dashboard",
    "dashboard_port",
)
_CONFIG_TYPES: dict[str, tuple[type | tuple[type, ...], str]] = {
    "port": (int, "an integer"),
    "max_log_bytes": (int, "an integer"),
    "heartbeat_timeout": ((int, float), "a number of seconds"),
    "crash_retries": (int, "an integer"),
    "pool_limits": (dict, "a table of pool names and step counts ({ local = 4, gpu = 1 })"),
    "auth": (bool, "true or false"),
    "dashboard": (bool, "true or false"),
    "dashboard_port": (int, "an integer"),
}
"""The keys that are not strings: their type and how to say it."""


def _server_config(path: str | None) -> dict[str, Any]:
    """Settings from a TOML file: --config, else PLAIT_HOME/server.toml when it exists."""
    import tomllib

    from plait._settings import plait_home

    file = Path(path) if path else plait_home() / "server.toml"
    if not file.exists():
        if path:
            fail(f"no config file {path}")
        return {}
    try:
        data = tomllib.loads(file.read_text())
    except OSError as exc:
        fail(f"cannot read {file}: {exc.strerror or exc}")
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        fail(f"{file} is not valid TOML: {exc}")
    unknown = sorted(set(data) - set(_CONFIG_KEYS))
    if unknown:
        fail(f"{file}: unknown setting(s) {', '.join(unknown)}; known: {', '.join(_CONFIG_KEYS)}")
    for key, value in data.items():
        kind, said = _CONFIG_TYPES.get(key, (str, "a string"))
        # bool is an int in Python, not in TOML
        if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
            fail(f"{file}: {key} must be {said}, not {value!r}")
    for pool, limit in data.get("pool_limits", {}).items():
        if not isinstance(limit, int) or isinstance(limit, bool):
            fail(f"{file}: pool_limits.{pool} must be an integer, not {limit!r}")
    return data


class _PoolLimit(click.ParamType):  # type: ignore[type-arg]
    """``NAME=N``: at most N steps of pool NAME (a runner's name, or a remote pool's) at once."""

    name = "NAME=N"
    envvar_list_splitter = ","  # PLAIT_POOL_LIMITS="local=4,gpu=1"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, tuple):
            return value
        pool, sep, limit = str(value).strip().partition("=")
        if not sep or not pool or not limit.strip().isdigit():
            self.fail(f"{value!r} is not NAME=N (a pool name and a number of steps)", param, ctx)
        return pool.strip(), int(limit)


_SERVER_OPTIONS = [
    click.option(
        "--config",
        "config_file",
        default=None,
        envvar="PLAIT_SERVER_CONFIG",
        type=click.Path(dir_okay=False),
        help="A TOML file of these settings (keys: host, port, database_url, "
        "artifact_store, auth, tls_cert, tls_key, tls_client_ca, max_log_bytes, "
        "heartbeat_timeout, crash_retries, pool_limits, dashboard, dashboard_port) "
        "[default: PLAIT_HOME/server.toml if "
        "it exists]; flags and variables win over it.",
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
        "--dashboard/--no-dashboard",
        default=None,
        envvar="PLAIT_DASHBOARD",
        help="Serve the web dashboard on a port of its own [default: on; env PLAIT_DASHBOARD "
        "(0 or 1); config key dashboard]. `plait dashboard` opens it signed in.",
    ),
    click.option(
        "--dashboard-port",
        type=click.IntRange(min=0, max=65535),
        default=None,
        envvar="PLAIT_DASHBOARD_PORT",
        help="The dashboard's port, on the same host as the API [default: 7677; 0: any free "
        "port; env PLAIT_DASHBOARD_PORT; config key dashboard_port]. A port given here must be "
        "free; when the default one is taken the daemon starts without a dashboard, saying so.",
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
        "--max-log-bytes",
        type=click.IntRange(min=1),
        default=None,
        envvar="PLAIT_MAX_LOG_BYTES",
        help="Bytes of stdout and stderr kept per step attempt; the rest is dropped, with a "
        "line saying how much [default: 4194304 (4 MiB); env PLAIT_MAX_LOG_BYTES].",
    ),
    click.option(
        "--heartbeat-timeout",
        type=click.FloatRange(min=0, min_open=True, max=86400),
        default=None,
        envvar="PLAIT_HEARTBEAT_TIMEOUT",
        help="Seconds a step's lease lasts without a heartbeat: a worker silent for longer "
        "(hung, stopped, cut off) loses the attempt, which is CRASHED and retried. Workers "
        "heartbeat about three times in that span [default: 30; env PLAIT_HEARTBEAT_TIMEOUT].",
    ),
    click.option(
        "--crash-retries",
        type=click.IntRange(min=0, max=MAX_CRASH_RETRIES),
        default=None,
        envvar="PLAIT_CRASH_RETRIES",
        help="Attempts a step may lose to its infrastructure (CRASHED: a lost worker, an "
        "expired lease, a vanished container) and still be retried; they never use up the "
        "step's own retries. 0 makes a crash final [default: 3; env PLAIT_CRASH_RETRIES].",
    ),
    click.option(
        "--pool-limit",
        "pool_limits",
        type=_PoolLimit(),
        multiple=True,
        envvar="PLAIT_POOL_LIMITS",
        help="NAME=N: at most N steps of a pool queued or running at once; a pool is a runner "
        "(local) or a remote worker pool (@step(pool=...)). Repeatable [env PLAIT_POOL_LIMITS "
        'as "local=4,gpu=1"; config key pool_limits, a table].',
    ),
    click.option(
        "--foreground",
        is_flag=True,
        help="Run in this process (for containers and supervisors); logs go to stderr.",
    ),
    click.option(
        "--auth/--no-auth",
        default=None,
        help="Require a credential on every call [default: on, loopback included]. "
        "--no-auth is refused off loopback and lets every local user run code as you.",
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
    """Adds the daemon's settings as options (``server start`` and ``up`` share them)."""
    for option in reversed(_SERVER_OPTIONS):
        fn = option(fn)
    return fn


@server.command("start", epilog=EPILOG)
@_server_options
@click.option(
    "--log-file",
    default=None,
    hidden=True,
    type=click.Path(dir_okay=False),
    help="With --foreground: log to this file, rotated by size (the background start uses it).",
)
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
    max_log_bytes: int | None = None,
    heartbeat_timeout: float | None = None,
    crash_retries: int | None = None,
    pool_limits: tuple[tuple[str, int], ...] = (),
    log_file: str | None = None,
    dashboard: bool | None = None,
    dashboard_port: int | None = None,
) -> None:
    """Start the control-plane daemon (in the background unless --foreground).

    Unfinished runs of its store resume at start; SIGTERM (`plait server stop`) shuts it down
    gracefully and leaves them resumable. It also serves the web dashboard (on port 7677
    unless told otherwise; `plait dashboard` opens it signed in). PID and log files live in
    PLAIT_HOME; the log, server.log, rotates at 10 MB (PLAIT_SERVER_LOG_BYTES sets the size),
    keeping 3 old files (server.log.1 to server.log.3).

    \b
    Example:
      plait server start --port 7676
      PLAIT_SERVER=127.0.0.1:7676 plait run examples/quickstart.py:demo
    """
    import subprocess
    import time

    from plait._settings import DEFAULT_DASHBOARD_PORT, plait_home
    from plait.engine._daemon import (
        DEFAULT_PORT,
        crash_retries_setting,
        pool_limits_setting,
        run_daemon,
    )

    cfg = _server_config(config_file)
    host = host or str(cfg.get("host", "127.0.0.1"))
    port = port if port is not None else int(cfg.get("port", DEFAULT_PORT))
    database_url = database_url or str(cfg.get("database_url", ""))
    artifact_store = artifact_store or str(cfg.get("artifact_store", ""))
    auth = auth if auth is not None else cfg.get("auth")
    tls_cert = tls_cert or str(cfg.get("tls_cert", ""))
    tls_key = tls_key or str(cfg.get("tls_key", ""))
    tls_client_ca = tls_client_ca or str(cfg.get("tls_client_ca", ""))
    if max_log_bytes is None and "max_log_bytes" in cfg:
        max_log_bytes = int(cfg["max_log_bytes"])
    if heartbeat_timeout is None and "heartbeat_timeout" in cfg:
        heartbeat_timeout = float(cfg["heartbeat_timeout"])
    if crash_retries is None and "crash_retries" in cfg:
        crash_retries = int(cfg["crash_retries"])
    if dashboard is None:
        dashboard = bool(cfg.get("dashboard", True))
    dashboard_required = dashboard_port is not None or "dashboard_port" in cfg
    if dashboard_port is None:
        dashboard_port = int(cfg.get("dashboard_port", DEFAULT_DASHBOARD_PORT))
    # the file's table, each pool's limit replaced by a flag's (or the variable's) for it
    limits: dict[str, int] = {**cfg.get("pool_limits", {}), **dict(pool_limits)}
    try:  # refused here, not by a background daemon's first line of log
        crash_retries_setting(crash_retries)
        pool_limits_setting(limits)
    except PlaitError as exc:
        fail(str(exc))
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
                max_log_bytes=max_log_bytes,
                heartbeat_timeout=heartbeat_timeout,
                crash_retries=crash_retries,
                pool_limits=limits,
                log_file=Path(log_file) if log_file else None,
                dashboard_port=dashboard_port if dashboard else None,
                dashboard_required=dashboard_required,
            )
        except PlaitError as exc:
            fail(str(exc))
        return
    running = _server_pid()
    if running is not None:
        fail(
            f"a server is already running (pid {running[0]}, {running[1]}); "
            f"`plait server stop` first"
        )
    if _lock_held():
        fail("a server of this PLAIT_HOME is starting; `plait server status` tells when it runs")
    _, server_log = _server_files()
    private_dir(server_log.parent)
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
        "--log-file",
        str(server_log),
    ]
    if max_log_bytes is not None:
        cmd += ["--max-log-bytes", str(max_log_bytes)]
    if heartbeat_timeout is not None:
        cmd += ["--heartbeat-timeout", repr(heartbeat_timeout)]
    if crash_retries is not None:
        cmd += ["--crash-retries", str(crash_retries)]
    for pool, limit in limits.items():
        cmd += ["--pool-limit", f"{pool}={limit}"]
    if not dashboard:
        cmd += ["--no-dashboard"]
    elif dashboard_required:
        cmd += ["--dashboard-port", str(dashboard_port)]
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
    fd = os.open(server_log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    os.fchmod(fd, 0o600)  # the log says what runs: the owner's only, whatever the umask
    with os.fdopen(fd, "ab") as log:
        offset = log.tell()
        proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True
        )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            fail(_start_error(server_log, offset, proc.returncode))
        found = _server_pid()
        # the pid file is written once the server listens; TLS servers can't be probed here
        if found is not None and (tls_cert or healthy(found[1], timeout=0.5)):
            click.echo(f"plait server running at {found[1]} (pid {found[0]}); log: {server_log}")
            click.echo(f"use it with: export PLAIT_SERVER={found[1]}  (or plait login {found[1]})")
            url = dashboard_url()
            if url:
                click.echo(f"dashboard: {url}  (`plait dashboard` opens it signed in)")
            elif dashboard:
                click.echo(f"no dashboard: see {server_log}", err=True)
            return
        time.sleep(0.1)
    proc.kill()
    fail(f"the server did not become healthy within 30 s; see {server_log}")


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
        # the daemon holds its lock until it exits: released, it is gone
        if not _lock_held():
            click.echo(f"stopped the server at {address} (pid {pid})")
            return
        time.sleep(0.05)
    if _server_pid() != running:  # it went just now (or its identity changed): leave it
        click.echo(f"stopped the server at {address} (pid {pid})")
        return
    os.kill(pid, signal.SIGKILL)
    click.echo(f"the server did not stop within {timeout:g} s: killed pid {pid}", err=True)


def _start_error(log_file: Path, offset: int, code: int) -> str:
    """One line for a daemon that exited at start: its own error line, from what it wrote to
    the log since `offset` (the daemon prints ``error: …`` before it exits)."""
    try:
        with open(log_file, "rb") as fh:
            if fh.seek(0, os.SEEK_END) < offset:
                offset = 0  # the log rotated meanwhile
            fh.seek(offset)
            lines = fh.read().decode(errors="replace").splitlines()
    except OSError:
        lines = []
    for line in reversed(lines):
        if line.startswith("error: "):
            return line.removeprefix("error: ").strip()
    last = next((line.strip() for line in reversed(lines) if line.strip()), "")
    return f"the server exited at start (code {code}){': ' + last if last else ''}; see {log_file}"


@server.command("status", epilog=EPILOG)
def server_status() -> None:
    """Say whether the daemon of this PLAIT_HOME runs and answers; exit 1 when it does not."""
    running = _server_pid()
    if running is None:
        click.echo("no server is running")
        sys.exit(1)
    pid, address = running
    serving = healthy(address)
    click.echo(f"server at {address} (pid {pid}): {'SERVING' if serving else 'NOT SERVING'}")
    url = dashboard_url()
    if url:
        click.echo(f"dashboard: {url}")
    if not serving:
        sys.exit(1)


@server.command("logs", epilog=EPILOG)
@click.option("-n", "--lines", default=50, show_default=True, help="How many last lines.")
@click.option("-f", "--follow", is_flag=True, help="Keep printing new lines (Ctrl-C stops).")
def server_logs(lines: int, follow: bool) -> None:
    """Print the end of the daemon's log file."""
    import time

    _, log_file = _server_files()
    if not log_file.exists():
        fail(f"no server log at {log_file}")
    with open(log_file, errors="replace") as fh:
        for line in fh.readlines()[-lines:]:
            click.echo(line, nl=False)
        while follow:
            line = fh.readline()
            if line:
                click.echo(line, nl=False)
            else:
                time.sleep(0.2)


@click.command("up", epilog=EPILOG)
@_server_options
@click.pass_context
def up(ctx: click.Context, /, **kwargs: Any) -> None:
    """Start the daemon: the same as `plait server start`."""
    ctx.invoke(server_start, **kwargs)


@click.command("down", epilog=EPILOG)
@click.pass_context
def down(ctx: click.Context) -> None:
    """Stop the daemon: the same as `plait server stop`."""
    ctx.invoke(server_stop)


@click.command("dashboard", epilog=EPILOG)
@click.option("--no-browser", is_flag=True, help="Only print the link; do not open a web browser.")
def dashboard(no_browser: bool) -> None:
    """Open the daemon's web dashboard, signed in (a one-time login link).

    Asks the daemon of this PLAIT_HOME for a link that signs a browser in as this account
    (its local admin credential, like Jupyter's token links), prints it, and opens it in the
    default web browser. The link works once, within 5 minutes. On another machine, or for
    another account, open the dashboard's address and paste an API token instead
    (`plait token create NAME --role user`).

    \b
    Example:
      plait up && plait dashboard
    """
    import json
    import ssl
    import urllib.error
    import urllib.request
    import webbrowser

    from plait._settings import CREDENTIAL_FILE, plait_home

    if _server_pid() is None:
        fail("no server is running for this PLAIT_HOME: start one with `plait up`")
    url = dashboard_url()
    if not url:
        fail(
            "the server serves no dashboard (started with --no-dashboard, or its port was "
            "taken: see `plait server logs`)"
        )
    try:
        token = str(json.loads((plait_home() / CREDENTIAL_FILE).read_text())["token"])
    except (OSError, ValueError, KeyError, TypeError):
        token = ""
    request = urllib.request.Request(
        f"{url}/api/login-codes",
        method="POST",
        headers={"Authorization": f"Bearer {token}"} if token else {},
    )
    context = None
    if url.startswith("https:"):
        try:
            cert = json.loads((plait_home() / "dashboard.json").read_text()).get("tls_cert")
        except (OSError, ValueError):
            cert = None
        context = ssl.create_default_context(cafile=cert or None)
    try:
        with urllib.request.urlopen(request, timeout=30, context=context) as resp:
            path = json.loads(resp.read())["path"]
    except urllib.error.HTTPError as exc:
        try:
            said = json.loads(exc.read()).get("error", "")
        except ValueError:
            said = ""
        fail(f"the dashboard refused a login link: {said or exc.reason}")
    except (urllib.error.URLError, OSError) as exc:
        fail(f"cannot reach the dashboard at {url}: {exc}")
    link = f"{url}{path}"
    click.echo(link)
    if not no_browser:
        webbrowser.open(link)
