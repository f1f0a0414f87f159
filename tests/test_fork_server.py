"""On Linux the local runner's workers are forked by a fork server (runners/_forks.py,
runners/worker/_forks.py): the embedded engine's early process, which imported Plait once.

Each pipeline runs as a fresh ``python script.py``. Its steps say which process ran them: a
forked worker's parent is the fork server, whose parent is the engine. A worker killed
mid-step fails its attempt with the signal's name, as a spawned one does; a killed fork server
takes its workers with it, their steps are retried, and later workers are spawned; once the
engine's process ends, none of its workers nor its fork server is left.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from processes import DEADLINE, run, spawned, wait_for
from test_lifecycle import AS_AT_A_TERMINAL

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux only")

SCRIPT = """\
import json
import os
import signal
import sys
import time
from pathlib import Path

import plait


def parent_of(pid):
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def whoami():
    return [os.getpid(), os.getppid(), parent_of(os.getppid())]


@plait.step(cache=False)
def meet(d: str, i: int) -> list:
    # both steps wait for each other: the pool must start a second worker
    Path(d, f"in-{i}").touch()
    end = time.monotonic() + 60
    while len([p for p in os.listdir(d) if p.startswith("in-")]) < 2:
        if time.monotonic() > end:
            raise TimeoutError("no second worker came")
        time.sleep(0.01)
    return whoami()


@plait.step(cache=False)
def both(xs: list) -> list:
    return xs


@plait.pipeline
def fan(d: str):
    both([meet(d, i) for i in range(2)])


@plait.step(cache=False)
def victim(d: str) -> list:
    pid_file = Path(d, "victim.json")
    if not pid_file.exists():  # the first attempt: the test kills this process
        Path(d, "victim.tmp").write_text(json.dumps(whoami()))
        os.rename(Path(d, "victim.tmp"), pid_file)
        time.sleep(600)
    return whoami()


@plait.pipeline
def victimized(d: str):
    victim(d)


@plait.step(cache=False)
def assassin(d: str) -> list:
    done = Path(d, "assassinated")
    if not done.exists():  # the first attempt kills its fork server, and so itself
        done.write_text(json.dumps(whoami()))
        os.kill(os.getppid(), signal.SIGKILL)
        time.sleep(600)
    return whoami()


@plait.pipeline
def murder(d: str):
    assassin(d)


def events(run, step):
    out = []
    for batch in plait.Client.default().watch(run.run_id):
        out += [[e.attempt, str(e.step_status), e.message] for e in batch if e.step_id == step]
    return out


def fresh(root, name):
    d = Path(root, name)
    d.mkdir()
    return str(d)


if __name__ == "__main__":
    mode, root = sys.argv[1], sys.argv[2]
    out = {"engine": os.getpid()}
    if mode == "fan":
        r = fan(fresh(root, "fan"))
        out.update(status=r.status, steps=r.steps["both"].output())
    elif mode == "victim":
        r = victimized(root)
        out.update(status=r.status, events=events(r, "victim"), step=r.steps["victim"].output())
    elif mode == "fallback":
        first = fan(fresh(root, "fan1"))
        second = murder(fresh(root, "murder"))
        third = fan(fresh(root, "fan2"))
        out.update(
            statuses=[first.status, second.status, third.status],
            first=first.steps["both"].output(),
            murdered=json.loads(Path(root, "murder", "assassinated").read_text()),
            events=events(second, "assassin"),
            retried=second.steps["assassin"].output(),
            third=third.steps["both"].output(),
        )
    print(json.dumps(out))
"""


def _env(tmp_path: Path) -> dict[str, str]:
    env = {**os.environ, "PLAIT_HOME": str(tmp_path / "home"), "PLAIT_WORKERS": "2"}
    env.pop("PLAIT_SERVER", None)
    env.pop("PLAIT_FORK_SERVER", None)
    return env


def _script(tmp_path: Path) -> Path:
    script = tmp_path / "forks.py"
    script.write_text(SCRIPT)
    return script


def _run(tmp_path: Path, mode: str) -> dict[str, Any]:
    out = run([sys.executable, _script(tmp_path), mode, tmp_path], env=_env(tmp_path))
    assert out.returncode == 0, out.stdout + out.stderr
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    _assert_none_left(result["engine"])
    return result


def _running(pid: int) -> bool:
    """Whether the process runs (a zombie, dead but not reaped, does not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def _assert_none_left(engine: int) -> None:
    """No process of that engine's is left: neither a worker (forked ones run the fork
    server's command line) nor the fork server."""
    mark = f"local-{engine}-".encode()
    left = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if mark in cmdline and _running(int(entry.name)):
            left.append((int(entry.name), cmdline.replace(b"\0", b" ").decode()))
    assert not left, left


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


@contextlib.contextmanager
def _victim(
    tmp_path: Path, argv: list[Any], out_file: Path
) -> Iterator[tuple[subprocess.Popen[bytes], tuple[int, int, int]]]:
    """`python ARGV` running the victim step: the process, and (the step's worker, its
    parent, that one's parent) once the step runs; its output goes to ``out_file``."""
    with (
        open(out_file, "wb") as out,
        spawned(
            [sys.executable, *argv], env=_env(tmp_path), stdout=out, stderr=subprocess.STDOUT
        ) as proc,
    ):
        pid_file = tmp_path / "victim.json"
        wait_for(pid_file.exists, "the victim step running")
        pid, server, engine = json.loads(pid_file.read_text())
        yield proc, (pid, server, engine)


def _ended(proc: subprocess.Popen[bytes], out_file: Path, what: str) -> None:
    try:
        proc.wait(timeout=DEADLINE)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"{what}:\n{out_file.read_text()}") from None


