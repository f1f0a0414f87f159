"""``@plait.step``: a Python function that becomes one node of a pipeline."""

from __future__ import annotations

import ast
import dataclasses
import functools
import hashlib
import inspect
import math
import textwrap
import typing
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Generic, ParamSpec, TypeVar, get_args, get_origin, overload

from plait._environment import Environment, Resources
from plait._types import strip_annotated, type_expr
from plait.errors import PipelineDefinitionError, PipelineValidationError

P = ParamSpec("P")
R = TypeVar("R")

SINGLE_OUTPUT = "output"
"""The name of the output of a step whose return annotation names none."""


DEFAULT_RETRY_BACKOFF = 2.0
"""The factor a retry's delay grows by when a step names none (the IR's default too)."""
DEFAULT_RETRY_JITTER = 0.1
"""The fraction a retry's delay is jittered by when a step names none (the IR's default too)."""

ExceptionTypes = type[BaseException] | str | tuple[type[BaseException] | str, ...]
"""Exception types as ``retry_on`` and ``no_retry_on`` take them: one or a tuple, each a class
or its qualified name (``"mypkg.errors.Flaky"``)."""


def _type_names(what: str, types: Any) -> tuple[str, ...]:
    """Qualified names ("builtins.ValueError") of exception classes or names, in order."""
    items = types if isinstance(types, tuple | list) else (types,)
    names: list[str] = []
    for t in items:
        if isinstance(t, type) and issubclass(t, BaseException):
            names.append(f"{t.__module__}.{t.__qualname__}")
        elif isinstance(t, str) and t and " " not in t:
            names.append(t)
        else:
            raise PipelineDefinitionError(
                f"{what}: {t!r} is neither an exception class nor its qualified name "
                f'("mypkg.errors.Flaky")'
            )
    return tuple(names)


Hook = Callable[..., Any]
"""A hook: a module-level function, ``on_success(context)`` or ``on_failure(context, error)``."""

_HOOK_ARGS = {"on_success": ("context",), "on_failure": ("context", "error")}


def check_hook(what: str, hook: Any) -> None:
    """Refuses a hook that a worker could not import by module and qualified name, or whose
    signature does not take the arguments it is called with.

    Args:
        what: ``"on_success"`` or ``"on_failure"``, to name it in the error (and to know its
            arguments).
        hook: the hook, or None.

    Raises:
        PipelineDefinitionError: naming the hook and what to do.
    """
    if hook is None:
        return
    args = _HOOK_ARGS[what]
    qualname = getattr(hook, "__qualname__", None)
    module = getattr(hook, "__module__", None)
    if isinstance(hook, Step) or not callable(hook) or not isinstance(qualname, str) or not module:
        raise PipelineDefinitionError(
            f"{what}: {hook!r} is not a function; a hook is a module-level function "
            f"taking ({', '.join(args)})"
        )
    if "<lambda>" in qualname or "<locals>" in qualname:
        raise PipelineDefinitionError(
            f"{what}: {module}.{qualname} is a lambda or is defined inside a function; define "
            f"the hook as a function at module level (def {what}_hook({', '.join(args)}): ...) "
            f"so that worker processes can import it"
        )
    try:
        inspect.signature(hook).bind(*args)
    except TypeError:
        raise PipelineDefinitionError(
            f"{what}: {module}.{qualname} is called as {qualname}({', '.join(args)}); its "
            f"signature {inspect.signature(hook)} does not take that"
        ) from None
    except ValueError:  # no signature to check (a builtin): the call will tell
        pass


def _check_retry_policy(s: StepSettings) -> None:
    def finite(name: str, value: float, low: float, high: float = math.inf) -> None:
        if not (isinstance(value, int | float) and math.isfinite(value) and low <= value <= high):
            bounds = f"between {low:g} and {high:g}" if high < math.inf else f">= {low:g}"
            raise PipelineDefinitionError(f"{name} must be a finite number {bounds}, not {value!r}")

    finite("retry_delay", s.retry_delay, 0.0)
    finite("retry_backoff", s.retry_backoff, 1.0)
    if s.retry_max_delay is not None:
        finite("retry_max_delay", s.retry_max_delay, 0.0)
    finite("retry_jitter", s.retry_jitter, 0.0, 1.0)


