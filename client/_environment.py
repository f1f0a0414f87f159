"""What a step needs to run: its execution environment (addressed by content) and resources.

An :class:`Environment` has two digests. Its :attr:`~Environment.build_digest` covers what goes
into a build (an image, or a virtualenv for the local runner): the parent image, the Python
version, the requirements normalised and sorted, the apt packages sorted. Its
:attr:`~Environment.digest` covers all of it, the runtime variables included, and is part of a
step's cache key. Changing a variable changes the cache key but never makes a build.

:class:`Resources` says what one attempt of a step may use (CPUs, memory, GPUs); container
runners turn it into limits. It is not in the cache key.
"""

from __future__ import annotations

import math
import os
import re
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from plait.errors import PipelineDefinitionError
from plait.ir.builds import build_digest, normalize_requirement, parse_requirements
from plait.ir.canonical import message_digest
from plait.ir.v1 import ir_pb2

__all__ = ["Environment", "Resources", "parse_memory"]

_PYTHON_VERSION = re.compile(r"\d+(\.\d+){0,2}")
# a Debian package name (policy 5.6.1), an optional architecture and an optional version
_APT_PACKAGE = re.compile(r"[a-z0-9][a-z0-9+.-]+(:[a-z0-9-]+)?(=[A-Za-z0-9.+~:-]+)?")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _strings(what: str, values: Iterable[str]) -> list[str]:
    """The items of ``values``, which must be strings (a lone string is refused: it is
    iterable, and ``requirements="numpy"`` would otherwise be five one-letter requirements)."""
    if isinstance(values, str | bytes):
        raise TypeError(f"Environment: {what} must be a list of strings, not a single string")
    out = list(values)
    for value in out:
        if not isinstance(value, str):
            raise TypeError(
                f"Environment: {what} must be strings, got {type(value).__name__} {value!r}"
            )
    return out


def _requirements(
    given: Iterable[str], file: str | os.PathLike[str] | None, base: Path | None
) -> tuple[str, ...]:
    reqs: list[str] = []
    for line in _strings("requirements", given):
        req = normalize_requirement(line)
        if req.startswith("-"):
            raise PipelineDefinitionError(
                f"Environment: requirement {line!r}: pip options are not supported; list the "
                f"requirements themselves"
            )
        if req:
            reqs.append(req)
    if file is not None and os.fspath(file) != "":
        path = Path(file)
        if not path.is_absolute() and base is not None:
            path = base / path
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise PipelineDefinitionError(
                f"Environment: requirements_file {os.fspath(file)!r}: no such file (looked for "
                f"{path}; a relative path is relative to the file that creates the "
                f"Environment, or to the working directory where there is none)"
            ) from None
        except (OSError, UnicodeDecodeError) as exc:
            raise PipelineDefinitionError(
                f"Environment: requirements_file {os.fspath(file)!r} cannot be read: {exc}"
            ) from None
        try:
            reqs.extend(parse_requirements(text))
        except ValueError as exc:
            raise PipelineDefinitionError(
                f"Environment: requirements_file {os.fspath(file)!r}, {exc}"
            ) from None
    return tuple(sorted(set(reqs)))


def _apt_packages(given: Iterable[str]) -> tuple[str, ...]:
    out = set()
    for value in _strings("apt_packages", given):
        name = value.strip()
        if not _APT_PACKAGE.fullmatch(name):
            raise PipelineDefinitionError(
                f"Environment: apt package {value!r} is not a Debian package name "
                f'("libgomp1", "curl=7.88.1-10", "libc6:amd64")'
            )
        out.add(name)
    return tuple(sorted(out))


