"""The build digest of an environment: what the environment declares goes into a build.

Both sides compute it: the SDK (``plait.Environment.build_digest``) and the control plane, which
reads only IR. It covers the parent image reference, the Python version, the requirements
normalised (comments, blank lines and white space dropped, project names in their canonical
form, duplicates removed) and sorted, and the apt packages sorted: never the environment's
runtime variables, which are in a step's cache key but never make a build. The image builder
adds what the environment cannot know (the parent image resolved to its id, the Plait and recipe
versions) to make an image's key.
"""

from __future__ import annotations

import re
from typing import Any

from plait.ir.canonical import digest_json
from plait.ir.v1 import ir_pb2

__all__ = [
    "BUILD_KEY_SCHEME",
    "build_digest",
    "build_material",
    "needs_build",
    "normalize_requirement",
    "parse_requirements",
]

BUILD_KEY_SCHEME = "plait.build.v1"
"""The version of the rules below; part of the material, so changing them changes every key."""

_NAME = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)(.*)$", re.DOTALL)


def normalize_requirement(line: str) -> str:
    """One requirement in canonical form: ``NumPy >= 1.26`` and ``numpy>=1.26`` are the same.

    A comment (``#`` at the start or after white space) and surrounding white space are
    dropped; a project name is lower-cased with runs of ``-_.`` made one ``-`` (PEP 503); white
    space is removed from the specifier and extras, and collapsed to one space in an environment
    marker. A URL or a path is kept as written (without its comment). Empty when nothing is
    left.
    """
    text = re.split(r"(?:^|\s)#", line, maxsplit=1)[0].strip()
    if not text:
        return ""
    if "://" in text or text.startswith((".", "/", "~")) or " @ " in text:
        return text
    m = _NAME.match(text)
    if m is None:
        return text
    name = re.sub(r"[-_.]+", "-", m.group(1)).lower()
    rest, _, marker = m.group(2).partition(";")
    out = name + re.sub(r"\s+", "", rest)
    if marker.strip():
        out += "; " + " ".join(marker.split())
    return out


def parse_requirements(text: str) -> list[str]:
    """The requirements of a requirements file's text, normalised, in file order.

    Options lines (``-r``, ``--index-url``, ...) are refused: an environment lists its
    requirements itself, so that what goes into a build is all in its digest.
    """
    out = []
    for number, line in enumerate(text.splitlines(), 1):
        req = normalize_requirement(line)
        if req.startswith("-"):
            raise ValueError(
                f"line {number}: {req!r}: requirement options are not supported in an "
                f"Environment's requirements file; list the requirements themselves"
            )
        if req:
            out.append(req)
    return out


def build_material(env: ir_pb2.Environment) -> dict[str, Any]:
    """What the build digest is the digest of (see the module's docstring)."""
    reqs = sorted({r for r in (normalize_requirement(x) for x in env.requirements) if r})
    return {
        "key_scheme": BUILD_KEY_SCHEME,
        "parent_image": env.parent_image.strip(),
        "python_version": env.python_version.strip(),
        "requirements": reqs,
        "apt_packages": sorted({p.strip() for p in env.apt_packages if p.strip()}),
    }


def build_digest(env: ir_pb2.Environment) -> str:
    """The hex sha256 of the canonical JSON of :func:`build_material`."""
    return digest_json(build_material(env))


def needs_build(env: ir_pb2.Environment) -> bool:
    """Whether a process runner needs a build for this environment (it has requirements or
    apt packages); a container runner always runs a build."""
    return bool(env.requirements or env.apt_packages)
