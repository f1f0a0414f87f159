"""Hypothesis strategies shared by the tests."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import networkx as nx
from google.protobuf import message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from hypothesis import strategies as st

from plait.ir.v1 import ir_pb2

json_values: st.SearchStrategy[Any] = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=10),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=5), children, max_size=4)
    ),
    max_leaves=15,
)
"""Values whose JSON round trip is exact."""


@st.composite
def dags(draw: st.DrawFn, max_steps: int = 12) -> nx.DiGraph:
    """Random DAGs on nodes 0..n-1."""
    n = draw(st.integers(1, max_steps))
    g = nx.DiGraph()
    g.add_nodes_from(range(n))
    g.add_edges_from((i, j) for j in range(n) for i in range(j) if draw(st.booleans()))
    return g  # edges only go forward, so it is acyclic


# ---- fuzzing requests (tests/test_fuzz.py) ----
#
# A request message of any type built from its descriptor, with values picked to hurt: strings
# short, unicode, with NUL bytes, path-like, resource-name-like, ids that exist on the server
# (``known``), and huge-ish (around and a few times over the field's limit); integers at their
# type's edges; enums valid and not; floats NaN and infinite; a few items in repeated fields,
# sometimes one more than their limit; nested messages down to a depth. Pipeline specs also come
# from :func:`ir_specs` (plausible steps and bindings), JSON fields from :func:`json_texts`, type
# expressions from :data:`type_exprs`. :func:`mutated` breaks the encoding of such a message.

_INT_RANGES: dict[int, tuple[int, int]] = {
    **dict.fromkeys(
        (FieldDescriptor.TYPE_INT32, FieldDescriptor.TYPE_SINT32, FieldDescriptor.TYPE_SFIXED32),
        (-(2**31), 2**31 - 1),
    ),
    **dict.fromkeys(
        (FieldDescriptor.TYPE_INT64, FieldDescriptor.TYPE_SINT64, FieldDescriptor.TYPE_SFIXED64),
        (-(2**63), 2**63 - 1),
    ),
    **dict.fromkeys((FieldDescriptor.TYPE_UINT32, FieldDescriptor.TYPE_FIXED32), (0, 2**32 - 1)),
    **dict.fromkeys((FieldDescriptor.TYPE_UINT64, FieldDescriptor.TYPE_FIXED64), (0, 2**64 - 1)),
}
_MAX_DEPTH = 5
_NAME_LIMIT = 256
_BIG_COUNT = 1_000
"""Repeated fields with at most this many items are sometimes sent one over their limit."""


def fuzz_ints(lo: int, hi: int) -> st.SearchStrategy[int]:
    edges = [v for v in (0, 1, -1, 2, lo, hi, lo + 1, hi - 1, 2**31 - 1, 2**32) if lo <= v <= hi]
    return st.sampled_from(edges) | st.integers(max(lo, -3), min(hi, 100)) | st.integers(lo, hi)


def _huge(limit: int) -> st.SearchStrategy[str]:
    """A string of about ``limit`` bytes (just under, at, over, a few times over)."""

    def make(unit: str, size: int) -> str:
        return unit * max(1, size // len(unit.encode()))

    sizes = st.sampled_from([limit - 1, limit, limit + 1, 2 * limit, 3 * limit])
    return st.builds(make, st.sampled_from(["x", "é", "€", "😀", "\x00", "a/"]), sizes)


RESOURCE_COLLECTIONS = ("runs", "pipelines", "artifacts", "tokens", "stacks", "components")
PATHS = ("/", "/etc/passwd", "../../../etc/passwd", "a/b/c", "C:\\x", "~", ".", "..", "%2e%2e/")


def fuzz_strings(limit: int = _NAME_LIMIT, known: Sequence[str] = ()) -> st.SearchStrategy[str]:
    """Strings for a field whose limit is ``limit`` bytes; ``known``: names that exist."""
    ident = st.text(alphabet="abcxyz0123456789_-.", min_size=1, max_size=12)
    some_id = st.sampled_from(known) | ident if known else ident
    resource = (
        st.builds(lambda c, i: f"{c}/{i}", st.sampled_from(RESOURCE_COLLECTIONS), some_id)
        | st.builds(lambda n, v: f"pipelines/{n}/versions/{v}", some_id, some_id)
        | st.sampled_from(["runs/", "runs//x", "runs/a/b", "pipelines/x/versions/", "/", "//"])
    )
    options = [
        st.just(""),
        st.text(max_size=16),
        st.text(alphabet="a\x00/\\.\n é\u202e\ufeff", max_size=10),
        st.sampled_from(PATHS),
        resource,
        some_id,
        _huge(limit),
    ]
    if known:
        options.append(st.sampled_from(known))
    return st.one_of(options)


def fuzz_bytes(limit: int) -> st.SearchStrategy[bytes]:
    sizes = st.sampled_from([limit - 1, limit, limit + 1])
    return st.binary(max_size=32) | st.builds(lambda n: b"\x00" * n, sizes)


_HARD_JSON: dict[str, tuple[str, int]] = {
    "big int": ("9", 5_000),  # over Python's int digit limit
    "deep arrays": ("[", 100_000),  # deeper than the recursion limit
    "deep objects": ('{"a":', 50_000),
    "deep closed": ("[", -10_000),  # [[[...]]] 10,000 deep
    "900 deep": ("[", -900),  # parses, but deeper than the server takes
    "long string": ("a", 100_000),
}


def _hard_json(key: str) -> str:
    unit, n = _HARD_JSON[key]
    if n < 0:
        return unit * -n + "]" * -n
    text = unit * n
    return f'"{text}"' if unit == "a" else text


json_texts: st.SearchStrategy[str] = st.one_of(
    st.builds(json.dumps, json_values),
    st.sampled_from(
        [
            *("", "{", "null", "[]", "{}", '"x"', "1", "-0", "1.5", "true", "\x00"),
            *("NaN", "Infinity", "-Infinity", "1e999", "[1e999]", '{"a": NaN}', '"\\ud800"'),
        ]
    ),
    st.sampled_from(sorted(_HARD_JSON)).map(_hard_json),
    st.sampled_from(sorted(_HARD_JSON)).map(_hard_json),
    st.text(max_size=20),
)
"""JSON texts: valid ones, non-finite numbers, broken and deeply nested ones."""

_HARD_TYPES: dict[str, tuple[str, int, str]] = {
    "long union": ("a|", 30_000, "a"),  # deep in the parser
    "many minuses": ("-", 60_000, "1"),
    "wide union": ("a|", 2_000, "a"),  # parses, but deep for a recursive checker
    "nested lists": ("list[", 300, "int" + "]" * 300),
    "parentheses": ("(", 5_000, ")" * 5_000),
}


def _hard_type(key: str) -> str:
    unit, n, tail = _HARD_TYPES[key]
    return unit * n + tail


type_exprs: st.SearchStrategy[str] = st.one_of(
    st.sampled_from(
        [
            *("", "int", "float", "str", "bool", "None", "Any", "list[int]", "tuple[int, ...]"),
            *("tuple[int, str]", "dict[str, int]", "dict[str]", "int | None", "Optional[int]"),
            *("Union[int, str]", "typing.List[float]", "Literal['a']", "list[", "int\x00"),
            *("lambda: 0", "'int'", "list[list[list[list[int]]]]"),
        ]
    ),
    st.sampled_from(sorted(_HARD_TYPES)).map(_hard_type),
    st.text(max_size=12),
)
"""Parameter and input type expressions, the parser's hard cases among them."""


