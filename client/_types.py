"""Type expressions for the IR, and the compatibility check between a step output and an input."""

from __future__ import annotations

import ast
import collections.abc
import functools
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


_SEQUENCES = {"list", "Sequence", "MutableSequence", "Iterable", "Collection"}
_MAPPINGS = {"dict", "Mapping", "MutableMapping"}


def conform(value: Any, expr: str) -> Any:
    """``value`` with numpy scalars where ``expr`` declares ``int``, ``float`` or ``bool``
    turned into those Python types, when that is exact; anything else unchanged.

    ``arr.mean()`` is a ``numpy.float64`` and ``arr.sum()`` of ints a ``numpy.int64``: a step
    declared ``-> float`` or ``-> int`` that returns one stores the Python number, as declared.
    The items of tuples, lists and dicts are converted by their declared item types
    (``tuple[int, float]``, ``list[float]``, ``dict[str, int]``), rebuilt only when one
    changes. A conversion that would lose something (a ``numpy.longdouble`` that no float
    holds) is not made.

    Args:
        value: a step's output.
        expr: its declared type, as the IR writes it (:func:`type_expr`).
    """
    node = _parsed(expr)
    return value if node is None else _conform(value, node)


@functools.lru_cache(maxsize=1024)
def _parsed(expr: str) -> ast.expr | None:
    """``expr`` parsed, None when it is not an expression; cached, as a worker conforms every
    output of every step it runs (`_conform` only reads the tree)."""
    try:
        return ast.parse(expr, mode="eval").body
    except SyntaxError:
        return None


def _members(node: ast.expr) -> list[ast.expr]:
    """The members of a union ``a | b | c``, or the node alone."""
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr):
        return _members(node.left) + _members(node.right)
    return [node]


def _base(node: ast.expr) -> tuple[str, list[ast.expr]]:
    """``collections.abc.Sequence[int]`` → ``("Sequence", [int])``; ``int`` → ``("int", [])``."""
    args: list[ast.expr] = []
    if isinstance(node, ast.Subscript):
        inner = node.slice
        args = list(inner.elts) if isinstance(inner, ast.Tuple) else [inner]
        node = node.value
    if isinstance(node, ast.Name):
        return node.id, args
    if isinstance(node, ast.Attribute):
        return node.attr, args
    return "", args


def _conform(value: Any, node: ast.expr) -> Any:
    t = type(value)
    numpy = t.__module__ == "numpy"
    if not numpy and t is not tuple and t is not list and t is not dict:
        return value  # nothing to convert, whatever the declaration (most outputs)
    members = [_base(m) for m in _members(node)]
    names = {name for name, _ in members}
    if numpy:
        return _from_numpy(value, names)
    if t is tuple:
        for name, args in members:
            if name == "tuple" and len(args) == 2 and _is_ellipsis(args[1]):
                return _rebuilt(value, [_conform(v, args[0]) for v in value])
            if name == "tuple" and len(args) == len(value):
                return _rebuilt(value, [_conform(v, a) for v, a in zip(value, args, strict=True)])
            if name in _SEQUENCES - {"list"} and len(args) == 1:
                return _rebuilt(value, [_conform(v, args[0]) for v in value])
    elif t is list:
        for name, args in members:
            if name in _SEQUENCES and len(args) == 1:
                return _rebuilt(value, [_conform(v, args[0]) for v in value])
    elif t is dict:
        for name, args in members:
            if name in _MAPPINGS and len(args) == 2:
                pairs = [(_conform(k, args[0]), _conform(v, args[1])) for k, v in value.items()]
                same = zip(pairs, value.items(), strict=True)
                if all(a is k and b is v for (a, b), (k, v) in same):
                    return value
                return dict(pairs)
    return value


def _is_ellipsis(node: ast.expr) -> bool:
    return isinstance(node, ast.Constant) and node.value is Ellipsis


def _rebuilt(value: Any, items: list[Any]) -> Any:
    """``value`` (a tuple or a list) itself when no item changed, else a new one of its type."""
    if all(a is b for a, b in zip(items, value, strict=True)):
        return value
    return type(value)(items)


def _from_numpy(value: Any, declared: set[str]) -> Any:
    import numpy as np

    if isinstance(value, np.bool_) and "bool" in declared:
        return bool(value)
    if isinstance(value, np.integer) and declared & {"int", "float"}:
        return int(value)  # exact at any size; an int is a float as declarations go
    if isinstance(value, np.floating) and "float" in declared:
        as_float = float(value)
        if value.dtype.itemsize <= 8 or as_float == value or (np.isnan(value)):
            return as_float
    return value
