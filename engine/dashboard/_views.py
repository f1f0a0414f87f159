"""What the dashboard's JSON says, computed from the API's records: the graph's layout, a run's
steps, a step's inputs and attempts, the diff of two versions, an artifact's preview. Pure
functions of their arguments (the server does the calls)."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from typing import Any

from google.protobuf import json_format

from plait.cli._common import artifact_json, step_json, time_json
from plait.ir.mapping import split_item
from plait.ir.v1 import ir_pb2

PREVIEW_MAX_BYTES = 8 * 1024 * 1024
"""Artifacts larger than this are not loaded for a preview (download them)."""
PREVIEW_CHARS = 64 * 1024
"""The most characters of text or JSON a preview holds."""
PREVIEW_ROWS = 100
"""The most rows of a table (and items of an array's first axis) a preview holds."""
PREVIEW_VALUES = 2_000
"""The most values of an array a preview holds."""
MASK = "••••••"
"""What a secret-like configuration value shows as."""
_SECRET_WORDS = ("password", "secret", "token", "key", "credential", "passwd")


def layout(spec: ir_pb2.PipelineSpec) -> dict[str, Any]:
    """The graph of a pipeline's steps: each step's layer (its longest path from a step with no
    upstream) and row (its place in that layer, in the IR's order), and the edges."""
    from plait.engine._ir import upstream_ids

    layer: dict[str, int] = {}
    rows: dict[int, int] = {}
    nodes: list[dict[str, Any]] = []
    edges: list[list[str]] = []
    for s in spec.steps:  # topological order: upstream first
        ups = upstream_ids(s)
        depth = 1 + max((layer[u] for u in ups), default=-1)
        layer[s.id] = depth
        row = rows.get(depth, 0)
        rows[depth] = row + 1
        nodes.append({"id": s.id, "layer": depth, "row": row})
        edges.extend([u, s.id] for u in ups)
    return {"nodes": nodes, "edges": edges}


def artifact_view(a: Any) -> dict[str, Any]:
    """An artifact as the dashboard shows it, with where to download it."""
    doc = artifact_json(a)
    doc["download"] = f"/api/artifacts/{a.artifact_id}/download"
    return doc


def step_view(s: Any, step_ids: Iterable[str]) -> dict[str, Any]:
    """A ``plait.StepRun`` as the dashboard's JSON has it: outputs as a list (without the items
    of an output a map iterates), and ``parent``, the mapped step of an item."""
    doc = step_json(s)
    doc["outputs"] = [artifact_view(a) for name, a in s.outputs.items() if split_item(name) is None]
    item = split_item(s.step_id)
    doc["parent"] = item[0] if item is not None and item[0] in step_ids else None
    return doc


def step_spec(spec: ir_pb2.PipelineSpec, step_id: str) -> ir_pb2.StepSpec | None:
    """The IR of a step of the pipeline, or of the mapped step an item belongs to."""
    for s in spec.steps:
        if s.id == step_id:
            return s
    item = split_item(step_id)
    if item is not None:
        return step_spec(spec, item[0])
    return None


def inputs_view(step: ir_pb2.StepSpec, item: bool) -> list[dict[str, Any]]:
    """Where each input of a step comes from (for an item, its mapped input is the item)."""
    out = []
    for i in step.inputs:
        b = i.binding
        kind = b.WhichOneof("kind") or ""
        doc: dict[str, Any] = {
            "name": i.name,
            "type": i.type.expr,
            "source": kind,
            "value": None,
            "step_id": None,
            "output": None,
            "mapped": i.mapped,
        }
        if i.mapped and item:
            doc["source"] = "item"
        if kind == "output":
            doc["step_id"], doc["output"] = b.output.step_id, b.output.output
        elif kind == "parameter":
            doc["value"] = b.parameter
        elif kind == "literal":
            doc["value"] = json.loads(b.literal.json)
        else:
            doc["value"] = json_format.MessageToDict(b, preserving_proto_field_name=True)
        out.append(doc)
    return out


def attempts_view(events: Iterable[Any], step_id: str) -> list[dict[str, Any]]:
    """A step's attempts from its events: each attempt's latest status, its start and end."""
    attempts: dict[int, dict[str, Any]] = {}
    for e in events:
        if e.step_id != step_id or e.step_status is None or not e.attempt:
            continue
        a = attempts.setdefault(
            e.attempt,
            {"attempt": e.attempt, "status": "", "start_time": None, "end_time": None},
        )
        a["status"] = str(e.step_status)
        a["message"] = e.message or a.get("message", "")
        if str(e.step_status) == "RUNNING" and a["start_time"] is None:
            a["start_time"] = time_json(e.time)
        if e.step_status.is_final or str(e.step_status) == "RETRYING":
            a["end_time"] = time_json(e.time)
    return [attempts[k] for k in sorted(attempts)]


def explain_view(e: Any) -> dict[str, Any]:
    """A ``plait.CacheExplanation`` as JSON."""
    return {
        "reason": e.reason,
        "cached_from_run": e.cached_from_run or None,
        "earlier_run": e.earlier_run or None,
        "differences": [
            {"component": d.component, "name": d.name, "now": d.value, "before": d.earlier_value}
            for d in e.differences
        ],
    }


def diff_versions(a: ir_pb2.PipelineSpec, b: ir_pb2.PipelineSpec) -> dict[str, Any]:
    """What changed from version ``a`` to ``b``: steps added and removed, the fields of steps
    in both that differ (by path), and the parameters that differ."""
    sa, sb = {s.id: s for s in a.steps}, {s.id: s for s in b.steps}
    changed = []
    for step_id in (s for s in sb if s in sa):
        fields = _differences(_as_dict(sa[step_id]), _as_dict(sb[step_id]), "")
        if fields:
            changed.append({"step_id": step_id, "fields": fields})
    params_a = {p.name: _as_dict(p) for p in a.parameters}
    params_b = {p.name: _as_dict(p) for p in b.parameters}
    return {
        "added": [s for s in sb if s not in sa],
        "removed": [s for s in sa if s not in sb],
        "changed": changed,
        "parameters": _differences(params_a, params_b, ""),
        "settings": _differences(_top(a), _top(b), ""),
    }


def _as_dict(message: Any) -> dict[str, Any]:
    return json_format.MessageToDict(message, preserving_proto_field_name=True)


def _top(spec: ir_pb2.PipelineSpec) -> dict[str, Any]:
    doc = _as_dict(spec)
    doc.pop("steps", None)
    doc.pop("parameters", None)
    return doc


def _differences(a: Any, b: Any, path: str) -> list[dict[str, Any]]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for key in sorted(set(a) | set(b)):
            out.extend(_differences(a.get(key), b.get(key), f"{path}.{key}" if path else key))
        return out
    if a != b:
        return [{"path": path, "a": a, "b": b}]
    return []


def masked(config: Mapping[str, Any]) -> dict[str, Any]:
    """A component's configuration with secret-like values (by their key) masked."""
    return {
        k: MASK if any(w in k.lower() for w in _SECRET_WORDS) and v not in ("", None) else v
        for k, v in config.items()
    }


def preview(value: Any) -> dict[str, Any]:
    """A loaded artifact's preview: JSON, text, a table (pandas) or an array (numpy), cut to
    what a page shows."""
    kind = type(value).__module__.split(".", 1)[0]
    if kind == "pandas":
        return _table(value)
    if kind == "numpy":
        if hasattr(value, "shape") and getattr(value, "ndim", 0) > 0:
            return _array(value)
        value = value.item()  # a scalar
    if isinstance(value, str):
        return {
            "kind": "text",
            "data": value[:PREVIEW_CHARS],
            "truncated": len(value) > PREVIEW_CHARS,
        }
    if isinstance(value, bytes):
        return {"kind": "none", "data": None, "truncated": False, "note": f"{len(value)} bytes"}
    try:
        text = json.dumps(_plain(value), ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError):
        text = None
    if text is None:
        return {
            "kind": "text",
            "data": repr(value)[:PREVIEW_CHARS],
            "truncated": len(repr(value)) > PREVIEW_CHARS,
            "note": f"a {type(value).__name__}",
        }
    if len(text) > PREVIEW_CHARS:
        return {"kind": "text", "data": text[:PREVIEW_CHARS], "truncated": True, "note": "JSON"}
    return {"kind": "json", "data": json.loads(text), "truncated": False}


def _plain(value: Any) -> Any:
    """A value with tuples and sets as lists and non-finite floats as strings (JSON)."""
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_plain(v) for v in value]
    return value


def _table(value: Any) -> dict[str, Any]:
    frame = (
        value.to_frame() if hasattr(value, "to_frame") and not hasattr(value, "columns") else value
    )
    head = frame.head(PREVIEW_ROWS)
    doc = json.loads(head.to_json(orient="split", date_format="iso", default_handler=str))
    return {
        "kind": "table",
        "data": {
            "columns": [str(c) for c in doc.get("columns", [])],
            "index": doc.get("index", []),
            "rows": doc.get("data", []),
            "shape": list(frame.shape),
        },
        "truncated": len(frame) > PREVIEW_ROWS,
    }


def _array(value: Any) -> dict[str, Any]:
    head = value[:PREVIEW_ROWS]
    cut = head.size > PREVIEW_VALUES
    flat = head.reshape(-1)[:PREVIEW_VALUES] if cut else head
    try:
        values = _plain(flat.tolist())
    except Exception:  # an object array of things lists do not hold
        values = [repr(v) for v in flat.reshape(-1)[:PREVIEW_VALUES]]
    return {
        "kind": "array",
        "data": {"shape": list(value.shape), "dtype": str(value.dtype), "values": values},
        "truncated": cut or len(value) > PREVIEW_ROWS,
        "note": "values flattened" if cut else "",
    }
