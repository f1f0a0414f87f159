"""``@plait.pipeline``: tracing a function of steps into a graph, and compiling it to the IR."""

from __future__ import annotations

import contextvars
import functools
import inspect
import json
import math
import operator
import sys
import typing
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, NoReturn, ParamSpec, get_origin, overload

from plait._archive import code_file, pipeline_root, relative_file
from plait._environment import Environment, Resources
from plait._step import (
    DEFAULT_RETRY_BACKOFF,
    DEFAULT_RETRY_JITTER,
    Hook,
    Step,
    check_hook,
    code_digest,
)
from plait._types import element_type, is_any, is_compatible, strip_annotated, type_expr
from plait.errors import ParameterError, PipelineDefinitionError, PipelineValidationError
from plait.ir.canonical import canonical_json, message_digest
from plait.ir.v1 import ir_pb2

if TYPE_CHECKING:
    import networkx as nx

    from plait._client import Client
    from plait._models import Run

P = ParamSpec("P")

_tracer: contextvars.ContextVar[Tracer | None] = contextvars.ContextVar(
    "plait_tracer", default=None
)


def current_tracer() -> Tracer | None:
    return _tracer.get()


def _misuse(what: str) -> NoReturn:
    raise PipelineValidationError(
        f"{what} is a placeholder while the pipeline is traced: it has no value yet. "
        f"Pass it to a step (step outputs can only be consumed by steps)"
    )


class _Placeholder:
    """Base of trace-time placeholders: any attempt to use one as a value is an error."""

    __slots__ = ()

    def _describe(self) -> str:
        raise NotImplementedError

    def __bool__(self) -> bool:
        _misuse(self._describe())

    def __iter__(self) -> Iterator[Any]:
        # `a, b = step()`: a step declared `-> tuple[int, int]` has ONE output, a tuple
        declared = strip_annotated(getattr(self, "annotation", None))
        if isinstance(self, OutputRef) and tuple in (declared, typing.get_origin(declared)):
            raise PipelineValidationError(
                f"{self._describe()} is one value, declared {type_expr(self.annotation)}: a "
                f"plain tuple is one output, and cannot be unpacked while the pipeline is "
                f'traced. To unpack it, name each item with Annotated[T, "name"]: '
                f'-> tuple[Annotated[int, "a"], Annotated[int, "b"]] declares the outputs a '
                f"and b, and then `a, b = {self.step_id}(...)` works; or pass the tuple whole "
                f"to the next step"
            )
        _misuse(self._describe())

    def __len__(self) -> int:
        _misuse(self._describe())

    def __str__(self) -> str:
        _misuse(self._describe())

    def __format__(self, spec: str) -> str:
        _misuse(self._describe())

    def __index__(self) -> int:
        _misuse(self._describe())

    def __int__(self) -> int:
        _misuse(self._describe())

    def __float__(self) -> float:
        _misuse(self._describe())

    def __getitem__(self, key: Any) -> Any:
        _misuse(self._describe())

    def __contains__(self, item: Any) -> bool:
        _misuse(self._describe())

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        _misuse(self._describe())


def _binary(name: str) -> Callable[..., Any]:
    def op(self: _Placeholder, *other: Any) -> Any:
        _misuse(self._describe())

    op.__name__ = name
    return op


for _op in (
    "add",
    "sub",
    "mul",
    "truediv",
    "floordiv",
    "mod",
    "pow",
    "and",
    "or",
    "xor",
    "lt",
    "le",
    "gt",
    "ge",
    "neg",
    "pos",
    "abs",
    "matmul",
    "lshift",
    "rshift",
):
    setattr(_Placeholder, f"__{_op}__", _binary(f"__{_op}__"))
    if _op not in ("lt", "le", "gt", "ge", "neg", "pos", "abs"):
        setattr(_Placeholder, f"__r{_op}__", _binary(f"__r{_op}__"))


class OutputRef(_Placeholder):
    """One output of one step invocation, while a pipeline is traced."""

    __slots__ = ("annotation", "output", "step_id", "tracer")

    def __init__(self, tracer: Tracer, step_id: str, output: str, annotation: Any) -> None:
        object.__setattr__(self, "tracer", tracer)
        object.__setattr__(self, "step_id", step_id)
        object.__setattr__(self, "output", output)
        object.__setattr__(self, "annotation", annotation)

    def _describe(self) -> str:
        return f"output {self.output!r} of step {self.step_id!r}"

    def __getattr__(self, name: str) -> Any:
        _misuse(f"{self._describe()} (asked for attribute {name!r})")

    def __repr__(self) -> str:
        return f"<step output {self.step_id}.{self.output}>"


NO_VALUE: Any = type("NoValue", (), {"__repr__": lambda self: "<no value>"})()
"""The value of a parameter that has none while the pipeline is traced (required, not given)."""