@dataclass(frozen=True)
class StepSettings:
    """Settings of a step; :meth:`Step.with_options` changes them per invocation."""

    cache: bool = True
    """Whether a run may serve the step from the cache."""
    cache_version: str = ""
    """Part of the cache key: change it to invalidate the step's cache entries."""
    retries: int = 0
    """How many more attempts a failed attempt gets (crashes have their own budget)."""
    retry_delay: float = 0.0
    """Seconds before the first retry; 0 retries at once."""
    retry_backoff: float = DEFAULT_RETRY_BACKOFF
    """The factor the delay grows by from one retry to the next."""
    retry_max_delay: float | None = None
    """The longest delay before a retry, in seconds; None: no cap (but a day)."""
    retry_jitter: float = DEFAULT_RETRY_JITTER
    """The fraction by which each delay is moved at random, up or down."""
    retry_on: tuple[str, ...] = ()
    """Qualified names of the exception types that are retried (subclasses too); empty: all.
    Types given as classes are turned into their names."""
    no_retry_on: tuple[str, ...] = ()
    """Qualified names of the exception types never retried (subclasses too); wins over
    ``retry_on``."""
    timeout: float | None = None
    """Wall-clock limit of one attempt in seconds; None means none."""
    environment: Environment | None = None
    """The environment the step needs; None: the pipeline's (``@plait.pipeline(environment=)``)."""
    resources: Resources | None = None
    """What one attempt may use (a dict with the keys cpu, memory, gpus is turned into
    :class:`plait.Resources`); not in the cache key."""
    runner: str = ""
    """The runner that executes the step; empty means the default."""
    pool: str = ""
    """The remote worker pool that executes the step (workers started with
    ``plait worker --pool``); empty means the pipeline's pool, else the runner's own workers."""
    materializer: str | Mapping[str, str] = ""
    """A materializer name for every output, or one per output name ("pickle" is an opt-in)."""
    on_success: Hook | None = None
    """Called by the worker as ``on_success(context)`` after an attempt's outputs are stored;
    None: the pipeline's. A module-level function; not in the cache key."""
    on_failure: Hook | None = None
    """Called by the worker as ``on_failure(context, error)`` after the step's code raised,
    before the failure is reported; None: the pipeline's. A module-level function; not in the
    cache key."""

    def __post_init__(self) -> None:
        check_hook("on_success", self.on_success)
        check_hook("on_failure", self.on_failure)
        object.__setattr__(self, "retry_on", _type_names("retry_on", self.retry_on))
        object.__setattr__(self, "no_retry_on", _type_names("no_retry_on", self.no_retry_on))
        if self.resources is not None:
            object.__setattr__(self, "resources", Resources.coerce(self.resources))
        _check_retry_policy(self)

    def materializer_for(self, output: str) -> str:
        if isinstance(self.materializer, str):
            return self.materializer
        return self.materializer.get(output, "")


@dataclass(frozen=True)
class OutputDecl:
    """One declared output of a step."""

    name: str
    annotation: Any