def test_a_fan_outs_workers_are_forked_by_one_fork_server(tmp_path: Path) -> None:
    result = _run(tmp_path, "fan")
    assert result["status"] == "SUCCEEDED"
    engine = result["engine"]
    (pid_a, server_a, grand_a), (pid_b, server_b, grand_b) = result["steps"]
    assert pid_a != pid_b  # two workers at once
    assert server_a == server_b != engine  # children of one process, not of the engine
    assert grand_a == grand_b == engine  # which is the engine's child: the fork server
    assert not _running(server_a)  # and ended with the engine


def test_a_forked_worker_killed_mid_step_fails_its_attempt_saying_how(tmp_path: Path) -> None:
    out_file = tmp_path / "out.txt"
    argv = [_script(tmp_path), "victim", tmp_path]
    with _victim(tmp_path, argv, out_file) as (proc, (pid, server, engine)):
        assert server != engine == proc.pid  # a forked worker
        os.kill(pid, signal.SIGKILL)  # as the kernel's out-of-memory killer would
        _ended(proc, out_file, "the run did not end")
    text = out_file.read_text()
    assert proc.returncode == 0, text
    result = json.loads(text.strip().splitlines()[-1])
    assert result["status"] == "SUCCEEDED"  # retried: a crash has its own budget
    lost = [m for attempt, _, m in result["events"] if attempt == 1 and m]
    assert any("worker process killed by signal 9 (SIGKILL: out of memory?)" in m for m in lost)
    retried_pid, retried_server, _ = result["step"]
    assert retried_pid != pid and retried_server == server  # forked again, by the same server
    _assert_none_left(engine)


def test_when_the_fork_server_dies_its_steps_are_retried_and_workers_spawned(
    tmp_path: Path,
) -> None:
    result = _run(tmp_path, "fallback")
    engine = result["engine"]
    assert result["statuses"] == ["SUCCEEDED", "SUCCEEDED", "SUCCEEDED"]
    servers = {server for _, server, _ in result["first"]}
    (server,) = servers
    assert server != engine  # the first run's workers were forked
    killed_pid, killed_server, _ = result["murdered"]
    assert killed_server == server  # the assassin ran forked, and killed that fork server
    lost = [m for attempt, _, m in result["events"] if attempt == 1 and m]
    assert any("killed as its fork server killed by signal 9" in m for m in lost), lost
    # the retry ran at once on a live worker: not handed to the other worker of the dead fork
    # server, still waiting on its stream, whose lease would only have expired (30 s later)
    ended = [(attempt, status) for attempt, status, _ in result["events"] if status != "QUEUED"]
    assert ended[-1] == (2, "SUCCEEDED"), result["events"]
    # from then on workers are spawned: children of the engine itself
    retried_pid, retried_parent, _ = result["retried"]
    assert retried_pid != killed_pid and retried_parent == engine
    assert all(parent == engine for _, parent, _ in result["third"])
    assert len({pid for pid, _, _ in result["third"]}) == 2


def test_a_ctrl_c_leaves_no_fork_server_nor_worker(tmp_path: Path) -> None:
    """An engine interrupted mid-step stops its workers and its fork server before it exits."""
    out_file = tmp_path / "out.txt"
    argv = ["-c", AS_AT_A_TERMINAL, _script(tmp_path), "victim", tmp_path]
    with _victim(tmp_path, argv, out_file) as (proc, (pid, server, engine)):
        assert b"--fork-server" in _cmdline(server)
        proc.send_signal(signal.SIGINT)
        _ended(proc, out_file, "the engine did not exit")
        _assert_none_left(engine)
        assert not _running(pid) and not _running(server)
