"""Helpers over the pipeline IR that the scheduler, the store and the API need: names, strict
JSON, parameter values."""

from __future__ import annotations

import ast
import functools
import json
import math
import re
from typing import Any

from plait.errors import ParameterError
from plait.ir.canonical import canonical_json
from plait.ir.steps import upstream_ids as upstream_ids  # shared with the SDK
from plait.ir.v1 import ir_pb2

NAME_PATTERN = r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}"
"""What a pipeline, stack or component name looks like (it goes into resource names such as
``pipelines/NAME/versions/VERSION``): an ASCII letter, digit or underscore, then up to 127 of
those, ``.`` or ``-``. Python function names fit (ASCII ones); a slash never does."""
_NAME = re.compile(NAME_PATTERN)


def valid_name(name: str) -> bool:
    """Whether ``name`` matches :data:`NAME_PATTERN` (whole)."""
    return _NAME.fullmatch(name) is not None


def name_problem(name: str) -> str:
    """Why ``name`` is refused, for an error message that also names the field."""
    shown = repr(name[:64]) + ("..." if len(name) > 64 else "")
    return f"{shown} is not a valid name (it must match {NAME_PATTERN})"


def _non_finite(text: str) -> Any:
    raise ValueError(f"{text} is not a number JSON allows (no NaN or Infinity)")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text[:32]} is out of the range of a float (JSON has no Infinity)")
    return value


MAX_JSON_DEPTH = 100
"""How deep a JSON value (a parameter, literal, default, metadata, ``config_json``) may nest:
deeper ones would overflow the recursion of the JSON decoder and encoder and of the type
checks."""


def load_json(text: str) -> Any:
    """``json.loads`` that refuses ``NaN``, ``Infinity``, floats that overflow to them, and
    values nested deeper than :data:`MAX_JSON_DEPTH`.

    Raises ValueError (JSONDecodeError is one) with a message fit to follow ``not JSON:``.
    """
    too_deep = f"nested deeper than {MAX_JSON_DEPTH} levels"
    try:
        value = json.loads(text, parse_constant=_non_finite, parse_float=_finite_float)
    except RecursionError:
        raise ValueError(too_deep) from None
    if _deeper_than(value, MAX_JSON_DEPTH):
        raise ValueError(too_deep)
    return value


def _deeper_than(value: Any, limit: int) -> bool:
    """Whether arrays and objects nest in ``value`` more than ``limit`` levels (no recursion)."""
    stack = [(value, 1)] if isinstance(value, list | dict) else []
    while stack:
        item, depth = stack.pop()
        children = item.values() if isinstance(item, dict) else item
        if depth > limit:
            return True
        stack.extend((c, depth + 1) for c in children if isinstance(c, list | dict))
    return False


def resolve_parameters(spec: ir_pb2.PipelineSpec, given: dict[str, str]) -> dict[str, str]:
    """Parameter values as canonical JSON: the given ones, checked against their declared types
    (:func:`coerce_parameter`), and defaults for the rest.

    A structural parameter (``structural_value`` set: the version's graph was compiled for that
    value) takes that value, given or not; another value is refused.
    """
    declared = {p.name: p for p in spec.parameters}
    unknown = sorted(set(given) - set(declared))
    if unknown:
        raise ParameterError(
            f"pipeline {spec.name!r} has no parameter {unknown[0]!r}; "
            f"its parameters are: {', '.join(declared) or 'none'}"
        )
    out: dict[str, str] = {}
    for name, p in declared.items():
        structural = None
        if p.HasField("structural_value"):
            structural = _checked_json(name, p.type.expr, p.structural_value.json, "compiled")
        if name in given:
            out[name] = _checked_json(name, p.type.expr, given[name], "")
            if structural is not None and out[name] != structural:
                raise ParameterError(
                    f"pipeline {spec.name!r}: parameter {name!r} is structural (the pipeline "
                    f"function uses its value, so the graph depends on it) and this version was "
                    f"compiled with {name}={_brief(structural)}; got {name}={_brief(out[name])}. "
                    f"Compile the pipeline with {name}={_brief(out[name])} (calling it with that "
                    f"value does) and run that version"
                )
        elif structural is not None:
            out[name] = structural
        elif p.HasField("default_value"):
            try:
                out[name] = _checked_json(name, p.type.expr, p.default_value.json, "default")
            except ParameterError:  # ``x: int = None``: Python allows it; taken as it is
                out[name] = p.default_value.json
        else:
            raise ParameterError(f"pipeline {spec.name!r}: parameter {name!r} is required")
    return out


def _checked_json(name: str, expr: str, text: str, what: str) -> str:
    """``text`` (JSON) checked against the type ``expr`` and converted, as canonical JSON."""
    label = f"parameter {name!r}" + (f" ({what} value)" if what else "")
    try:
        value = load_json(text)
    except ValueError as exc:
        raise ParameterError(f"{label}: not JSON: {exc}") from None
    try:
        return canonical_json(coerce_parameter(name, expr, value))
    except ParameterError as exc:
        if not what:
            raise
        raise ParameterError(f"{exc} (the {what} value in the pipeline's IR)") from None


def _brief(text: str) -> str:
    return text if len(text) <= 60 else text[:57] + "..."


# ---- parameter types ----


class _Mismatch(Exception):
    def __init__(self, where: str, value: Any) -> None:
        self.where = where
        self.value = value


