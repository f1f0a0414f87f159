"""Big and hostile output, and process hygiene: real workers, real signals, real sockets.

A step that prints 100 MB succeeds with a capped log; a step whose output does not fit in its
worker's memory fails saying so; a worker killed by SIGKILL is reported by the signal's name;
the daemon's commands never signal a process they did not start; start-up refusals are one line;
the server log rotates by size.
"""

from __future__ import annotations

import os
import signal
import socket
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from processes import kill_group, run, spawned

import plait

PLAIT = str(Path(sys.executable).parent / "plait")
MiB = 1024 * 1024

# ---- steps (module level, so that worker processes import them) ----


@plait.step(cache=False)
def shout(megabytes: int) -> int:
    line = "x" * (MiB - 1) + "\n"
    for _ in range(megabytes):
        sys.stdout.write(line)
    sys.stdout.flush()
    print("a last word on stderr", file=sys.stderr)
    return megabytes


@plait.pipeline
def loud(megabytes: int = 100) -> None:
    shout(megabytes)


@plait.step(cache=False)
def huge(megabytes: int) -> str:
    import resource

    value = "x" * (megabytes * MiB)
    # this worker may now grow by 64 MiB more: saving the value (a copy) needs far more
    with open("/proc/self/statm") as fh:
        size = int(fh.read().split()[0]) * resource.getpagesize()
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (size + 64 * MiB, hard))
    return value


@plait.pipeline
def too_big(megabytes: int = 256) -> None:
    huge(megabytes)


@plait.step(cache=False)
def die() -> int:
    os.kill(os.getpid(), signal.SIGKILL)
    return 0


@plait.pipeline
def killed() -> None:
    die()