def _is_json_field(field: FieldDescriptor) -> bool:
    return field.name == "json" or field.name.endswith("_json")


def _scalars(
    field: FieldDescriptor,
    limits: Mapping[str, int],
    known: Sequence[str],
    hints: Mapping[str, Sequence[str]],
) -> st.SearchStrategy[Any]:
    t = field.type
    limit = limits.get(field.full_name, _NAME_LIMIT)
    if t == FieldDescriptor.TYPE_STRING:
        strings = fuzz_strings(limit, known)
        hinted = hints.get(field.full_name) or hints.get(field.name)
        if hinted:
            strings = st.sampled_from(hinted) | strings
        if _is_json_field(field):
            return st.one_of(json_texts, json_texts, strings)
        if field.full_name.endswith("TypeSpec.expr"):
            return type_exprs | strings
        return strings
    if t == FieldDescriptor.TYPE_BYTES:
        return fuzz_bytes(limit)
    if t == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if t == FieldDescriptor.TYPE_DOUBLE:
        return st.floats() | st.sampled_from([0.0, -0.0, 1e300, -1.0, 5e-324])
    if t == FieldDescriptor.TYPE_FLOAT:
        return st.floats(width=32)
    if t == FieldDescriptor.TYPE_ENUM:
        assert field.enum_type is not None
        valid = [v.number for v in field.enum_type.values]
        return st.sampled_from(valid) | fuzz_ints(-(2**31), 2**31 - 1)
    lo, hi = _INT_RANGES[t]
    return fuzz_ints(lo, hi)


_message_cache: dict[tuple[str, int, int, int], st.SearchStrategy[Any]] = {}


