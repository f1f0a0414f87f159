"""Cache keys: the digest of a named key-material record, so that a miss can be explained.

The key of a step in a run is the sha256 of the canonical encoding (plait.ir.canonical) of a
``plait.ir.v1.CacheKeyMaterial`` holding, under key scheme ``plait.cache.v1``:

* the step's code digest (its AST without decorators: comments and formatting don't count);
* its outputs' names, types and requested materializers;
* the values of its inputs bound to pipeline parameters and literals;
* the content digests (and materializers) of its inputs bound to upstream outputs;
* the digest of its environment;
* its ``cache_version``.

Not in the key: the step id, the pipeline, the run, retries, timeout, runner. Changing those
does not invalidate the cache.
"""

from __future__ import annotations

import json
from typing import Any

from google.protobuf.json_format import MessageToDict

from plait.ir.canonical import canonical_json, message_digest
from plait.ir.v1 import ir_pb2

KEY_SCHEME = "plait.cache.v1"


def key_material(step: ir_pb2.StepSpec, values: dict[str, Any]) -> ir_pb2.CacheKeyMaterial:
    """The key material of ``step`` given its resolved input values.

    ``values`` maps input names to resolved values in the form :data:`plait.engine.scheduler.Value`
    uses: ``("json", text)``, ``("artifact", info)``, ``("list", [...])``, ``("map", {...})``.
    """
    material = ir_pb2.CacheKeyMaterial(
        key_scheme=KEY_SCHEME,
        code_digest=step.code.code_digest,
        environment_digest=message_digest(step.settings.environment),
        cache_version=step.settings.cache_version,
    )
    material.outputs.extend(step.outputs)
    for spec in step.inputs:
        kind, value = values[spec.name]
        if kind == "json":
            material.parameters.add(name=spec.name, json=canonical_json(json.loads(value)))
        else:
            material.inputs.add(name=spec.name, json=canonical_json(_key_value(kind, value)))
    return material


def _key_value(kind: str, value: Any) -> Any:
    if kind == "json":
        return {"value": json.loads(value)}
    if kind == "artifact":
        return {"artifact": value.digest, "materializer": value.materializer}
    if kind == "list":
        return {"list": [_key_value(k, v) for k, v in value]}
    return {"map": {key: _key_value(k, v) for key, (k, v) in value.items()}}


def cache_key(material: ir_pb2.CacheKeyMaterial) -> str:
    return message_digest(material)


def material_to_json(material: ir_pb2.CacheKeyMaterial) -> dict[str, Any]:
    return MessageToDict(material, preserving_proto_field_name=True)
