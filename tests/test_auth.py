"""Every door needs a key: the daemon and the embedded engine against another OS user, token
roles, the local credential, `plait login --token`, and owner-only files. Real processes, a
real second user (``nobody`` through setpriv), real sockets on loopback."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from other_user import ATTACK, OtherUser
from processes import kill_group, wait_for
from test_runs import demo
from test_security import PLAIT, Daemon, free_port

import plait
from plait.api.v1 import run_service_pb2 as runs
from plait.api.v1 import run_service_pb2_grpc, task_service_pb2_grpc, token_service_pb2_grpc
from plait.api.v1 import task_service_pb2 as tasks
from plait.api.v1 import token_service_pb2 as tokens

REFUSED = {
    "read_credential": "PermissionError",
    "list_home": "PermissionError",
    "register": "UNAUTHENTICATED",
    "create_run": "UNAUTHENTICATED",
    "list_runs": "UNAUTHENTICATED",
    "connect_as_worker": "UNAUTHENTICATED",
}


@pytest.fixture(scope="module")
def other_user() -> Iterator[OtherUser]:
    user = OtherUser()
    try:
        yield user
    finally:
        user.close()


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    d = Daemon(tmp_path / "home")  # the defaults: authentication on, loopback included
    try:
        yield d
    finally:
        d.stop()


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_another_user_cannot_use_the_daemon(
    daemon: Daemon, other_user: OtherUser, tmp_path: Path
) -> None:
    marker = Path("/tmp") / f"plait-pwned-{os.getpid()}"
    found = other_user.run(
        ATTACK, address=daemon.address, home=str(daemon.home), marker=str(marker)
    )
    assert found == REFUSED
    bad = other_user.run(
        ATTACK, address=daemon.address, home=str(daemon.home), marker=str(marker), token="guess"
    )
    assert bad == REFUSED
    assert not marker.exists()
    # the daemon's own account gets in with no configuration: the credential file
    listed = subprocess.run(
        [PLAIT, "runs", "list"],
        env={**daemon.env, "PLAIT_SERVER": daemon.address},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert listed.returncode == 0, listed.stderr
    assert mode(daemon.home) == 0o700
    assert mode(daemon.home / "credentials.json") == 0o600


EMBEDDED = """
import sys, plait
client = plait.Client(home=sys.argv[1])
print(client.address, flush=True)
sys.stdin.read()  # serve until the test closes stdin
"""


def test_another_user_cannot_use_an_embedded_engine(other_user: OtherUser, tmp_path: Path) -> None:
    home = tmp_path / "embedded-home"
    # a token stored in that home's database: the embedded engine accepts none of them
    stored = subprocess.run(
        [
            PLAIT,
            "token",
            "create",
            "stored",
            "--role",
            "admin",
            "--database-url",
            f"sqlite:///{home / 'plait.db'}",
        ],
        env={**os.environ, "PLAIT_HOME": str(home)},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout.strip()
    proc = subprocess.Popen(
        [sys.executable, "-c", EMBEDDED, str(home)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        assert proc.stdout is not None
        address = proc.stdout.readline().strip()
        assert address.startswith("127.0.0.1:"), address
        marker = Path("/tmp") / f"plait-pwned-{os.getpid()}"
        wait_for(lambda: _worker_of(proc.pid) is not None, "the embedded engine's first worker")
        worker = _worker_of(proc.pid)
        for token in ("", stored):
            found = other_user.run(
                ATTACK,
                address=address,
                home=str(home),
                marker=str(marker),
                token=token,
                environ_of=worker,
            )
            assert found == {**REFUSED, "read_worker_environ": "PermissionError"}
        assert not marker.exists()
        # the stored admin token is refused for the embedding process's own account too
        with grpc.insecure_channel(address) as channel, pytest.raises(grpc.RpcError) as info:
            run_service_pb2_grpc.RunServiceStub(channel).ListRuns(
                runs.ListRunsRequest(), metadata=[("authorization", f"Bearer {stored}")]
            )
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert mode(home) == 0o700
        for name in ("plait.db", "plait.db-wal", "plait.db-shm"):
            assert mode(home / name) == 0o600, name
    finally:
        proc.kill()
        kill_group(proc.pid)
        proc.wait()
        for pipe in (proc.stdin, proc.stdout):
            if pipe is not None:
                pipe.close()


def _worker_of(parent: int) -> int | None:
    """A worker process the embedded engine of process ``parent`` started, if any yet."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if int(fields[1]) == parent and b"plait.runners.worker" in cmdline:
            return int(entry.name)
    return None


