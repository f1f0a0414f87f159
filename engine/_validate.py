"""Validation of an IR received from any client, in any language."""

from __future__ import annotations

import ast
import math

from plait.engine._ir import load_json, name_problem, valid_name
from plait.errors import PipelineValidationError
from plait.ir.v1 import ir_pb2

MAX_STEPS = 100_000
MAX_RETRIES = 100
"""The most retries a step may ask for."""
MAX_RETRY_DELAY = 86_400.0
"""The longest delay before a retry, in seconds (a day); a step's own cap is at most this."""
MAX_RETRY_BACKOFF = 100.0
"""The largest growth factor of retry delays."""
MAX_RETRY_TYPES = 64
"""The most exception type names in a step's retry_on, and in its no_retry_on."""
MAX_TYPE_NAME = 1024
"""The longest qualified exception type name, in characters."""
MAX_CONCURRENCY = MAX_STEPS
"""The largest per-run limit of steps at once (more than that is no limit)."""


def validate_pipeline(spec: ir_pb2.PipelineSpec) -> None:
    """Checks a PipelineSpec; errors name the offending field.

    A binding may only read a step before its own, so the steps are in a topological order
    and their graph has no cycle (``plait.ir.steps.step_graph`` draws it)."""
    if not spec.name:
        raise PipelineValidationError("name: a pipeline needs a name")
    if not valid_name(spec.name):
        raise PipelineValidationError(f"name: {name_problem(spec.name)}")
    if not spec.steps:
        raise PipelineValidationError("steps: a pipeline needs at least one step")
    if len(spec.steps) > MAX_STEPS:
        raise PipelineValidationError(f"steps: more than {MAX_STEPS} steps")
    if spec.HasField("max_concurrency") and not 1 <= spec.max_concurrency <= MAX_CONCURRENCY:
        raise PipelineValidationError(
            f"max_concurrency: {spec.max_concurrency} is not between 1 and {MAX_CONCURRENCY}"
        )
    params: set[str] = set()
    for i, p in enumerate(spec.parameters):
        where = f"parameters[{i}]"
        if not p.name or p.name in params:
            raise PipelineValidationError(f"{where}.name: empty or duplicate {p.name!r}")
        params.add(p.name)
        if p.HasField("default_value"):
            _json(f"{where}.default_value", p.default_value.json)
    outputs: dict[str, set[str]] = {}
    iterable: set[tuple[str, str]] = set()
    """The outputs a map may iterate: those stored with their items, and a mapped step's."""
    for i, s in enumerate(spec.steps):
        where = f"steps[{i}] ({s.id!r})"
        if not s.id or s.id in outputs:
            raise PipelineValidationError(f"{where}.id: empty or duplicate step id")
        if "[" in s.id or "]" in s.id:
            raise PipelineValidationError(
                f"{where}.id: brackets are kept for the items of mapped steps ({s.id}[0])"
            )
        if not s.code.module or not s.code.qualname:
            raise PipelineValidationError(f"{where}.code: module and qualname are required")
        timeout = s.settings.timeout_seconds
        if s.settings.HasField("timeout_seconds") and not (math.isfinite(timeout) and timeout >= 0):
            raise PipelineValidationError(
                f"{where}.settings.timeout_seconds: {timeout} is not a finite number >= 0"
            )
        _check_retry_policy(f"{where}.settings", s.settings)
        names = [o.name for o in s.outputs]
        if len(set(names)) != len(names) or not all(names):
            raise PipelineValidationError(f"{where}.outputs: empty or duplicate output names")
        if any("[" in n or "]" in n for n in names):
            raise PipelineValidationError(
                f"{where}.outputs: brackets in an output name are kept for the items of "
                f"outputs that maps iterate"
            )
        mapped = [x for x in s.inputs if x.mapped]
        if len(mapped) > 1:
            raise PipelineValidationError(
                f"{where}.inputs: {', '.join(x.name for x in mapped)} are all mapped; a step is "
                f"mapped over one input at most"
            )
        if mapped and any(o.items for o in s.outputs):
            raise PipelineValidationError(
                f"{where}.outputs: a mapped step's outputs are its items' own; none sets items"
            )
        inputs = [x.name for x in s.inputs]
        if len(set(inputs)) != len(inputs) or not all(inputs):
            raise PipelineValidationError(f"{where}.inputs: empty or duplicate input names")
        for j, o in enumerate(s.outputs):
            _check_type(f"{where}.outputs[{j}] ({o.name!r}).type", o.type.expr)
        for j, inp in enumerate(s.inputs):
            _check_type(f"{where}.inputs[{j}] ({inp.name!r}).type", inp.type.expr)
            _check_binding(
                f"{where}.inputs[{j}] ({inp.name!r}).binding", inp.binding, outputs, params
            )
            if inp.mapped:
                _check_mapped(f"{where}.inputs[{j}] ({inp.name!r}).binding", inp.binding, iterable)
        outputs[s.id] = set(names)
        iterable.update((s.id, o.name) for o in s.outputs if mapped or o.items)


