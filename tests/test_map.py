"""Dynamic fan-out (``step.map``): one step run per item of a list known only at run time, each
cached on its own item, read downstream as a list in order, composable (a map over a map's
results); traced into a step with a map binding, run on the embedded engine and through a
daemon, and grouped by ``plait runs show``. (tests/test_map_scheduler.py drives the
scheduler's side alone.)"""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import pytest
from test_security import Daemon

import plait
from plait.engine._validate import validate_pipeline
from plait.errors import PipelineDefinitionError, PipelineValidationError
from plait.ir.v1 import ir_pb2

PLAIT = str(Path(sys.executable).parent / "plait")

# ---- steps and pipelines (module level: worker processes import them) ----


def _note(log: str, what: str) -> None:
    with open(log, "a") as f:
        f.write(what + "\n")


@plait.step(cache=False)
def make(n: int) -> list[int]:
    return list(range(n))


@plait.step
def square(x: int, log: str, k: int = 1) -> int:
    _note(log, f"square {x}")
    if x == 7:
        raise ValueError("seven is not welcome")
    return x * x * k


@plait.step
def add_one(x: int) -> int:
    return x + 1


@plait.step
def total(xs: list[int]) -> int:
    return sum(xs)


@plait.step
def collect(xs: list[int]) -> list[int]:
    return xs


@plait.pipeline
def fan(log: str, n: int = 5) -> None:
    """square over make's list, then add_one over square's results, then their total."""
    collect(add_one.map(square.map(make(n), log=log, k=2)))


@plait.pipeline
def over_parameter(log: str, xs: list[int] = [1, 2, 3]) -> None:  # noqa: B006
    collect(square.map(xs, log=log))


@plait.pipeline
def over_outputs(log: str) -> None:
    """A list of constants and step outputs, as the list to map over."""
    collect(square.map([2, total(make(3)), 4], log=log))


@plait.step(cache=False)
def not_a_list() -> Any:  # a map over Any is allowed when traced: the worker checks
    return 5


@plait.pipeline
def bad_list() -> None:
    collect(add_one.map(not_a_list()))


def ran(log: Path) -> Counter[str]:
    """How many times each (step, item) ran."""
    return Counter(log.read_text().splitlines()) if log.exists() else Counter()