def _create(daemon: Daemon, name: str, role: str, token: str | None = None) -> str:
    env = {**daemon.env, "PLAIT_SERVER": daemon.address}
    if token is not None:
        env["PLAIT_TOKEN"] = token
    out = subprocess.run(
        [PLAIT, "token", "create", name, "--role", role],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def _code(call: object) -> grpc.StatusCode:
    try:
        call()  # type: ignore[operator]
    except grpc.RpcError as exc:
        return exc.code()  # type: ignore[no-any-return]
    return grpc.StatusCode.OK


def test_roles_decide_which_services_a_token_may_call(daemon: Daemon) -> None:
    user = _create(daemon, "alice", "user")  # over TokenService, with the local credential
    worker = _create(daemon, "pool-a", "worker")
    admin = _create(daemon, "ops", "admin", token=daemon.credential)
    with grpc.insecure_channel(daemon.address) as channel:
        run_stub = run_service_pb2_grpc.RunServiceStub(channel)
        task_stub = task_service_pb2_grpc.TaskServiceStub(channel)
        token_stub = token_service_pb2_grpc.TokenServiceStub(channel)

        def as_(token: str) -> list[tuple[str, str]]:
            return [("authorization", f"Bearer {token}")]

        def connect(token: str) -> object:
            hello = tasks.ConnectRequest(hello=tasks.WorkerHello(worker_id="w", runner="nope"))
            return lambda: list(task_stub.Connect(iter([hello]), metadata=as_(token), timeout=60))

        def list_runs(token: str) -> object:
            return lambda: run_stub.ListRuns(runs.ListRunsRequest(), metadata=as_(token))

        def list_tokens(token: str) -> object:
            return lambda: token_stub.ListTokens(tokens.ListTokensRequest(), metadata=as_(token))

        assert _code(list_runs(user)) == grpc.StatusCode.OK
        assert _code(connect(user)) == grpc.StatusCode.PERMISSION_DENIED
        assert _code(list_tokens(user)) == grpc.StatusCode.PERMISSION_DENIED
        assert _code(list_runs(worker)) == grpc.StatusCode.PERMISSION_DENIED
        assert _code(list_tokens(worker)) == grpc.StatusCode.PERMISSION_DENIED
        # past authorization, the worker meets the service itself: there is no pool "nope"
        assert _code(connect(worker)) == grpc.StatusCode.INVALID_ARGUMENT
        assert _code(list_runs(admin)) == grpc.StatusCode.OK
        assert _code(connect(admin)) == grpc.StatusCode.PERMISSION_DENIED
        listed = token_stub.ListTokens(tokens.ListTokensRequest(), metadata=as_(admin)).tokens
    roles = {t.display_name: tokens.TokenRole.Name(t.role) for t in listed}
    assert roles["alice"] == "TOKEN_ROLE_USER" and roles["pool-a"] == "TOKEN_ROLE_WORKER"
    assert roles["ops"] == "TOKEN_ROLE_ADMIN"
    # the message says what is wrong and what would do
    with pytest.raises(plait.RpcError, match="a user token may not call TokenService") as info:
        plait.Client(daemon.address, token=user).tokens("ListTokens", tokens.ListTokensRequest())
    assert info.value.code == "PERMISSION_DENIED"
    # a user may not mint tokens through the CLI either
    refused = subprocess.run(
        [PLAIT, "token", "create", "sneaky", "--role", "admin"],
        env={**daemon.env, "PLAIT_SERVER": daemon.address, "PLAIT_TOKEN": user},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert refused.returncode == 2 and "may not call TokenService" in refused.stderr
    # a user token runs pipelines
    assert demo.run({"n": 4}, client=plait.Client(daemon.address, token=user)).status == (
        "SUCCEEDED"
    )


def test_login_saves_the_token_owner_only(daemon: Daemon, tmp_path: Path) -> None:
    user = _create(daemon, "bob", "user")
    # another PLAIT_HOME: no local credential to fall back on
    env = {
        **daemon.env,
        "PLAIT_HOME": str(tmp_path / "elsewhere"),
        "XDG_CONFIG_HOME": str(tmp_path / "config"),
    }
    env.pop("PLAIT_TOKEN", None)

    def plait_cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([PLAIT, *args], env=env, capture_output=True, text=True, timeout=60)

    assert plait_cli("login", daemon.address).returncode == 0
    refused = plait_cli("runs", "list")
    assert refused.returncode != 0 and "token" in refused.stderr
    assert plait_cli("login", daemon.address, "--token", "plait_000000000000_wrong").returncode == 2
    saved = plait_cli("login", daemon.address, "--token", user)
    assert saved.returncode == 0, saved.stderr
    config = tmp_path / "config" / "plait" / "config.json"
    assert mode(config) == 0o600 and mode(config.parent) == 0o700
    assert json.loads(config.read_text())["tokens"][daemon.address] == user
    assert plait_cli("runs", "list").returncode == 0
    assert plait_cli("logout").returncode == 0
    assert daemon.address not in json.loads(config.read_text()).get("tokens", {})


def test_no_auth_only_on_loopback_and_loudly(tmp_path: Path) -> None:
    env = {**os.environ, "PLAIT_HOME": str(tmp_path / "home")}
    env.pop("PLAIT_SERVER", None)
    refused = subprocess.run(
        [
            PLAIT,
            "server",
            "start",
            "--foreground",
            "--no-auth",
            "--host",
            "0.0.0.0",
            "--port",
            str(free_port()),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert refused.returncode != 0 and "--no-auth is for loopback only" in refused.stderr
    d = Daemon(tmp_path / "open", "--no-auth")
    try:
        anyone = plait.Client(d.address, token="")
        assert anyone.list_runs() == []
        assert "AUTHENTICATION IS OFF" in d.log.read_text()
        assert not (d.home / "credentials.json").exists()
    finally:
        d.stop()


def test_files_are_owner_only_whatever_the_umask(tmp_path: Path) -> None:
    home = tmp_path / "home"
    port = free_port()
    env = {**os.environ, "PLAIT_HOME": str(home), "PLAIT_WORKERS": "1"}
    for key in ("PLAIT_SERVER", "PLAIT_TOKEN"):
        env.pop(key, None)
    old = os.umask(0o022)
    try:
        started = subprocess.run(
            [PLAIT, "server", "start", "--port", str(port)],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
    finally:
        os.umask(old)
    assert started.returncode == 0, started.stderr
    try:
        run = demo.run(
            {"n": 3},
            client=plait.Client(
                f"127.0.0.1:{port}",
                token=json.loads((home / "credentials.json").read_text())["token"],
            ),
        )
        assert run.status == "SUCCEEDED"
        assert mode(home) == 0o700
        for name in (
            "plait.db",
            "plait.db-wal",
            "plait.db-shm",
            "credentials.json",
            "server.pid",
            "server.log",
        ):
            assert mode(home / name) == 0o600, name
        artifacts = home / "artifacts"
        assert mode(artifacts) == 0o700
        blobs = [p for p in artifacts.rglob("*") if p.is_file()]
        assert blobs and all(mode(p) == 0o600 for p in blobs)
    finally:
        stopped = subprocess.run(
            [PLAIT, "server", "stop"], env=env, capture_output=True, text=True, timeout=120
        )
        assert stopped.returncode == 0, stopped.stderr