class ParamRef(_Placeholder):
    """A pipeline parameter, while a pipeline is traced.

    Passed to a step (alone, or in a list or dict) it is bound by name: a *run parameter*,
    whose value the version leaves open. Used as a value in Python (``range(n)``, ``if flag:``,
    ``n - 1``, ``f"{n}"``, ``n == 3``, ``len(items)``, ``for x in items``, ``cfg["key"]``,
    ``name.upper()``…) it gives its call-time value and the tracer records it as *structural*:
    the graph depends on its value, which becomes part of the version.
    """

    __slots__ = ("annotation", "name", "tracer", "value")

    def __init__(self, tracer: Tracer, name: str, annotation: Any, value: Any = NO_VALUE) -> None:
        object.__setattr__(self, "tracer", tracer)
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "annotation", annotation)
        object.__setattr__(self, "value", value)

    def _describe(self) -> str:
        return f"pipeline parameter {self.name!r}"

    def _use(self) -> Any:
        """The value, recording the parameter as structural."""
        return self.tracer.use_value(self)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):  # protocols (copy, pickle, numpy…) are not asked of a value
            raise AttributeError(name)
        return getattr(self._use(), name)

    def __bool__(self) -> bool:
        return bool(self._use())

    def __iter__(self) -> Iterator[Any]:
        return iter(self._use())

    def __reversed__(self) -> Iterator[Any]:
        value: Any = self._use()
        return iter(reversed(value))

    def __len__(self) -> int:
        return len(self._use())

    def __str__(self) -> str:
        return str(self._use())

    def __format__(self, spec: str) -> str:
        return format(self._use(), spec)

    def __index__(self) -> int:
        return operator.index(self._use())

    def __int__(self) -> int:
        return int(self._use())

    def __float__(self) -> float:
        return float(self._use())

    def __complex__(self) -> complex:
        return complex(self._use())

    def __round__(self, ndigits: int | None = None) -> Any:
        return round(self._use(), ndigits)

    def __trunc__(self) -> Any:
        return math.trunc(self._use())

    def __floor__(self) -> Any:
        return math.floor(self._use())

    def __ceil__(self) -> Any:
        return math.ceil(self._use())

    def __hash__(self) -> int:
        return hash(self._use())

    def __getitem__(self, key: Any) -> Any:
        return self._use()[_plain(key)]

    def __contains__(self, item: Any) -> bool:
        return _plain(item) in self._use()

    def __repr__(self) -> str:
        return f"<pipeline parameter {self.name}>"


def _plain(value: Any) -> Any:
    """A parameter's value (recording it as structural); anything else unchanged."""
    return value._use() if isinstance(value, ParamRef) else value


def _forward(fn: Callable[..., Any], reflected: bool = False) -> Callable[..., Any]:
    def op(self: ParamRef, *other: Any) -> Any:
        args = [_plain(o) for o in other]
        return fn(*args, self._use()) if reflected else fn(self._use(), *args)

    return op


for _op in (
    "add",
    "sub",
    "mul",
    "truediv",
    "floordiv",
    "mod",
    "pow",
    "and",
    "or",
    "xor",
    "matmul",
    "lshift",
    "rshift",
):
    _fn = getattr(operator, f"{_op}_" if _op in ("and", "or") else _op)
    setattr(ParamRef, f"__{_op}__", _forward(_fn))
    setattr(ParamRef, f"__r{_op}__", _forward(_fn, reflected=True))
for _name, _fn, _reflected in (
    ("divmod", divmod, False),
    ("rdivmod", divmod, True),
    *((op, getattr(operator, op), False) for op in ("lt", "le", "gt", "ge", "eq", "ne")),
    *((op, getattr(operator, op), False) for op in ("neg", "pos", "abs", "invert")),
):
    setattr(ParamRef, f"__{_name}__", _forward(_fn, _reflected))


class StepOutputs(tuple[OutputRef, ...]):
    """The outputs of a step with several named outputs: unpack it, or index it by name."""

    step_id: str

    def __new__(cls, step_id: str, refs: tuple[OutputRef, ...]) -> StepOutputs:
        self = super().__new__(cls, refs)
        self.step_id = step_id
        return self

    def _by_name(self, name: str) -> OutputRef:
        for ref in self:
            if ref.output == name:
                return ref
        raise PipelineValidationError(
            f"step {self.step_id!r} has no output {name!r}; its outputs are: "
            f"{', '.join(r.output for r in self)}"
        )

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, str):
            return self._by_name(key)
        return super().__getitem__(key)

    def __getattr__(self, name: str) -> OutputRef:
        if name.startswith("__"):
            raise AttributeError(name)
        return self._by_name(name)


@dataclass
class Invocation:
    """One step invocation recorded by the tracer."""

    id: str
    step: Step[..., Any]
    bindings: dict[str, ir_pb2.Binding]
    annotations: dict[str, Any]
    upstream: list[str] = field(default_factory=list)
    mapped: str = ""
    """The input a ``step.map`` invocation maps over; empty for a plain call."""


