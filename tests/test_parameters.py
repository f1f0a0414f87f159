"""Parameters as values: structural and run parameters, and values checked against annotations.

Tracing alone, runs on the embedded engine, the raw gRPC API, and ``plait`` commands as
processes against a daemon.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_grpc import Api, error_of
from test_security import Daemon

import plait
from plait.api.v1 import resources_pb2 as res
from plait.api.v1 import run_service_pb2 as runs
from plait.ir.v1 import ir_pb2

PLAIT = str(Path(sys.executable).parent / "plait")

# ---- steps and pipelines (module level, so that worker processes import them) ----


@plait.step
def leaf(i: int) -> int:
    return i * 10


@plait.step
def word(text: str) -> str:
    return text


@plait.step
def total(xs: list[int], scale: float) -> float:
    return sum(xs) * scale


@plait.step
def scaled(x: float) -> float:
    return x * 2


@plait.step
def echo(value: object) -> str:
    return repr(value)


@plait.pipeline
def fan(n: int = 3, scale: float = 1.0) -> None:
    total([leaf(i) for i in range(n)], scale)


@plait.pipeline
def needs_n(n: int) -> None:
    for i in range(n):
        leaf(i)


@plait.pipeline
def floaty(c: float = 1.0) -> None:
    scaled(c)


@plait.pipeline
def shaped(c: float = 1.0) -> None:
    scaled(c * 2)  # structural: the literal 2c goes into the graph


@plait.pipeline
def typed(
    seed: int = 0,
    c: float = 1.0,
    flag: bool = False,
    items: list[int] | None = None,
    cfg: dict[str, int] | None = None,
    tag: str = "",
) -> None:
    echo([seed, c, flag, items, cfg, tag])


# ---- which parameters are structural ----

STRUCTURAL_USES: list[tuple[str, Callable[..., None], dict[str, Any], set[str]]] = [
    ("range", lambda n, items, flag, name: [leaf(i) for i in range(n)], {}, {"n"}),
    ("if", lambda n, items, flag, name: leaf(1) if flag else leaf(2), {}, {"flag"}),
    ("arithmetic", lambda n, items, flag, name: leaf(n - 1), {}, {"n"}),
    ("reflected", lambda n, items, flag, name: leaf(10 - n), {}, {"n"}),
    ("unary", lambda n, items, flag, name: leaf(-n), {}, {"n"}),
    ("f-string", lambda n, items, flag, name: word(f"{name}-{n:03d}"), {}, {"n", "name"}),
    ("str", lambda n, items, flag, name: word(str(n)), {}, {"n"}),
    ("compare", lambda n, items, flag, name: leaf(1) if n > 2 else None, {}, {"n"}),
    ("equal", lambda n, items, flag, name: leaf(1) if name == "x" else leaf(2), {}, {"name"}),
    ("len", lambda n, items, flag, name: leaf(len(items)), {}, {"items"}),
    ("iterate", lambda n, items, flag, name: [leaf(i) for i in items], {}, {"items"}),
    ("index", lambda n, items, flag, name: leaf(items[0]), {}, {"items"}),
    ("contains", lambda n, items, flag, name: leaf(1) if 2 in items else None, {}, {"items"}),
    ("method", lambda n, items, flag, name: word(name.upper()), {}, {"name"}),
    ("int()", lambda n, items, flag, name: leaf(int(n)), {}, {"n"}),
    ("round", lambda n, items, flag, name: leaf(round(n)), {}, {"n"}),
    ("to a step", lambda n, items, flag, name: (leaf(n), word(name)), {}, set()),
    ("in a list", lambda n, items, flag, name: total([leaf(1), n], 1.0), {}, set()),
]


def _pipeline_of(body: Callable[..., None]) -> plait.Pipeline[Any]:
    def uses(n: int = 3, items: list[int] = [1, 2], flag: bool = True, name: str = "x") -> None:  # noqa: B006
        body(n, items, flag, name)

    return plait.pipeline(uses)


@pytest.mark.parametrize(
    ("body", "values", "expected"),
    [u[1:] for u in STRUCTURAL_USES],
    ids=[u[0] for u in STRUCTURAL_USES],
)
def test_a_parameter_used_as_a_value_is_structural(
    body: Callable[..., None], values: dict[str, Any], expected: set[str]
) -> None:
    compiled = _pipeline_of(body).compile(values)
    assert set(compiled.structural) == expected
    marked = {p.name for p in compiled.spec.parameters if p.HasField("structural_value")}
    assert marked == expected


def test_the_function_sees_call_time_values_and_the_graph_follows() -> None:
    three = fan.compile()  # the default n=3
    assert [s.id for s in three.spec.steps] == ["leaf", "leaf_2", "leaf_3", "total"]
    assert dict(three.structural) == {"n": "3"}
    (n,) = [p for p in three.spec.parameters if p.name == "n"]
    assert n.structural_value.json == "3" and n.default_value.json == "3"
    five = fan.compile({"n": 5})
    assert len(five.spec.steps) == 6 and five.version != three.version
    # the same n compiles to the same version; a run parameter's value is not in it
    assert fan.compile({"n": 3}).version == three.version
    assert fan.compile({"n": 3, "scale": 2.5}).version == three.version
    (scale,) = [p for p in three.spec.parameters if p.name == "scale"]
    assert not scale.HasField("structural_value")
    # a pipeline keeps its compilations: the same structural values, the same object
    assert fan.compile({"n": 5}) is five


def test_a_bool_list_and_dict_parameter_as_values() -> None:
    @plait.pipeline
    def branches(flag: bool = False, items: list[int] = [4, 5], cfg: dict[str, int] = {}) -> None:  # noqa: B006
        for i in items:
            leaf(i)
        if flag:
            word(f"depth {cfg['depth']}")

    off = branches.compile()
    assert [s.id for s in off.spec.steps] == ["leaf", "leaf_2"]
    assert dict(off.structural) == {"flag": "false", "items": "[4,5]"}  # cfg never used
    on = branches.compile({"flag": True, "cfg": {"depth": 2}})
    assert [s.id for s in on.spec.steps] == ["leaf", "leaf_2", "word"]
    assert json.loads(on.spec.steps[2].inputs[0].binding.literal.json) == "depth 2"
    assert dict(on.structural) == {"flag": "true", "items": "[4,5]", "cfg": '{"depth":2}'}


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 12), st.integers(1, 12))
def test_versions_follow_structural_values(a: int, b: int) -> None:
    va, vb = needs_n.compile({"n": a}), needs_n.compile({"n": b})
    assert (va.version == vb.version) == (a == b)
    assert len(va.spec.steps) == a


def test_a_structural_parameter_needs_a_value() -> None:
    with pytest.raises(plait.ParameterError) as info:
        needs_n.compile()
    message = str(info.value)
    assert "'n'" in message and "as a value" in message and "-p n=" in message
    # passed only to steps, a required parameter needs no value to compile
    assert leaf_only.compile().structural == {}


@plait.pipeline
def leaf_only(i: int) -> None:
    leaf(i)


def test_structural_values_are_converted_as_a_run_gets_them() -> None:
    # 1 for a float is 1.0 to the function, and one version
    assert shaped.compile({"c": 1}).version == shaped.compile({"c": 1.0}).version
    assert shaped.compile({"c": 1}).structural == {"c": "1.0"}
    (step,) = shaped.compile({"c": 3}).spec.steps
    assert step.inputs[0].binding.literal.json == "6.0"


def test_a_float_default_written_as_an_int_is_a_float() -> None:
    @plait.pipeline
    def int_default(c: float = 1) -> None:
        scaled(c)

    (p,) = int_default.compile().spec.parameters
    assert p.default_value.json == "1.0"


# ---- values checked against the annotations, before anything runs ----


@pytest.mark.parametrize(
    ("given", "message"),
    [
        ({"seed": "abc"}, "parameter 'seed' is declared int; got a string \"abc\""),
        ({"seed": 1.5}, "parameter 'seed' is declared int; got a float 1.5"),
        ({"c": "x"}, "parameter 'c' is declared float; got a string"),
        ({"flag": "yes"}, "parameter 'flag' is declared bool"),
        ({"items": [1, "two"]}, 'got a string "two" at [1]'),
        ({"cfg": {"a": "b"}}, "parameter 'cfg' is declared dict[str, int] | None"),
        ({"nope": 1}, "has no parameter 'nope'"),
        ({"seed": object()}, "object value"),
        ({"c": math.inf}, "is not JSON"),
    ],
)
def test_wrong_values_are_refused_naming_parameter_type_and_value(
    given: dict[str, Any], message: str
) -> None:
    with pytest.raises(plait.ParameterError) as info:
        typed.check_parameters(given)
    assert message in str(info.value)


def test_values_are_converted() -> None:
    values = typed.check_parameters(
        {"seed": 3, "c": 1, "flag": True, "items": [1, 2], "cfg": {"a": 1}, "tag": "t"}
    )
    assert values == {
        "seed": 3,
        "c": 1.0,
        "flag": True,
        "items": [1, 2],
        "cfg": {"a": 1},
        "tag": "t",
    }
    assert isinstance(values["c"], float)


# ---- runs on the embedded engine ----


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[plait.Client]:
    c = plait.Client(home=tmp_path_factory.mktemp("params"))
    try:
        yield c
    finally:
        c.shutdown()


def statuses(run: plait.Run) -> dict[str, str]:
    return {k: str(s.status) for k, s in run.steps.items()}


def test_runs_of_structural_and_run_parameters(client: plait.Client) -> None:
    first = fan.run({"n": 4, "scale": 2}, client=client)
    assert first.status == "SUCCEEDED"
    assert sorted(first.steps) == ["leaf", "leaf_2", "leaf_3", "leaf_4", "total"]
    assert first.steps["total"].output() == 120.0
    assert first.parameters == {"n": 4, "scale": 2.0}
    # scale=2.0 after scale=2: one value, one cache key
    again = fan.run({"n": 4, "scale": 2.0}, client=client)
    assert set(statuses(again).values()) == {"CACHED"}
    # the default n (3): the shared leaves come from the cache, the run records n
    default = fan.run({}, client=client)
    assert statuses(default) == {
        "leaf": "CACHED",
        "leaf_2": "CACHED",
        "leaf_3": "CACHED",
        "total": "SUCCEEDED",
    }
    assert default.parameters == {"n": 3, "scale": 1.0}


def test_one_cache_entry_for_1_and_1_0(client: plait.Client) -> None:
    one = floaty.run({"c": 1}, client=client, no_cache=True)
    assert statuses(one) == {"scaled": "SUCCEEDED"}
    assert statuses(floaty.run({"c": 1.0}, client=client)) == {"scaled": "CACHED"}
    assert statuses(floaty.run({}, client=client)) == {"scaled": "CACHED"}  # the default 1.0


def test_a_wrong_value_starts_nothing(client: plait.Client) -> None:
    before = len(client.list_runs())
    with pytest.raises(plait.ParameterError, match="'seed' is declared int"):
        typed.run({"seed": "abc"}, client=client)
    with pytest.raises(plait.ParameterError, match="'n' as a value"):
        needs_n.run({}, client=client)
    assert len(client.list_runs()) == before


def test_values_reach_the_steps_converted(client: plait.Client) -> None:
    run = typed.run({"c": 2, "items": [1], "cfg": {"a": 1}}, client=client)
    assert run.steps["echo"].output() == "[0, 2.0, False, [1], {'a': 1}, '']"


# ---- the engine: other clients, other languages ----


@pytest.fixture(scope="module")
def api(client: plait.Client) -> Iterator[Api]:
    a = Api(client.address, client.token)
    try:
        yield a
    finally:
        a.channel.close()


def test_the_engine_holds_a_run_to_its_structural_values(api: Api) -> None:
    version = api.register(fan.compile({"n": 2}).spec)  # the default n is 3
    # not given: the value the version was compiled with, not the default
    run = api.run_to_end(version)
    assert run.status == res.RUN_STATUS_SUCCEEDED
    assert {p.name: json.loads(p.json) for p in run.parameters}["n"] == 2
    assert api.run_to_end(version, n="2", scale="5").status == res.RUN_STATUS_SUCCEEDED
    # another value: refused, saying why and what to do
    code, details, reason = error_of(
        api.runs.CreateRun,
        runs.CreateRunRequest(
            pipeline_version=version, parameters=[ir_pb2.NamedValue(name="n", json="4")]
        ),
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT and reason == "INVALID_PARAMETER"
    assert "parameter 'n' is structural" in details and "compiled with n=2" in details
    assert "got n=4" in details


def test_the_engine_converts_structural_values_as_given_ones(api: Api) -> None:
    version = api.register(shaped.compile({"c": 2}).spec)
    run = api.run_to_end(version, c="2")  # 2 for the float 2.0 it was compiled with
    assert run.status == res.RUN_STATUS_SUCCEEDED
    assert {p.name: json.loads(p.json) for p in run.parameters} == {"c": 2.0}
    code, details, _ = error_of(
        api.runs.CreateRun,
        runs.CreateRunRequest(
            pipeline_version=version, parameters=[ir_pb2.NamedValue(name="c", json='"2"')]
        ),
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "declared float" in details


def test_the_engine_checks_a_foreign_structural_value(api: Api) -> None:
    spec = ir_pb2.PipelineSpec()
    spec.CopyFrom(needs_n.compile({"n": 1}).spec)
    spec.parameters[0].structural_value.json = '"one"'  # another client got it wrong
    version = api.register(spec)
    code, details, _ = error_of(api.runs.CreateRun, runs.CreateRunRequest(pipeline_version=version))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "parameter 'n' is declared int; got a string \"one\"" in details
    assert "the compiled value in the pipeline's IR" in details


# ---- the command line, embedded and against a daemon ----

PIPE = """
import plait