def messages(
    descriptor: Descriptor,
    known: Sequence[str] = (),
    limits: Mapping[str, int] | None = None,
    counts: Mapping[str, int] | None = None,
    hints: Mapping[str, Sequence[str]] | None = None,
    seeds: Mapping[str, Sequence[Message]] | None = None,
    depth: int = 0,
) -> st.SearchStrategy[Message]:
    """Any message of type ``descriptor``.

    ``known``: strings that name real rows, mixed into every string field; ``limits`` and
    ``counts``: bytes and items by full field name (the server's table), to aim huge values and
    long lists at them; ``hints``: values that half the time fill a field, by its full name or
    its name (``pipeline_version``, ``plait.ir.v1.NamedValue.name``); ``seeds``: real messages by
    their type's full name, that half the time are merged over a generated one.
    """
    limits = limits or {}
    counts = counts or {}
    hints = hints or {}
    seeds = seeds or {}
    key = (descriptor.full_name, id(known), id(hints) ^ id(seeds), depth)
    cached = _message_cache.get(key)
    if cached is not None:
        return cached
    cls = message_factory.GetMessageClass(descriptor)
    if depth >= _MAX_DEPTH:
        return st.just(cls())

    def value_of(field: FieldDescriptor) -> st.SearchStrategy[Any]:
        if field.message_type is not None:
            sub = messages(field.message_type, known, limits, counts, hints, seeds, depth + 1)
            if field.message_type.full_name == "plait.ir.v1.PipelineSpec":
                return ir_specs(known) | sub
            return sub
        return _scalars(field, limits, known, hints)

    plans = [(f, st.deferred(lambda f=f: value_of(f))) for f in descriptor.fields]
    oneofs = [list(o.fields) for o in descriptor.oneofs]
    seeded = seeds.get(descriptor.full_name, ())

    @st.composite
    def build(draw: st.DrawFn) -> Message:
        msg = cls()
        skipped: set[str] = set()
        for members in oneofs:
            chosen = draw(st.sampled_from([None, *members]))
            skipped.update(f.name for f in members if f is not chosen)
        for field, values in plans:
            if field.name in skipped:
                continue
            if not field.containing_oneof and draw(st.integers(0, 2)) == 0:
                continue
            target = getattr(msg, field.name) if field.is_repeated else None
            if target is not None:
                items = [draw(values) for _ in range(draw(st.sampled_from([0, 1, 1, 1, 2, 3])))]
                count = counts.get(field.full_name, _BIG_COUNT)
                if items and count <= _BIG_COUNT and draw(st.integers(0, 9)) == 0:
                    first = items[0]
                    size = first.ByteSize() if isinstance(first, Message) else len(first)
                    if size <= 1024:  # one over the limit, in a message of reasonable size
                        items = items[:1] * (count + 1)
                if field.message_type is not None:
                    for item in items:
                        target.add().CopyFrom(item)
                else:
                    target.extend(items)
            elif field.message_type is not None:
                getattr(msg, field.name).CopyFrom(draw(values))
            else:
                setattr(msg, field.name, draw(values))
        if seeded and draw(st.booleans()):
            msg.MergeFrom(draw(st.sampled_from(seeded)))
        return msg

    strategy = build()
    _message_cache[key] = strategy
    return strategy


def bindings(
    step_ids: Sequence[str], params: Sequence[str], known: Sequence[str] = ()
) -> st.SearchStrategy[ir_pb2.Binding]:
    names = st.sampled_from(["output", "out", "x", ""]) | fuzz_strings(_NAME_LIMIT, known)
    leaves = st.one_of(
        st.builds(
            lambda s, o: ir_pb2.Binding(output=ir_pb2.OutputRef(step_id=s, output=o)),
            st.sampled_from([*step_ids, "nope"]),
            names,
        ),
        st.builds(lambda p: ir_pb2.Binding(parameter=p), st.sampled_from([*params, "nope", ""])),
        st.builds(lambda j: ir_pb2.Binding(literal=ir_pb2.Literal(json=j)), json_texts),
        st.just(ir_pb2.Binding()),
    )

    def nest(children: st.SearchStrategy[ir_pb2.Binding]) -> st.SearchStrategy[ir_pb2.Binding]:
        entry = st.builds(
            lambda k, v: ir_pb2.BindingMapEntry(key=k, value=v),
            st.sampled_from(["a", "b", "", "\x00"]),
            children,
        )
        return st.builds(
            lambda items: ir_pb2.Binding(list=ir_pb2.BindingList(items=items)),
            st.lists(children, max_size=3),
        ) | st.builds(
            lambda entries: ir_pb2.Binding(map=ir_pb2.BindingMap(entries=entries)),
            st.lists(entry, max_size=3),
        )

    return st.recursive(leaves, nest, max_leaves=6)