class Step(Generic[P, R]):
    """A step: call it inside a ``@plait.pipeline`` to add an invocation to the graph.

    Called outside a pipeline, it simply calls the function, which keeps steps unit-testable.
    """

    def __init__(
        self,
        fn: Callable[P, R],
        *,
        name: str | None = None,
        settings: StepSettings | None = None,
        invocation_id: str | None = None,
    ) -> None:
        if isinstance(fn, Step):
            raise PipelineDefinitionError(f"{getattr(fn, '__name__', fn)!r} is already a step")
        if not callable(fn) or not hasattr(fn, "__code__"):
            raise PipelineDefinitionError(f"@plait.step decorates functions, not {fn!r}")
        functools.update_wrapper(self, fn)
        self.fn = fn
        self.name = name or fn.__name__
        self.settings = settings or StepSettings()
        self.invocation_id = invocation_id
        self.is_async = inspect.iscoroutinefunction(fn)
        self.signature = inspect.signature(fn)
        try:
            self.hints = typing.get_type_hints(fn, include_extras=True)
        except Exception as exc:  # an annotation that does not resolve
            raise PipelineDefinitionError(
                f"step {self.name!r}: cannot resolve its annotations: {exc}"
            ) from exc
        for param in self.signature.parameters.values():
            if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
                raise PipelineDefinitionError(
                    f"step {self.name!r}: *args and **kwargs are not supported; "
                    f"name every input (or take one list or dict input)"
                )
            if param.kind is param.POSITIONAL_ONLY:
                raise PipelineDefinitionError(
                    f"step {self.name!r}: positional-only parameter {param.name!r} is not "
                    f"supported; inputs are bound by name"
                )
        self.outputs = _parse_outputs(self.name, self.hints.get("return", inspect.Parameter.empty))
        self._check_materializers()

    def _check_materializers(self) -> None:
        if isinstance(self.settings.materializer, Mapping):
            names = {o.name for o in self.outputs}
            unknown = set(self.settings.materializer) - names
            if unknown:
                raise PipelineDefinitionError(
                    f"step {self.name!r}: materializer given for unknown output(s) "
                    f"{', '.join(sorted(unknown))}; outputs are: {', '.join(sorted(names))}"
                )

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        from plait._pipeline import current_tracer

        tracer = current_tracer()
        if tracer is None:
            return self.fn(*args, **kwargs)
        self.check_outputs_storable()
        result: R = tracer.invoke(self, args, dict(kwargs))
        return result

    def map(self, items: Any, /, **fixed: Any) -> Any:
        """Runs the step once per item of ``items``: a dynamic fan-out.

        The item goes to the step's first input that ``fixed`` does not name; ``fixed`` gives
        the others, the same for every item. ``items`` is a list known only when the run gets
        there: a list that an upstream step returns, the results of another map, a list
        parameter, or a list of values and step outputs. When it is known, the control plane
        makes one step run per item (``leaf[0]``, ``leaf[1]``, ...), each cached on its own
        item. Passed to another step, each output of the map arrives as the list of the items'
        outputs, in order; it can be mapped over again.

        Called outside a pipeline, it calls the function once per item and returns the list
        of results.

        Args:
            items: the list to map over.
            **fixed: the step's other inputs (``id=`` names the invocation, as for a call).

        Returns:
            Inside a pipeline, the outputs' placeholders, each standing for a list.

        Raises:
            PipelineDefinitionError: an output no materializer stores (before anything runs).
            PipelineValidationError: ``items`` is no list, its items do not fit the input, or
                every input is in ``fixed``.
        """
        from plait._pipeline import current_tracer

        free = [p for p in self.signature.parameters if p not in fixed]  # "id" is none
        if not free:
            raise PipelineValidationError(
                f"step {self.name!r}: .map() gives every input in fixed "
                f"({', '.join(fixed)}); leave out the one to map over"
            )
        tracer = current_tracer()
        if tracer is None:
            if "id" not in self.signature.parameters:
                fixed.pop("id", None)
            call: Any = self.fn  # the item goes to the input fixed does not name
            return [call(**{free[0]: item}, **fixed) for item in items]
        self.check_outputs_storable()
        return tracer.invoke(self, (), {free[0]: items, **fixed}, mapped=free[0])

    def check_outputs_storable(self) -> None:
        """Refuses, while a pipeline is traced (before any step runs), an output whose declared
        type no materializer stores.

        An output with a ``materializer=`` of its own is not checked (the named one is asked
        when the step returns). Materializers registered by then count (see
        :func:`plait._materializers.type_problem` for what is refused and what passes).

        Raises:
            PipelineDefinitionError: naming the step, the output, the type and what to do.
        """
        from plait._materializers import type_problem

        for out in self.outputs:
            if self.settings.materializer_for(out.name):
                continue
            problem = type_problem(out.annotation)
            if problem is None:
                continue
            declared = type_expr(out.annotation)
            where = "" if problem == declared else f" (it holds {problem})"
            hint = ""
            if get_origin(strip_annotated(out.annotation)) is tuple:
                hint = (
                    " To return several outputs (an array and a number, say), name each item: "
                    '-> tuple[Annotated[numpy.ndarray, "x"], Annotated[int, "n"]].'
                )
            raise PipelineDefinitionError(
                f"step {self.name!r}: output {out.name!r} is declared {declared}{where}, and no "
                f"materializer stores a {problem}.{hint} Register one for the type with "
                f"plait.register_materializer(...) in the module that defines the step; or "
                f"declare a type Plait stores (builtins, numpy, pandas: see docs/types.md); "
                f'or opt into pickle with @plait.step(materializer="pickle") (unsafe: loading '
                f"it runs code)"
            )

    def with_options(self, *, id: str | None = None, **settings: Any) -> Step[P, R]:
        """A copy with other settings (same names as ``@plait.step``) or an invocation id."""
        unknown = set(settings) - {f.name for f in dataclasses.fields(StepSettings)} - {"name"}
        if unknown:
            raise TypeError(f"unknown step option(s): {', '.join(sorted(unknown))}")
        name = settings.pop("name", self.name)
        return Step(
            self.fn,
            name=name,
            settings=dataclasses.replace(self.settings, **settings),
            invocation_id=id if id is not None else self.invocation_id,
        )

    @property
    def code_digest(self) -> str:
        """sha256 of the function's AST without decorators: formatting and comments don't count."""
        # kept per function, not per Step: every with_options() copy shares its function
        digest = _DIGESTS.get(self.fn)
        if digest is None:
            digest = _DIGESTS[self.fn] = code_digest(self.fn)
        return digest

    def __repr__(self) -> str:
        return f"<plait.step {self.name}>"


