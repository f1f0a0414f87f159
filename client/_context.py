"""What a running step can ask about itself, and metadata it can attach."""

from __future__ import annotations

import contextvars
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from plait.errors import NotInStepError, PlaitError
from plait.ir.canonical import canonical_json


@dataclass(frozen=True)
class StepContext:
    """The running step's identity: use ``(run_id, step_id, attempt)`` as an idempotency key."""

    run_id: str
    """The run."""
    step_id: str
    """The step's id in the pipeline."""
    attempt: int
    """The attempt number, from 1."""
    pipeline: str
    """The pipeline's name."""
    output_locations: Mapping[str, str]
    """Where each output will be stored: its artifact resource name, by output name."""
    artifact_store_uri: str
    """The artifact store outputs are written to."""
    _report: Callable[[Any, str, str], None] = field(repr=False, compare=False)
    _token: Any = field(repr=False, compare=False)


class LazyContext:
    """A step's context, made on first use: most steps never ask for theirs, and a worker
    that builds one for every step spends its time on objects nobody reads."""

    __slots__ = ("_ctx", "_make")

    def __init__(self, make: Callable[[], StepContext]) -> None:
        self._make = make
        self._ctx: StepContext | None = None

    def get(self) -> StepContext:
        """The context (the same object every time, whichever thread asks first)."""
        ctx = self._ctx
        if ctx is None:
            with _MAKING:
                ctx = self._ctx
                if ctx is None:
                    ctx = self._ctx = self._make()
        return ctx


_MAKING = threading.Lock()
"""Taken only to make a step's context, the first time it is asked for."""


_current: contextvars.ContextVar[StepContext | LazyContext | None] = contextvars.ContextVar(
    "plait_step_context", default=None
)


def set_context(
    ctx: StepContext | LazyContext,
) -> contextvars.Token[StepContext | LazyContext | None]:
    return _current.set(ctx)


def reset_context(token: contextvars.Token[StepContext | LazyContext | None]) -> None:
    _current.reset(token)


def get_step_context() -> StepContext:
    """The context of the step running in this process.

    Raises:
        NotInStepError: called outside a running step.
    """
    ctx = _current.get()
    if ctx is None:
        raise NotInStepError("get_step_context() works only inside a running step")
    return ctx.get() if isinstance(ctx, LazyContext) else ctx


def log_metadata(metadata: Mapping[str, Any], *, output: str | None = None) -> None:
    """Attaches JSON metadata to the running step, or to one of its outputs.

    Calls merge: a later key replaces an earlier one. Shown by ``plait runs show``.

    Args:
        metadata: a JSON-able mapping with string keys.
        output: the output's name, to attach it to that output artifact instead of the step.

    Raises:
        NotInStepError: called outside a running step.
        PlaitError: the metadata is not JSON, or the output does not exist.
    """
    ctx = get_step_context()
    if output is not None and output not in ctx.output_locations:
        raise PlaitError(
            f"step {ctx.step_id!r} has no output {output!r}; outputs: "
            f"{', '.join(ctx.output_locations) or 'none'}"
        )
    if not isinstance(metadata, Mapping) or not all(isinstance(k, str) for k in metadata):
        raise PlaitError("log_metadata takes a mapping with str keys")
    try:
        text = canonical_json(dict(metadata))
    except (TypeError, ValueError) as exc:
        raise PlaitError(f"log_metadata: metadata must be JSON: {exc}") from None
    ctx._report(ctx._token, output or "", text)