@pytest.fixture
def client(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[plait.Client]:
    monkeypatch.setenv("PLAIT_WORKERS", "1")
    monkeypatch.delenv("PLAIT_SERVER", raising=False)
    monkeypatch.delenv("PLAIT_MAX_LOG_BYTES", raising=False)
    c = plait.Client(home=tmp_path / "home")
    yield c
    c.shutdown()


def _run(pipe: plait.Pipeline[Any], client: plait.Client, **params: Any) -> plait.Run:
    return pipe.run(params, client=client)


# ---- big and hostile output ----


def test_a_step_printing_100_mb_succeeds_with_a_capped_log(client: plait.Client) -> None:
    r = _run(loud, client, megabytes=100)
    assert r.status == "SUCCEEDED", r.steps["shout"].error
    entries = client.logs(r.run_id, "shout")
    stdout = "".join(e.text for e in entries if e.stream == "stdout")
    stderr = "".join(e.text for e in entries if e.stream == "stderr")
    assert "a last word on stderr" in stderr  # the small stream is kept whole
    kept = len(stdout.encode()) + len(stderr.encode())
    assert 4 * MiB - 1024 <= kept <= 4 * MiB + 1024
    assert stdout.rstrip("\n").endswith("of stdout dropped; the log keeps the first 4 MiB]")
    assert "[plait: 96 MiB of stdout dropped" in stdout
    assert max(len(e.text.encode()) for e in entries) <= 256 * 1024  # bounded chunks


def test_the_log_limit_is_a_setting(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PLAIT_WORKERS", "1")
    monkeypatch.delenv("PLAIT_SERVER", raising=False)
    monkeypatch.setenv("PLAIT_MAX_LOG_BYTES", str(MiB))
    c = plait.Client(home=tmp_path / "home")
    try:
        r = _run(loud, c, megabytes=3)
        assert r.status == "SUCCEEDED"
        stdout = "".join(e.text for e in c.logs(r.run_id, "shout") if e.stream == "stdout")
        assert "the log keeps the first" in stdout
        assert len(stdout.encode()) <= MiB + 1024
    finally:
        c.shutdown()


def test_an_output_larger_than_memory_fails_saying_so(client: plait.Client) -> None:
    r = _run(too_big, client)
    step = r.steps["huge"]
    assert step.status == "FAILED"
    assert step.error is not None
    assert step.error.type == "builtins.MemoryError"
    assert "(builtins.str) is too large" in step.error.message, step.error.message
    assert "ran out of memory" in step.error.message


@plait.step(cache=False)
def wordy_failure() -> int:
    # 4-byte characters: 300,000 of them are 1.2 MB, past every limit on a report
    raise ValueError("\U0001d11e" * 300_000)


@plait.pipeline
def fails_wordily() -> None:
    wordy_failure()


def test_a_huge_error_message_is_cut_to_fit_the_report(client: plait.Client) -> None:
    r = _run(fails_wordily, client)
    step = r.steps["wordy_failure"]
    assert step.status == "FAILED"  # the step's own failure, not a worker lost to a refused report
    assert step.error is not None and step.error.type == "builtins.ValueError"
    assert len(step.error.message.encode()) <= 64 * 1024 + 64
    assert "bytes cut]" in step.error.message


def test_a_worker_killed_by_sigkill_is_named(client: plait.Client) -> None:
    r = _run(killed, client)
    step = r.steps["die"]
    assert step.status == "CRASHED"
    assert step.error is not None
    assert "killed by signal 9 (SIGKILL: out of memory?)" in step.error.message


def test_the_scheduler_caps_a_misbehaving_workers_logs_per_attempt() -> None:
    import networkx as nx
    from test_state_machine import Machine, spec_of

    from plait.engine.scheduler import Failed, Logs, Scheduler

    m = Machine(spec_of(nx.DiGraph([(0, 1)]), retries=1))
    m.scheduler = Scheduler(log_limit_bytes=1000)
    _, fx = m.create()
    (task,) = fx.tasks
    stored = [m.apply(Logs(task.token, "stdout", "é" * 300)).logs for _ in range(4)]
    texts = [row["text"] for rows in stored for row in rows]
    assert len(texts) == 2  # 600 + 600 bytes crosses the limit: cut and said; then nothing
    assert texts[0] == "é" * 300
    assert texts[1].startswith("é" * 200 + "\n[plait: this attempt's log passed its limit")
    assert len("".join(texts).encode()) <= 1000 + 1024
    # a new attempt has a budget of its own
    from plait._models import StepError

    fx = m.apply(Failed(task.token, StepError("builtins.ValueError", "again")))
    (retry,) = fx.tasks
    assert retry.token.attempt == task.token.attempt + 1
    assert m.apply(Logs(retry.token, "stderr", "fine")).logs[0]["text"] == "fine"


# ---- process hygiene ----


def _env(home: Path, **extra: str) -> dict[str, str]:
    env = {**os.environ, "PLAIT_HOME": str(home), "PLAIT_WORKERS": "1", **extra}
    for name in ("PLAIT_SERVER", "PLAIT_SERVER_CONFIG", "PLAIT_MAX_LOG_BYTES"):
        env.pop(name, None)
    return env


def _plait(home: Path, *args: str, **extra: str) -> subprocess.CompletedProcess[str]:
    return run([PLAIT, *args], env=_env(home, **extra), timeout=120)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _one_line(out: subprocess.CompletedProcess[str]) -> str:
    """The one line of a refusal (a --foreground daemon logs to stderr too: its log lines,
    which carry a time stamp, are left out)."""
    assert out.returncode != 0, out.stdout + out.stderr
    assert "Traceback" not in out.stderr and "ExceptionGroup" not in out.stderr, out.stderr
    lines = [
        line
        for line in out.stderr.strip().splitlines()
        if not (line[:4].isdigit() and " plait." in line)
    ]
    assert len(lines) == 1, out.stderr
    return lines[0]


def test_a_stale_pid_file_is_removed_and_its_process_left_alone(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    pid_file = home / "server.pid"
    with spawned(["sleep", "300"]) as sleeper:
        for command in (["server", "status"], ["server", "stop"], ["down"]):
            pid_file.write_text(f"{sleeper.pid}\n127.0.0.1:{_free_port()}\n")
            out = _plait(home, *command)
            assert (
                f"removed a stale server.pid (process {sleeper.pid} is not a Plait server)"
                in out.stderr
            ), out.stderr
            assert "no server is running" in out.stdout
            assert not pid_file.exists()
            assert sleeper.poll() is None  # neither SIGTERM nor SIGKILL reached it
        out = _plait(home, "server", "status")
        assert out.returncode == 1 and "stale" not in out.stderr


def test_start_on_a_busy_port_is_one_line(tmp_path: Path) -> None:
    home = tmp_path / "home"
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = str(busy.getsockname()[1])
        for flags in ([], ["--foreground"]):
            line = _one_line(_plait(home, "server", "start", "--port", port, *flags))
            assert f"cannot listen on 127.0.0.1:{port}" in line and "in use" in line, line
    assert not (home / "server.pid").exists()


def test_an_unreadable_or_invalid_config_is_one_line(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    config = home / "server.toml"
    config.write_bytes(b'host = "\xff\xfe"\n')
    assert "server.toml is not valid TOML" in _one_line(_plait(home, "server", "start"))
    config.write_text('port = "seven"\n')
    assert "port must be an integer" in _one_line(_plait(home, "server", "start"))
    config.write_text("max_log_bytes = 0\n")
    assert "max_log_bytes" in _one_line(_plait(home, "server", "start", "--foreground"))
    config.write_text('heartbeat_timeout = "soon"\n')
    assert "heartbeat_timeout must be a number of seconds" in _one_line(
        _plait(home, "server", "start")
    )
    config.write_text("heartbeat_timeout = -1\n")
    assert "heartbeat_timeout: expected a number above 0" in _one_line(
        _plait(home, "server", "start", "--foreground")
    )
    config.unlink()
    config.mkdir()  # unreadable as a file, even for root
    assert "cannot read" in _one_line(_plait(home, "server", "start"))


def test_a_database_of_a_newer_schema_is_one_line(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    con = sqlite3.connect(home / "plait.db")
    try:
        con.execute("create table alembic_version (version_num varchar(32) primary key)")
        con.execute("insert into alembic_version values ('9999')")
        con.commit()
    finally:
        con.close()
    port = str(_free_port())
    try:
        for flags in ([], ["--foreground"]):
            line = _one_line(_plait(home, "server", "start", "--port", port, *flags))
            assert "newer Plait" in line, line
    finally:
        _stop(home)


def _stop(home: Path) -> None:
    """Teardown: stop a daemon of `home` if one runs, and kill its process group."""
    pid_file = home / "server.pid"
    pid = pid_file.read_text().split()[0] if pid_file.exists() else ""
    _plait(home, "server", "stop")
    if pid.isdigit():
        kill_group(int(pid))


def test_the_server_log_rotates_by_size(tmp_path: Path) -> None:
    home = tmp_path / "home"
    port = str(_free_port())
    small = {"PLAIT_SERVER_LOG_BYTES": "400"}
    try:
        for _ in range(3):
            out = _plait(home, "server", "start", "--port", port, "--no-auth", **small)
            assert out.returncode == 0, out.stdout + out.stderr
            pid = int((home / "server.pid").read_text().split()[0])
            status = _plait(home, "server", "status")
            assert "SERVING" in status.stdout and f"pid {pid}" in status.stdout
            out = _plait(home, "server", "stop")
            assert out.returncode == 0 and "stopped the server" in out.stdout
            kill_group(pid)
    finally:
        _stop(home)
    assert (home / "server.log.1").exists()
    assert not (home / "server.log.4").exists()
    assert (home / "server.log").stat().st_size <= 2000
    logs = _plait(home, "server", "logs", "-n", "100")
    assert logs.returncode == 0
