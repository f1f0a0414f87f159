"""Clients survive a restart of the daemon: `plait runs watch`, an SDK watcher and a blocking
pipeline call reconnect, resume after the last event they saw, and report the run's success.

The daemon is killed with SIGKILL (its process group: its workers die with it) and started again
on the same port and PLAIT_HOME. Every wait is on a file, a line or a process, never the clock.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from processes import DEADLINE, group_alive, kill_group, wait_for
from test_live_logs import Child
from test_security import free_port

import plait

PLAIT = str(Path(sys.executable).parent / "plait")

PIPELINE = """
import os
import time
import plait

@plait.step(cache=False)
def hold(flag: str, gate: str) -> str:
    ctx = plait.get_step_context()
    with open(f"{flag}.{ctx.attempt}", "w") as f:  # the test learns the run and the attempt
        f.write(ctx.run_id)
    deadline = time.monotonic() + 600  # a hang guard only: the test creates the gate
    while not os.path.exists(gate):
        if time.monotonic() > deadline:
            raise TimeoutError(f"nobody created {gate}")
        time.sleep(0.02)
    return gate

@plait.step
def after(x: str) -> str:
    return x + " done"

@plait.pipeline
def long_run(flag: str, gate: str):
    after(hold(flag, gate))
"""

# the SDK's two ways of following: a blocking pipeline call, and watch() from another process
CALL_PIPELINE = """
import faulthandler, json, signal, sys
faulthandler.register(signal.SIGUSR1)  # a hang shows where it is
sys.path.insert(0, sys.argv[1])
from long_pipeline import long_run
run = long_run(flag=sys.argv[2], gate=sys.argv[3])
print(json.dumps({"run_id": run.run_id, "status": str(run.status)}))
"""

WATCH_RUN = """
import faulthandler, json, signal, sys
from pathlib import Path
import plait
faulthandler.register(signal.SIGUSR1)  # a hang shows where it is
client = plait.Client()
client.on_reconnect = lambda notice: print("notice:", notice, file=sys.stderr, flush=True)
seen = []
for batch in client.watch(sys.argv[1]):
    seen.extend([e.sequence, e.step_id, str(e.step_status or e.run_status)] for e in batch)
    Path(sys.argv[2]).touch()  # watching
print(json.dumps(seen))
"""

EVENT_LINE = re.compile(r"^\d\d:\d\d:\d\d\.\d{3}  (step \S+ \S+|run \S+)")


class RestartableDaemon:
    """`plait server start --foreground` on a fixed port and PLAIT_HOME, in a process group of
    its own (its workers in it), killed at teardown whatever happened."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.env = {**os.environ, "PLAIT_HOME": str(home), "PLAIT_WORKERS": "1"}
        for key in ("PLAIT_SERVER", "PLAIT_TOKEN", "PLAIT_TLS_CA"):
            self.env.pop(key, None)
        home.mkdir(parents=True, exist_ok=True)
        self.groups: list[int] = []
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.home / "foreground.log", "ab") as log:
            proc = self.proc = subprocess.Popen(
                [PLAIT, "server", "start", "--foreground", "--port", str(self.port)],
                env=self.env,
                stdout=log,
                stderr=log,
                start_new_session=True,
            )
        self.groups.append(proc.pid)

        def serving() -> bool:
            if proc.poll() is not None:
                raise AssertionError((self.home / "foreground.log").read_text())
            try:
                return (self.home / "server.pid").read_text().split()[0] == str(proc.pid)
            except (FileNotFoundError, IndexError):
                return False

        wait_for(serving, "the daemon writing its server.pid")

    def kill(self) -> None:
        """SIGKILL to the daemon and its workers, as a machine that dies."""
        assert self.proc is not None
        kill_group(self.proc.pid)
        self.proc.wait(timeout=DEADLINE)
        pgid = self.proc.pid
        wait_for(lambda: not group_alive(pgid), "the daemon's process group dying")

    def client_env(self) -> dict[str, str]:
        """A client of this daemon: same PLAIT_HOME, so the local credential is used."""
        return {**self.env, "PLAIT_SERVER": self.address}

    def close(self) -> None:
        for pgid in self.groups:
            kill_group(pgid)
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[RestartableDaemon]:
    d = RestartableDaemon(tmp_path / "server-home")
    try:
        d.start()
        yield d
    finally:
        d.close()


