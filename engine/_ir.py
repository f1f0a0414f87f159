"""Helpers over the pipeline IR that the scheduler and the store both need."""

from __future__ import annotations

import json

from plait.errors import ParameterError
from plait.ir.canonical import canonical_json
from plait.ir.v1 import ir_pb2


def upstream_ids(step: ir_pb2.StepSpec) -> list[str]:
    """The ids of the steps whose outputs ``step`` reads, in first-use order."""
    out: list[str] = []

    def walk(b: ir_pb2.Binding) -> None:
        kind = b.WhichOneof("kind")
        if kind == "output" and b.output.step_id not in out:
            out.append(b.output.step_id)
        elif kind == "list":
            for i in b.list.items:
                walk(i)
        elif kind == "map":
            for e in b.map.entries:
                walk(e.value)

    for i in step.inputs:
        walk(i.binding)
    return out


def resolve_parameters(spec: ir_pb2.PipelineSpec, given: dict[str, str]) -> dict[str, str]:
    """Parameter values as canonical JSON: the given ones, defaults for the rest."""
    declared = {p.name: p for p in spec.parameters}
    unknown = sorted(set(given) - set(declared))
    if unknown:
        raise ParameterError(
            f"pipeline {spec.name!r} has no parameter {unknown[0]!r}; "
            f"its parameters are: {', '.join(declared) or 'none'}"
        )
    out: dict[str, str] = {}
    for name, p in declared.items():
        if name in given:
            try:
                out[name] = canonical_json(json.loads(given[name]))
            except ValueError as exc:
                raise ParameterError(f"parameter {name!r}: not JSON: {exc}") from None
        elif p.HasField("default_value"):
            out[name] = p.default_value.json
        else:
            raise ParameterError(f"pipeline {spec.name!r}: parameter {name!r} is required")
    return out
