"""Cache keys: the digest of a named key-material record, so that a miss can be explained.

The key of a step in a run is the sha256 of the canonical encoding (plait.ir.canonical) of a
``plait.ir.v1.CacheKeyMaterial`` holding, under key scheme ``plait.cache.v1``:

* the step's code digest (its AST without decorators: comments and formatting don't count);
* its outputs' names, types and requested materializers;
* the values of its inputs bound to pipeline parameters and literals, where a file
  (``plait.File``, a ``pathlib.Path`` parameter: ``{"plait.file": PATH, "sha256": DIGEST}``)
  counts by its content digest alone, so a file overwritten at the same path changes the key
  and the same bytes under another path do not;
* the content digests (and materializers) of its inputs bound to upstream outputs;
* the digest of its environment;
* its ``cache_version``.

Not in the key: the step id, the pipeline, the run, retries, timeout, runner. Changing those
does not invalidate the cache.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from plait.engine._json import JsonText
from plait.ir.canonical import canonical_json, digest_json, message_digest, message_to_canonical
from plait.ir.v1 import ir_pb2

KEY_SCHEME = "plait.cache.v1"

FILE_MARKER = "plait.file"
"""The key of a JSON object that stands for a file (see plait.File): its path and sha256."""


def key_material(step: ir_pb2.StepSpec, values: dict[str, Any]) -> ir_pb2.CacheKeyMaterial:
    """The key material of ``step`` given its resolved input values.

    ``values`` maps input names to resolved values in the form :data:`plait.engine.scheduler.Value`
    uses: ``("json", text)``, ``("artifact", info)``, ``("list", [...])``, ``("map", {...})``.
    """
    material = ir_pb2.CacheKeyMaterial(
        key_scheme=KEY_SCHEME,
        code_digest=step.code.code_digest,
        environment_digest=message_digest(step.settings.environment),  # (memoized)
        cache_version=step.settings.cache_version,
    )
    material.outputs.extend(step.outputs)
    for spec in step.inputs:
        kind, value = values[spec.name]
        if kind == "json":
            material.parameters.add(name=spec.name, json=_json_key(value))
        else:
            material.inputs.add(name=spec.name, json=canonical_json(_key_value(kind, value)))
    return material


def _json_key(text: str) -> str:
    """A JSON value's canonical text in the key: a file counts by its content digest."""
    value = json.loads(text)
    if FILE_MARKER in text:  # the common case (no file) pays only this test
        value = _by_content(value)
    return canonical_json(value)


def _by_content(value: Any) -> Any:
    if isinstance(value, dict):
        if FILE_MARKER in value and "sha256" in value:
            return {"plait.file.sha256": value["sha256"]}
        return {k: _by_content(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_by_content(v) for v in value]
    return value


def _key_value(kind: str, value: Any) -> Any:
    if kind == "json":
        parsed = json.loads(value)
        return {"value": _by_content(parsed) if FILE_MARKER in value else parsed}
    if kind == "artifact":
        return {"artifact": value.digest, "materializer": value.materializer}
    if kind == "list":
        return {"list": [_key_value(k, v) for k, v in value]}
    return {"map": {key: _key_value(k, v) for key, (k, v) in value.items()}}


def cache_key(material: ir_pb2.CacheKeyMaterial) -> str:
    """The key: the digest of the material's canonical encoding (``message_digest``)."""
    return digest_json(_canonical(material))


def material_to_json(material: ir_pb2.CacheKeyMaterial) -> dict[str, Any]:
    """The material as stored beside its cache entry (what ``plait runs explain`` compares):
    protobuf's JSON form with field names as declared, which for this message is its
    canonical form too (strings, repeated messages of strings and a bool: a test checks)."""
    return _canonical(material)


_OUTPUTS: dict[bytes, dict[str, Any]] = {}
"""The canonical form of output specs, by serialized bytes: every step's key holds its outputs,
and protobuf's reflection costs more than the rest of the key."""


def _canonical(material: ir_pb2.CacheKeyMaterial) -> dict[str, Any]:
    """``message_to_canonical(material)``, without reflection (fields of default value left out,
    as proto3 JSON does)."""
    out: dict[str, Any] = {}
    for name in ("key_scheme", "code_digest", "environment_digest", "cache_version"):
        value = getattr(material, name)
        if value:
            out[name] = value
    if len(material.outputs):
        out["outputs"] = [_output(o) for o in material.outputs]
    for name in ("parameters", "inputs"):
        values = getattr(material, name)
        if len(values):
            out[name] = [_named(v) for v in values]
    return out


_STATIC: dict[int, tuple[ir_pb2.StepSpec, dict[str, Any]]] = {}
"""The part of a step's key material that depends on its spec alone, by the spec's id() (the
spec is held with it, so the id stays its own): a step's key is made each time it is ready."""
_STATIC_KEPT = 4096


def key_and_material(step: ir_pb2.StepSpec, values: dict[str, Any]) -> tuple[str, JsonText]:
    """``cache_key(m)`` and ``material_to_json(m)`` (as its canonical text, which the store
    keeps as it is) of ``m = key_material(step, values)``, without building the message: the
    part that depends on the step alone is made once per step (a test checks they agree)."""
    held = _STATIC.get(id(step))
    if held is None or held[0] is not step:
        if len(_STATIC) >= _STATIC_KEPT:  # a long-lived daemon sees many: keep the newest
            _STATIC.pop(next(iter(_STATIC)))
        static = _canonical(
            ir_pb2.CacheKeyMaterial(
                key_scheme=KEY_SCHEME,
                code_digest=step.code.code_digest,
                environment_digest=message_digest(step.settings.environment),
                cache_version=step.settings.cache_version,
                outputs=step.outputs,
            )
        )
        held = _STATIC[id(step)] = (step, static)
    material = dict(held[1])
    parameters: list[dict[str, str]] = []
    inputs: list[dict[str, str]] = []
    for spec in step.inputs:
        kind, value = values[spec.name]
        if kind == "json":
            parameters.append(_pair(spec.name, _json_key(value)))
        else:
            inputs.append(_pair(spec.name, canonical_json(_key_value(kind, value))))
    if parameters:
        material["parameters"] = parameters
    if inputs:
        material["inputs"] = inputs
    text = canonical_json(material)
    return hashlib.sha256(text.encode()).hexdigest(), JsonText(text)


def _pair(name: str, text: str) -> dict[str, str]:
    """A NamedValue's canonical form (as `_named`: fields of default value left out)."""
    out = {}
    if name:
        out["name"] = name
    if text:
        out["json"] = text
    return out


def _named(value: ir_pb2.NamedValue) -> dict[str, str]:
    return _pair(value.name, value.json)


def _output(spec: ir_pb2.OutputSpec) -> dict[str, Any]:
    raw = spec.SerializeToString(deterministic=True)
    found = _OUTPUTS.get(raw)
    if found is None:
        if len(_OUTPUTS) >= 4096:  # a long-lived daemon sees many: keep the newest
            _OUTPUTS.pop(next(iter(_OUTPUTS)))
        found = _OUTPUTS[raw] = message_to_canonical(spec)
    return found  # shared: the material's JSON is hashed and stored, never changed