def test_watchers_and_a_blocking_pipeline_call_survive_a_restart(
    daemon: RestartableDaemon, tmp_path: Path
) -> None:
    (tmp_path / "long_pipeline.py").write_text(PIPELINE, encoding="utf-8")
    (tmp_path / "call_pipeline.py").write_text(CALL_PIPELINE, encoding="utf-8")
    (tmp_path / "watch_run.py").write_text(WATCH_RUN, encoding="utf-8")
    flag, gate, watching = tmp_path / "flag", tmp_path / "gate", tmp_path / "watching"
    env = daemon.client_env()
    python = sys.executable
    with Child(
        [python, tmp_path / "call_pipeline.py", tmp_path, flag, gate], env=env, cwd=tmp_path
    ) as caller:
        first = Path(f"{flag}.1")
        wait_for(first.exists, "the step's first attempt running")
        run_id = first.read_text()
        with (
            Child([PLAIT, "runs", "watch", run_id], env=env) as cli,
            Child([python, tmp_path / "watch_run.py", run_id, watching], env=env) as sdk,
        ):
            cli.stdout.until("step hold RUNNING")  # all three follow the run
            wait_for(watching.exists, "the SDK watcher following the run")

            daemon.kill()  # mid-step
            cli.stderr.until("reconnecting")
            sdk.stderr.until("reconnecting")
            caller.stderr.until("reconnecting")

            daemon.start()  # same port, same PLAIT_HOME: the run goes on
            wait_for(Path(f"{flag}.2").exists, "the step running again after the restart")
            gate.touch()

            assert caller.wait() == 0, caller.stderr.rest()
            assert cli.wait() == 0, cli.stderr.rest()
            assert sdk.wait() == 0, sdk.stderr.rest()
            called = json.loads(caller.stdout.rest())
            cli_out = cli.stdout.rest()
            watched = json.loads(sdk.stdout.rest())
            notices = [cli.stderr.rest(), sdk.stderr.rest(), caller.stderr.rest()]

    assert called == {"run_id": run_id, "status": "SUCCEEDED"}
    client = plait.Client(daemon.address, token=_credential(daemon.home))
    try:
        events = [e for batch in client.watch(run_id) for e in batch]
        assert client.get_run(run_id).status == "SUCCEEDED"
    finally:
        client.close()
    assert events[-1].run_status == "SUCCEEDED"
    # every event exactly once, in order
    assert watched == [[e.sequence, e.step_id, str(e.step_status or e.run_status)] for e in events]
    printed = [m.group(1) for line in cli_out.splitlines() if (m := EVENT_LINE.match(line))]
    assert printed == [
        f"step {e.step_id} {e.step_status}" if e.step_id else f"run {e.run_status}" for e in events
    ]
    assert "SUCCEEDED" in cli_out.splitlines()[-2] + cli_out.splitlines()[-1]
    # one short notice each, naming the server
    for text in notices:
        lines = [line for line in text.splitlines() if "reconnecting" in line]
        assert len(lines) == 1 and daemon.address in lines[0], text


def test_a_follower_gives_up_naming_the_server(daemon: RestartableDaemon, tmp_path: Path) -> None:
    (tmp_path / "long_pipeline.py").write_text(PIPELINE, encoding="utf-8")
    env = daemon.client_env()
    flag, gate = tmp_path / "flag", tmp_path / "gate"
    rid = subprocess.run(
        [
            PLAIT, "run", f"{tmp_path / 'long_pipeline.py'}:long_run",
            "-p", f"flag={flag}", "-p", f"gate={gate}", "--detach",
        ],
        env=env, capture_output=True, text=True, timeout=DEADLINE, check=True,
    ).stdout.strip()  # fmt: skip
    env["PLAIT_RECONNECT_TIMEOUT"] = "1"
    with Child([PLAIT, "runs", "watch", rid], env=env) as cli:
        cli.stdout.until("step hold RUNNING")
        daemon.kill()  # and it never comes back
        assert cli.wait() == 2
        err = cli.stderr.rest()
    assert "reconnecting" in err
    assert f"the control plane at {daemon.address} has not answered for 1 s" in err
    assert f"plait runs watch {rid}" in err


def _credential(home: Path) -> str:
    return str(json.loads((home / "credentials.json").read_text())["token"])


def test_a_bad_reconnect_timeout_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PLAIT_RECONNECT_TIMEOUT", "soon")
    with pytest.raises(plait.PlaitError, match="PLAIT_RECONNECT_TIMEOUT must be a number"):
        plait.Client("127.0.0.1:1", token="t")
    monkeypatch.setenv("PLAIT_RECONNECT_TIMEOUT", "2.5")
    client = plait.Client("127.0.0.1:1", token="t")
    try:
        assert client.reconnect_timeout == 2.5
    finally:
        client.close()
