"""The names a map (``step.map``) gives what it makes, shared by workers and the control plane.

A mapped step ``leaf`` runs once per item of its list, as the step runs ``leaf[0]``,
``leaf[1]``, ...; an upstream output ``xs`` that a map iterates is stored as the list and as
one artifact per item, reported as the outputs ``xs[0]``, ``xs[1]``, ... (see
``InputSpec.mapped`` and ``OutputSpec.items`` in the IR).
"""

from __future__ import annotations

import hashlib

__all__ = ["MAX_MAP_ITEMS", "item_artifact_id", "item_name", "split_item"]

MAX_MAP_ITEMS = 10_000
"""The most items one map runs; a longer list fails the mapped step, saying so."""


def item_name(name: str, index: int) -> str:
    """The name of item ``index`` of a mapped step or an itemized output: ``name[index]``."""
    return f"{name}[{index}]"


def split_item(name: str) -> tuple[str, int] | None:
    """``("leaf", 3)`` for ``"leaf[3]"``; None for a name that is no item's."""
    if not name.endswith("]"):
        return None
    base, sep, index = name[:-1].partition("[")
    if not sep or not base or not index.isdigit() or (index != "0" and index[0] == "0"):
        return None
    return base, int(index)


def item_artifact_id(artifact_id: str, index: int) -> str:
    """The artifact id of item ``index`` of the output stored as ``artifact_id``: known before
    the step runs, the same on a retry of the report."""
    return hashlib.sha256(f"{artifact_id}/{index}".encode()).hexdigest()[:32]