_DIGESTS: weakref.WeakKeyDictionary[Callable[..., Any], str] = weakref.WeakKeyDictionary()
"""Code digests by function (a function redefined is a new object, with a digest of its own)."""


def code_digest(fn: Callable[..., Any]) -> str:
    try:
        source = textwrap.dedent(inspect.getsource(fn))
        tree = ast.parse(source)
    except (OSError, TypeError, SyntaxError):
        code = fn.__code__
        material = repr((code.co_code, code.co_consts, code.co_names)).encode()
        return hashlib.sha256(material).hexdigest()
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            node.decorator_list = []
            break
    return hashlib.sha256(ast.dump(tree, include_attributes=False).encode()).hexdigest()


def _output_name(step: str, tp: Any) -> str | None:
    if get_origin(tp) is not Annotated:
        return None
    names = [m for m in tp.__metadata__ if isinstance(m, str)]
    if len(names) > 1:
        raise PipelineDefinitionError(f"step {step!r}: an output has more than one name: {names}")
    if names and not names[0].isidentifier():
        raise PipelineDefinitionError(
            f"step {step!r}: output name {names[0]!r} is not a Python identifier"
        )
    return names[0] if names else None


def _parse_outputs(step: str, ret: Any) -> tuple[OutputDecl, ...]:
    if ret is None or ret is type(None):
        return ()
    if ret is inspect.Parameter.empty:
        return (OutputDecl(SINGLE_OUTPUT, Any),)
    single = _output_name(step, ret)
    if single is not None:
        return (OutputDecl(single, ret),)
    if get_origin(ret) is tuple:
        items = get_args(ret)
        names = [_output_name(step, t) if t is not Ellipsis else None for t in items]
        if any(n is not None for n in names):
            if any(n is None for n in names):
                raise PipelineDefinitionError(
                    f"step {step!r}: name every item of the returned tuple with "
                    f'Annotated[T, "name"] or none of them (got {type_expr(ret)})'
                )
            if len(set(names)) != len(names):
                raise PipelineDefinitionError(f"step {step!r}: duplicate output names {names}")
            return tuple(OutputDecl(n, t) for n, t in zip(names, items, strict=True) if n)
    return (OutputDecl(SINGLE_OUTPUT, ret),)


@overload
def step(fn: Callable[P, R], /) -> Step[P, R]: ...


@overload
def step(
    *,
    name: str | None = None,
    cache: bool = True,
    cache_version: str = "",
    retries: int = 0,
    retry_delay: float = 0.0,
    retry_backoff: float = DEFAULT_RETRY_BACKOFF,
    retry_max_delay: float | None = None,
    retry_jitter: float = DEFAULT_RETRY_JITTER,
    retry_on: ExceptionTypes = (),
    no_retry_on: ExceptionTypes = (),
    timeout: float | None = None,
    environment: Environment | None = None,
    resources: Resources | Mapping[str, Any] | None = None,
    runner: str = "",
    pool: str = "",
    materializer: str | Mapping[str, str] = "",
    on_success: Hook | None = None,
    on_failure: Hook | None = None,
) -> Callable[[Callable[P, R]], Step[P, R]]: ...