@st.composite
def ir_specs(draw: st.DrawFn, known: Sequence[str] = ()) -> ir_pb2.PipelineSpec:
    """Pipeline specs with a few steps, some of them valid: steps whose code is among ``known``
    (``module:qualname``) or not, inputs bound to parameters, literals, other steps' outputs
    (cycles and dangling references included), lists and maps of those."""
    names = st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,20}", fullmatch=True)
    step_ids = draw(st.lists(st.sampled_from(["a", "b", "c", "d", ""]), min_size=1, max_size=4))
    params = draw(st.lists(st.sampled_from(["n", "x", "y", ""]), max_size=3))
    refs = [k for k in known if ":" in k] or ["os:getcwd"]
    spec = ir_pb2.PipelineSpec(
        name=draw(names | fuzz_strings(_NAME_LIMIT, known)),
        description=draw(st.text(max_size=10)),
    )
    for p in params:
        param = spec.parameters.add(name=p, type=ir_pb2.TypeSpec(expr=draw(type_exprs)))
        if draw(st.booleans()):
            param.default_value.json = draw(json_texts)
    for sid in step_ids:
        module, _, qualname = draw(st.sampled_from([*refs, "nowhere:nothing", ":"])).partition(":")
        step = spec.steps.add(
            id=sid,
            name=draw(st.sampled_from([sid, qualname, ""])),
            code=ir_pb2.CodeRef(
                module=module,
                qualname=qualname,
                file=draw(st.sampled_from(["", *PATHS])),
                code_digest=draw(st.sampled_from(["", "0" * 64, "sha256:x"])),
                is_async=draw(st.booleans()),
            ),
        )
        for name in draw(st.lists(st.sampled_from(["x", "n", "y", ""]), max_size=3)):
            step.inputs.add(
                name=name,
                type=ir_pb2.TypeSpec(expr=draw(type_exprs)),
                binding=draw(bindings(step_ids, params, known)),
            )
        for name in draw(st.lists(st.sampled_from(["output", "out", ""]), max_size=2)):
            step.outputs.add(
                name=name, materializer=draw(st.sampled_from(["", "json", "pickle", "nope"]))
            )
        if draw(st.booleans()):
            settings = step.settings
            settings.retries = draw(fuzz_ints(0, 2**32 - 1))
            settings.runner = draw(st.sampled_from(["", "local", "nope"]))
            if draw(st.booleans()):
                settings.cache = draw(st.booleans())
            if draw(st.booleans()):
                settings.timeout_seconds = draw(st.floats() | st.sampled_from([0.0, 0.001, -1.0]))
    return spec


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


@st.composite
def mutated(draw: st.DrawFn, raw: st.SearchStrategy[bytes]) -> bytes:
    """A serialized message, broken: bits flipped, cut short, bytes inserted or overwritten,
    replaced by random bytes or nothing, fields appended that are not UTF-8, of an unknown or
    invalid wire type, or longer than the message."""
    data = bytearray(draw(raw))
    for _ in range(draw(st.integers(1, 3))):
        op = draw(
            st.sampled_from(
                ["flip", "cut", "insert", "overwrite", "random", "empty", "utf8", "wire", "long"]
            )
        )
        pos = draw(st.integers(0, len(data)))
        field = draw(st.integers(1, 8))
        if op == "flip" and data:
            i = min(pos, len(data) - 1)
            data[i] ^= 1 << draw(st.integers(0, 7))
        elif op == "cut":
            del data[pos:]
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=8))
        elif op == "overwrite":
            chunk = draw(st.binary(min_size=1, max_size=8))
            data[pos : pos + len(chunk)] = chunk
        elif op == "random":
            data = bytearray(draw(st.binary(max_size=64)))
        elif op == "empty":
            data = bytearray()
        elif op == "utf8":  # a length-delimited field that is not UTF-8
            bad = draw(st.sampled_from([b"\xff", b"\xc0\x80", b"\xed\xa0\x80", b"a\xfe"]))
            data += _varint(field << 3 | 2) + _varint(len(bad)) + bad
        elif op == "wire":  # groups, invalid wire types, a field number 0 or out of range
            tag = draw(st.sampled_from([field << 3 | 3, field << 3 | 4, field << 3 | 7, 0, 2**32]))
            data += _varint(tag) + b"\x01"
        else:  # a length longer than what follows
            data += _varint(field << 3 | 2) + _varint(draw(st.sampled_from([2**31, 2**63, 5])))
    return bytes(data)
