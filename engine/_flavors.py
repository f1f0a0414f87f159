"""The flavors of each kind of stack component, and the configuration keys each one accepts.

A component is registered with a kind, a flavor (its implementation) and a configuration.
Registration refuses a flavor nothing implements and a key nothing reads, with the list of the
valid ones, so that a stack never carries settings that are silently ignored. Each entry says
which part of Plait uses it:

==================  ======  ============================================  ==================
kind                flavor  keys                                          used by
==================  ======  ============================================  ==================
RUNNER              local   (none)                                        the LocalRunner
RUNNER              docker  network, keep_containers, stop_grace_seconds  the DockerRunner
ARTIFACT_STORE      local   (none: ``plait server --artifact-store``)     the control plane
IMAGE_BUILDER       docker  parent_image                                  DockerImageBuilder
CONTAINER_REGISTRY  docker  uri (required)                                DockerImageBuilder
SECRETS             (none)
==================  ======  ============================================  ==================

Components already in a database are read as they are, whatever they hold; only registering
(or replacing) one is checked. This module imports nothing of the engine's: the store calls
:func:`check_component` when a component is registered.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from plait.errors import PipelineError

__all__ = ["FLAVORS", "Flavor", "Key", "check_component", "kind_text"]

Check = Callable[[Any], str | None]
"""A value check: None when the value is fine, else what is wrong (after "must be")."""


@dataclass(frozen=True)
class Key:
    """A configuration key of a flavor."""

    doc: str
    """One line: what it sets."""
    check: Check
    required: bool = False


@dataclass(frozen=True)
class Flavor:
    """An implementation of a kind of component."""

    doc: str
    """One line: what it is."""
    used_by: str
    """The part of Plait that reads it."""
    keys: Mapping[str, Key] = field(default_factory=dict)


def _one_of(*values: str) -> Check:
    def check(value: Any) -> str | None:
        return None if value in values else f"one of {', '.join(values)}"

    return check


def _boolean(value: Any) -> str | None:
    return None if isinstance(value, bool) else "true or false"


def _seconds(value: Any) -> str | None:
    ok = (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and math.isfinite(value)
        and 0 <= value <= 3600
    )
    return None if ok else "a number of seconds from 0 to 3600"


_REFERENCE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/:@-]*$")


def _image_reference(value: Any) -> str | None:
    if isinstance(value, str) and len(value) <= 1024 and _REFERENCE.match(value):
        return None
    return (
        "an image reference (REPOSITORY, REPOSITORY:TAG or REPOSITORY@DIGEST, "
        "e.g. python:3.11-slim)"
    )


_REGISTRY = re.compile(
    r"^(?:[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?|\[[0-9A-Fa-f:.]+\])"  # a host, or [IPv6]
    r"(?::(?P<port>[0-9]{1,5}))?"  # a port
    r"(?:/[a-z0-9]+(?:[._-][a-z0-9]+)*)*$"  # a path of repository components
)


def _registry_uri(value: Any) -> str | None:
    # no square brackets in messages: the CLI prints them as rich markup
    what = (
        "the registry's HOST:PORT or HOST:PORT/PATH, after http:// or https:// to choose the "
        "protocol (e.g. 127.0.0.1:5000)"
    )
    if not isinstance(value, str) or len(value) > 1024:
        return what
    scheme, sep, rest = value.partition("://")
    if sep:
        if scheme not in ("http", "https"):
            return f"{what}, not {scheme}://"
        value = rest
    m = _REGISTRY.match(value.rstrip("/"))
    if m is None or (m.group("port") is not None and not 0 < int(m.group("port")) < 65536):
        return what
    return None


FLAVORS: dict[str, dict[str, Flavor]] = {
    "RUNNER": {
        "local": Flavor(
            "steps run in worker processes on the control plane's machine",
            "plait.runners.LocalRunner",
        ),
        "docker": Flavor(
            "each step runs in its own container, from its environment's image",
            "the Docker runner (plait[docker])",
            {
                "keep_containers": Key(
                    "keep each step's container after it ends, for debugging (default false)",
                    _boolean,
                ),
                "network": Key(
                    "host: containers share the host's network; bridge: Docker's bridge, the "
                    "control plane reached at the bridge's gateway (default host)",
                    _one_of("host", "bridge"),
                ),
                "stop_grace_seconds": Key(
                    "seconds a cancelled step's container gets after SIGTERM before it is "
                    "killed (default 10)",
                    _seconds,
                ),
            },
        ),
    },
    "ARTIFACT_STORE": {
        "local": Flavor(
            "the control plane's artifact store (a folder, set by `plait server start "
            "--artifact-store`)",
            "the control plane",
        ),
    },
    "IMAGE_BUILDER": {
        "docker": Flavor(
            "builds the images of environments with the Docker daemon",
            "plait.engine.builds DockerImageBuilder",
            {
                "parent_image": Key(
                    "the parent image of environments that name none "
                    "(default python:MAJOR.MINOR-slim of the environment's Python)",
                    _image_reference,
                ),
            },
        ),
    },
    "CONTAINER_REGISTRY": {
        "docker": Flavor(
            "a registry (Docker registry HTTP API v2) that builds are pushed to and pulled from",
            "plait.engine.builds DockerImageBuilder",
            {
                "uri": Key(
                    "the registry's HOST:PORT or HOST:PORT/PATH; http:// or https:// before it "
                    "chooses the protocol (else HTTP on loopback, HTTPS elsewhere, as Docker)",
                    _registry_uri,
                    True,
                ),
            },
        ),
    },
    "SECRETS": {},
}
"""Flavors by kind (the store's kind names: ``RUNNER``, ...), each with its keys."""


def kind_text(kind: str) -> str:
    """A kind as users write it in messages: ``RUNNER`` -> ``runner``, ``IMAGE_BUILDER`` ->
    ``image builder``."""
    return kind.lower().replace("_", " ")


def check_component(name: str, kind: str, flavor: str, config: Mapping[str, Any]) -> None:
    """Refuses a component whose flavor is not known for its kind, or whose configuration has
    a key the flavor does not read, a bad value, or misses a required key.

    Raises:
        PipelineError: naming the component and listing what is valid.
    """
    what = kind_text(kind)
    flavors = FLAVORS.get(kind)
    if flavors is None:  # the API only passes kinds it knows
        raise PipelineError(f"component {name!r}: no kind {kind!r}")
    found = flavors.get(flavor)
    if found is None:
        valid = ", ".join(sorted(flavors)) or f"none (Plait has no {what} component yet)"
        raise PipelineError(
            f"component {name!r}: {what} flavor {flavor!r} is not known; valid: {valid}"
        )
    a = f"a {flavor} {what}"
    for key in sorted(config):
        if key not in found.keys:
            valid = ", ".join(sorted(found.keys)) or f"none ({a} takes no configuration)"
            raise PipelineError(f"component {name!r}: unknown key {key!r} for {a}; valid: {valid}")
        problem = found.keys[key].check(config[key])
        if problem is not None:
            got = json.dumps(config[key], sort_keys=True)
            got = got if len(got) <= 80 else f"{got[:80]}..."
            raise PipelineError(f"component {name!r}: {key} of {a} must be {problem}; got {got}")
    for key, spec in sorted(found.keys.items()):
        if spec.required and key not in config:
            raise PipelineError(f"component {name!r}: {a} needs {key} ({spec.doc})")