def step(
    fn: Callable[P, R] | None = None,
    /,
    *,
    name: str | None = None,
    cache: bool = True,
    cache_version: str = "",
    retries: int = 0,
    retry_delay: float = 0.0,
    retry_backoff: float = DEFAULT_RETRY_BACKOFF,
    retry_max_delay: float | None = None,
    retry_jitter: float = DEFAULT_RETRY_JITTER,
    retry_on: ExceptionTypes = (),
    no_retry_on: ExceptionTypes = (),
    timeout: float | None = None,
    environment: Environment | None = None,
    resources: Resources | Mapping[str, Any] | None = None,
    runner: str = "",
    pool: str = "",
    materializer: str | Mapping[str, str] = "",
    on_success: Hook | None = None,
    on_failure: Hook | None = None,
) -> Step[P, R] | Callable[[Callable[P, R]], Step[P, R]]:
    """Declares a step. Use bare (``@plait.step``) or with settings (``@plait.step(cache=False)``).

    Args:
        name: the step's name; the function's name by default.
        cache: whether runs may serve this step from the cache.
        cache_version: part of the cache key; change it to invalidate earlier results.
        retries: how many more attempts a failed attempt gets. An attempt lost to the
            infrastructure (CRASHED: a dead worker, an expired lease) does not count: it draws
            on the control plane's crash budget (``plait server start --crash-retries``).
        retry_delay: seconds before the first retry; 0 (the default) retries at once.
        retry_backoff: the factor the delay grows by from one retry to the next (>= 1):
            retry ``k`` waits ``min(retry_max_delay, retry_delay * retry_backoff ** (k - 1))``.
        retry_max_delay: the longest delay before a retry, in seconds; None: no cap (but a
            day, the longest the engine accepts).
        retry_jitter: the fraction (0 to 1) by which the control plane moves each delay at
            random, up or down, so that steps that failed together do not retry together.
        retry_on: exception classes (or their qualified names, ``"mypkg.errors.Flaky"``) that
            are retried, subclasses included; empty (the default) retries every exception.
            A failure that matches none is FAILED at once.
        no_retry_on: exception classes (or names) never retried, subclasses included; they
            win over ``retry_on``.
        timeout: wall-clock limit of one attempt, in seconds.
        environment: what the step's process needs (see :class:`plait.Environment`); the
            pipeline's environment when None.
        resources: what one attempt may use: a :class:`plait.Resources`, or a dict with its
            keys (``{"cpu": 1.5, "memory": "512MiB", "gpus": 1}``). Container runners enforce
            it; the local runner does not. Not in the cache key.
        runner: the runner that executes it; the default runner when empty.
        pool: the remote worker pool that runs it (workers started with
            ``plait worker --pool NAME``); the pipeline's pool when empty.
        materializer: a materializer name for all outputs, or a dict by output name.
            ``"pickle"`` stores any picklable object; loading it runs code, so it is opt-in.
        on_success: a module-level function the worker calls as ``on_success(context)``
            after each attempt that succeeded, once its outputs are stored (``context`` is
            what :func:`plait.get_step_context` returns in the step). None: the pipeline's
            (``@plait.pipeline(on_success=)``). See ``docs/hooks.md``.
        on_failure: a module-level function the worker calls as
            ``on_failure(context, error)`` after each attempt whose code raised, with the
            exception, before the failure is reported. None: the pipeline's. A hook that
            raises is logged to the step's stderr; it never changes the step's outcome.

    Outputs come from the return annotation: ``-> T`` is one output named ``output``;
    ``-> tuple[Annotated[int, "total"], Annotated[float, "mean"]]`` names two outputs.
    """
    if retries < 0:
        raise PipelineDefinitionError("retries must be >= 0")
    if timeout is not None and timeout <= 0:
        raise PipelineDefinitionError("timeout must be > 0 seconds")
    settings = StepSettings(
        cache=cache,
        cache_version=cache_version,
        retries=retries,
        retry_delay=retry_delay,
        retry_backoff=retry_backoff,
        retry_max_delay=retry_max_delay,
        retry_jitter=retry_jitter,
        retry_on=_type_names("retry_on", retry_on),
        no_retry_on=_type_names("no_retry_on", no_retry_on),
        timeout=timeout,
        environment=environment,
        resources=Resources.coerce(resources) if resources is not None else None,
        runner=runner,
        pool=pool,
        materializer=materializer,
        on_success=on_success,
        on_failure=on_failure,
    )

    def wrap(f: Callable[P, R]) -> Step[P, R]:
        return Step(f, name=name, settings=settings)

    return wrap(fn) if fn is not None else wrap
