"""The `plait` command, run as a user runs it: a real process, its own PLAIT_HOME."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import click
import pytest

from plait.cli import cli

ROOT = Path(__file__).resolve().parent.parent
PLAIT = str(Path(sys.executable).parent / "plait")

FAILING = """
import plait

@plait.step
def ok() -> int:
    return 1

@plait.step
def broken(x: int) -> int:
    raise ValueError("this step is broken")

@plait.pipeline
def bad():
    broken(ok())
"""

ECHO = """
import sys
import plait

@plait.step
def echo(value: object) -> str:
    print(f"value={value!r} type={type(value).__name__}")
    print("to stderr", file=sys.stderr)
    plait.log_metadata({"kind": type(value).__name__})
    return repr(value)

@plait.pipeline
def show(value: object = "default"):
    echo(value)
"""


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    e = {**os.environ, "PLAIT_HOME": str(tmp_path / "home"), "PLAIT_WORKERS": "2"}
    e.pop("PLAIT_SERVER", None)
    return e


def plait(env: dict[str, str], *args: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
    out = subprocess.run(
        [PLAIT, *args], env=env, capture_output=True, text=True, cwd=ROOT, timeout=120
    )
    if ok:
        assert out.returncode == 0, f"plait {' '.join(args)}: {out.stdout}\n{out.stderr}"
    return out


def run_id_of(out: subprocess.CompletedProcess[str]) -> str:
    for word in out.stdout.split():
        if len(word) == 32 and all(c in "0123456789abcdef" for c in word):
            return word
    raise AssertionError(f"no run id in {out.stdout!r}")


def test_run_the_quickstart(env: dict[str, str]) -> None:
    out = plait(env, "run", "examples/quickstart.py:demo", "-p", "n=100")
    assert "SUCCEEDED" in out.stdout and "3 succeeded" in out.stdout
    rid = run_id_of(out)
    show = plait(env, "runs", "show", rid[:12])
    for step in ("load", "stats", "report"):
        assert step in show.stdout
    assert '"n": 100' in show.stdout
    assert '{"count": 100}' in show.stdout  # metadata logged by the stats step


def test_rerun_is_cached_and_no_cache_is_not(env: dict[str, str]) -> None:
    first = plait(env, "run", "examples/quickstart.py:demo")
    cached = plait(env, "run", "examples/quickstart.py:demo")
    assert "2 cached" in cached.stdout
    fresh = plait(env, "run", "examples/quickstart.py:demo", "--no-cache")
    assert "3 succeeded" in fresh.stdout and "cached" not in fresh.stdout.split("(")[1]
    show = plait(env, "runs", "show", run_id_of(cached))
    # a cached step names the run its outputs came from
    assert show.stdout.count("CACHED") == 2
    assert show.stdout.count(f"from {run_id_of(first)[:12]}") == 2


def test_a_failing_run_exits_1_and_says_why(env: dict[str, str], tmp_path: Path) -> None:
    (tmp_path / "bad.py").write_text(FAILING)
    out = plait(env, "run", f"{tmp_path / 'bad.py'}:bad", ok=False)
    assert out.returncode == 1
    assert "FAILED" in out.stdout
    assert "step broken failed" in out.stdout and "this step is broken" in out.stdout
    assert "Traceback" in out.stdout


def test_parameters_are_json_or_strings(env: dict[str, str], tmp_path: Path) -> None:
    (tmp_path / "echo.py").write_text(ECHO)
    target = f"{tmp_path / 'echo.py'}:show"
    cases = {"3": "int", "[1, 2]": "list", "hello": "str", '"7"': "str", "true": "bool"}
    for raw, kind in cases.items():
        out = plait(env, "run", target, "-q", "-p", f"value={raw}")
        logs = plait(env, "runs", "logs", out.stdout.strip())
        assert f"type={kind}" in logs.stdout, (raw, logs.stdout)
    bad = plait(env, "run", target, "-p", "value", ok=False)
    assert bad.returncode == 2 and "name=value" in bad.stderr


def test_runs_list_newest_first(env: dict[str, str]) -> None:
    first = run_id_of(plait(env, "run", "examples/quickstart.py:demo", "-p", "n=3"))
    second = run_id_of(plait(env, "run", "examples/quickstart.py:demo", "-p", "n=4"))
    out = plait(env, "runs", "list").stdout
    assert out.index(second[:12]) < out.index(first[:12])
    assert "demo" in out and "SUCCEEDED" in out
    assert "no runs of pipeline 'other'" in plait(env, "runs", "list", "--pipeline", "other").stdout


def test_logs_of_a_run_and_of_a_step(env: dict[str, str], tmp_path: Path) -> None:
    (tmp_path / "echo.py").write_text(ECHO)
    rid = plait(env, "run", f"{tmp_path / 'echo.py'}:show", "-q").stdout.strip()
    all_logs = plait(env, "runs", "logs", rid)
    assert "--- echo" in all_logs.stdout and "value='default'" in all_logs.stdout
    assert "to stderr" in all_logs.stderr
    one = plait(env, "runs", "logs", rid[:8], "echo")
    assert "value='default'" in one.stdout
    missing = plait(env, "runs", "logs", rid, "nope", ok=False)
    assert missing.returncode == 2 and "no step 'nope'" in missing.stderr


def test_artifacts_get(env: dict[str, str], tmp_path: Path) -> None:
    rid = run_id_of(plait(env, "run", "examples/quickstart.py:demo", "-p", "n=100"))
    import plait as sdk

    run = sdk.Client(home=env["PLAIT_HOME"]).get_run(rid)
    load_out = run.steps["load"].outputs["output"]
    printed = plait(env, "artifacts", "get", load_out.artifact_id[:10])
    assert json.loads(printed.stdout) == list(range(100))
    target = tmp_path / "out.bin"
    plait(env, "artifacts", "get", load_out.artifact_id, "-o", str(target))
    blob = Path(load_out.uri.removeprefix("file://"))
    assert target.read_bytes() == blob.read_bytes()
    missing = plait(env, "artifacts", "get", "f" * 32, ok=False)
    assert missing.returncode == 2 and "no artifact" in missing.stderr


def test_pipeline_compile(env: dict[str, str], tmp_path: Path) -> None:
    out1 = plait(env, "pipeline", "compile", "examples/quickstart.py:demo", "-o", str(tmp_path))
    out2 = plait(env, "pipeline", "compile", "examples/quickstart.py:demo", "-o", str(tmp_path))
    version = out1.stdout.split()[1]
    assert len(version) == 64 and out2.stdout.split()[1] == version
    spec = json.loads((tmp_path / "demo.json").read_text())
    assert [s["id"] for s in spec["steps"]] == ["load", "stats", "report"]
    dot = (tmp_path / "demo.dot").read_text()
    assert '"load" -> "stats";' in dot and '"stats" -> "report";' in dot
    from plait.ir.canonical import message_digest
    from plait.ir.v1 import ir_pb2

    binary = ir_pb2.PipelineSpec.FromString((tmp_path / "demo.pb").read_bytes())
    assert message_digest(binary) == version


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["run", "examples/quickstart.py"], "FILE_OR_MODULE:PIPELINE"),
        (["run", "examples/nope.py:demo"], "no such file"),
        (["run", "examples/quickstart.py:nope"], "pipelines there: demo"),
        (["run", "no_such_module_xyz:demo"], "cannot import"),
        (["run", "examples/quickstart.py:demo", "-p", "m=1"], "no parameter 'm'"),
        (["runs", "show", "nope"], "no run with id 'nope'"),
        (["runs", "logs", "nope"], "no run with id 'nope'"),
    ],
)
def test_clear_errors_without_tracebacks(
    env: dict[str, str], args: list[str], message: str
) -> None:
    out = plait(env, *args, ok=False)
    assert out.returncode == 2
    assert message in out.stderr
    assert "Traceback" not in out.stderr


def _commands(group: click.Group, prefix: list[str]) -> list[list[str]]:
    # list_commands/get_command, not .commands: the root group loads `server` and `token` lazily
    ctx = click.Context(group, info_name=prefix[-1] if prefix else "plait")
    found = [prefix]
    for name in group.list_commands(ctx):
        cmd = group.get_command(ctx, name)
        if isinstance(cmd, click.Group):
            found.extend(_commands(cmd, [*prefix, name]))
        else:
            found.append([*prefix, name])
    return found


@pytest.mark.parametrize("command", _commands(cli, []), ids=lambda c: " ".join(c) or "plait")
def test_every_command_has_help(env: dict[str, str], command: list[str]) -> None:
    out = plait(env, *command, "--help")
    assert "Usage: plait" in out.stdout
    lines = [line for line in out.stdout.splitlines() if line.strip()]
    assert len(lines) >= 3


def test_pipeline_list_status_filter_and_followed_logs(env: dict[str, str], tmp_path: Path) -> None:
    plait(env, "run", "examples/quickstart.py:demo")
    (tmp_path / "bad.py").write_text(FAILING)
    plait(env, "run", f"{tmp_path / 'bad.py'}:bad", ok=False)
    listed = plait(env, "pipeline", "list").stdout
    assert "demo" in listed and "bad" in listed
    failed = plait(env, "runs", "list", "--status", "failed").stdout
    assert "bad" in failed and "demo" not in failed
    rid = run_id_of(plait(env, "run", "examples/quickstart.py:demo", "--no-cache"))
    followed = plait(env, "runs", "logs", rid, "--follow")
    assert "loading 10 numbers" in followed.stdout


# runs `plait ARGS` in a fresh interpreter (no ARGS: only imports the CLI), then names what of
# the engine and its database stack got loaded
ENGINE_LOADED = """
import sys
from plait.cli import cli
if {args!r}:
    try:
        cli({args!r}, prog_name="plait")
    except SystemExit:
        pass
loaded = [m for m in sys.modules if m.split(".")[0] in ("sqlalchemy", "alembic")
          or m == "plait.engine" or m.startswith("plait.engine.")]
print("loaded:", *sorted(loaded))
"""


@pytest.mark.parametrize(
    "args", [[], ["--help"], ["runs", "--help"]], ids=["import", "--help", "runs --help"]
)
def test_the_cli_does_not_load_the_engine(args: list[str]) -> None:
    out = subprocess.run(
        [sys.executable, "-c", ENGINE_LOADED.format(args=args)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[-1] == "loaded:"


def test_plait_help_lists_the_admin_commands_as_they_describe_themselves() -> None:
    from plait.cli import _ADMIN

    ctx = click.Context(cli, info_name="plait")
    for name, (_, _, short_help) in _ADMIN.items():
        command = cli.get_command(ctx, name)
        assert command is not None and command.name == name
        assert (command.help or "").split("\n\n")[0] == short_help, name
