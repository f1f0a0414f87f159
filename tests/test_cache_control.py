"""Cache control: file contents in the key (plait.File, pathlib.Path), refreshing steps
(``refresh=``, ``plait run --refresh``) and explaining a step's key (``plait runs explain``),
on the embedded engine and through a daemon."""

from __future__ import annotations

import hashlib
import inspect
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_security import Daemon

import plait
from plait._file import File, files_to_json, files_to_paths, is_file_type, load_json
from plait._models import StepStatus
from plait.engine._cache import cache_key, key_material
from plait.ir.v1 import ir_pb2

PLAIT = str(Path(sys.executable).parent / "plait")

# ---- steps (module level, so that worker processes import them) ----


def _path(data: Any) -> Path:
    """The path a step got: a Path (the worker decodes files), or the file's JSON form (a
    worker that does not decode them yet)."""
    return Path(data["plait.file"]) if isinstance(data, dict) else Path(data)


@plait.step
def count_rows(data: Path) -> int:
    return len(_path(data).read_text().splitlines())


@plait.step
def double(n: int) -> int:
    return 2 * n


@plait.pipeline
def rows(data: plait.File) -> None:
    double(count_rows(data))


@plait.step
def kind_of(data: Path) -> str:
    return type(data).__name__


@plait.pipeline
def kinds(data: Path) -> None:
    kind_of(data)


@plait.step
def source(marker: str) -> int:
    """Returns what the marker file holds: an outside change a refresh picks up."""
    return int(Path(marker).read_text())


@plait.step
def plus_one(x: int) -> int:
    return x + 1


@plait.pipeline
def chain(marker: str, k: int = 1) -> None:
    plus_one(source(marker))
    double(k)


# ---- helpers ----


def statuses(run: plait.Run) -> dict[str, str]:
    return {k: str(s.status) for k, s in run.steps.items()}


def _worker_decodes_files() -> bool:
    from plait.runners.worker import _execute

    return "load_json" in inspect.getsource(_execute)