@plait.step
def leaf(seed: int, i: int) -> int:
    return seed * 100 + i

@plait.step
def total(xs: list[int], c: float) -> float:
    return sum(xs) * c

@plait.step
def show(value: object) -> str:
    return repr(value)

@plait.pipeline
def fan(n: int, seed: int = 0, c: float = 1.0) -> None:
    total([leaf(seed, i, id=f"leaf_{i}") for i in range(n)], c)

@plait.pipeline
def kinds(flag: bool = False, items: list[int] = [], cfg: dict = {}, tag: str = "") -> None:
    show([flag, items, cfg, tag])
"""


def _plait(env: dict[str, str], *args: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
    out = subprocess.run([PLAIT, *args], env=env, capture_output=True, text=True, timeout=120)
    if ok:
        assert out.returncode == 0, f"plait {' '.join(args)}: {out.stdout}\n{out.stderr}"
    return out


def _run_id(out: subprocess.CompletedProcess[str]) -> str:
    return out.stdout.strip().splitlines()[-1]


@pytest.fixture
def project(tmp_path: Path) -> Path:
    (tmp_path / "proj").mkdir()
    (tmp_path / "proj" / "pipe.py").write_text(PIPE)
    return tmp_path / "proj" / "pipe.py"


def test_compile_a_given_shape(project: Path, tmp_path: Path) -> None:
    env = {**os.environ, "PLAIT_HOME": str(tmp_path / "home")}
    env.pop("PLAIT_SERVER", None)
    out_dir = str(tmp_path / "ir")
    three = _plait(env, "pipeline", "compile", f"{project}:fan", "-p", "n=3", "-o", out_dir)
    assert "structural parameters: n=3" in three.stdout
    spec = json.loads((tmp_path / "ir" / "fan.json").read_text())
    assert [s["id"] for s in spec["steps"]] == ["leaf_0", "leaf_1", "leaf_2", "total"]
    (n,) = [p for p in spec["parameters"] if p["name"] == "n"]
    assert n["structural_value"] == {"json": "3"}
    version = three.stdout.split()[1]
    # a run parameter does not change the version; another n does
    same = _plait(
        env, "pipeline", "compile", f"{project}:fan", "-p", "n=3", "-p", "c=2", "-o", out_dir
    )
    assert same.stdout.split()[1] == version
    four = _plait(env, "pipeline", "compile", f"{project}:fan", "-p", "n=4", "-o", out_dir)
    assert four.stdout.split()[1] != version
    missing = _plait(env, "pipeline", "compile", f"{project}:fan", "-o", out_dir, ok=False)
    assert missing.returncode == 2 and "-p n=VALUE" in missing.stderr
    bad = _plait(env, "pipeline", "compile", f"{project}:fan", "-p", "n=x", ok=False)
    assert bad.returncode == 2 and "parameter 'n' is declared int; got a string \"x\"" in bad.stderr
    assert "Traceback" not in bad.stderr


@pytest.mark.parametrize("where", ["embedded", "daemon"])
def test_plait_run_with_parameters(
    where: str, project: Path, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    if where == "daemon":
        d: Daemon = request.getfixturevalue("daemon")
        env = d.client_env()
        server: tuple[str, str] | None = (d.address, d.credential)
    else:
        env = {**os.environ, "PLAIT_HOME": str(tmp_path / "home"), "PLAIT_WORKERS": "1"}
        env.pop("PLAIT_SERVER", None)
        server = None
    target = f"{project}:fan"

    first = _plait(env, "run", target, "-q", "-p", "n=3", "-p", "c=1")
    second = _plait(env, "run", target, "-q", "-p", "n=3", "-p", "c=1.0")
    four = _plait(env, "run", target, "-q", "-p", "n=4", "-p", "seed=2")
    # refused before anything runs, naming the parameter, its type and the value
    bad = _plait(env, "run", target, "-p", "n=3", "-p", "seed=abc", ok=False)
    assert bad.returncode == 2
    assert "parameter 'seed' is declared int; got a string \"abc\"" in bad.stderr
    assert "Traceback" not in bad.stderr
    no_n = _plait(env, "run", target, ok=False)
    assert no_n.returncode == 2 and "'n'" in no_n.stderr and "as a value" in no_n.stderr

    kinds = _plait(
        env,
        "run",
        f"{project}:kinds",
        "-q",
        "-p",
        "flag=true",
        "-p",
        "items=[1, 2]",
        "-p",
        'cfg={"a": 1}',
        "-p",
        "tag=2024",
    )

    if server is None:
        client = plait.Client(home=tmp_path / "home")
    else:
        client = plait.Client(server[0], token=server[1])
    try:
        a, b, c = (client.get_run(_run_id(o)) for o in (first, second, four))
        assert a.status == b.status == c.status == "SUCCEEDED"
        assert a.steps["total"].output() == 3.0 and a.parameters == {"n": 3, "seed": 0, "c": 1.0}
        # c=1 and c=1.0: one cache entry
        assert set(statuses(b).values()) == {"CACHED"}
        assert b.pipeline_version == a.pipeline_version
        assert sorted(c.steps) == ["leaf_0", "leaf_1", "leaf_2", "leaf_3", "total"]
        assert c.pipeline_version != a.pipeline_version and c.steps["total"].output() == 806.0
        shown = client.get_run(_run_id(kinds)).steps["show"].output()
        assert shown == "[True, [1, 2], {'a': 1}, '2024']"  # tag is a str: "2024", not 2024
    finally:
        if server is None:
            client.shutdown()
        else:
            client.close()