@pytest.fixture
def client(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[plait.Client]:
    monkeypatch.setenv("PLAIT_WORKERS", "2")
    c = plait.Client(home=tmp_path / "home")
    yield c
    c.shutdown()


# ---- tracing: a step with a map binding ----


def test_a_map_compiles_to_a_step_with_a_map_binding() -> None:
    spec = fan.compile({"log": "l"}).spec
    steps = {s.id: s for s in spec.steps}
    assert list(steps) == ["make", "square", "add_one", "collect"]
    (output,) = steps["make"].outputs
    assert output.items and output.type.expr == "list[int]"  # stored with its items
    x, log, k = steps["square"].inputs
    assert x.mapped and x.type.expr == "int"
    assert x.binding.output == ir_pb2.OutputRef(step_id="make", output="output")
    assert not log.mapped and log.binding.parameter == "log" and k.binding.literal.json == "2"
    (again,) = steps["add_one"].inputs  # a map over a map's results: nothing to itemize
    assert again.mapped and again.binding.output.step_id == "square"
    assert not any(o.items for o in steps["square"].outputs)
    (xs,) = steps["collect"].inputs
    assert not xs.mapped and xs.binding.output.step_id == "add_one"
    validate_pipeline(spec)  # what the control plane checks
    # the list parameter stays a run parameter: one version for every list
    assert over_parameter.compile({"log": "l", "xs": [1]}).version == (
        over_parameter.compile({"log": "l", "xs": [1, 2, 3, 4]}).version
    )


def test_outside_a_pipeline_a_map_calls_the_function_per_item(tmp_path: Path) -> None:
    log = str(tmp_path / "log")
    assert square.map([1, 2, 3], log=log, k=10) == [10, 40, 90]
    assert add_one.map(square.map([1, 2], log=log)) == [2, 5]


@plait.step
def pair(x: int) -> tuple[Annotated[int, "a"], Annotated[str, "b"]]:
    return x, str(x)


@plait.step
def text_of(x: str) -> str:
    return x


@plait.step
def words() -> str:
    return "abc"


@plait.step
def table() -> dict[str, int]:
    return {}


def _trace_error(body: object, match: str) -> None:
    pipe = plait.pipeline(body)  # type: ignore[call-overload]
    with pytest.raises((PipelineValidationError, PipelineDefinitionError), match=match):
        pipe.compile()


def test_what_a_map_cannot_go_over_is_refused_when_traced() -> None:
    def over_a_string() -> None:
        add_one.map(words())

    def over_a_dict() -> None:
        add_one.map(table())

    def wrong_items() -> None:
        text_of.map(make(3))

    def everything_fixed() -> None:
        add_one.map([1], x=2)

    def several_outputs() -> None:
        add_one.map(pair(1))

    def a_constant() -> None:
        add_one.map(3)

    _trace_error(over_a_string, r"maps over input 'x'.*is str; a map goes over a list")
    _trace_error(over_a_dict, r"is dict\[str, int\]; a map goes over a list")
    _trace_error(wrong_items, r"its items are int, but the input expects str")
    _trace_error(everything_fixed, r"gives every input in fixed \(x\)")
    _trace_error(several_outputs, r"got several outputs; a map goes over a list")
    _trace_error(a_constant, r"got int; a map goes over a list")


class Opaque:
    pass


@plait.step
def opaque(x: int) -> Opaque:
    return Opaque()


def test_a_map_whose_output_nothing_stores_fails_when_traced() -> None:
    def body() -> None:
        opaque.map([1, 2])

    _trace_error(body, r"output 'output' is declared tests?\.?.*Opaque.*no materializer")


def _fan_spec() -> ir_pb2.PipelineSpec:
    """A copy of fan's IR, to change (the compiled one is shared)."""
    spec = ir_pb2.PipelineSpec()
    spec.CopyFrom(fan.compile({"log": "l"}).spec)
    return spec


def test_the_control_plane_refuses_a_map_it_could_not_run() -> None:
    spec = _fan_spec()
    spec.steps[0].outputs[0].items = False  # a client that forgot to itemize make's list
    with pytest.raises(PipelineValidationError, match="must be stored with its items"):
        validate_pipeline(spec)
    spec = _fan_spec()
    spec.steps[2].inputs.add(name="y", binding=spec.steps[2].inputs[0].binding, mapped=True)
    with pytest.raises(PipelineValidationError, match="mapped over one input at most"):
        validate_pipeline(spec)
    spec = _fan_spec()
    spec.steps[0].id = "make[0]"
    with pytest.raises(PipelineValidationError, match="brackets are kept"):
        validate_pipeline(spec)


# ---- running: the embedded engine ----


def test_a_map_runs_per_item_reads_as_a_list_and_caches_per_item(
    client: plait.Client, tmp_path: Path
) -> None:
    log = tmp_path / "log"
    first = client.run_pipeline(fan, {"log": str(log), "n": 4})
    assert first.status == "SUCCEEDED", [s.error for s in first.steps.values() if s.error]
    assert first.output("collect") == [1, 3, 9, 19]  # 2x² + 1, in order
    assert first.output("square") == [0, 2, 8, 18] and first.output("add_one") == [1, 3, 9, 19]
    assert [k for k in first.steps if k.startswith("square[")] == [f"square[{i}]" for i in range(4)]
    assert first.steps["make"].output() == [0, 1, 2, 3]  # its items are not outputs of its own
    # a longer list: the four items already made are served from the cache, one by one
    second = client.run_pipeline(fan, {"log": str(log), "n": 6})
    assert second.status == "SUCCEEDED"
    assert second.output("collect") == [1, 3, 9, 19, 33, 51]
    cached = sorted(k for k, s in second.steps.items() if k.startswith("square[") and s.cached)
    assert cached == [f"square[{i}]" for i in range(4)]
    assert second.steps["square[1]"].cached_from == first.run_id
    assert ran(log) == Counter({f"square {i}": 1 for i in range(6)})
    # refreshing the mapped step re-runs every item
    third = client.run_pipeline(fan, {"log": str(log), "n": 2}, refresh=["square"])
    assert third.status == "SUCCEEDED"
    assert not any(third.steps[f"square[{i}]"].cached for i in range(2))
    assert ran(log)["square 0"] == 2
    why = client.explain_step(second.run_id, "square[5]").reason
    assert why.startswith("ran: no earlier cache entry of step 'square[5]'"), why
    why = client.explain_step(second.run_id, "square[2]").reason
    assert why == f"cached: its key matched the cache entry of run {first.run_id}"
    assert client.explain_step(second.run_id, "square").reason.startswith("a mapped step")


def test_maps_over_a_parameter_a_list_of_outputs_and_an_empty_list(
    client: plait.Client, tmp_path: Path
) -> None:
    log = str(tmp_path / "log")
    run = client.run_pipeline(over_parameter, {"log": log, "xs": [3, 1]})
    assert run.status == "SUCCEEDED" and run.output("collect") == [9, 1]
    run = client.run_pipeline(over_outputs, {"log": log})
    assert run.status == "SUCCEEDED" and run.output("collect") == [4, 9, 16]
    empty = client.run_pipeline(over_parameter, {"log": log, "xs": []})
    assert empty.status == "SUCCEEDED" and empty.steps["collect"].output() == []
    assert not [k for k in empty.steps if k.startswith("square[")]


def test_a_failed_item_fails_the_map_after_the_others_and_a_retry_runs_it_alone(
    client: plait.Client, tmp_path: Path
) -> None:
    log = tmp_path / "log"
    run = client.run_pipeline(over_parameter, {"log": str(log), "xs": [1, 7, 3]})
    assert run.status == "FAILED"
    statuses = {k: str(s.status) for k, s in run.steps.items()}
    assert statuses == {
        "square": "FAILED",
        "square[0]": "SUCCEEDED",
        "square[1]": "FAILED",
        "square[2]": "SUCCEEDED",
        "collect": "SKIPPED",
    }
    error = run.steps["square"].error
    assert error is not None and "square[1] failed" in error.message
    failed = run.steps["square[1]"].error
    assert failed is not None and "seven is not welcome" in failed.message
    # the items that succeeded are reused; the failed one runs again (and fails again)
    retry = client.retry_run(run.run_id, over_parameter)
    assert retry.steps["square[0]"].cached_from == run.run_id
    assert retry.steps["square[2]"].cached_from == run.run_id
    assert ran(log) == Counter({"square 1": 1, "square 7": 2, "square 3": 1})


def test_an_output_a_map_iterates_that_is_no_list_fails_its_step(client: plait.Client) -> None:
    run = client.run_pipeline(bad_list, {})
    assert run.status == "FAILED"
    error = run.steps["not_a_list"].error
    assert error is not None and "mapped over (step.map), so it must be a list" in error.message


# ---- through a daemon, with the CLI ----

SCRIPT = """\
import plait


@plait.step
def make(n: int) -> list[int]:
    return list(range(n))


@plait.step
def leaf(x: int) -> int:
    if x == 7:
        raise ValueError("seven")
    return x * 10


@plait.step
def join(xs: list[int]) -> int:
    return sum(xs)


@plait.pipeline
def wide(n: int = 12) -> None:
    join(leaf.map(make(n)))
"""


def test_through_a_daemon_runs_show_groups_the_items(tmp_path: Path) -> None:
    project = tmp_path / "project"
    project.mkdir()
    (project / "wide.py").write_text(SCRIPT)
    daemon = Daemon(tmp_path / "daemon-home")
    try:
        env = daemon.client_env()

        def plait_cli(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [PLAIT, *args],
                env={**env, "COLUMNS": "200"},
                cwd=project,
                capture_output=True,
                text=True,
                timeout=300,
                check=check,
            )

        done = plait_cli("run", "wide.py:wide", "-p", "n=5")
        assert "SUCCEEDED" in done.stdout + done.stderr
        failed = plait_cli("run", "wide.py:wide", check=False)  # 12 items, leaf[7] fails
        assert failed.returncode == 1
        runs = json.loads(plait_cli("runs", "list", "--output", "json").stdout)["runs"]
        run_id = runs[0]["run_id"]
        shown = plait_cli("runs", "show", run_id).stdout
        assert "leaf[0..11]" in shown
        assert "5 cached, 1 failed, 6 succeeded" in shown  # items 0..4 from the first run
        assert "leaf[7]" in shown and "ValueError: seven" in shown
        assert "leaf[3] " not in shown  # a succeeded item has no row of its own
        assert "output[0..11]: 12 items" in shown  # make's list, stored item by item
        doc = json.loads(plait_cli("runs", "show", run_id, "--output", "json").stdout)
        items = [s["step_id"] for s in doc["steps"] if s["step_id"].startswith("leaf[")]
        assert items == [f"leaf[{i}]" for i in range(12)]  # json lists every item, in order
        explained = plait_cli("runs", "explain", run_id, "leaf[2]").stdout
        assert "cached" in explained
    finally:
        daemon.stop()