@pytest.fixture
def client(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[plait.Client]:
    monkeypatch.setenv("PLAIT_WORKERS", "1")
    c = plait.Client(home=tmp_path / "home")
    yield c
    c.shutdown()


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    d = Daemon(tmp_path / "daemon-home")
    try:
        yield d
    finally:
        d.stop()


# ---- plait.File: the rules ----


def test_a_file_travels_as_its_path_and_content_digest(tmp_path: Path) -> None:
    csv = tmp_path / "data.csv"
    csv.write_text("a\nb\n")
    as_json = File(csv).to_json()
    assert as_json == {
        "plait.file": str(csv.resolve()),
        "sha256": hashlib.sha256(b"a\nb\n").hexdigest(),
    }
    assert files_to_json(csv) == as_json  # a pathlib.Path is a file
    assert files_to_json(str(csv), "pathlib.Path") == as_json  # so is a str declared as one
    assert files_to_json(str(csv), "plait._file.File | None") == as_json
    assert files_to_json(str(csv), "str") == str(csv)  # a str declared str is a str
    assert files_to_json([File(csv)]) == [as_json]
    assert isinstance(File(csv), Path)
    assert files_to_paths({"x": as_json}) == {"x": csv.resolve()}
    assert load_json(json.dumps(as_json)) == csv.resolve()
    assert load_json('{"a": 1}') == {"a": 1}
    assert is_file_type("pathlib.Path") and not is_file_type("str | pathlib.Path")
    with pytest.raises(FileNotFoundError):
        File(tmp_path / "missing.csv").to_json()


def _file_step() -> ir_pb2.StepSpec:
    step = ir_pb2.StepSpec(
        id="s", name="s", code=ir_pb2.CodeRef(module="m", qualname="s", code_digest="c" * 64)
    )
    step.inputs.add(name="data", binding=ir_pb2.Binding(parameter="data"))
    return step


def test_a_file_counts_in_the_key_by_its_content_alone() -> None:
    def key(path: str, digest: str) -> str:
        value = json.dumps({"plait.file": path, "sha256": digest})
        return cache_key(key_material(_file_step(), {"data": ("json", value)}))

    assert key("/a/data.csv", "1" * 64) == key("/b/other.csv", "1" * 64)  # moved: a hit
    assert key("/a/data.csv", "1" * 64) != key("/a/data.csv", "2" * 64)  # overwritten: a miss
    nested = json.dumps([{"plait.file": "/x", "sha256": "1" * 64}])
    material = key_material(_file_step(), {"data": ("json", nested)})
    assert json.loads(material.parameters[0].json) == [{"plait.file.sha256": "1" * 64}]


# ---- embedded ----


def test_overwriting_a_file_at_the_same_path_runs_its_steps_again(
    client: plait.Client, tmp_path: Path
) -> None:
    csv = tmp_path / "data.csv"
    csv.write_text("a\nb\n")
    first = rows.run({"data": plait.File(csv)}, client=client)
    assert statuses(first) == {"count_rows": "SUCCEEDED", "double": "SUCCEEDED"}
    assert first.steps["double"].output() == 4

    again = rows.run({"data": plait.File(csv)}, client=client)
    assert statuses(again) == {"count_rows": "CACHED", "double": "CACHED"}

    csv.write_text("a\nb\nc\n")  # the same path, new content
    changed = rows.run({"data": plait.File(csv)}, client=client)
    assert statuses(changed) == {"count_rows": "SUCCEEDED", "double": "SUCCEEDED"}
    assert changed.steps["double"].output() == 6

    moved = tmp_path / "moved.csv"
    moved.write_text("a\nb\nc\n")  # the same content under another path: a hit
    assert statuses(rows.run({"data": str(moved)}, client=client))["count_rows"] == "CACHED"

    # why it ran: the file's digest changed
    why = client.explain_step(changed.run_id, "count_rows")
    assert why.earlier_run == again.run_id or why.earlier_run == first.run_id
    assert [(d.component, d.name) for d in why.differences] == [("parameter", "data")]
    assert "plait.file.sha256" in why.differences[0].value

    with pytest.raises(FileNotFoundError):
        rows.run({"data": plait.File(tmp_path / "missing.csv")}, client=client)


@pytest.mark.skipif(
    not _worker_decodes_files(),
    reason="the worker does not decode files yet (runners/worker/_execute.py: load_json)",
)
def test_a_step_receives_a_path(client: plait.Client, tmp_path: Path) -> None:
    csv = tmp_path / "data.csv"
    csv.write_text("x\n")
    run = kinds.run({"data": csv}, client=client)
    assert run.steps["kind_of"].output() in ("PosixPath", "WindowsPath")


def test_refresh_runs_a_cached_step_and_only_what_its_new_outputs_change(
    client: plait.Client, tmp_path: Path
) -> None:
    marker = tmp_path / "marker"
    marker.write_text("1")
    first = chain.run({"marker": str(marker)}, client=client)
    assert set(statuses(first).values()) == {"SUCCEEDED"}
    assert statuses(chain.run({"marker": str(marker)}, client=client)) == {
        "source": "CACHED",
        "plus_one": "CACHED",
        "double": "CACHED",
    }

    # refreshed, the same output: its downstream stays cached
    same = client.run_pipeline(chain, {"marker": str(marker)}, refresh=["source"])
    assert statuses(same) == {"source": "SUCCEEDED", "plus_one": "CACHED", "double": "CACHED"}
    why = client.explain_step(same.run_id, "source")
    assert "refreshed" in why.reason

    # the outside world changed: refreshed, the new output runs its downstream again
    marker.write_text("41")
    assert statuses(chain.run({"marker": str(marker)}, client=client))["source"] == "CACHED"
    fresh = client.run_pipeline(chain, {"marker": str(marker)}, refresh=["source"])
    assert statuses(fresh) == {"source": "SUCCEEDED", "plus_one": "SUCCEEDED", "double": "CACHED"}
    assert fresh.steps["plus_one"].output() == 42
    why = client.explain_step(fresh.run_id, "plus_one")
    assert [(d.component, d.name) for d in why.differences] == [("input", "x")]

    # the refreshed outputs replace the cache entry: a plain run now gets them
    later = chain.run({"marker": str(marker)}, client=client)
    assert statuses(later)["plus_one"] == "CACHED"
    assert later.steps["plus_one"].output() == 42

    with pytest.raises(plait.PipelineError, match="nope"):
        client.run_pipeline(chain, {"marker": str(marker)}, refresh=["nope"])


def test_explain_names_each_component_that_differs(client: plait.Client, tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    marker.write_text("1")
    first = chain.run({"marker": str(marker), "k": 1}, client=client)
    second = chain.run({"marker": str(marker), "k": 2}, client=client)
    assert statuses(second) == {"source": "CACHED", "plus_one": "CACHED", "double": "SUCCEEDED"}

    why = client.explain_step(second.run_id, "double")
    assert why.status == "SUCCEEDED" and why.earlier_run == first.run_id
    assert [(d.component, d.name, d.value, d.earlier_value) for d in why.differences] == [
        ("parameter", "n", "2", "1")
    ]
    assert "parameter 'n'" in why.reason

    # a CACHED step: the run it came from (also what its outputs record)
    cached = client.explain_step(second.run_id, "plus_one")
    assert cached.status == "CACHED" and cached.cached_from_run == first.run_id
    assert cached.differences == [] and first.run_id in cached.reason
    assert second.steps["plus_one"].outputs["output"].run_id == first.run_id

    # the first run of a step has nothing to compare with
    assert "never succeeded before" in client.explain_step(first.run_id, "source").reason
    with pytest.raises(plait.PlaitError, match="no step 'nope'"):
        client.explain_step(first.run_id, "nope")


# ---- a daemon: the SDK and the CLI ----


def test_cache_control_through_a_daemon(daemon: Daemon, tmp_path: Path) -> None:
    client = plait.Client(daemon.address, token=daemon.credential)
    try:
        csv = tmp_path / "data.csv"
        csv.write_text("a\n")
        assert rows.run({"data": csv}, client=client).steps["double"].output() == 2
        csv.write_text("a\nb\n")
        changed = rows.run({"data": csv}, client=client)
        assert statuses(changed)["count_rows"] == "SUCCEEDED"
        assert changed.steps["double"].output() == 4

        marker = tmp_path / "marker"
        marker.write_text("1")
        first = chain.run({"marker": str(marker)}, client=client)
        marker.write_text("9")
    finally:
        client.close()

    env = daemon.client_env()
    here = Path(__file__).resolve()
    out = subprocess.run(
        [PLAIT, "run", f"{here}:chain", "-q", "-p", f"marker={marker}", "--refresh", "source"],
        env=env,
        capture_output=True,
        text=True,
        cwd=here.parent,
    )
    assert out.returncode == 0, out.stderr
    run_id = out.stdout.strip().splitlines()[-1]

    shown = subprocess.run(
        [PLAIT, "runs", "explain", run_id, "plus_one", "--output", "json"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert shown.returncode == 0, shown.stderr
    why = json.loads(shown.stdout)
    assert why["status"] == "SUCCEEDED" and why["earlier_run"] == first.run_id
    assert [(d["component"], d["name"]) for d in why["differences"]] == [("input", "x")]

    text = subprocess.run(
        [PLAIT, "runs", "explain", run_id, "double"], env=env, capture_output=True, text=True
    )
    assert text.returncode == 0, text.stderr
    assert f"cached: its key matched the cache entry of run {first.run_id}" in text.stdout

    bad = subprocess.run(
        [PLAIT, "run", f"{here}:chain", "-q", "-p", f"marker={marker}", "--refresh", "nope"],
        env=env,
        capture_output=True,
        text=True,
        cwd=here.parent,
    )
    assert bad.returncode != 0 and "nope" in bad.stderr


# ---- the scheduler: refresh is stored, and a recovered run keeps it ----


def test_the_scheduler_stores_refresh_and_a_recovered_run_keeps_it() -> None:
    import networkx as nx
    from test_state_machine import VERSION, Machine, by_step, done, spec_of

    from plait.engine.scheduler import CreateRun, StoredRun, StoredStep

    m = Machine(spec_of(nx.DiGraph([(0, 1)])))
    _, fx = m.create()
    fx = m.apply(done(by_step(fx.tasks)["n0"]))
    m.apply(done(by_step(fx.tasks)["n1"]))  # both outputs are in the cache now
    _, fx = m.create()
    assert fx.tasks == []

    _, fx = m.create(refresh=("n0",))
    assert fx.run_inserts[0]["refresh"] == ["n0"]
    assert [t.token.step_id for t in fx.tasks] == ["n0"]  # cached, but refreshed: it runs

    bad = CreateRun(VERSION, {}, refresh=("nope",))
    reply = m.apply(bad).replies[id(bad)]
    assert isinstance(reply, plait.PipelineError) and "'nope'" in str(reply)

    stored = StoredRun(
        run_id="r",
        version=VERSION,
        parameters={},
        no_cache=False,
        stack="default",
        steps=[
            StoredStep("n0", StepStatus.PENDING, 0, None, None, {}),
            StoredStep("n1", StepStatus.PENDING, 0, None, None, {}),
        ],
        refresh=("n0",),
    )
    fx = m.scheduler.recover([stored], m.now, m.lookups)
    assert [t.token.step_id for t in fx.tasks] == ["n0"]
    assert m.scheduler.runs["r"].refresh == frozenset({"n0"})
