"""Cache-key rules: what changes a key and what does not (engine/_cache.py documents them)."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given
from hypothesis import strategies as st
from strategies import json_values

from plait._models import ArtifactInfo
from plait.engine._cache import KEY_SCHEME, cache_key, key_material
from plait.ir.v1 import ir_pb2


def _step(**settings: Any) -> ir_pb2.StepSpec:
    step = ir_pb2.StepSpec(
        id="s",
        name="s",
        code=ir_pb2.CodeRef(module="m", qualname="s", code_digest="c" * 64),
        settings=ir_pb2.StepSettings(**settings),
    )
    step.inputs.add(name="p", binding=ir_pb2.Binding(parameter="p"))
    step.inputs.add(
        name="x", binding=ir_pb2.Binding(output=ir_pb2.OutputRef(step_id="u", output="output"))
    )
    step.outputs.add(name="output", type=ir_pb2.TypeSpec(expr="int"))
    return step


def _artifact(digest: str = "d" * 64, materializer: str = "plait.json", **kw: Any) -> ArtifactInfo:
    base = {
        "artifact_id": "a",
        "output": "output",
        "digest": digest,
        "size": 1,
        "uri": "file:///x",
        "materializer": materializer,
        "data_type": "int",
        "unsafe": False,
        "run_id": "r",
        "step_id": "u",
    }
    base.update(kw)
    return ArtifactInfo(**base)


def _key(step: ir_pb2.StepSpec, p: Any = 1, art: ArtifactInfo | None = None) -> str:
    values = {"p": ("json", json.dumps(p)), "x": ("artifact", art or _artifact())}
    return cache_key(key_material(step, values))


def test_the_key_material_is_a_named_record() -> None:
    m = key_material(
        _step(cache_version="v1"), {"p": ("json", "1"), "x": ("artifact", _artifact())}
    )
    assert m.key_scheme == KEY_SCHEME == "plait.cache.v1"
    assert m.code_digest == "c" * 64 and m.cache_version == "v1"
    assert [(p.name, p.json) for p in m.parameters] == [("p", "1")]
    assert json.loads(m.inputs[0].json) == {"artifact": "d" * 64, "materializer": "plait.json"}
    assert len(m.environment_digest) == 64


@given(st.dictionaries(st.text(max_size=5), json_values, max_size=6))
def test_parameter_keys_ignore_insertion_order(value: dict[str, Any]) -> None:
    reordered = dict(reversed(list(value.items())))
    assert _key(_step(), value) == _key(_step(), reordered)


@given(json_values, json_values)
def test_different_parameter_values_give_different_keys(a: Any, b: Any) -> None:
    same = json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)
    assert (_key(_step(), a) == _key(_step(), b)) == same


def test_what_changes_the_key() -> None:
    base = _key(_step())
    code = _step()
    code.code.code_digest = "e" * 64
    env = _step(environment=ir_pb2.Environment(requirements=["x==1"]))
    materializer = _step()
    materializer.outputs[0].materializer = "pickle"
    changed = {
        "code": _key(code),
        "cache_version": _key(_step(cache_version="2")),
        "environment": _key(env),
        "parameter": _key(_step(), 2),
        "input content": _key(_step(), art=_artifact(digest="f" * 64)),
        "input materializer": _key(_step(), art=_artifact(materializer="plait.pickle")),
        "output materializer": _key(materializer),
    }
    for what, key in changed.items():
        assert key != base, what
    assert len(set(changed.values())) == len(changed)


def test_what_does_not_change_the_key() -> None:
    base = _key(_step())
    renamed = _step()
    renamed.id = "other_id"
    moved = _step()
    moved.code.module, moved.code.file = "other.module", "/elsewhere.py"
    assert _key(renamed) == base
    assert _key(moved) == base  # the code digest, not where the code lives
    assert _key(_step(retries=3)) == base
    assert _key(_step(timeout_seconds=5)) == base
    assert _key(_step(runner="other")) == base
    assert _key(_step(cache=False)) == base  # cache=False skips lookups, not the key
    # where the input was produced (run, step, artifact id) does not matter: its content does
    assert _key(_step(), art=_artifact(artifact_id="zz", run_id="r2", step_id="v")) == base


@given(st.lists(st.sampled_from("0123456789abcdef"), min_size=64, max_size=64))
def test_fan_in_keys_follow_item_order(chars: list[str]) -> None:
    digest = "".join(chars)
    step = _step()
    del step.inputs[:]
    items = [
        ir_pb2.Binding(output=ir_pb2.OutputRef(step_id=f"u{i}", output="output")) for i in range(2)
    ]
    step.inputs.add(name="xs", binding=ir_pb2.Binding(list=ir_pb2.BindingList(items=items)))
    a, b = _artifact(digest=digest), _artifact(digest="0" * 64)
    k1 = cache_key(key_material(step, {"xs": ("list", [("artifact", a), ("artifact", b)])}))
    k2 = cache_key(key_material(step, {"xs": ("list", [("artifact", b), ("artifact", a)])}))
    assert (k1 == k2) == (digest == "0" * 64)


_names = st.text(max_size=4)


@given(
    scheme=_names,
    version=_names,
    outputs=st.lists(st.tuples(_names, st.one_of(st.none(), _names), _names, st.booleans())),
    named=st.lists(st.tuples(_names, _names), max_size=3),
)
def test_the_key_is_the_digest_of_the_canonical_material(
    scheme: str,
    version: str,
    outputs: list[tuple[str, str | None, str, bool]],
    named: list[tuple[str, str]],
) -> None:
    """The key and the stored material skip protobuf's reflection: they must stay what
    message_digest and MessageToDict give (keys written by earlier versions stay valid)."""
    from google.protobuf.json_format import MessageToDict

    from plait.engine._cache import material_to_json
    from plait.ir.canonical import message_digest, message_to_canonical

    m = ir_pb2.CacheKeyMaterial(key_scheme=scheme, code_digest="c" * 64, cache_version=version)
    for name, expr, materializer, items in outputs:
        o = m.outputs.add(name=name, materializer=materializer, items=items)
        if expr is not None:
            o.type.expr = expr  # set, even when empty: a message field with presence
    for name, value in named:
        m.parameters.add(name=name, json=value)
        m.inputs.add(name=value, json=name)
    for _ in range(2):  # the second time from the memo of output specs
        assert cache_key(m) == message_digest(m)
        assert material_to_json(m) == message_to_canonical(m)
        assert material_to_json(m) == MessageToDict(m, preserving_proto_field_name=True)


@given(
    version=st.text(max_size=5),
    p=json_values,
    names=st.lists(st.text(min_size=1, max_size=5), max_size=3, unique=True),
    digests=st.lists(st.sampled_from(["d" * 64, "e" * 64]), min_size=3, max_size=3),
    environment=st.lists(st.text(min_size=1, max_size=5), max_size=2),
)
def test_the_scheduler_s_key_and_material_are_the_message_s(
    version: str, p: Any, names: list[str], digests: list[str], environment: list[str]
) -> None:
    """The scheduler makes a step's key and stored material without building the message,
    from a memo of what the step alone decides: they must be cache_key and material_to_json
    of key_material, for every shape of input (and again from the memo)."""
    from plait.engine._cache import key_and_material, material_to_json

    step = _step(cache_version=version)
    step.settings.environment.requirements.extend(environment)
    values: dict[str, Any] = {"p": ("json", json.dumps(p)), "x": ("artifact", _artifact())}
    for i, name in enumerate(names):  # more inputs: plain values, lists and maps of artifacts
        step.inputs.add(name=name, binding=ir_pb2.Binding(parameter=name))
        art = _artifact(digests[i])
        values[name] = [
            ("json", json.dumps({"n": i})),
            ("list", [("artifact", art), ("json", "[1, 2]")]),
            ("map", {"k": ("artifact", art)}),
        ][i]
    m = key_material(step, values)
    for _ in range(2):
        key, text = key_and_material(step, values)
        assert key == cache_key(m)
        assert json.loads(text) == material_to_json(m)
    other = _step(cache_version=version + "x")  # another spec: not the first one's memo
    fewer = {"p": values["p"], "x": values["x"]}
    assert key_and_material(other, fewer)[0] == cache_key(key_material(other, fewer)) != key
