"""The SDK: decorators, tracing into a graph, validation errors, compiling to the IR."""

from __future__ import annotations

from typing import Annotated, Any

import pytest

import plait
from plait._pipeline import compile_pipeline
from plait.ir.canonical import message_digest


@plait.step
def load(n: int) -> list[int]:
    return list(range(n))


@plait.step
def stats(xs: list[int]) -> tuple[Annotated[int, "total"], Annotated[float, "mean"]]:
    return sum(xs), sum(xs) / len(xs)


@plait.step(cache=False, retries=2, timeout=5, cache_version="v2")
async def report(total: int, mean: float) -> str:
    return f"{total}/{mean}"


@plait.step
def add(a: int, b: int = 1) -> int:
    return a + b


@plait.step
def leaf(i: int) -> int:
    return i


@plait.step
def join(xs: list[int]) -> int:
    return sum(xs)


@plait.step
def join_map(parts: dict[str, int]) -> int:
    return sum(parts.values())


@plait.step
def shout(text: str) -> str:
    return text.upper()


@plait.step
def nothing() -> None:
    return None


@plait.pipeline
def demo(n: int = 10) -> None:
    total, mean = stats(load(n))
    report(total, mean)


def test_quickstart_compiles_to_the_ir() -> None:
    compiled = demo.compile()
    spec = compiled.spec
    assert [s.id for s in spec.steps] == ["load", "stats", "report"]
    assert [(p.name, p.type.expr, p.default_value.json) for p in spec.parameters] == [
        ("n", "int", "10")
    ]
    load_s, stats_s, report_s = spec.steps
    assert load_s.inputs[0].binding.parameter == "n"
    assert stats_s.inputs[0].binding.output.step_id == "load"
    assert stats_s.inputs[0].binding.output.output == "output"
    assert [(o.name, o.type.expr) for o in stats_s.outputs] == [("total", "int"), ("mean", "float")]
    assert [(i.name, i.binding.output.output) for i in report_s.inputs] == [
        ("total", "total"),
        ("mean", "mean"),
    ]
    assert report_s.code.is_async and not load_s.code.is_async
    assert report_s.code.module == __name__ and report_s.code.qualname == "report"
    assert report_s.code.file.endswith("test_sdk.py")
    assert len(report_s.code.code_digest) == 64
    s = report_s.settings
    assert s.HasField("cache") and s.cache is False
    assert (s.retries, s.timeout_seconds, s.cache_version) == (2, 5.0, "v2")
    assert not load_s.settings.HasField("cache")  # unset means True
    assert compiled.version == message_digest(spec)
    assert sorted(compiled.graph.edges) == [("load", "stats"), ("stats", "report")]


def test_version_is_deterministic_and_content_addressed() -> None:
    a = compile_pipeline(demo)
    b = compile_pipeline(demo)
    assert a.version == b.version
    assert a.spec.SerializeToString() == b.spec.SerializeToString()

    @plait.pipeline(name="demo")
    def other(n: int = 11) -> None:  # same name, another default: another version
        total, mean = stats(load(n))
        report(total, mean)

    assert compile_pipeline(other).version != a.version


def test_repeated_invocations_get_distinct_ids_and_explicit_ids_work() -> None:
    @plait.pipeline
    def p() -> None:
        x = add(1)
        y = add(x, 2)
        add(y, id="last")
        add.with_options(id="via_options")(3)

    spec = compile_pipeline(p).spec
    assert [s.id for s in spec.steps] == ["add", "add_2", "last", "via_options"]
    assert [s.name for s in spec.steps] == ["add"] * 4
    # the default of b becomes a literal
    assert spec.steps[0].inputs[1].binding.literal.json == "1"


def test_duplicate_explicit_id_is_an_error() -> None:
    @plait.pipeline
    def p() -> None:
        add(1, id="x")
        add(2, id="x")

    with pytest.raises(plait.PipelineValidationError, match="'x' is used twice"):
        compile_pipeline(p)


