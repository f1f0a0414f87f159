"""What a user of other CLIs expects of `plait`: `--output json` on list and show commands,
server addresses in every usual form (and a clear refusal of the others), `runs cancel` on a
finished run, Ctrl-C during `plait run`, and a progress clock that runs during a long step.

Every command is a real `plait` process; the server ones talk to a real daemon.
"""

from __future__ import annotations

import json
import os
import pty
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import click
import pytest
from processes import DEADLINE, spawned, wait_for
from test_lifecycle import AS_AT_A_TERMINAL
from test_security import Daemon, _certificate

import plait
from plait._settings import DEFAULT_PORT, SERVER_FORMS, normalize_server
from plait.cli import cli
from plait.errors import PlaitError

PLAIT = str(Path(sys.executable).parent / "plait")

GATED = """
import os
import time

import plait

@plait.step
def slow(gate: str) -> str:
    with open(gate + ".started", "a") as starts:  # one line per attempt
        starts.write("started\\n")
    print("waiting for the gate", flush=True)
    while not os.path.exists(gate):
        time.sleep(0.05)
    return "through"

@plait.pipeline
def gated(gate: str):
    slow(gate)
"""

QUICK = """
import plait

@plait.step
def make(n: int) -> list[int]:
    plait.log_metadata({"n": n})
    return list(range(n))

@plait.step
def total(xs: list[int]) -> int:
    return sum(xs)

@plait.pipeline
def quick(n: int = 3):
    total(make(n))
"""