_INT, _FLOAT, _BOOL, _STR = ("int",), ("float",), ("bool",), ("str",)
_LIST = ("list", "List", "typing.List")
_TUPLE = ("tuple", "Tuple", "typing.Tuple")
_DICT = ("dict", "Dict", "typing.Dict")
_OPTIONAL = ("Optional", "typing.Optional")
_UNION = ("Union", "typing.Union")


def coerce_parameter(name: str, expr: str, value: Any) -> Any:
    """A parameter's JSON value checked against its declared type expression ``expr``.

    ``int`` takes integers (not floats, not booleans); ``float`` takes numbers and returns them
    as floats (so ``1`` and the default ``1.0`` give one cache key); ``bool`` and ``str`` take
    their JSON kind; ``None`` takes null; ``list[X]``, ``tuple[X, ...]``, ``tuple[X, Y]`` take
    arrays and ``dict[K, V]`` objects, checking (and converting) their items by the same
    rules; ``A | B``, ``Optional[A]`` and ``Union[A, B]`` take what the first member that fits
    takes. Anything else (``Any``, custom classes, ``Literal[...]``, no type) takes any JSON.
    Raises ParameterError naming the parameter, its type and what was given.
    """
    tree = _parse(expr)
    if tree is None:
        return value
    try:
        return _coerce(tree, value, "")
    except RecursionError:  # a union of thousands of members, registered before it was refused
        shown = repr(expr[:64]) + ("..." if len(expr) > 64 else "")
        raise ParameterError(
            f"parameter {name!r}: its declared type {shown} is nested too deeply to check"
        ) from None
    except _Mismatch as m:
        where = f" at {m.where}" if m.where else ""
        raise ParameterError(
            f"parameter {name!r} is declared {expr}; got {_shown(m.value)}{where}"
        ) from None


@functools.lru_cache(maxsize=256)
def _parse(expr: str) -> ast.expr | None:
    if not expr:
        return None
    try:
        return ast.parse(expr, mode="eval").body
    except (SyntaxError, ValueError, RecursionError, MemoryError):  # too deep for the parser
        return None


def _dotted(node: ast.expr) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value)
        return None if base is None else f"{base}.{node.attr}"
    return None


def _members(node: ast.expr) -> list[ast.expr] | None:
    """The members of a union (``A | B``, ``Optional[A]``, ``Union[A, B]``); None otherwise."""
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr):
        return [*(_members(node.left) or [node.left]), *(_members(node.right) or [node.right])]
    if isinstance(node, ast.Subscript):
        base = _dotted(node.value)
        if base in _OPTIONAL:
            return [node.slice, ast.Constant(None)]
        if base in _UNION:
            return list(node.slice.elts) if isinstance(node.slice, ast.Tuple) else [node.slice]
    return None


def _coerce(node: ast.expr, value: Any, where: str) -> Any:
    members = _members(node)
    if members is not None:
        deepest = _Mismatch(where, value)
        for member in members:
            try:
                return _coerce(member, value, where)
            except _Mismatch as m:
                if len(m.where) > len(deepest.where):  # a member that fit but for an item
                    deepest = m
        raise deepest
    if isinstance(node, ast.Constant):
        if node.value is None:
            if value is None:
                return None
            raise _Mismatch(where, value)
        return value  # a forward reference ("Model") or a literal: not checked
    if isinstance(node, ast.Subscript):
        base = _dotted(node.value)
        args = list(node.slice.elts) if isinstance(node.slice, ast.Tuple) else [node.slice]
    else:
        base, args = _dotted(node), []
    if base in _INT:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif base in _FLOAT:
        if isinstance(value, int | float) and not isinstance(value, bool):
            try:
                return float(value)
            except OverflowError:
                pass
    elif base in _BOOL:
        if isinstance(value, bool):
            return value
    elif base in _STR:
        if isinstance(value, str):
            return value
    elif base in _LIST or base in _TUPLE:
        if isinstance(value, list):
            return _items(base in _TUPLE, args, value, where)
    elif base in _DICT:
        if isinstance(value, dict):
            if len(args) != 2:
                return value
            return {k: _coerce(args[1], v, f"{where}[{k!r}]") for k, v in value.items()}
    else:
        return value  # Any, custom classes, Literal[...]: any JSON
    raise _Mismatch(where, value)


def _items(is_tuple: bool, args: list[ast.expr], value: list[Any], where: str) -> list[Any]:
    if not args:
        return value
    if is_tuple and not (len(args) == 2 and _is_ellipsis(args[1])):
        if len(args) != len(value):
            raise _Mismatch(where, value)
        pairs = zip(args, value, strict=True)
        return [_coerce(a, v, f"{where}[{i}]") for i, (a, v) in enumerate(pairs)]
    return [_coerce(args[0], v, f"{where}[{i}]") for i, v in enumerate(value)]


def _is_ellipsis(node: ast.expr) -> bool:
    return isinstance(node, ast.Constant) and node.value is Ellipsis


def _shown(value: Any) -> str:
    """What was given, briefly: ``a string "abc"``, ``an array``."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"a boolean {json.dumps(value)}"
    if isinstance(value, int):
        text = str(value) if value.bit_length() < 200 else "(a very large one)"
        return f"an integer {text}"
    if isinstance(value, float):
        return f"a float {value!r}"
    if isinstance(value, str):
        return f"a string {json.dumps(value[:40])}{'...' if len(value) > 40 else ''}"
    return "an array" if isinstance(value, list) else "an object"
