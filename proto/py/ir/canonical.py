"""The canonical encoding that Plait's content addresses are computed from.

Protobuf's binary and JSON encodings are not canonical across libraries and versions, so pipeline
versions, cache keys and environment digests are never hashed from them. They are hashed from
this encoding instead, which any language can reproduce:

* a message becomes a JSON object whose keys are its field names; fields that are not present
  (proto3 defaults without presence, empty repeated fields, unset messages) are left out;
* enum values are written as their names, 64-bit integers as JSON numbers, bytes as base64;
* the JSON text has sorted keys, no white space, UTF-8 text (not ``\\u`` escapes) and no NaN or
  infinity; floats are written as the shortest text that reads back as the same double.

The digest is the lowercase hex sha256 of that UTF-8 text.
"""

from __future__ import annotations

import base64
import hashlib
import json
from typing import Any

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

__all__ = [
    "canonical_json",
    "digest_json",
    "is_map_entry",
    "message_digest",
    "message_to_canonical",
]


def is_map_entry(descriptor: Any) -> bool:
    """Whether a message type is a map's entry. Only a type with options can be one: asking
    its options imports protobuf's descriptor_pb2, a few milliseconds of a short run, which a
    type without any (all of Plait's) never needs."""
    return bool(descriptor.has_options and descriptor.GetOptions().map_entry)


def canonical_json(value: Any) -> str:
    """Encodes a JSON-able value canonically (sorted keys, compact, UTF-8, no NaN)."""
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    )


def digest_json(value: Any) -> str:
    """The hex sha256 of the canonical JSON of ``value``."""
    return hashlib.sha256(canonical_json(value).encode()).hexdigest()


def _scalar(field: Any, value: Any) -> Any:
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        return message_to_canonical(value)
    if field.type == FieldDescriptor.TYPE_ENUM:
        enum_value = field.enum_type.values_by_number.get(value)
        return enum_value.name if enum_value is not None else value
    if field.type == FieldDescriptor.TYPE_BYTES:
        return base64.b64encode(value).decode()
    return value


def message_to_canonical(message: Message) -> dict[str, Any]:
    """The canonical JSON-able form of a message (see the module docstring)."""
    out: dict[str, Any] = {}
    for field in message.DESCRIPTOR.fields:
        value = getattr(message, field.name)
        if field.is_repeated:
            if field.message_type is not None and is_map_entry(field.message_type):
                value_field = field.message_type.fields_by_name["value"]
                if len(value):
                    out[field.name] = {str(k): _scalar(value_field, v) for k, v in value.items()}
            elif len(value):
                out[field.name] = [_scalar(field, v) for v in value]
        elif field.has_presence:
            if message.HasField(field.name):
                out[field.name] = _scalar(field, value)
        elif value != field.default_value:
            out[field.name] = _scalar(field, value)
    return out


_DIGESTS: dict[tuple[str, bytes], str] = {}
"""Digests by message type and the sha256 of the message's deterministic binary encoding (a memo
key only, never an address): a pipeline is digested when it is compiled and again each time it
is registered, and the canonical encoding costs some 15 times what serializing and hashing do.
The canonical encoding reads only known fields, each of which that binary encoding writes
exactly (presence, order of repeated fields, floats bit for bit, open enums by number), so equal
bytes of one type have one digest; what differs only in bytes (unknown fields) is a miss."""
_DIGESTS_KEPT = 256


def message_digest(message: Message) -> str:
    """The hex sha256 of a message's canonical encoding."""
    raw = message.SerializePartialToString(deterministic=True)
    key = (message.DESCRIPTOR.full_name, hashlib.sha256(raw).digest())
    digest = _DIGESTS.get(key)
    if digest is None:
        digest = digest_json(message_to_canonical(message))
        if len(_DIGESTS) >= _DIGESTS_KEPT:  # a long-lived daemon sees many: keep the newest
            _DIGESTS.pop(next(iter(_DIGESTS)), None)
        _DIGESTS[key] = digest
    return digest