class Tracer:
    """Records step invocations while a pipeline function runs."""

    def __init__(self, pipeline: str) -> None:
        self.pipeline = pipeline
        self.invocations: dict[str, Invocation] = {}
        self.structural: dict[str, str] = {}
        """The parameters the function used as values, with those values (canonical JSON)."""
        self.itemized: set[tuple[str, str]] = set()
        """The outputs (step id, output) of plain steps that a map iterates: stored with their
        items."""
        self._counts: dict[str, int] = {}

    def use_value(self, ref: ParamRef) -> Any:
        """The value of a parameter the function uses in Python, which makes it structural."""
        if ref.tracer is not self:
            raise PipelineValidationError(f"{ref!r} belongs to another pipeline")
        if ref.value is NO_VALUE:
            raise ParameterError(
                f"pipeline {self.pipeline!r} uses parameter {ref.name!r} as a value (in Python "
                f"control flow, arithmetic, formatting or iteration), so its value shapes the "
                f"graph and is needed to compile it; give one (call the pipeline with "
                f"{ref.name}=..., or `-p {ref.name}=VALUE` on the command line), or pass "
                f"{ref.name!r} only to steps"
            )
        if ref.name not in self.structural:
            self.structural[ref.name] = canonical_json(ref.value)
        return ref.value

    def _new_id(self, step: Step[..., Any], explicit: str | None) -> str:
        if explicit is not None:
            if not explicit or not isinstance(explicit, str):
                raise PipelineValidationError(f"step {step.name!r}: id must be a non-empty string")
            if explicit in self.invocations:
                raise PipelineValidationError(
                    f"step id {explicit!r} is used twice in pipeline {self.pipeline!r}"
                )
            return explicit
        n = self._counts.get(step.name, 0)
        while True:
            n += 1
            candidate = step.name if n == 1 else f"{step.name}_{n}"
            if candidate not in self.invocations:
                self._counts[step.name] = n
                return candidate

    def invoke(
        self,
        step: Step[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        mapped: str = "",
    ) -> Any:
        """Records an invocation of ``step`` and returns its outputs' placeholders; with
        ``mapped``, a map over that input (``kwargs`` has its list): each output is a list."""
        explicit = step.invocation_id
        if "id" in kwargs and "id" not in step.signature.parameters:
            explicit = kwargs.pop("id")
        step_id = self._new_id(step, explicit)
        try:
            bound = step.signature.bind(*args, **kwargs)
        except TypeError as exc:
            raise PipelineValidationError(_bind_message(step_id, step, args, kwargs, exc)) from None
        bound.apply_defaults()
        inv = Invocation(step_id, step, {}, {}, mapped=mapped)
        for name, value in bound.arguments.items():
            expected = step.hints.get(name, inspect.Parameter.empty)
            if name == mapped:
                inv.bindings[name] = self._mapped_binding(step_id, name, value, expected, inv)
            else:
                inv.bindings[name] = self._binding(step_id, name, value, expected, inv)
            inv.annotations[name] = expected
        self.invocations[step_id] = inv
        refs = tuple(
            OutputRef(
                self,
                step_id,
                o.name,
                list[strip_annotated(o.annotation)] if mapped else o.annotation,  # type: ignore[misc]
            )
            for o in step.outputs
        )
        if not refs:
            return None
        if len(refs) == 1 and len(step.outputs) == 1 and step.outputs[0].name == "output":
            return refs[0]
        if len(refs) == 1:
            return refs[0]
        return StepOutputs(step_id, refs)

    def _mapped_binding(
        self, step_id: str, name: str, items: Any, expected: Any, inv: Invocation
    ) -> ir_pb2.Binding:
        """The binding of the input a map goes over: a list that an upstream step returns (a
        mapped step's results included), a list parameter, or a list of values and outputs."""
        where = f"step {step_id!r} maps over input {name!r}"
        if isinstance(items, OutputRef | ParamRef):
            if items.tracer is not self:
                raise PipelineValidationError(f"{where}: {items!r} belongs to another pipeline")
            declared = strip_annotated(items.annotation)
            origin = get_origin(declared) or declared
            if (
                not is_any(declared)
                and isinstance(origin, type)
                and (issubclass(origin, str | bytes | dict) or not issubclass(origin, list | tuple))
            ):
                raise PipelineValidationError(
                    f"{where}: {items._describe()} is {type_expr(declared)}; a map goes over a "
                    f"list (declare it list[...])"
                )
            item = element_type(declared)
            if not is_compatible(item, expected):
                raise PipelineValidationError(
                    f"{where}: its items are {type_expr(item)}, but the input expects "
                    f"{type_expr(expected)}"
                )
            if isinstance(items, ParamRef):
                return ir_pb2.Binding(parameter=items.name)
            if not self.invocations[items.step_id].mapped:
                self.itemized.add((items.step_id, items.output))
            if items.step_id not in inv.upstream:
                inv.upstream.append(items.step_id)
            return ir_pb2.Binding(
                output=ir_pb2.OutputRef(step_id=items.step_id, output=items.output)
            )
        if isinstance(items, StepOutputs) or not isinstance(items, list | tuple):
            what = "several outputs" if isinstance(items, StepOutputs) else type(items).__name__
            raise PipelineValidationError(
                f"{where}: got {what}; a map goes over a list (a step's list output, a list "
                f"parameter, or a list of values and step outputs)"
            )
        return self._binding(step_id, name, list(items), list[expected], inv)

    def _binding(
        self, step_id: str, name: str, value: Any, expected: Any, inv: Invocation
    ) -> ir_pb2.Binding:
        where = f"step {step_id!r}, input {name!r}"
        if isinstance(value, StepOutputs):
            raise PipelineValidationError(
                f"{where}: got all outputs of step {value.step_id!r} "
                f"({', '.join(r.output for r in value)}); pass one of them"
            )
        if isinstance(value, OutputRef):
            if value.tracer is not self:
                raise PipelineValidationError(f"{where}: {value!r} belongs to another pipeline")
            if not is_compatible(value.annotation, expected):
                raise PipelineValidationError(
                    f"{where}: expects {type_expr(expected)}, but output {value.output!r} of "
                    f"step {value.step_id!r} is {type_expr(value.annotation)}"
                )
            if value.step_id not in inv.upstream:
                inv.upstream.append(value.step_id)
            return ir_pb2.Binding(
                output=ir_pb2.OutputRef(step_id=value.step_id, output=value.output)
            )
        if isinstance(value, ParamRef):
            if value.tracer is not self:
                raise PipelineValidationError(f"{where}: {value!r} belongs to another pipeline")
            if not is_compatible(value.annotation, expected):
                raise PipelineValidationError(
                    f"{where}: expects {type_expr(expected)}, but pipeline parameter "
                    f"{value.name!r} is {type_expr(value.annotation)}"
                )
            return ir_pb2.Binding(parameter=value.name)
        if _contains_placeholder(value):
            item = element_type(expected)
            if isinstance(value, list | tuple):
                items = [
                    self._binding(step_id, f"{name}[{i}]", v, item, inv)
                    for i, v in enumerate(value)
                ]
                return ir_pb2.Binding(list=ir_pb2.BindingList(items=items))
            if isinstance(value, dict):
                if not all(isinstance(k, str) for k in value):
                    raise PipelineValidationError(f"{where}: a dict of step outputs needs str keys")
                entries = [
                    ir_pb2.BindingMapEntry(
                        key=k, value=self._binding(step_id, f"{name}[{k!r}]", value[k], item, inv)
                    )
                    for k in sorted(value)
                ]
                return ir_pb2.Binding(map=ir_pb2.BindingMap(entries=entries))
            raise PipelineValidationError(
                f"{where}: step outputs may be passed alone or in a list, tuple or dict, "
                f"not inside a {type(value).__name__}"
            )
        return ir_pb2.Binding(literal=ir_pb2.Literal(json=_literal_json(where, value)))


def _contains_placeholder(value: Any) -> bool:
    if isinstance(value, _Placeholder):
        return True
    if isinstance(value, list | tuple):
        return any(_contains_placeholder(v) for v in value)
    if isinstance(value, dict):
        return any(_contains_placeholder(v) for v in value.values())
    return False


def _literal_json(where: str, value: Any) -> str:
    try:
        return canonical_json(value)
    except (TypeError, ValueError):
        raise PipelineValidationError(
            f"{where}: {type(value).__name__} value {value!r:.60} is not a JSON literal. "
            f"Constants in a pipeline must be JSON (str, int, float, bool, None, list, dict); "
            f"produce other values in a step"
        ) from None


def _bind_message(
    step_id: str,
    step: Step[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    exc: TypeError,
) -> str:
    params = list(step.signature.parameters)
    text = str(exc)
    missing = [
        p
        for p in params[len(args) :]
        if p not in kwargs and step.signature.parameters[p].default is inspect.Parameter.empty
    ]
    if "missing" in text and missing:
        return f"step {step_id!r}: missing input {missing[0]!r} (inputs: {', '.join(params)})"
    extra = [k for k in kwargs if k not in params]
    if extra:
        return (
            f"step {step_id!r}: unexpected input {extra[0]!r} "
            f"(inputs: {', '.join(params) or 'none'})"
        )
    if len(args) > len(params):
        return (
            f"step {step_id!r}: takes {len(params)} input(s) "
            f"({', '.join(params) or 'none'}), got {len(args)} positional"
        )
    return f"step {step_id!r}: {text}"


@dataclass(frozen=True)
class CompiledPipeline:
    """A traced and compiled pipeline."""

    spec: ir_pb2.PipelineSpec
    """The IR."""
    version: str
    """sha256 of the canonical IR."""
    structural: Mapping[str, str] = field(default_factory=dict)
    """The structural parameters (used as values by the pipeline function while it was
    traced) and the values this version was compiled with, as canonical JSON. The same values
    are in the IR (``ParameterSpec.structural_value``)."""

    @functools.cached_property
    def graph(self) -> nx.DiGraph:
        """The steps as a networkx graph: a node per step (attribute ``spec``, its IR), an edge
        from each step to each step reading its outputs. Drawn on first use (running a
        pipeline needs none, and does not import networkx)."""
        from plait.ir.steps import step_graph

        return step_graph(self.spec)


_KEPT_COMPILATIONS = 16
"""How many compilations (one per set of structural values) a pipeline keeps."""


class Pipeline(Generic[P]):
    """A pipeline: call it to run it (embedded engine or ``PLAIT_SERVER``) and get a Run."""

    def __init__(
        self,
        fn: Callable[P, Any],
        *,
        name: str | None = None,
        pool: str = "",
        max_concurrency: int | None = None,
        fail_fast: bool = False,
        environment: Environment | None = None,
        on_success: Hook | None = None,
        on_failure: Hook | None = None,
    ) -> None:
        functools.update_wrapper(self, fn)
        self.fn = fn
        self.name = name or fn.__name__
        self.pool = pool
        """The remote worker pool of the steps that name none."""
        if environment is not None and not isinstance(environment, Environment):
            raise PipelineDefinitionError(
                f"pipeline {self.name!r}: environment must be a plait.Environment or None, "
                f"not {environment!r}"
            )
        self.environment = environment
        """The environment of the steps that name none."""
        if max_concurrency is not None and (
            isinstance(max_concurrency, bool)
            or not isinstance(max_concurrency, int)
            or max_concurrency < 1
        ):
            raise PipelineDefinitionError(
                f"pipeline {self.name!r}: max_concurrency must be an integer >= 1 or None, "
                f"not {max_concurrency!r}"
            )
        self.max_concurrency = max_concurrency
        """The most steps of one run queued or running at once; None: no limit."""
        self.fail_fast = fail_fast
        """Whether a run cancels its other steps at the first step that fails for good."""
        check_hook("on_success", on_success)
        check_hook("on_failure", on_failure)
        self.on_success = on_success
        """The ``on_success`` hook of the steps that name none."""
        self.on_failure = on_failure
        """The ``on_failure`` hook of the steps that name none."""
        self.signature = inspect.signature(fn)
        self.hints = typing.get_type_hints(fn, include_extras=True)
        for p in self.signature.parameters.values():
            if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD, p.POSITIONAL_ONLY):
                raise PipelineDefinitionError(
                    f"pipeline {self.name!r}: parameter {p.name!r} must be a named parameter"
                )
        self._compiled: list[CompiledPipeline] = []  # the newest last

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> Run:
        return self.run(self.bind(*args, **kwargs))

    def bind(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """Parameter values by name from a call's arguments (defaults are applied later)."""
        try:
            return dict(self.signature.bind_partial(*args, **kwargs).arguments)
        except TypeError as exc:
            raise PipelineValidationError(f"pipeline {self.name!r}: {exc}") from None

    def run(
        self,
        parameters: Mapping[str, Any] | None = None,
        *,
        no_cache: bool = False,
        client: Client | None = None,
        wait: bool = True,
        refresh: Sequence[str] = (),
    ) -> Run:
        """Runs the pipeline and, with ``wait``, blocks until the run ends.

        Args:
            parameters: parameter values by name; missing ones take their defaults. They are
                checked against the annotations (``1`` for a ``float`` is ``1.0``) before
                anything runs; the structural ones choose the version (:meth:`compile`).
            no_cache: run every step, ignoring the cache.
            client: the client to use; :func:`plait.Client.default` when None.
            wait: wait for the run to end (True) or return as soon as it is accepted.
            refresh: step ids to run even when cached (``leaf`` also names ``leaf[i]``); what
                they feed runs again only when their new outputs differ (docs/cache.md).
        """
        if client is None:
            from plait._embedded import expect_runs

            expect_runs()  # a worker for an embedded engine starts now, before the imports
        from plait._client import Client

        if client is None:
            client = Client.default()
        return client.run_pipeline(
            self, dict(parameters or {}), no_cache=no_cache, wait=wait, refresh=refresh
        )

    def compile(self, parameters: Mapping[str, Any] | None = None) -> CompiledPipeline:
        """Traces the pipeline function with these parameter values and compiles it.

        A parameter the function uses as a value (``range(n)``, ``if flag:``, ``n - 1``,
        ``f"{n}"``…) is structural: the graph is compiled for its value, given here or its
        default, and the value is part of the version. A parameter only passed to steps is a
        run parameter: its value does not matter here. The result is kept, and reused by a
        later call whose structural values are the same.

        Args:
            parameters: parameter values by name (missing ones take their defaults); checked
                against the annotations as :meth:`check_parameters` does.

        Raises:
            ParameterError: a value does not fit its parameter's type, or a structural
                parameter has neither a value nor a default.
        """
        values = self.trace_values(self.check_parameters(parameters or {}))
        for compiled in reversed(self._compiled):
            if all(
                name in values and canonical_json(values[name]) == value
                for name, value in compiled.structural.items()
            ):
                return compiled
        compiled = compile_pipeline(self, values)
        self._compiled = [*self._compiled[-_KEPT_COMPILATIONS + 1 :], compiled]
        return compiled

    def parameter_type(self, name: str) -> str:
        """The type expression of parameter ``name``, as the IR declares it."""
        param = self.signature.parameters[name]
        return type_expr(self.hints.get(name, param.annotation))

    def check_parameters(self, parameters: Mapping[str, Any]) -> dict[str, Any]:
        """Parameter values checked against the annotations and converted as a run takes them.

        The rules are the engine's (:func:`plait.engine._ir.coerce_parameter`): an ``int``
        takes an integer, not ``"3"`` or ``3.5``; a ``float`` takes any number and makes it a
        float (``1`` is ``1.0``: one version, one cache key); ``list[...]`` and
        ``dict[...]`` check their items; values must be JSON.

        Raises:
            ParameterError: an unknown parameter, a value that is not JSON, or one that does
                not fit its type (the message names the parameter, the type and the value).
        """
        from plait.engine._ir import coerce_parameter

        out: dict[str, Any] = {}
        for name, value in parameters.items():
            if name not in self.signature.parameters:
                raise ParameterError(
                    f"pipeline {self.name!r} has no parameter {name!r}; its parameters are: "
                    f"{', '.join(self.signature.parameters) or 'none'}"
                )
            try:
                value = json.loads(canonical_json(value))
            except (TypeError, ValueError):
                raise ParameterError(
                    f"parameter {name!r}: {type(value).__name__} value {value!r:.60} is not JSON"
                ) from None
            out[name] = coerce_parameter(name, self.parameter_type(name), value)
        return out

    def trace_values(self, given: Mapping[str, Any]) -> dict[str, Any]:
        """The value each parameter has while the function is traced: the given one (checked),
        else its default (as a run gets it); a required parameter not given has none."""
        out = dict(given)
        for name in self.signature.parameters:
            if name not in out:
                default = self.default_json(name)
                if default is not None:
                    out[name] = json.loads(default)
        return out

    def default_json(self, name: str) -> str | None:
        """Parameter ``name``'s default as canonical JSON, converted to its type as a given
        value is (a ``float`` default ``1`` is ``1.0``); None when it has none.

        Raises:
            PipelineDefinitionError: the default is not finite.
            PipelineValidationError: the default is not a JSON value.
        """
        from plait.engine._ir import coerce_parameter

        default = self.signature.parameters[name].default
        if default is inspect.Parameter.empty:
            return None
        if isinstance(default, float) and not math.isfinite(default):
            raise PipelineDefinitionError(
                f"pipeline {self.name!r}: default of {name!r} is not finite"
            )
        text = _literal_json(f"pipeline {self.name!r}, parameter {name!r} default", default)
        try:
            return canonical_json(
                coerce_parameter(name, self.parameter_type(name), json.loads(text))
            )
        except ParameterError:  # ``x: int = None``: Python allows it, a run takes it as it is
            return text

    def __repr__(self) -> str:
        return f"<plait.pipeline {self.name}>"


@overload
def pipeline(fn: Callable[P, Any], /) -> Pipeline[P]: ...


@overload
def pipeline(
    *,
    name: str | None = None,
    pool: str = "",
    max_concurrency: int | None = None,
    fail_fast: bool = False,
    environment: Environment | None = None,
    on_success: Hook | None = None,
    on_failure: Hook | None = None,
) -> Callable[[Callable[P, Any]], Pipeline[P]]: ...


def pipeline(
    fn: Callable[P, Any] | None = None,
    /,
    *,
    name: str | None = None,
    pool: str = "",
    max_concurrency: int | None = None,
    fail_fast: bool = False,
    environment: Environment | None = None,
    on_success: Hook | None = None,
    on_failure: Hook | None = None,
) -> Pipeline[P] | Callable[[Callable[P, Any]], Pipeline[P]]:
    """Declares a pipeline: a function that calls steps. Calling it runs it and returns a Run.

    The function's parameters are the pipeline's parameters; their values and defaults must
    be JSON and are checked against their annotations before anything runs. A parameter only
    passed to steps is a *run parameter*: one version of the pipeline for all its values. A
    parameter the function uses as a value (``range(n)``, ``if flag:``, ``n - 1``,
    ``f"{n}"``, ``len(items)``) has its call-time value there and is *structural*: the graph
    depends on it, so its value is part of the version (see ``docs/parameters.md``).

    Args:
        name: the pipeline's name; the function's name by default.
        pool: the remote worker pool (``plait worker --pool NAME``) of every step that names
            none itself.
        max_concurrency: the most steps of one run that may be queued or running at once;
            a ready step past it waits (first come, first served) until one ends. None (the
            default): no limit but the runners' and pools' own.
        fail_fast: at the first step that fails for good (its retries used up, or crashed
            past the crash budget), cancel the run's other steps, stopping those running,
            and end the run FAILED. False (the default): independent branches keep going and
            only the failed step's downstream is skipped.
        environment: the :class:`plait.Environment` of every step that names none itself (a
            step's own environment wins; the two are not merged).
        on_success: the ``on_success`` hook (see :func:`plait.step`) of every step that
            names none itself; a step's own wins.
        on_failure: the ``on_failure`` hook of every step that names none itself; a step's
            own wins. See ``docs/hooks.md``.
    """

    def wrap(f: Callable[P, Any]) -> Pipeline[P]:
        return Pipeline(
            f,
            name=name,
            pool=pool,
            max_concurrency=max_concurrency,
            fail_fast=fail_fast,
            environment=environment,
            on_success=on_success,
            on_failure=on_failure,
        )

    return wrap(fn) if fn is not None else wrap


def trace(pipe: Pipeline[Any], values: Mapping[str, Any] | None = None) -> Tracer:
    """Runs the pipeline function with placeholders and records its step invocations.

    ``values`` are the parameters' values (:meth:`Pipeline.trace_values`): a parameter the
    function uses as a value gets its own and is recorded as structural
    (:attr:`Tracer.structural`).
    """
    tracer = Tracer(pipe.name)
    values = {} if values is None else values
    params = {
        name: ParamRef(
            tracer, name, pipe.hints.get(name, inspect.Parameter.empty), values.get(name, NO_VALUE)
        )
        for name in pipe.signature.parameters
    }
    token = _tracer.set(tracer)
    try:
        pipe.fn(**params)
    finally:
        _tracer.reset(token)
    if not tracer.invocations:
        raise PipelineValidationError(f"pipeline {pipe.name!r} calls no step")
    return tracer


def _code_ref(step: Step[..., Any], root: Path | None) -> ir_pb2.CodeRef:
    """The step's code reference; its file relative to the pipeline's source root ``root``
    (no absolute path enters the IR: the same code in two folders is the same version)."""
    fn = step.fn
    qualname = fn.__qualname__
    if "<locals>" in qualname:
        raise PipelineDefinitionError(
            f"step {step.name!r} is defined inside a function ({qualname}); define steps at "
            f"module level so that worker processes can import them"
        )
    file = code_file(fn)
    if fn.__module__ == "__main__" and file is None:
        raise PipelineDefinitionError(
            f"step {step.name!r} is defined in an interactive session; define steps in a "
            f"module or a script file so that worker processes can import them"
        )
    rel = relative_file(file, root) if file is not None and root is not None else ""
    if fn.__module__ == "__main__" and not rel:
        raise PipelineDefinitionError(
            f"step {step.name!r} is defined in the script {file}, outside the pipeline's source "
            f"root {root}, so workers cannot load it; define the pipeline in that script too, "
            f"or set PLAIT_SOURCE_ROOT to a folder that holds both"
        )
    return ir_pb2.CodeRef(
        module=fn.__module__,
        qualname=qualname,
        file=rel,
        code_digest=step.code_digest,
        is_async=step.is_async,
    )


def _hook_ref(step: Step[..., Any], what: str, hook: Hook, root: Path | None) -> ir_pb2.CodeRef:
    """A hook's code reference, found by a worker as a step's code is (module and qualname,
    the file relative to the source root for a script)."""
    check_hook(what, hook)
    module, qualname = hook.__module__, hook.__qualname__
    where = f"step {step.name!r}: {what} hook {module}.{qualname}"
    obj: Any = sys.modules.get(module)
    for part in qualname.split("."):
        obj = getattr(obj, part, None)
    if obj is not hook:
        raise PipelineDefinitionError(
            f"{where} cannot be found under that name in its module (was it replaced, or made "
            f"by a factory?); define the hook as a function at module level"
        )
    file = code_file(hook)
    if module == "__main__" and file is None:
        raise PipelineDefinitionError(
            f"{where} is defined in an interactive session; define it in a module or a script "
            f"file so that worker processes can import it"
        )
    rel = relative_file(file, root) if file is not None and root is not None else ""
    if module == "__main__" and not rel:
        raise PipelineDefinitionError(
            f"{where} is defined in the script {file}, outside the pipeline's source root "
            f"{root}, so workers cannot load it; define it beside the pipeline"
        )
    return ir_pb2.CodeRef(
        module=module,
        qualname=qualname,
        file=rel,
        code_digest=code_digest(hook),
        is_async=inspect.iscoroutinefunction(hook),
    )


def _settings(
    step: Step[..., Any],
    pool: str = "",
    environment: Environment | None = None,
    hooks: Mapping[str, Hook | None] | None = None,
    root: Path | None = None,
) -> ir_pb2.StepSettings:
    """A step's IR settings; ``pool``, ``environment`` and ``hooks`` (by name: on_success,
    on_failure) are its pipeline's, for a step that names none; ``root`` is the pipeline's
    source root, which a hook defined in a script is found under."""
    s = step.settings
    out = ir_pb2.StepSettings(
        cache_version=s.cache_version, retries=s.retries, runner=s.runner, pool=s.pool or pool
    )
    if not s.cache:
        out.cache = False
    if s.timeout is not None:
        out.timeout_seconds = float(s.timeout)
    env = s.environment if s.environment is not None else environment
    if env is not None:
        out.environment.CopyFrom(env.to_proto())
    # no resources, no field: a step that names none keeps its pipeline's version
    if s.resources is not None and s.resources != Resources():
        out.resources.CopyFrom(s.resources.to_proto())
    # a retry policy's defaults stay out of the IR: a pipeline that names none keeps its version
    if s.retry_delay:
        out.retry_delay_seconds = float(s.retry_delay)
    if s.retry_backoff != DEFAULT_RETRY_BACKOFF:
        out.retry_backoff = float(s.retry_backoff)
    if s.retry_max_delay is not None:
        out.retry_max_delay_seconds = float(s.retry_max_delay)
    if s.retry_jitter != DEFAULT_RETRY_JITTER:
        out.retry_jitter = float(s.retry_jitter)
    out.retry_on.extend(s.retry_on)
    out.no_retry_on.extend(s.no_retry_on)
    # no hook, no field: a pipeline without hooks keeps its version
    own = {"on_success": s.on_success, "on_failure": s.on_failure}
    for what, hook in own.items():
        hook = hook or (hooks or {}).get(what)
        if hook is not None:
            getattr(out, what).CopyFrom(_hook_ref(step, what, hook, root))
    return out


def compile_pipeline(
    pipe: Pipeline[Any], values: Mapping[str, Any] | None = None
) -> CompiledPipeline:
    """Traces ``pipe``, validates what it calls and compiles it into the IR (whose steps
    ``CompiledPipeline.graph`` draws as a networkx graph).

    ``values`` are the parameters' values while it is traced (:meth:`Pipeline.trace_values`;
    by default the defaults): those of the structural parameters go into the IR.
    """
    if values is None:
        values = pipe.trace_values({})
    tracer = trace(pipe, values)
    root = pipeline_root(pipe.fn)
    spec = ir_pb2.PipelineSpec(
        name=pipe.name, description=inspect.getdoc(pipe.fn) or "", fail_fast=pipe.fail_fast
    )
    if pipe.max_concurrency is not None:
        spec.max_concurrency = pipe.max_concurrency
    for name in pipe.signature.parameters:
        ps = spec.parameters.add(name=name, type=ir_pb2.TypeSpec(expr=pipe.parameter_type(name)))
        default = pipe.default_json(name)
        if default is not None:
            ps.default_value.json = default
        if name in tracer.structural:
            ps.structural_value.json = tracer.structural[name]
    # by function: the copies of one step (``with_options``, a loop of calls) share their code,
    # and finding its file and digest costs more than the rest of a step's compilation
    code_refs: dict[Callable[..., Any], ir_pb2.CodeRef] = {}
    for inv in tracer.invocations.values():
        code = code_refs.get(inv.step.fn)
        if code is None:
            code = code_refs[inv.step.fn] = _code_ref(inv.step, root)
        step_spec = spec.steps.add(
            id=inv.id,
            name=inv.step.name,
            code=code,
            settings=_settings(
                inv.step,
                pipe.pool,
                pipe.environment,
                {"on_success": pipe.on_success, "on_failure": pipe.on_failure},
                root,
            ),
        )
        for name, binding in inv.bindings.items():
            step_spec.inputs.add(
                name=name,
                type=ir_pb2.TypeSpec(expr=type_expr(inv.annotations[name])),
                binding=binding,
                mapped=name == inv.mapped,
            )
        for out in inv.step.outputs:
            step_spec.outputs.add(
                name=out.name,
                type=ir_pb2.TypeSpec(expr=type_expr(strip_annotated(out.annotation))),
                materializer=inv.step.settings.materializer_for(out.name),
                items=(inv.id, out.name) in tracer.itemized,
            )
    # a call reads only outputs of earlier calls: the steps are in a topological order
    return CompiledPipeline(
        spec=spec, version=message_digest(spec), structural=dict(tracer.structural)
    )