def plait_cmd(
    env: dict[str, str], *args: str, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """`plait ARGS` as a process of its own (its group killed after, whatever happens)."""
    from processes import run

    return run([PLAIT, *args], env=env, cwd=cwd)


def no_traceback(out: subprocess.CompletedProcess[str]) -> None:
    assert "Traceback" not in out.stdout + out.stderr, out.stdout + out.stderr


def write(folder: Path, name: str, text: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(text)
    return path


# ---- server addresses ----


@pytest.mark.parametrize(
    ("given", "normal"),
    [
        ("127.0.0.1:7000", "127.0.0.1:7000"),
        ("cp.example.com", f"cp.example.com:{DEFAULT_PORT}"),
        ("localhost", f"localhost:{DEFAULT_PORT}"),
        ("grpc://cp.example.com", f"grpc://cp.example.com:{DEFAULT_PORT}"),
        ("GRPC://cp:80", "grpc://cp:80"),
        ("grpcs://cp.example.com:443", "grpcs://cp.example.com:443"),
        ("grpcs://cp", f"grpcs://cp:{DEFAULT_PORT}"),
        ("[::1]:7000", "[::1]:7000"),
        ("[::1]", f"[::1]:{DEFAULT_PORT}"),
        ("a:1, b", f"a:1,b:{DEFAULT_PORT}"),
        ("grpcs://a,grpcs://b:9", f"grpcs://a:{DEFAULT_PORT},grpcs://b:9"),
    ],
)
def test_every_accepted_server_form_normalizes(given: str, normal: str) -> None:
    assert normalize_server(given) == normal
    assert normalize_server(normal) == normal  # the normal spelling is a fixed point


@pytest.mark.parametrize(
    "given",
    [
        "http://cp:80",
        "https://cp",
        "host:abc",
        "host:0",
        "host:70000",
        "host:",
        "",
        " , ",
        "::1",
        "[::1",
        "[nothost]:1",
        "cp:80/path",
        "user@cp:80",
        "a:1,grpcs://b:2",
        "grpc://a,grpcs://b",
        "ho st:1",
    ],
)
def test_other_server_addresses_are_refused_with_the_accepted_forms(given: str) -> None:
    with pytest.raises(PlaitError) as info:
        normalize_server(given)
    assert f"accepted: {SERVER_FORMS}" in str(info.value)


@pytest.mark.parametrize(
    "args",
    [
        ["runs", "list"],
        ["run", "QUICK:quick"],
        ["login", "http://cp:80"],
        ["worker", "--server", "cp:abc", "--pool", "p"],
    ],
)
def test_the_cli_refuses_a_bad_address_with_the_forms_and_no_traceback(
    embedded: dict[str, str], tmp_path: Path, args: list[str]
) -> None:
    script = write(tmp_path / "src", "quick.py", QUICK)
    args = [str(script) + ":quick" if a == "QUICK:quick" else a for a in args]
    out = plait_cmd({**embedded, "PLAIT_SERVER": "http://cp:80"}, *args)
    assert out.returncode == 2, out.stdout + out.stderr
    err = " ".join(out.stderr.split())  # click wraps a usage error's lines
    assert "not a server address" in err and "grpcs://HOST[:PORT] (TLS)" in err, out.stderr
    no_traceback(out)


def test_a_daemon_answers_at_every_spelling_of_its_address(daemon: Daemon) -> None:
    for address in (
        daemon.address,
        f"localhost:{daemon.port}",
        f"grpc://127.0.0.1:{daemon.port}",
        f"grpc://localhost:{daemon.port}",
        f"127.0.0.1:{daemon.port}, localhost:{daemon.port}",  # replicas (here: twice the one)
    ):
        out = plait_cmd(
            {**daemon.env, "PLAIT_SERVER": address, "PLAIT_TOKEN": daemon.credential},
            "runs",
            "list",
            "--output",
            "json",
        )
        assert out.returncode == 0, f"{address}: {out.stderr}"
        assert isinstance(json.loads(out.stdout)["runs"], list)
    # and `plait login` saves the normal spelling, which the next commands use
    config = daemon.home / "config"
    env = {**daemon.env, "XDG_CONFIG_HOME": str(config)}
    login = plait_cmd(env, "login", f"grpc://localhost:{daemon.port}")
    assert login.returncode == 0, login.stderr
    saved = json.loads((config / "plait" / "config.json").read_text())
    assert saved["server"] == f"grpc://localhost:{daemon.port}"
    assert plait_cmd(env, "runs", "list").returncode == 0


def test_grpcs_is_tls_and_grpc_is_plain_text(tmp_path: Path) -> None:
    cert, key = _certificate(tmp_path, "server")
    d = Daemon(tmp_path / "home", "--tls-cert", str(cert), "--tls-key", str(key))
    try:
        env = {**d.env, "PLAIT_TOKEN": d.credential, "PLAIT_TLS_CA": str(cert)}
        tls = plait_cmd({**env, "PLAIT_SERVER": f"grpcs://localhost:{d.port}"}, "runs", "list")
        assert tls.returncode == 0, tls.stderr
        # the CA alone makes a scheme-less address TLS, as before
        bare = plait_cmd({**env, "PLAIT_SERVER": f"localhost:{d.port}"}, "runs", "list")
        assert bare.returncode == 0, bare.stderr
        # grpc:// says plain text: with a CA that asks for TLS it is refused, not downgraded
        plain = plait_cmd({**env, "PLAIT_SERVER": f"grpc://localhost:{d.port}"}, "runs", "list")
        assert plain.returncode == 2 and "use grpcs://" in plain.stderr, plain.stderr
        no_traceback(plain)
        # grpcs:// without a CA trusts the system's roots, which did not sign this certificate
        del env["PLAIT_TLS_CA"]
        system = plait_cmd({**env, "PLAIT_SERVER": f"grpcs://localhost:{d.port}"}, "runs", "list")
        assert system.returncode != 0
        no_traceback(system)
    finally:
        d.stop()


# ---- --output json ----


def _list_and_show_commands(group: click.Group, prefix: tuple[str, ...] = ()) -> Iterator[str]:
    for name, command in group.commands.items():
        if isinstance(command, click.Group):
            yield from _list_and_show_commands(command, (*prefix, name))
        elif name in ("list", "show", "describe"):
            yield " ".join((*prefix, name))


# commands of other modules, to be given --output as well (see the report on issue 11)
_ELSEWHERE: set[str] = set()


@pytest.mark.parametrize("command", sorted(_list_and_show_commands(cli)))
def test_every_list_and_show_command_has_output_json(command: str) -> None:
    if command in _ELSEWHERE:
        pytest.skip(f"`plait {command}` lives in a module this change does not touch")
    target: click.Command = cli
    for word in command.split():
        assert isinstance(target, click.Group)
        target = target.commands[word]
    options = {p.name: p for p in target.params}
    assert "output" in options, f"plait {command} has no --output"
    choice = options["output"].type
    assert isinstance(choice, click.Choice) and list(choice.choices) == ["table", "json"]
    assert options["output"].default == "table"


def test_runs_and_artifacts_as_json(embedded: dict[str, str], tmp_path: Path) -> None:
    script = write(tmp_path / "src", "quick.py", QUICK)
    run = plait_cmd(embedded, "run", "-q", f"{script}:quick", "-p", "n=4")
    assert run.returncode == 0, run.stderr
    run_id = run.stdout.strip()

    listed = json.loads(plait_cmd(embedded, "runs", "list", "--output", "json").stdout)
    assert list(listed) == ["runs"] and [r["run_id"] for r in listed["runs"]] == [run_id]
    summary = listed["runs"][0]
    assert summary["status"] == "SUCCEEDED" and summary["pipeline"] == "quick"
    assert summary["parameters"] == {"n": 4} and "steps" not in summary

    shown = json.loads(plait_cmd(embedded, "runs", "show", run_id[:8], "--output", "json").stdout)
    assert {k: shown[k] for k in summary} == summary  # the list's keys, the same values
    assert [s["step_id"] for s in shown["steps"]] == ["make", "total"]
    make = shown["steps"][0]
    assert make["status"] == "SUCCEEDED" and make["metadata"] == {"n": 4}
    assert make["error"] is None and make["duration_seconds"] >= 0
    assert shown["create_time"].endswith("+00:00")  # ISO 8601, UTC
    artifact = make["outputs"]["output"]
    assert artifact["run_id"] == run_id and artifact["size_bytes"] > 0

    one = plait_cmd(embedded, "artifacts", "show", artifact["artifact_id"][:10], "--output", "json")
    assert json.loads(one.stdout) == artifact
    table = plait_cmd(embedded, "artifacts", "show", artifact["artifact_id"][:10])
    assert artifact["digest"] in table.stdout

    none = plait_cmd(embedded, "runs", "list", "--pipeline", "other", "--output", "json")
    assert json.loads(none.stdout) == {"runs": []}
    builds = plait_cmd(embedded, "builds", "list", "--output", "json")
    assert json.loads(builds.stdout) == {"builds": []}


def test_stacks_and_components_as_json(embedded: dict[str, str]) -> None:
    assert (
        plait_cmd(
            embedded,
            "component",
            "register",
            "boxes",
            "--kind",
            "runner",
            "--flavor",
            "docker",
            "-c",
            "network=bridge",
        ).returncode
        == 0
    )
    components = json.loads(plait_cmd(embedded, "component", "list", "--output", "json").stdout)
    boxes = {
        "name": "boxes",
        "kind": "runner",
        "flavor": "docker",
        "config": {"network": "bridge"},
    }
    assert boxes in components["components"]
    described = plait_cmd(embedded, "component", "describe", "boxes", "--output", "json")
    assert json.loads(described.stdout) == {**boxes, "used_by": []}

    stacks = json.loads(plait_cmd(embedded, "stack", "list", "--output", "json").stdout)
    assert list(stacks) == ["stacks"]
    active = [s for s in stacks["stacks"] if s["active"]]
    assert len(active) == 1 and isinstance(active[0]["components"], list)
    one = json.loads(plait_cmd(embedded, "stack", "describe", "--output", "json").stdout)
    assert one["name"] == active[0]["name"] and one["active"] is True
    assert [c["name"] for c in one["components"]] == active[0]["components"]


# ---- runs cancel ----


def test_cancel_says_a_finished_run_already_ended(daemon: Daemon, tmp_path: Path) -> None:
    script = write(tmp_path / "src", "quick.py", QUICK)
    env = daemon.client_env()
    run = plait_cmd(env, "run", "-q", f"{script}:quick", "-p", "n=2")
    assert run.returncode == 0, run.stderr
    run_id = run.stdout.strip()
    out = plait_cmd(env, "runs", "cancel", run_id[:12])
    assert out.returncode == 1, out.stdout + out.stderr
    assert f"run {run_id} already ended: SUCCEEDED" in out.stderr
    no_traceback(out)
    assert "Exit codes: 0 the run is cancelled" in plait_cmd(env, "runs", "cancel", "-h").stdout


def test_cancel_a_running_run(daemon: Daemon, tmp_path: Path) -> None:
    script = write(tmp_path / "src", "gated.py", GATED)
    gate = tmp_path / "gate"
    env = daemon.client_env()
    try:
        started = plait_cmd(env, "run", "--detach", f"{script}:gated", "-p", f"gate={gate}")
        assert started.returncode == 0, started.stderr
        run_id = started.stdout.strip()
        wait_for(Path(f"{gate}.started").exists, "the step starting")
        out = plait_cmd(env, "runs", "cancel", run_id)
        assert out.returncode == 0, out.stdout + out.stderr
        assert run_id in out.stdout
        client = plait.Client(daemon.address, token=daemon.credential)
        assert client.wait(run_id).status == "CANCELLED"
    finally:
        gate.touch()


# ---- Ctrl-C during `plait run` ----


def _interrupt_run(env: dict[str, str], script: Path, gate: Path) -> tuple[int, str, str]:
    """Starts `plait run` on the gated pipeline, sends Ctrl-C (SIGINT to its process group, as
    a terminal does) once the step runs, and returns its exit status and output."""
    with spawned(
        # SIGINT as at a terminal, even under a runner that left it ignored (see test_lifecycle)
        [
            sys.executable,
            "-c",
            AS_AT_A_TERMINAL,
            PLAIT,
            "run",
            f"{script}:gated",
            "-p",
            f"gate={gate}",
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    ) as proc:
        wait_for(Path(f"{gate}.started").exists, "the step starting")
        os.killpg(proc.pid, signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=DEADLINE)
        return proc.returncode, stdout.decode(), stderr.decode()


def test_ctrl_c_leaves_a_daemon_run_going_and_says_how_to_follow_it(
    daemon: Daemon, tmp_path: Path
) -> None:
    script = write(tmp_path / "src", "gated.py", GATED)
    gate = tmp_path / "gate"
    client = plait.Client(daemon.address, token=daemon.credential)
    try:
        code, _, stderr = _interrupt_run(daemon.client_env(), script, gate)
        assert code == 130, stderr
        assert "Traceback" not in stderr and "Aborted" not in stderr, stderr
        found = [r for r in client.list_runs(pipeline="gated") if r.run_id in stderr]
        assert len(found) == 1, stderr
        run_id = found[0].run_id
        assert "goes on" in stderr and f"plait runs watch {run_id[:12]}" in stderr
        assert f"plait runs cancel {run_id[:12]}" in stderr
        assert client.get_run(run_id).status == "RUNNING"  # the run went on without the CLI
        gate.touch()
        assert client.wait(run_id).status == "SUCCEEDED"
    finally:
        gate.touch()


def test_ctrl_c_on_the_embedded_engine_cancels_its_run_and_says_so(
    embedded: dict[str, str], tmp_path: Path
) -> None:
    script = write(tmp_path / "src", "gated.py", GATED)
    gate = tmp_path / "gate"
    try:
        code, _, stderr = _interrupt_run(embedded, script, gate)
    finally:
        gate.touch()
    assert code == 130, stderr
    assert "Traceback" not in stderr and "Aborted" not in stderr, stderr
    match = re.search(r"run ([0-9a-f]{32}) is cancelled", stderr)
    assert match, stderr
    shown = plait_cmd(embedded, "runs", "show", match.group(1), "--output", "json")
    assert json.loads(shown.stdout)["status"] == "CANCELLED"


# ---- the live progress clock ----


def test_the_progress_clock_runs_during_a_long_step(
    embedded: dict[str, str], tmp_path: Path
) -> None:
    """The status line is redrawn with a later time while a step runs and no event comes."""
    script = write(tmp_path / "src", "gated.py", GATED)
    gate = tmp_path / "gate"
    main, terminal = pty.openpty()  # rich draws live progress only on a terminal
    seen: list[bytes] = []

    def read() -> None:
        while True:
            try:
                data = os.read(main, 4096)
            except OSError:  # the terminal's other side closed
                return
            if not data:
                return
            seen.append(data)

    reader = threading.Thread(target=read, daemon=True)
    try:
        with spawned(
            [PLAIT, "run", f"{script}:gated", "-p", f"gate={gate}"],
            env={**embedded, "TERM": "xterm", "COLUMNS": "200"},
            stdout=subprocess.DEVNULL,
            stderr=terminal,
        ) as proc:
            os.close(terminal)
            terminal = -1
            reader.start()

            def clocks_after_the_step_started() -> set[str]:
                text = b"".join(seen).decode(errors="replace")
                _, found, after = text.partition("running: slow")
                return set(re.findall(r"(\d+\.\d)s", after)) if found else set()

            wait_for(Path(f"{gate}.started").exists, "the step starting")
            # three different times while the step waits at the gate (no event meanwhile)
            wait_for(lambda: len(clocks_after_the_step_started()) >= 3, "the clock moving on")
            gate.touch()
            assert proc.wait(timeout=DEADLINE) == 0
        # one attempt: the clock moved on by itself, not because a retry sent events
        assert Path(f"{gate}.started").read_text() == "started\n"
    finally:
        gate.touch()
        if terminal >= 0:
            os.close(terminal)
        reader.join(timeout=DEADLINE)
        os.close(main)