def _check_retry_policy(where: str, s: ir_pb2.StepSettings) -> None:
    if s.retries > MAX_RETRIES:
        raise PipelineValidationError(f"{where}.retries: {s.retries} is more than {MAX_RETRIES}")
    bounds = [("retry_delay_seconds", 0.0, MAX_RETRY_DELAY)]
    if s.HasField("retry_max_delay_seconds"):
        bounds.append(("retry_max_delay_seconds", 0.0, MAX_RETRY_DELAY))
    if s.HasField("retry_backoff"):
        bounds.append(("retry_backoff", 1.0, MAX_RETRY_BACKOFF))
    if s.HasField("retry_jitter"):
        bounds.append(("retry_jitter", 0.0, 1.0))
    for name, low, high in bounds:
        value = getattr(s, name)
        if not (math.isfinite(value) and low <= value <= high):
            raise PipelineValidationError(
                f"{where}.{name}: {value} is not a finite number between {low:g} and {high:g}"
            )
    for name in ("retry_on", "no_retry_on"):
        types = getattr(s, name)
        if len(types) > MAX_RETRY_TYPES:
            raise PipelineValidationError(
                f"{where}.{name}: {len(types)} types; the limit is {MAX_RETRY_TYPES}"
            )
        for k, t in enumerate(types):
            if not t or len(t) > MAX_TYPE_NAME or any(c.isspace() for c in t):
                raise PipelineValidationError(
                    f"{where}.{name}[{k}]: not a qualified exception type name "
                    f'("builtins.ValueError": non-empty, no spaces, at most {MAX_TYPE_NAME} '
                    f"characters)"
                )


_TYPE_NODES = (
    ast.Expression,
    ast.Name,
    ast.Attribute,
    ast.Subscript,
    ast.Tuple,
    ast.BinOp,
    ast.BitOr,
    ast.Constant,
    ast.Load,
    ast.List,
)


_GOOD_TYPES: set[str] = set()
"""Type expressions that passed: the same few come in every step of every pipeline, and
parsing costs more than the rest of a step's checks."""


def _check_type(where: str, expr: str) -> None:
    """A type is a Python-style type expression: names, dotted names, subscripts, ``|``."""
    if not expr or expr in _GOOD_TYPES:
        return  # unset (any type), or checked before
    try:
        tree = ast.parse(expr, mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError):  # the last two: too deep
        shown = repr(expr[:64]) + ("..." if len(expr) > 64 else "")
        raise PipelineValidationError(f"{where}.expr: {shown} is not a type expression") from None
    for node in ast.walk(tree):
        if not isinstance(node, _TYPE_NODES) or (
            isinstance(node, ast.Constant)
            and node.value not in (None, Ellipsis)
            and not isinstance(node.value, str)
        ):
            raise PipelineValidationError(
                f"{where}.expr: {expr!r} is not a type expression (names, dotted names, "
                f"subscripts and '|' only)"
            )
    if len(_GOOD_TYPES) < 4096:  # bounded: a client may send any number of distinct types
        _GOOD_TYPES.add(expr)


def _json(where: str, text: str) -> None:
    """Literal and default values: JSON, without NaN or Infinity (they have no JSON form)."""
    try:
        load_json(text)
    except ValueError as exc:
        raise PipelineValidationError(f"{where}.json: not JSON ({exc})") from None


def _check_mapped(where: str, b: ir_pb2.Binding, iterable: set[tuple[str, str]]) -> None:
    """A mapped input's binding must give a list whose items the control plane can tell apart."""
    kind = b.WhichOneof("kind")
    if kind == "map":
        raise PipelineValidationError(f"{where}: a mapped input goes over a list, not a map")
    if kind == "output" and (b.output.step_id, b.output.output) not in iterable:
        raise PipelineValidationError(
            f"{where}.output: output {b.output.output!r} of step {b.output.step_id!r} is mapped "
            f"over, so it must be stored with its items (set its OutputSpec.items)"
        )


def _check_binding(
    where: str, b: ir_pb2.Binding, outputs: dict[str, set[str]], params: set[str]
) -> list[str]:
    kind = b.WhichOneof("kind")
    if kind == "output":
        if b.output.step_id not in outputs:
            raise PipelineValidationError(
                f"{where}.output: no step {b.output.step_id!r} before this one (steps must be "
                f"in topological order)"
            )
        if b.output.output not in outputs[b.output.step_id]:
            raise PipelineValidationError(
                f"{where}.output: step {b.output.step_id!r} has no output {b.output.output!r}"
            )
        return [b.output.step_id]
    if kind == "parameter":
        if b.parameter not in params:
            raise PipelineValidationError(f"{where}.parameter: no parameter {b.parameter!r}")
        return []
    if kind == "literal":
        _json(f"{where}.literal", b.literal.json)
        return []
    if kind == "list":
        return [
            u
            for k, item in enumerate(b.list.items)
            for u in _check_binding(f"{where}.list.items[{k}]", item, outputs, params)
        ]
    if kind == "map":
        keys = [e.key for e in b.map.entries]
        if keys != sorted(set(keys)):
            raise PipelineValidationError(f"{where}.map: keys must be unique and sorted")
        return [
            u
            for e in b.map.entries
            for u in _check_binding(f"{where}.map[{e.key!r}]", e.value, outputs, params)
        ]
    raise PipelineValidationError(f"{where}: no source set")