@dataclass(frozen=True)
class Environment:
    """What a step's process needs: a parent image, a Python, packages and variables.

    Its :attr:`build_digest` addresses a build: a runner that builds environments (Docker
    images, virtualenvs for the local runner) makes one build per digest and reuses it. The
    local runner runs a step whose environment has requirements in a virtualenv built for
    them (on the control plane's own Python); a step without requirements runs in the
    control plane's interpreter with :attr:`env` set.

    Requirements are pip requirement specifiers (``"numpy>=1.26"``, a URL, or a path to a
    wheel: a relative path is relative to the working directory of the control plane that
    builds, so prefer absolute paths). They are kept normalised and sorted: order, case of
    project names, white space and comments never change a digest; a version does.

    Example::

        gpu = plait.Environment(
            requirements_file="requirements.txt",
            apt_packages=["libgomp1"],
            env={"OMP_NUM_THREADS": "1"},
        )

        @plait.step(environment=gpu)
        def train(...): ...

    Args:
        parent_image: the parent image of a container build; empty: the image builder's
            default. The local runner ignores it.
        python_version: the Python version (``"3.11"``); empty: the runner's. The local
            runner runs the control plane's Python and refuses another version.
        requirements: pip requirement specifiers.
        requirements_file: a requirements file (a path; a relative one is relative to the
            folder of the Python file that creates the Environment, or to the working directory
            when there is no such file, as in a notebook), read now: its requirements
            (comments and blank lines dropped) join ``requirements``. Its content goes into
            the digests and the IR, never its path, so the same file in two folders is the
            same environment. Options lines (``-r``, ``--index-url`` ...) are refused.
        apt_packages: Debian packages a container build installs (the local runner does not
            install them: it uses the machine's own).
        env: environment variables set while the step runs; in the step's cache key, never in
            the build digest.

    Raises:
        TypeError: an argument of the wrong type (a requirement that is not a string).
        PipelineDefinitionError: a value Plait cannot use (a missing requirements file, an
            options line, a malformed Python version or package name).
    """

    parent_image: str = ""
    """The parent image of a container build; empty means the image builder's default."""
    python_version: str = ""
    """The Python version ("3.11"); empty means the runner's default."""
    requirements: tuple[str, ...] = ()
    """pip requirement specifiers, normalised, without duplicates, sorted."""
    apt_packages: tuple[str, ...] = ()
    """Debian packages, sorted."""
    env: Mapping[str, str] = field(default_factory=dict)
    """Environment variables set while the step runs."""
    requirements_file: str = field(default="", compare=False)
    """The requirements file the requirements were read from, for people (not in the IR)."""

    def __init__(
        self,
        *,
        parent_image: str = "",
        python_version: str = "",
        requirements: Iterable[str] = (),
        requirements_file: str | os.PathLike[str] | None = None,
        apt_packages: Iterable[str] = (),
        env: Mapping[str, str] | None = None,
    ) -> None:
        for what, value in (("parent_image", parent_image), ("python_version", python_version)):
            if not isinstance(value, str):
                raise TypeError(f"Environment: {what} must be a string, not {value!r}")
        version = python_version.strip()
        if version and not _PYTHON_VERSION.fullmatch(version):
            raise PipelineDefinitionError(
                f'Environment: python_version {python_version!r} is not a version like "3.11"'
            )
        if parent_image.strip() != parent_image or any(c.isspace() for c in parent_image):
            raise PipelineDefinitionError(
                f"Environment: parent_image {parent_image!r} is not an image reference"
            )
        object.__setattr__(self, "parent_image", parent_image)
        object.__setattr__(self, "python_version", version)
        # a relative file is found beside the module that creates the Environment: wherever
        # that module is imported from (a worker's unpacked code archive too)
        caller = sys._getframe(1).f_globals.get("__file__")
        base = Path(caller).resolve().parent if isinstance(caller, str) else None
        object.__setattr__(
            self, "requirements", _requirements(requirements, requirements_file, base)
        )
        object.__setattr__(self, "apt_packages", _apt_packages(apt_packages))
        object.__setattr__(
            self, "requirements_file", os.fspath(requirements_file) if requirements_file else ""
        )
        if env is not None and not isinstance(env, Mapping):
            raise TypeError(f"Environment: env must be a mapping of str to str, not {env!r}")
        object.__setattr__(self, "env", dict(env or {}))
        for name, value in self.env.items():
            if not isinstance(name, str) or not isinstance(value, str):
                raise TypeError(f"Environment.env must map str to str, got {name!r}: {value!r}")
            if not _ENV_NAME.fullmatch(name) or "\0" in value:
                raise PipelineDefinitionError(
                    f"Environment.env: {name!r} is not a variable name (letters, digits and "
                    f"_, not starting with a digit), or its value holds a NUL"
                )

    def __hash__(self) -> int:
        return hash(self.digest)

    def to_proto(self) -> ir_pb2.Environment:
        """The IR form: requirements and apt packages sorted, variables sorted by name, so
        that equal environments encode equally."""
        return ir_pb2.Environment(
            parent_image=self.parent_image,
            python_version=self.python_version,
            requirements=list(self.requirements),
            apt_packages=list(self.apt_packages),
            env=[ir_pb2.EnvVar(name=k, value=v) for k, v in sorted(self.env.items())],
        )

    @classmethod
    def from_proto(cls, msg: ir_pb2.Environment) -> Environment:
        """The environment an IR message describes (``from_proto(e.to_proto()) == e``)."""
        return cls(
            parent_image=msg.parent_image,
            python_version=msg.python_version,
            requirements=msg.requirements,
            apt_packages=msg.apt_packages,
            env={e.name: e.value for e in msg.env},
        )

    @property
    def digest(self) -> str:
        """sha256 of the canonical encoding of :meth:`to_proto`: the whole environment,
        variables included. Part of a step's cache key."""
        return message_digest(self.to_proto())

    @property
    def build_digest(self) -> str:
        """sha256 of what goes into a build (:func:`plait.ir.builds.build_digest`): the
        parent image, the Python version, the requirements and the apt packages; never
        :attr:`env`. Runs that ask for the same build digest share one build."""
        return build_digest(self.to_proto())


