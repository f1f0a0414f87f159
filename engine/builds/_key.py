"""An image's key: the digest of everything that goes into it, and why two keys differ.

An environment's build digest (:mod:`plait.ir.builds`) covers what the environment declares. The
image builder adds what only it can know, and keys the image by the sha256 of the whole
material:

* ``parent_image``: the parent reference actually used (the environment's, else the builder's
  default), and ``parent_image_id``: the image id it resolved to on the Docker host, so a tag
  that moved (``python:3.11`` pointing at a newer image) makes a new key;
* ``python_version``: the Python version the environment asks for ("" when the parent decides);
* ``plait_version``: Plait's version with a digest of its installed files and of the versions of
  its runtime dependencies, so an edit of an editable Plait tree rebuilds;
* ``recipe_version``: the version of the builder's recipe (its Dockerfile);
* ``file_digests``: the sha256 of the content of each requirement that is a local path (a wheel,
  a project folder), so the same path with new content rebuilds.

Runtime environment variables are never part of it. :func:`diff_material` names the components
in which two materials differ: the answer to "why was this build not reused?".
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from plait.ir.builds import build_material
from plait.ir.canonical import digest_json
from plait.ir.v1 import ir_pb2

__all__ = ["diff_material", "image_material", "material_key"]


def image_material(
    env: ir_pb2.Environment,
    *,
    parent_image: str,
    parent_image_id: str,
    python_version: str,
    plait_version: str,
    recipe_version: str,
    file_digests: Mapping[str, str],
) -> dict[str, Any]:
    """The key material of an image for ``env`` (see the module docstring).

    Args:
        env: the environment; only what :func:`plait.ir.builds.build_material` takes from it.
        parent_image: the parent image reference used, after defaults.
        parent_image_id: the id (``sha256:...``) that reference resolved to.
        python_version: the Python version asked for; empty when the parent image decides.
        plait_version: Plait's version and files digest (``plait.engine.builds._wheels``).
        recipe_version: the builder's recipe version.
        file_digests: requirement as written → sha256 (hex) of the local file or folder.
    """
    return {
        **build_material(env),
        "parent_image": parent_image,
        "parent_image_id": parent_image_id,
        "python_version": python_version,
        "plait_version": plait_version,
        "recipe_version": recipe_version,
        "file_digests": dict(sorted(file_digests.items())),
    }


def material_key(material: Mapping[str, Any]) -> str:
    """The key of an image: the hex sha256 of its material's canonical JSON."""
    return digest_json(dict(material))


def _short(value: Any) -> str:
    if value is None or value == "":
        return "(none)"
    text = str(value)
    for prefix in ("sha256:", ""):
        rest = text[len(prefix) :]
        if text.startswith(prefix) and re.fullmatch("[0-9a-f]{64}", rest):
            return f"{prefix}{rest[:12]}…"
    return text


def _list_diff(name: str, a: list[Any], b: list[Any]) -> str:
    added = [f"+ {x}" for x in b if x not in a]
    removed = [f"- {x}" for x in a if x not in b]
    return f"{name}: {' '.join(added + removed) or '(reordered)'}"


def diff_material(a: Mapping[str, Any], b: Mapping[str, Any]) -> list[str]:
    """Human-readable lines naming each component in which material ``b`` differs from ``a``.

    Lists say what was added (``+``) and removed (``-``); other values say ``old → new``. A
    parent image id that changed while the parent reference stayed the same says that the tag
    moved. Empty when the two are the same.
    """
    lines = []
    for name in sorted(set(a) | set(b)):
        old, new = a.get(name), b.get(name)
        if old == new:
            continue
        if isinstance(old, list | type(None)) and isinstance(new, list | type(None)):
            lines.append(_list_diff(name, list(old or []), list(new or [])))
        elif isinstance(old, Mapping | type(None)) and isinstance(new, Mapping | type(None)):
            old_map, new_map = dict(old or {}), dict(new or {})
            parts = []
            for item in sorted(set(old_map) | set(new_map)):
                if old_map.get(item) != new_map.get(item):
                    parts.append(
                        f"{item} {_short(old_map.get(item))} → {_short(new_map.get(item))}"
                    )
            lines.append(f"{name}: {'; '.join(parts)}")
        else:
            line = f"{name}: {_short(old)} → {_short(new)}"
            parent = a.get("parent_image")
            if name == "parent_image_id" and parent and parent == b.get("parent_image"):
                line += f" (the tag {parent} moved)"
            lines.append(line)
    return lines
