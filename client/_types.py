"""Type expressions for the IR, and the compatibility check between a step output and an input."""

from __future__ import annotations

import ast
import collections.abc
import inspect
import types
import typing
from typing import Annotated, Any, Union, get_args, get_origin

_EMPTY = inspect.Parameter.empty


def strip_annotated(tp: Any) -> Any:
    """``Annotated[T, ...]`` → ``T``; anything else unchanged."""
    while get_origin(tp) is Annotated:
        tp = get_args(tp)[0]
    return tp


def is_any(tp: Any) -> bool:
    tp = strip_annotated(tp)
    return tp is _EMPTY or tp is Any or tp is object or isinstance(tp, typing.TypeVar)


def type_expr(tp: Any) -> str:
    """A readable, stable type expression: ``int``, ``list[int]``, ``pandas.DataFrame``.

    Always a valid Python expression (the control plane checks): what cannot be written as one
    becomes ``Any``.
    """
    expr = _type_expr(tp)
    try:
        ast.parse(expr, mode="eval")
    except SyntaxError:
        return "Any"
    return expr


def _type_expr(tp: Any) -> str:
    tp = strip_annotated(tp)
    if is_any(tp):
        return "Any"
    if tp is None or tp is type(None):
        return "None"
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        return " | ".join(type_expr(a) for a in get_args(tp))
    if origin is not None:
        args = get_args(tp)
        inner = ", ".join("..." if a is Ellipsis else type_expr(a) for a in args)
        return f"{_class_expr(origin)}[{inner}]" if args else _class_expr(origin)
    if isinstance(tp, type):
        return _class_expr(tp)
    return repr(tp)


def _class_expr(cls: Any) -> str:
    if not isinstance(cls, type):
        return repr(cls)
    qualname = cls.__qualname__.replace("<locals>", "_locals_")
    if cls.__module__ == "builtins":
        return qualname
    return f"{cls.__module__}.{qualname}"


_NUMERIC_WIDENING = {(int, float), (int, complex), (float, complex)}


def is_compatible(provided: Any, expected: Any) -> bool:
    """Whether a value declared as ``provided`` may be passed where ``expected`` is declared.

    Unannotated or ``Any`` on either side is compatible. Unions: every member of ``provided``
    must fit some member of ``expected``. Classes: subclass, plus int → float → complex.
    Generic arguments are compared when both sides give the same number of them.
    """
    provided, expected = strip_annotated(provided), strip_annotated(expected)
    if is_any(provided) or is_any(expected):
        return True
    if get_origin(provided) in (Union, types.UnionType):
        return all(is_compatible(p, expected) for p in get_args(provided))
    if get_origin(expected) in (Union, types.UnionType):
        return any(is_compatible(provided, e) for e in get_args(expected))
    if provided is None:
        provided = type(None)
    if expected is None:
        expected = type(None)
    p_origin = get_origin(provided) or provided
    e_origin = get_origin(expected) or expected
    if not (isinstance(p_origin, type) and isinstance(e_origin, type)):
        return True  # a typing construct we do not model: do not refuse the pipeline
    if (p_origin, e_origin) in _NUMERIC_WIDENING:
        return True
    try:
        if not issubclass(p_origin, e_origin):
            return False
    except TypeError:
        return True
    p_args, e_args = get_args(provided), get_args(expected)
    if p_args and e_args and len(p_args) == len(e_args):
        return all(
            p is Ellipsis or e is Ellipsis or is_compatible(p, e)
            for p, e in zip(p_args, e_args, strict=True)
        )
    return True


def element_type(tp: Any) -> Any:
    """The item type of ``list[T]``/``Sequence[T]``/``set[T]``, or the value type of a mapping."""
    tp = strip_annotated(tp)
    origin, args = get_origin(tp), get_args(tp)
    if origin is None or not args or not isinstance(origin, type):
        return Any
    if issubclass(origin, collections.abc.Mapping) and len(args) == 2:
        return args[1]
    if origin is tuple:
        return args[0] if len(args) == 2 and args[1] is Ellipsis else Any
    if issubclass(origin, collections.abc.Iterable) and len(args) == 1:
        return args[0]
    return Any