_UNITS = {
    "": 1,
    "K": 1000,
    "M": 1000**2,
    "G": 1000**3,
    "T": 1000**4,
    "KI": 1024,
    "MI": 1024**2,
    "GI": 1024**3,
    "TI": 1024**4,
}
_MEMORY = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([KMGT]I?)?B?\s*", re.IGNORECASE)
_MAX_MEMORY = 2**63 - 1
_MAX_GPUS = 2**32 - 1


def parse_memory(value: int | str) -> int:
    """Bytes from an int (bytes) or a string with a unit: ``"512MiB"``, ``"1.5Gi"``, ``"2G"``.

    ``K``, ``M``, ``G``, ``T`` are powers of 1000, ``Ki``, ``Mi``, ``Gi``, ``Ti`` powers of
    1024 (as Kubernetes has them); a trailing ``B`` and the case of the letters do not matter.

    Raises:
        TypeError: neither an int nor a string.
        PipelineDefinitionError: a negative amount, or a string that is not an amount.
    """
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise TypeError(
            f'Resources: memory must be bytes (int) or a string like "512MiB", not {value!r}'
        )
    if isinstance(value, int):
        amount = value
    else:
        m = _MEMORY.fullmatch(value)
        if m is None:
            raise PipelineDefinitionError(
                f"Resources: memory {value!r} is not an amount of memory: write bytes, or a "
                f"number and a unit (K, M, G, T: powers of 1000; Ki, Mi, Gi, Ti: of 1024), "
                f'like "512MiB" or "2G"'
            )
        amount = round(float(m.group(1)) * _UNITS[(m.group(2) or "").upper()])
    if not 0 <= amount <= _MAX_MEMORY:
        raise PipelineDefinitionError(f"Resources: memory must be >= 0 bytes, not {value!r}")
    return amount


@dataclass(frozen=True)
class Resources:
    """What one attempt of a step may use: ``@plait.step(resources=plait.Resources(...))``.

    Container runners turn it into limits and device requests (an attempt that goes past its
    memory is killed, and CRASHED); the local process runner does not limit a step. Resources
    are not in the cache key: changing them reuses cached results. A plain dict with the same
    keys does too: ``resources={"cpu": 2, "memory": "1Gi"}``.

    Args:
        cpu: CPUs (1.5 is one and a half); 0: no limit.
        memory: bytes, or a string with a unit (see :func:`parse_memory`); 0: no limit.
        gpus: GPUs the step needs; 0: none.
    """

    cpu: float = 0.0
    """CPUs; 0 means no limit."""
    memory: int = 0
    """Memory in bytes; 0 means no limit."""
    gpus: int = 0
    """GPUs the step needs; 0 means none."""

    def __init__(self, *, cpu: float = 0.0, memory: int | str = 0, gpus: int = 0) -> None:
        if isinstance(cpu, bool) or not isinstance(cpu, int | float):
            raise TypeError(f"Resources: cpu must be a number, not {cpu!r}")
        if not (math.isfinite(cpu) and cpu >= 0):
            raise PipelineDefinitionError(f"Resources: cpu must be a finite number >= 0, not {cpu}")
        if isinstance(gpus, bool) or not isinstance(gpus, int):
            raise TypeError(f"Resources: gpus must be an integer, not {gpus!r}")
        if not 0 <= gpus <= _MAX_GPUS:
            raise PipelineDefinitionError(f"Resources: gpus must be >= 0, not {gpus}")
        object.__setattr__(self, "cpu", float(cpu))
        object.__setattr__(self, "memory", parse_memory(memory))
        object.__setattr__(self, "gpus", gpus)

    @classmethod
    def coerce(cls, value: Resources | Mapping[str, Any]) -> Resources:
        """``value`` when it is a Resources, else the Resources a dict with the keys ``cpu``,
        ``memory`` and ``gpus`` describes."""
        if isinstance(value, Resources):
            return value
        if not isinstance(value, Mapping):
            raise TypeError(
                f"resources must be a plait.Resources or a dict with the keys cpu, memory, "
                f"gpus; not {value!r}"
            )
        unknown = set(value) - {"cpu", "memory", "gpus"}
        if unknown:
            raise PipelineDefinitionError(
                f"resources: unknown key(s) {', '.join(sorted(map(str, unknown)))}; the keys "
                f"are cpu, memory, gpus"
            )
        return cls(**value)

    def to_proto(self) -> ir_pb2.Resources:
        """The IR form."""
        return ir_pb2.Resources(cpu=self.cpu, memory_bytes=self.memory, gpus=self.gpus)

    @classmethod
    def from_proto(cls, msg: ir_pb2.Resources) -> Resources:
        """The resources an IR message describes (``from_proto(r.to_proto()) == r``)."""
        return cls(cpu=msg.cpu, memory=msg.memory_bytes, gpus=msg.gpus)
