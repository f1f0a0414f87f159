"""The control-plane daemon as a real background process: client mode, detach, watch, cancel,
and runs that survive a restart."""

from __future__ import annotations

import os
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PLAIT = str(Path(sys.executable).parent / "plait")

PIPELINE = """
import time
import plait

@plait.step
def wait(seconds: float) -> float:
    time.sleep(seconds)
    return seconds

@plait.step
def after(x: float) -> str:
    return f"waited {x}"

@plait.pipeline
def slow(seconds: float = 0.2):
    after(wait(seconds))
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    def __init__(self, tmp: Path) -> None:
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.home = tmp / "server-home"
        self.env = {**os.environ, "PLAIT_HOME": str(self.home), "PLAIT_WORKERS": "2"}
        self.env.pop("PLAIT_SERVER", None)
        self.client_env = {
            **self.env,
            "PLAIT_SERVER": self.address,
            "PLAIT_HOME": str(tmp / "client-home"),
        }
        self.script = tmp / "slow_pipeline.py"
        self.script.write_text(PIPELINE)

    def plait(
        self, *args: str, client: bool = True, ok: bool = True
    ) -> subprocess.CompletedProcess[str]:
        out = subprocess.run(
            [PLAIT, *args],
            env=self.client_env if client else self.env,
            capture_output=True,
            text=True,
            timeout=120,
            cwd=ROOT,
        )
        if ok:
            assert out.returncode == 0, f"{args}: {out.stdout}\n{out.stderr}"
        return out

    def start(self) -> None:
        self.plait("server", "start", "--port", str(self.port), client=False)

    def stop(self) -> None:
        self.plait("server", "stop", client=False)

    def step_status(self, run_id: str, step: str) -> str | None:
        con = sqlite3.connect(self.home / "plait.db")
        try:
            row = con.execute(
                "select status from step_runs where run_id=? and step_id=?", (run_id, step)
            ).fetchone()
        finally:
            con.close()
        return row[0] if row else None


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    s = Server(tmp_path)
    s.start()
    yield s
    s.plait("server", "stop", client=False, ok=False)


def test_clients_use_the_daemon(server: Server) -> None:
    status = server.plait("server", "status", client=False)
    assert "SERVING" in status.stdout and server.address in status.stdout
    out = server.plait("run", f"{server.script}:slow")
    assert "SUCCEEDED" in out.stdout
    # the run lives in the server's store, not in the client's home
    assert (server.home / "plait.db").exists()
    assert not (Path(server.client_env["PLAIT_HOME"]) / "plait.db").exists()
    assert "slow" in server.plait("runs", "list").stdout


def test_detach_then_watch(server: Server) -> None:
    started = time.monotonic()
    rid = server.plait(
        "run", f"{server.script}:slow", "-p", "seconds=1.5", "--detach"
    ).stdout.strip()
    assert len(rid) == 32 and time.monotonic() - started < 1.4  # returned before the run ended
    watched = server.plait("runs", "watch", rid)
    assert "step wait RUNNING" in watched.stdout and "run SUCCEEDED" in watched.stdout
    assert server.step_status(rid, "after") == "SUCCEEDED"


def test_cancel(server: Server) -> None:
    rid = server.plait("run", f"{server.script}:slow", "-p", "seconds=60", "-d").stdout.strip()
    deadline = time.monotonic() + 30
    while server.step_status(rid, "wait") != "RUNNING":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    out = server.plait("runs", "cancel", rid[:10])
    assert "CANCELLED" in out.stdout
    assert server.step_status(rid, "wait") == "CANCELLED"
    assert server.step_status(rid, "after") == "CANCELLED"
    # the pool recovers: the next run works
    assert "SUCCEEDED" in server.plait("run", f"{server.script}:slow").stdout


def test_runs_resume_after_a_restart(server: Server) -> None:
    rid = server.plait("run", f"{server.script}:slow", "-p", "seconds=2", "-d").stdout.strip()
    deadline = time.monotonic() + 30
    while server.step_status(rid, "wait") != "RUNNING":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    server.stop()  # SIGTERM mid-step: the attempt dies with the server
    assert "no server" in server.plait("server", "status", client=False, ok=False).stdout
    server.start()
    watched = server.plait("runs", "watch", rid)
    assert "run SUCCEEDED" in watched.stdout
    assert "the control plane restarted" in watched.stdout
    con = sqlite3.connect(server.home / "plait.db")
    try:
        attempts = con.execute(
            "select attempt, status from attempts where run_id=? and "
            "step_id='wait' order by attempt",
            (rid,),
        ).fetchall()
    finally:
        con.close()
    assert attempts == [(1, "CRASHED"), (2, "SUCCEEDED")]


def test_server_refuses_non_loopback_and_detach_needs_a_server(tmp_path: Path) -> None:
    s = Server(tmp_path)
    out = s.plait(
        "server",
        "start",
        "--foreground",
        "--no-auth",
        "--host",
        "0.0.0.0",
        "--port",
        str(s.port),
        client=False,
        ok=False,
    )
    assert out.returncode == 2 and "without authentication" in out.stderr
    out = s.plait("run", f"{s.script}:slow", "--detach", client=False, ok=False)
    assert out.returncode == 2 and "--detach needs a server" in out.stderr


def test_login_and_logout(server: Server, tmp_path: Path) -> None:
    env = {
        **server.env,
        "XDG_CONFIG_HOME": str(tmp_path / "config"),
        "PLAIT_HOME": str(tmp_path / "other-home"),
    }
    env.pop("PLAIT_SERVER", None)

    def plait(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [PLAIT, *args], env=env, capture_output=True, text=True, timeout=60, cwd=ROOT
        )

    assert plait("login", "127.0.0.1:1").returncode == 2  # nothing answers there
    assert plait("login", server.address).returncode == 0
    rid = plait("run", f"{server.script}:slow", "-d").stdout.strip()
    assert len(rid) == 32  # detached: the saved server is used
    assert plait("logout").returncode == 0
    out = plait("runs", "show", rid)
    assert out.returncode == 2 and "no run" in out.stderr  # back on the embedded engine


def test_settings_from_a_config_file(tmp_path: Path) -> None:
    s = Server(tmp_path)
    s.home.mkdir(parents=True, exist_ok=True)
    (s.home / "server.toml").write_text(f'port = {s.port}\nhost = "127.0.0.1"\n')
    s.plait("server", "start", client=False)  # no --port: the file gives it
    try:
        status = s.plait("server", "status", client=False)
        assert s.address in status.stdout and "SERVING" in status.stdout
    finally:
        s.stop()
    (s.home / "server.toml").write_text("prot = 1\n")
    out = s.plait("server", "start", client=False, ok=False)
    assert out.returncode == 2 and "unknown setting(s) prot" in out.stderr
