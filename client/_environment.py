"""Execution environments: what a step needs installed, addressed by content."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from plait.ir.canonical import message_digest
from plait.ir.v1 import ir_pb2


@dataclass(frozen=True)
class Environment:
    """What a step's process needs: an image, a Python, packages and variables.

    Its :attr:`digest` addresses a build: a runner that builds environments (Docker images,
    virtualenvs) makes one build per digest and reuses it. The local process runner runs steps
    in the current interpreter and applies only :attr:`env`.

    Example::

        gpu = plait.Environment(requirements=["torch==2.13.0"], env={"OMP_NUM_THREADS": "1"})

        @plait.step(environment=gpu)
        def train(...): ...
    """

    parent_image: str = ""
    """The parent image of a container build; empty means the runner's default."""
    python_version: str = ""
    """The Python version ("3.11"); empty means the runner's default."""
    requirements: tuple[str, ...] = ()
    """pip requirement specifiers."""
    apt_packages: tuple[str, ...] = ()
    """Debian packages."""
    env: Mapping[str, str] = field(default_factory=dict)
    """Environment variables set while the step runs."""

    def __init__(
        self,
        *,
        parent_image: str = "",
        python_version: str = "",
        requirements: Iterable[str] = (),
        apt_packages: Iterable[str] = (),
        env: Mapping[str, str] | None = None,
    ) -> None:
        object.__setattr__(self, "parent_image", parent_image)
        object.__setattr__(self, "python_version", python_version)
        object.__setattr__(self, "requirements", tuple(requirements))
        object.__setattr__(self, "apt_packages", tuple(apt_packages))
        object.__setattr__(self, "env", dict(env or {}))
        for name, value in self.env.items():
            if not isinstance(name, str) or not isinstance(value, str):
                raise TypeError(f"Environment.env must map str to str, got {name!r}: {value!r}")

    def __hash__(self) -> int:
        return hash(self.digest)

    def to_proto(self) -> ir_pb2.Environment:
        """The IR form; variables sorted by name so that equal environments encode equally."""
        return ir_pb2.Environment(
            parent_image=self.parent_image,
            python_version=self.python_version,
            requirements=list(self.requirements),
            apt_packages=list(self.apt_packages),
            env=[ir_pb2.EnvVar(name=k, value=v) for k, v in sorted(self.env.items())],
        )

    @classmethod
    def from_proto(cls, msg: ir_pb2.Environment) -> Environment:
        return cls(
            parent_image=msg.parent_image,
            python_version=msg.python_version,
            requirements=msg.requirements,
            apt_packages=msg.apt_packages,
            env={e.name: e.value for e in msg.env},
        )

    @property
    def digest(self) -> str:
        """sha256 of the canonical encoding of :meth:`to_proto`."""
        return message_digest(self.to_proto())
