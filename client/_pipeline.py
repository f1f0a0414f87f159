"""``@plait.pipeline``: tracing a function of steps into a graph, and compiling it to the IR."""

from __future__ import annotations

import contextvars
import functools
import inspect
import math
import typing
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, NoReturn, ParamSpec, overload

from plait._archive import code_file, pipeline_root, relative_file
from plait._environment import Environment, Resources
from plait._step import DEFAULT_RETRY_BACKOFF, DEFAULT_RETRY_JITTER, Step
from plait._types import element_type, is_compatible, strip_annotated, type_expr
from plait.errors import PipelineDefinitionError, PipelineValidationError
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


class ParamRef(_Placeholder):
    """A pipeline parameter, while a pipeline is traced."""

    __slots__ = ("annotation", "name", "tracer")

    def __init__(self, tracer: Tracer, name: str, annotation: Any) -> None:
        object.__setattr__(self, "tracer", tracer)
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "annotation", annotation)

    def _describe(self) -> str:
        return f"pipeline parameter {self.name!r}"

    def __getattr__(self, name: str) -> Any:
        _misuse(f"{self._describe()} (asked for attribute {name!r})")

    def __repr__(self) -> str:
        return f"<pipeline parameter {self.name}>"


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


class Tracer:
    """Records step invocations while a pipeline function runs."""

    def __init__(self, pipeline: str) -> None:
        self.pipeline = pipeline
        self.invocations: dict[str, Invocation] = {}
        self._counts: dict[str, int] = {}

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

    def invoke(self, step: Step[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        explicit = step.invocation_id
        if "id" in kwargs and "id" not in step.signature.parameters:
            explicit = kwargs.pop("id")
        step_id = self._new_id(step, explicit)
        try:
            bound = step.signature.bind(*args, **kwargs)
        except TypeError as exc:
            raise PipelineValidationError(_bind_message(step_id, step, args, kwargs, exc)) from None
        bound.apply_defaults()
        inv = Invocation(step_id, step, {}, {})
        for name, value in bound.arguments.items():
            expected = step.hints.get(name, inspect.Parameter.empty)
            inv.bindings[name] = self._binding(step_id, name, value, expected, inv)
            inv.annotations[name] = expected
        self.invocations[step_id] = inv
        refs = tuple(OutputRef(self, step_id, o.name, o.annotation) for o in step.outputs)
        if not refs:
            return None
        if len(refs) == 1 and len(step.outputs) == 1 and step.outputs[0].name == "output":
            return refs[0]
        if len(refs) == 1:
            return refs[0]
        return StepOutputs(step_id, refs)

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
    graph: nx.DiGraph
    """Steps as nodes (attribute ``spec``), bindings as edges (attribute ``inputs``)."""


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
        self.signature = inspect.signature(fn)
        self.hints = typing.get_type_hints(fn, include_extras=True)
        for p in self.signature.parameters.values():
            if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD, p.POSITIONAL_ONLY):
                raise PipelineDefinitionError(
                    f"pipeline {self.name!r}: parameter {p.name!r} must be a named parameter"
                )
        self._compiled: CompiledPipeline | None = None

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> Run:
        return self.run(self.bind(*args, **kwargs))

    def bind(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """Parameter values by name from a call's arguments (defaults are left to the engine)."""
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
    ) -> Run:
        """Runs the pipeline and, with ``wait``, blocks until the run ends.

        Args:
            parameters: parameter values by name; missing ones take their defaults.
            no_cache: run every step, ignoring the cache.
            client: the client to use; :func:`plait.Client.default` when None.
            wait: wait for the run to end (True) or return as soon as it is accepted.
        """
        from plait._client import Client

        client = client or Client.default()
        return client.run_pipeline(self, dict(parameters or {}), no_cache=no_cache, wait=wait)

    def compile(self) -> CompiledPipeline:
        """Traces the pipeline function and compiles it (once; the result is kept)."""
        if self._compiled is None:
            self._compiled = compile_pipeline(self)
        return self._compiled

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
) -> Pipeline[P] | Callable[[Callable[P, Any]], Pipeline[P]]:
    """Declares a pipeline: a function that calls steps. Calling it runs it and returns a Run.

    The function's parameters are the pipeline's parameters: inside the function they are
    placeholders that can only be passed to steps. Defaults must be JSON values.

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
    """

    def wrap(f: Callable[P, Any]) -> Pipeline[P]:
        return Pipeline(
            f,
            name=name,
            pool=pool,
            max_concurrency=max_concurrency,
            fail_fast=fail_fast,
            environment=environment,
        )

    return wrap(fn) if fn is not None else wrap


def trace(pipe: Pipeline[Any]) -> Tracer:
    """Runs the pipeline function with placeholders and records its step invocations."""
    tracer = Tracer(pipe.name)
    params = {
        name: ParamRef(tracer, name, pipe.hints.get(name, inspect.Parameter.empty))
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


def _settings(
    step: Step[..., Any], pool: str = "", environment: Environment | None = None
) -> ir_pb2.StepSettings:
    """A step's IR settings; ``pool`` and ``environment`` are its pipeline's, for a step that
    names none."""
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
    return out


def compile_pipeline(pipe: Pipeline[Any]) -> CompiledPipeline:
    """Traces ``pipe`` into a networkx graph, validates it and compiles it into the IR."""
    import networkx as nx

    tracer = trace(pipe)
    root = pipeline_root(pipe.fn)
    spec = ir_pb2.PipelineSpec(
        name=pipe.name, description=inspect.getdoc(pipe.fn) or "", fail_fast=pipe.fail_fast
    )
    if pipe.max_concurrency is not None:
        spec.max_concurrency = pipe.max_concurrency
    for name, param in pipe.signature.parameters.items():
        ps = spec.parameters.add(
            name=name, type=ir_pb2.TypeSpec(expr=type_expr(pipe.hints.get(name, param.annotation)))
        )
        if param.default is not inspect.Parameter.empty:
            if isinstance(param.default, float) and not math.isfinite(param.default):
                raise PipelineDefinitionError(
                    f"pipeline {pipe.name!r}: default of {name!r} is not finite"
                )
            ps.default_value.json = _literal_json(
                f"pipeline {pipe.name!r}, parameter {name!r} default", param.default
            )
    graph = nx.DiGraph()
    for inv in tracer.invocations.values():
        step_spec = spec.steps.add(
            id=inv.id,
            name=inv.step.name,
            code=_code_ref(inv.step, root),
            settings=_settings(inv.step, pipe.pool, pipe.environment),
        )
        for name, binding in inv.bindings.items():
            step_spec.inputs.add(
                name=name,
                type=ir_pb2.TypeSpec(expr=type_expr(inv.annotations[name])),
                binding=binding,
            )
        for out in inv.step.outputs:
            step_spec.outputs.add(
                name=out.name,
                type=ir_pb2.TypeSpec(expr=type_expr(strip_annotated(out.annotation))),
                materializer=inv.step.settings.materializer_for(out.name),
            )
        graph.add_node(inv.id, spec=step_spec)
        for up in inv.upstream:
            graph.add_edge(up, inv.id)
    if not nx.is_directed_acyclic_graph(graph):  # cannot happen through tracing; keep it honest
        raise PipelineValidationError(f"pipeline {pipe.name!r} has a cycle")
    return CompiledPipeline(spec=spec, version=message_digest(spec), graph=graph)