def test_fan_in_of_a_list_and_a_dict_of_outputs() -> None:
    @plait.pipeline
    def p() -> None:
        join([leaf(i) for i in range(100)])
        join_map({"a": leaf(1, id="a"), "b": leaf(2, id="b")})

    compiled = compile_pipeline(p)
    spec = compiled.spec
    join_s = next(s for s in spec.steps if s.id == "join")
    items = join_s.inputs[0].binding.list.items
    assert len(items) == 100
    assert [i.output.step_id for i in items[:3]] == ["leaf", "leaf_2", "leaf_3"]
    assert compiled.graph.in_degree("join") == 100
    jm = next(s for s in spec.steps if s.id == "join_map")
    assert [(e.key, e.value.output.step_id) for e in jm.inputs[0].binding.map.entries] == [
        ("a", "a"),
        ("b", "b"),
    ]


def test_step_called_outside_a_pipeline_calls_the_function() -> None:
    assert add(2, 3) == 5
    assert stats([1, 2, 3]) == (6, 2.0)


def test_decorator_with_and_without_arguments() -> None:
    assert isinstance(load, plait.Step) and load.settings.cache is True
    assert isinstance(report, plait.Step) and report.settings.cache is False
    assert report.is_async
    assert [o.name for o in nothing.outputs] == []


def test_named_outputs_by_name_and_attribute() -> None:
    @plait.pipeline
    def p() -> None:
        out = stats(load(3))
        report(out["total"], out.mean)

    spec = compile_pipeline(p).spec
    assert [i.binding.output.output for i in spec.steps[2].inputs] == ["total", "mean"]


def _error(fn: Any) -> str:
    with pytest.raises(plait.PipelineValidationError) as info:
        compile_pipeline(plait.pipeline(fn))
    return str(info.value)


def test_missing_input_names_the_step_and_the_input() -> None:
    def p() -> None:
        stats()

    msg = _error(p)
    assert "step 'stats'" in msg and "missing input 'xs'" in msg


def test_extra_input_names_the_step_and_the_input() -> None:
    def p() -> None:
        add(1, c=3)

    msg = _error(p)
    assert "step 'add'" in msg and "unexpected input 'c'" in msg


def test_too_many_positional_inputs() -> None:
    def p() -> None:
        add(1, 2, 3)

    assert "takes 2 input(s)" in _error(p)


def test_unknown_output_name() -> None:
    def p() -> None:
        out = stats(load(3))
        report(out["totl"], out.mean)

    msg = _error(p)
    assert "step 'stats' has no output 'totl'" in msg and "total, mean" in msg


@pytest.mark.parametrize(
    "use",
    [
        lambda x: f"{x}",
        lambda x: len(x),
        lambda x: bool(x),
        lambda x: x + 1,
        lambda x: str(x),
        lambda x: [i for i in x],
        lambda x: x.upper(),
    ],
    ids=["format", "len", "bool", "add", "str", "iter", "attribute"],
)
def test_step_output_used_by_non_step_code(use: Any) -> None:
    def p() -> None:
        use(shout("a"))

    msg = _error(p)
    assert "output 'output' of step 'shout'" in msg and "Pass it to a step" in msg


def test_pipeline_parameter_used_as_a_value_is_structural() -> None:
    def p(n: int = 3) -> None:
        for i in range(n):
            leaf(i)

    compiled = compile_pipeline(plait.pipeline(p))
    assert len(compiled.spec.steps) == 3 and dict(compiled.structural) == {"n": "3"}


def test_annotation_contradicting_the_upstream_type() -> None:
    def p() -> None:
        shout(add(1))  # int passed where str is declared

    msg = _error(p)
    assert "step 'shout', input 'text'" in msg
    assert "expects str" in msg and "'add' is int" in msg


@plait.step
def takes_float(x: float) -> float:
    return x


@plait.step
def takes_any(x):  # type: ignore[no-untyped-def]
    return x


def test_compatible_annotations_are_accepted() -> None:
    @plait.pipeline
    def p() -> None:
        takes_float(add(1))  # int widens to float
        takes_any(load(2))

    assert len(compile_pipeline(p).spec.steps) == 4


def test_list_element_types_are_checked_in_fan_in() -> None:
    def p() -> None:
        join([leaf(1), shout("x")])

    msg = _error(p)
    assert "input 'xs[1]'" in msg and "expects int" in msg


def test_non_json_literal_is_an_error() -> None:
    def p() -> None:
        shout(object())  # type: ignore[arg-type]

    msg = _error(p)
    assert "step 'shout', input 'text'" in msg and "not a JSON literal" in msg


