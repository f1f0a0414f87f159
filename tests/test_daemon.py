"""The control-plane daemon as a real background process: client mode, detach, watch, cancel,
and runs that survive a restart."""

from __future__ import annotations

import contextlib
import os
import socket
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from processes import kill_group, run, wait_for

ROOT = Path(__file__).resolve().parent.parent
PLAIT = str(Path(sys.executable).parent / "plait")

PIPELINE = """
import os
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

@plait.step(cache=False)
def hold(gate: str) -> str:
    # blocks until the test creates `gate`: the test, not the clock, decides when the step ends
    deadline = time.monotonic() + 600  # a hang guard only
    while not os.path.exists(gate):
        if time.monotonic() > deadline:
            raise TimeoutError(f"nobody created {gate}")
        time.sleep(0.05)
    return gate

@plait.step
def released(gate: str) -> str:
    return f"released {gate}"

@plait.pipeline
def held(gate: str):
    released(hold(gate))
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
        self.gate = tmp / "gate"
        # the process groups of the daemons started: killed at teardown, workers included
        self.groups: list[int] = []
        self.token = ""

    def plait(
        self, *args: str, client: bool = True, ok: bool = True
    ) -> subprocess.CompletedProcess[str]:
        out = run(
            [PLAIT, *args], env=self.client_env if client else self.env, timeout=120, cwd=ROOT
        )
        if ok:
            assert out.returncode == 0, f"{args}: {out.stdout}\n{out.stderr}"
        return out

    def start(self, *args: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
        try:
            return self.plait("server", "start", *args, client=False, ok=ok)
        finally:
            self._remember_group()

    def _remember_group(self) -> None:
        # `plait server start` gives the daemon a session of its own: its pid is its group
        with contextlib.suppress(FileNotFoundError, ValueError, IndexError):
            self.groups.append(int((self.home / "server.pid").read_text().split()[0]))

    def stop(self) -> None:
        self.plait("server", "stop", client=False)

    def kill(self) -> None:
        """Teardown: a graceful stop, then SIGKILL whatever is left of every daemon started."""
        try:
            self.plait("server", "stop", client=False, ok=False)
        finally:
            for pgid in self.groups:
                kill_group(pgid)

    def run_status(self, run_id: str) -> str | None:
        con = sqlite3.connect(self.home / "plait.db")
        try:
            row = con.execute("select status from runs where id=?", (run_id,)).fetchone()
        finally:
            con.close()
        return row[0] if row else None

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
    try:
        s.start("--port", str(s.port))
        # clients live in another PLAIT_HOME: no local credential there, they need a token,
        # made through the server's TokenService with the daemon's own credential
        s.token = s.plait("token", "create", "test-client", client=False).stdout.strip()
        s.client_env["PLAIT_TOKEN"] = s.token
        yield s
    finally:
        s.kill()


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
    # the step cannot end before the gate exists: --detach must return while the run goes on
    rid = server.plait(
        "run", f"{server.script}:held", "-p", f"gate={server.gate}", "--detach"
    ).stdout.strip()
    assert len(rid) == 32
    assert server.run_status(rid) in ("PENDING", "RUNNING")
    assert server.step_status(rid, "released") != "SUCCEEDED"
    server.gate.touch()
    watched = server.plait("runs", "watch", rid)
    assert "step hold RUNNING" in watched.stdout and "run SUCCEEDED" in watched.stdout
    assert server.step_status(rid, "released") == "SUCCEEDED"


def test_cancel(server: Server) -> None:
    # nobody creates the gate: only the cancel ends the step
    rid = server.plait(
        "run", f"{server.script}:held", "-p", f"gate={server.gate}", "-d"
    ).stdout.strip()
    wait_for(lambda: server.step_status(rid, "hold") == "RUNNING", "step hold reaching RUNNING")
    out = server.plait("runs", "cancel", rid[:10])
    assert "CANCELLED" in out.stdout
    assert server.step_status(rid, "hold") == "CANCELLED"
    assert server.step_status(rid, "released") == "CANCELLED"
    # the pool recovers: the next run works
    assert "SUCCEEDED" in server.plait("run", f"{server.script}:slow").stdout


def test_runs_resume_after_a_restart(server: Server) -> None:
    rid = server.plait(
        "run", f"{server.script}:held", "-p", f"gate={server.gate}", "-d"
    ).stdout.strip()
    wait_for(lambda: server.step_status(rid, "hold") == "RUNNING", "step hold reaching RUNNING")
    server.stop()  # SIGTERM mid-step (the gate is closed): the attempt dies with the server
    assert "no server" in server.plait("server", "status", client=False, ok=False).stdout
    server.start("--port", str(server.port))
    server.gate.touch()  # the second attempt may finish
    watched = server.plait("runs", "watch", rid)
    assert "run SUCCEEDED" in watched.stdout
    assert "the control plane restarted" in watched.stdout
    con = sqlite3.connect(server.home / "plait.db")
    try:
        attempts = con.execute(
            "select attempt, status from attempts where run_id=? and "
            "step_id='hold' order by attempt",
            (rid,),
        ).fetchall()
    finally:
        con.close()
    assert attempts == [(1, "CRASHED"), (2, "SUCCEEDED")]


def test_server_refuses_non_loopback_and_detach_needs_a_server(tmp_path: Path) -> None:
    s = Server(tmp_path)
    # s.plait runs each command in a process group of its own, killed when it returns: a
    # foreground server that wrongly started does not outlive the test
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
        return run([PLAIT, *args], env=env, timeout=120, cwd=ROOT)

    assert plait("login", "127.0.0.1:1").returncode == 2  # nothing answers there
    assert plait("login", server.address, "--token", server.token).returncode == 0
    rid = plait("run", f"{server.script}:slow", "-d").stdout.strip()
    assert len(rid) == 32  # detached: the saved server is used
    assert plait("logout").returncode == 0
    out = plait("runs", "show", rid)
    assert out.returncode == 2 and "no run" in out.stderr  # back on the embedded engine


def test_settings_from_a_config_file(tmp_path: Path) -> None:
    s = Server(tmp_path)
    s.home.mkdir(parents=True, exist_ok=True)
    (s.home / "server.toml").write_text(f'port = {s.port}\nhost = "127.0.0.1"\n')
    try:
        s.start()  # no --port: the file gives it
        status = s.plait("server", "status", client=False)
        assert s.address in status.stdout and "SERVING" in status.stdout
        s.stop()
        (s.home / "server.toml").write_text("prot = 1\n")
        out = s.start(ok=False)
        assert out.returncode == 2 and "unknown setting(s) prot" in out.stderr
    finally:
        s.kill()
