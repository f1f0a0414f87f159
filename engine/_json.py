"""`JsonText`: a value for a JSON column given as its JSON text already."""

from __future__ import annotations

import json
from typing import Any


class JsonText(str):
    """A JSON column's value that is its JSON text already: the store writes it as it is.

    The scheduler encodes some values for a purpose of its own (a cache key's material, for
    its digest) or writes one value to several rows (a step's outputs, to its row and its
    cache entry): encoding each again for the column would cost more than the row's write.
    """

    __slots__ = ()


def plain(value: Any) -> Any:
    """The value a JsonText encodes; any other value as it is."""
    return json.loads(value) if type(value) is JsonText else value