def test_passing_all_outputs_of_a_multi_output_step() -> None:
    def p() -> None:
        report(stats(load(3)), 1.0)  # type: ignore[arg-type]

    assert "pass one of them" in _error(p)


def test_pipeline_without_steps() -> None:
    def p() -> None:
        pass

    assert "calls no step" in _error(p)


def test_definition_errors() -> None:
    with pytest.raises(plait.PipelineDefinitionError, match=r"\*args"):

        @plait.step
        def bad(*xs: int) -> int:
            return 0

    with pytest.raises(plait.PipelineDefinitionError, match="name every item"):

        @plait.step
        def half(x: int) -> tuple[Annotated[int, "a"], int]:
            return x, x

    with pytest.raises(plait.PipelineDefinitionError, match="retries"):
        plait.step(retries=-1)

    with pytest.raises(plait.PipelineDefinitionError, match="unknown output"):

        @plait.step(materializer={"nope": "pickle"})
        def one(x: int) -> int:
            return x


def test_steps_defined_in_a_function_cannot_compile() -> None:
    @plait.step
    def local(x: int) -> int:
        return x

    def p() -> None:
        local(1)

    with pytest.raises(plait.PipelineDefinitionError, match="module level"):
        compile_pipeline(plait.pipeline(p))


def test_pipeline_default_must_be_json() -> None:
    def p(x: object = object()) -> None:
        leaf(1)

    with pytest.raises(plait.PipelineValidationError, match="not a JSON literal"):
        compile_pipeline(plait.pipeline(p))


def test_code_digest_ignores_comments_and_decorators_but_not_code() -> None:
    from plait._step import code_digest

    ns: dict[str, Any] = {}
    sources = {
        "a": "def f(x):\n    return x + 1\n",
        "a_comment": "def f(x):\n    # a comment\n    return x + 1  # another\n",
        "b": "def f(x):\n    return x + 2\n",
    }
    digests = {}
    for key, src in sources.items():
        path = f"/tmp/plait_digest_{key}.py"
        with open(path, "w") as fh:
            fh.write(src)
        code = compile(src, path, "exec")
        exec(code, ns)
        digests[key] = code_digest(ns["f"])
    assert digests["a"] == digests["a_comment"]
    assert digests["a"] != digests["b"]


def test_environment_digest() -> None:
    a = plait.Environment(requirements=["x==1"], env={"A": "1", "B": "2"})
    b = plait.Environment(requirements=["x==1"], env={"B": "2", "A": "1"})
    c = plait.Environment(requirements=["x==2"], env={"A": "1", "B": "2"})
    assert a.digest == b.digest != c.digest
    assert plait.Environment.from_proto(a.to_proto()) == a


def test_public_api_is_locked() -> None:
    assert sorted(plait.__all__) == [
        "ArtifactError",
        "ArtifactInfo",
        "ArtifactNotFoundError",
        "Client",
        "Environment",
        "File",
        "Materializer",
        "NotInStepError",
        "ParameterError",
        "Pipeline",
        "PipelineDefinitionError",
        "PipelineError",
        "PipelineValidationError",
        "PlaitError",
        "Resources",
        "RpcError",
        "Run",
        "RunEvent",
        "RunNotFoundError",
        "RunStatus",
        "Status",
        "Step",
        "StepContext",
        "StepError",
        "StepFailedError",
        "StepRun",
        "StepSettings",
        "StepStatus",
        "__version__",
        "get_step_context",
        "log_metadata",
        "pipeline",
        "register_materializer",
        "step",
    ]
    for name in plait.__all__:
        assert hasattr(plait, name), name


def test_step_context_outside_a_step() -> None:
    with pytest.raises(plait.NotInStepError):
        plait.get_step_context()
    with pytest.raises(plait.NotInStepError):
        plait.log_metadata({"a": 1})


def test_type_expressions_are_always_valid_python() -> None:
    import ast

    from plait._types import type_expr

    class Local:
        pass

    for tp, want in [
        (int, "int"),
        (list[int], "list[int]"),
        (int | None, "int | None"),
        (dict[str, list[float]], "dict[str, list[float]]"),
        (tuple[int, ...], "tuple[int, ...]"),
    ]:
        assert type_expr(tp) == want
    local = type_expr(Local)
    assert "_locals_" in local
    ast.parse(local, mode="eval")
