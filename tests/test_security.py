"""Tokens and TLS against a real daemon process on loopback."""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from processes import DEADLINE, kill_group, wait_for
from test_runs import demo

import plait

PLAIT = str(Path(sys.executable).parent / "plait")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Daemon:
    def __init__(self, home: Path, *flags: str, port: int | None = None) -> None:
        self.home = home
        self.port = port or free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.env = {**os.environ, "PLAIT_HOME": str(home), "PLAIT_WORKERS": "1"}
        for key in ("PLAIT_SERVER", "PLAIT_TOKEN", "PLAIT_TLS_CA"):
            self.env.pop(key, None)
        home.mkdir(parents=True, exist_ok=True)
        self.log = home / "foreground.log"
        with open(self.log, "wb") as log:
            # a session of its own: stop() kills the group, the daemon's workers included
            self.proc = subprocess.Popen(
                [PLAIT, "server", "start", "--foreground", "--port", str(self.port), *flags],
                env=self.env,
                stdout=log,
                stderr=log,
                start_new_session=True,
            )
        try:

            def started() -> bool:
                if self.proc.poll() is not None:
                    raise AssertionError(self.log.read_text())
                return (home / "server.pid").exists()

            wait_for(started, "the daemon writing server.pid")
        except BaseException:
            self.stop()
            raise

    @property
    def credential(self) -> str:
        """The local admin token the daemon wrote for its own account."""
        return str(json.loads((self.home / "credentials.json").read_text())["token"])

    def token(self, *args: str) -> str:
        out = subprocess.run(
            [PLAIT, "token", *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        return out.stdout.strip()

    def client_env(self) -> dict[str, str]:
        """A client of this daemon: same PLAIT_HOME, so the local credential is used."""
        return {**self.env, "PLAIT_SERVER": self.address}

    def kill(self) -> None:
        """SIGKILL the daemon alone (what it started is left to fend for itself); start another
        with the same home and port to restart it. Its group is still killed by stop()."""
        self.proc.kill()
        self.proc.wait()
        (self.home / "server.pid").unlink(missing_ok=True)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL to the whole group whatever happened."""
        try:
            self.proc.terminate()
            self.proc.wait(timeout=DEADLINE)
        finally:
            kill_group(self.proc.pid)
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def authed(tmp_path: Path) -> Iterator[Daemon]:
    d = Daemon(tmp_path / "home", "--auth")
    try:
        yield d
    finally:
        d.stop()


def _code(fn: object) -> grpc.StatusCode:
    with pytest.raises(plait.RpcError) as info:
        fn()  # type: ignore[operator]
    return grpc.StatusCode[info.value.code]


def test_missing_wrong_revoked_and_valid_tokens(authed: Daemon) -> None:
    # no token, a wrong one, a made-up one: refused, with a message that says what to do
    no_token = plait.Client(authed.address, token="")
    with pytest.raises(plait.RpcError, match="PLAIT_TOKEN") as info:
        no_token.list_runs()
    assert info.value.code == "UNAUTHENTICATED"
    for bad in ("nonsense", "plait_000000000000_secret"):
        client = plait.Client(authed.address, token=bad)
        assert _code(client.list_runs) == grpc.StatusCode.UNAUTHENTICATED
    # a valid token: everything works, the workers included (they have their own token)
    token = authed.token("create", "alice")
    good = plait.Client(authed.address, token=token)
    run = demo.run({"n": 5}, client=good)
    assert run.status == "SUCCEEDED" and run.steps["stats"].output("total") == 10
    # stored hashed: the secret is not in the database
    db = sqlite3.connect(authed.home / "plait.db")
    try:
        hashes = [h for (h,) in db.execute("select secret_hash from api_tokens")]
    finally:
        db.close()
    assert hashes and token.split("_", 2)[2] not in "".join(hashes)
    listed = authed.token("list")
    assert "alice" in listed
    token_id = token.split("_")[1]
    authed.token("revoke", token_id)
    time.sleep(2.2)  # the server trusts a verified token for at most 2 s
    assert _code(good.list_runs) == grpc.StatusCode.UNAUTHENTICATED
    revoke_again = subprocess.run(
        [PLAIT, "token", "revoke", token_id],
        env=authed.env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert revoke_again.returncode == 2 and "no active token" in revoke_again.stderr


def test_health_needs_no_token(authed: Daemon) -> None:
    with grpc.insecure_channel(authed.address) as channel:
        resp = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
    assert resp.status == health_pb2.HealthCheckResponse.SERVING


def _certificate(tmp: Path, name: str) -> tuple[Path, Path]:
    key, cert = tmp / f"{name}.key", tmp / f"{name}.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            f"/CN={name}",
            "-addext",
            "subjectAltName=IP:127.0.0.1,DNS:localhost",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return cert, key


def test_tls_and_mutual_tls(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    server_cert, server_key = _certificate(tmp_path, "server")
    client_cert, client_key = _certificate(tmp_path, "client")
    d = Daemon(
        tmp_path / "home",
        "--tls-cert",
        str(server_cert),
        "--tls-key",
        str(server_key),
        "--tls-client-ca",
        str(client_cert),
    )
    try:
        monkeypatch.setenv("PLAIT_TLS_CERT", str(client_cert))
        monkeypatch.setenv("PLAIT_TLS_KEY", str(client_key))
        secure = plait.Client(d.address, tls_ca=str(server_cert), token=d.credential)
        assert demo.run({"n": 3}, client=secure).status == "SUCCEEDED"
        # without a client certificate the handshake fails
        monkeypatch.delenv("PLAIT_TLS_CERT")
        monkeypatch.delenv("PLAIT_TLS_KEY")
        anonymous = plait.Client(d.address, tls_ca=str(server_cert), token=d.credential)
        assert _code(anonymous.list_runs) == grpc.StatusCode.UNAVAILABLE
        # and a plaintext client gets nowhere
        plaintext = plait.Client(d.address, tls_ca="", token=d.credential)
        assert _code(plaintext.list_runs) == grpc.StatusCode.UNAVAILABLE
    finally:
        d.stop()


def test_a_daemons_worker_secret_is_kept_owner_only_and_an_embedded_ones_nowhere(
    tmp_path: Path,
) -> None:
    """The secret the processes a control plane starts report with: a daemon (which resumes
    runs) keeps it in PLAIT_HOME/worker-secret, 0600, the same after a restart; an embedded
    engine writes it nowhere."""
    from plait.engine._control_plane import ControlPlaneConfig, _worker_secret

    for home in (tmp_path / "daemon", tmp_path / "embedded"):
        home.mkdir(mode=0o700)
    daemon = ControlPlaneConfig(home=tmp_path / "daemon", resume=True)
    secret = _worker_secret(daemon)
    path = daemon.home / "worker-secret"
    assert path.stat().st_mode & 0o777 == 0o600
    assert path.read_text().strip() == secret and len(secret) >= 32
    assert _worker_secret(daemon) == secret  # a restart keeps it
    embedded = ControlPlaneConfig(home=tmp_path / "embedded")
    assert _worker_secret(embedded) != _worker_secret(embedded)  # new each start
    assert not (embedded.home / "worker-secret").exists()
