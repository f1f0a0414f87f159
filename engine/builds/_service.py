"""The control plane's side of builds: which build a task needs, made once per key, recorded.

A task for a container runner runs in an image built for its step's environment; a task for
the local runner whose environment has requirements runs in a virtualenv built for it. Either
way the build is addressed by its key (the sha256 of its key material: the environment's build
digest and what the builder adds, see :mod:`plait.engine.builds._key`). Before building, the
control plane claims the key in the store: a run or replica that asks for a key another one is
building waits for that build instead of making it twice. Every use is recorded against the run.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio

from plait.engine._lazy import lazy_module
from plait.engine.builds._errors import BuildError
from plait.engine.store._builds import (
    BuildRecord,
    claim_build,
    fail_build,
    finish_build,
    mark_used,
    renew_build,
)
from plait.errors import PlaitError
from plait.ir.builds import build_digest
from plait.ir.v1 import ir_pb2

if TYPE_CHECKING:
    import sqlalchemy as sa
    from sqlalchemy.engine import Connection

    from plait.engine.store import _schema as db
else:
    sa = lazy_module("sqlalchemy")
    db = lazy_module("plait.engine.store._schema")

if TYPE_CHECKING:
    from plait.engine.builds._docker import DockerImageBuilder
    from plait.engine.builds._venv import VenvBuilder
    from plait.engine.store import Store

log = logging.getLogger("plait.builds")

CLAIM_SECONDS = 60.0
"""How long a claim on a key lasts without renewal (renewed every third of it while building):
a replica that dies mid-build holds others up for at most this long."""
WAIT_POLL = 0.5
"""How often a request for a key another replica builds looks whether it is done."""


@dataclass(frozen=True)
class StackBuildConfig:
    """What the run's stack says about builds: its image builder's and registry's settings."""

    parent_image: str = ""
    """The image builder's default parent image (its ``parent_image`` key)."""
    registry: str = ""
    """The container registry's ``uri``; empty: no registry."""
    runner: dict[str, str] | None = None
    """The configuration of the stack's runner component."""


def stack_build_config(conn: Connection, run_id: str) -> StackBuildConfig:
    """The build settings of the stack ``run_id`` runs on."""
    stack = conn.execute(sa.select(db.runs.c.stack).where(db.runs.c.id == run_id)).scalar()
    comps = conn.execute(
        sa.select(db.stacks.c.components).where(db.stacks.c.name == (stack or "default"))
    ).scalar()
    configs: dict[str, dict[str, Any]] = {}
    for kind, name in dict(comps or {}).items():
        config = conn.execute(
            sa.select(db.components.c.config).where(db.components.c.name == name)
        ).scalar()
        configs[kind] = dict(config or {})
    return StackBuildConfig(
        parent_image=str(configs.get("IMAGE_BUILDER", {}).get("parent_image", "")),
        registry=str(configs.get("CONTAINER_REGISTRY", {}).get("uri", "")),
        runner={k: str(v) for k, v in configs.get("RUNNER", {}).items()},
    )


class Builds:
    """Images and virtualenvs for tasks, each key built once across runs and replicas."""

    def __init__(self, store: Store, home: Path, holder: str) -> None:
        self._store = store
        self._home = home
        self._holder = holder
        self._images: dict[str, DockerImageBuilder] = {}
        self._venvs: VenvBuilder | None = None

    def _image_builder(self, parent_image: str) -> DockerImageBuilder:
        builder = self._images.get(parent_image)
        if builder is None:
            try:
                from plait.engine.builds._docker import DockerImageBuilder
            except ImportError as exc:
                raise BuildError(
                    f"building images needs aiodocker: pip install 'plait[docker]' ({exc})"
                ) from None
            builder = self._images[parent_image] = DockerImageBuilder(
                self._home, parent_image=parent_image
            )
        return builder

    def _venv_builder(self) -> VenvBuilder:
        if self._venvs is None:
            from plait.engine.builds._venv import VenvBuilder

            self._venvs = VenvBuilder(self._home)
        return self._venvs

    async def image(
        self,
        env: ir_pb2.Environment,
        *,
        run_id: str,
        config: StackBuildConfig,
        log_line: Callable[[str], None],
    ) -> str:
        """The reference of an image for ``env`` (found, pulled or built)."""
        builder = self._image_builder(config.parent_image)
        try:
            material = await builder.material(env, config.registry)
        except PlaitError as exc:
            raise BuildError(str(exc)) from None
        from plait.engine.builds._key import material_key

        key = material_key(material)

        async def make(ready: BuildRecord | None) -> dict[str, Any]:
            # recorded as pushed to this registry: a local image needs no registry round trip
            built = await builder.ensure(
                env,
                key=key,
                material=material,
                registry=config.registry,
                log=log_line,
                pushed=ready is not None
                and bool(config.registry)
                and ready.pushed_to == _ref(key, config),
            )
            return {
                "reference": built.reference,
                "image_id": built.image_id,
                "size_bytes": built.size_bytes,
                "duration_seconds": built.duration_seconds,
                "source": built.source,
                "pushed_to": built.pushed_to,
            }

        done = await self._once(key, "image", env, material, run_id, make, log_line)
        return str(done["reference"])

    async def venv(
        self, env: ir_pb2.Environment, *, run_id: str, log_line: Callable[[str], None]
    ) -> str:
        """The Python interpreter of a virtualenv for ``env`` (found or built)."""
        from plait.ir.builds import build_material

        material = {**build_material(env), "interpreter": _interpreter()}
        from plait.ir.canonical import digest_json

        key = digest_json(material)
        builder = self._venv_builder()

        async def make(ready: BuildRecord | None) -> dict[str, Any]:
            built = await builder.ensure(env, key=key, log=log_line)
            return {
                "reference": built.reference,
                "image_id": "",
                "size_bytes": built.size_bytes,
                "duration_seconds": built.duration_seconds,
                "source": built.source,
                "pushed_to": "",
                "python": built.python,
            }

        done = await self._once(key, "venv", env, material, run_id, make, log_line)
        return str(done.get("python") or Path(done["reference"]) / "bin" / "python")

    async def _once(
        self,
        key: str,
        kind: str,
        env: ir_pb2.Environment,
        material: dict[str, Any],
        run_id: str,
        make: Callable[[BuildRecord | None], Any],
        log_line: Callable[[str], None],
    ) -> dict[str, Any]:
        """Claims ``key``, waits while another holder builds it, and makes it (``make``: the
        builder, which reuses what it finds) when this one holds the claim; records the use."""
        digest = build_digest(env)
        claim = functools.partial(
            claim_build,
            key=key,
            kind=kind,
            build_digest=digest,
            material=material,
            holder=self._holder,
            ttl=CLAIM_SECONDS,
        )
        said = False
        while True:
            state, ready = await self._store.write(lambda conn: claim(conn, now=time.time()))
            if state != "wait":
                break
            if not said:
                log_line(f"build {key[:12]} is being made for another run; waiting for it")
                said = True
            await anyio.sleep(WAIT_POLL)
        # ready or mine: the builder finds what exists (locally, in the registry) or makes it;
        # under the claim when it is this one's, renewed while it lasts
        try:
            if state == "mine":
                async with anyio.create_task_group() as tg:
                    tg.start_soon(self._renew, key)
                    try:
                        done: dict[str, Any] = await make(None)
                    finally:
                        tg.cancel_scope.cancel()
            else:
                done = await make(ready)
        except Exception as exc:
            message = str(exc) if isinstance(exc, PlaitError) else f"{type(exc).__name__}: {exc}"
            if state == "mine":
                with anyio.CancelScope(shield=True):
                    await self._store.write(fail_build, key, self._holder, message, time.time())
            raise BuildError(message) from exc
        now = time.time()

        def record(conn: Connection) -> None:
            if state == "mine":
                finish_build(
                    conn,
                    key,
                    self._holder,
                    reference=done["reference"],
                    image_id=done["image_id"],
                    size_bytes=int(done["size_bytes"]),
                    duration_seconds=float(done["duration_seconds"]),
                    source=done["source"],
                    pushed_to=done["pushed_to"],
                    now=now,
                )
            mark_used(conn, key, run_id, now, done["source"])

        await self._store.write(record)
        how = _SOURCES.get(done["source"], done["source"])
        log_line(f"{kind} {done['reference']} (build {key[:12]}): {how}")
        return done

    async def _renew(self, key: str) -> None:
        while True:
            await anyio.sleep(CLAIM_SECONDS / 3)
            await self._store.write(renew_build, key, self._holder, time.time(), CLAIM_SECONDS)

    async def remove(self, record: BuildRecord) -> None:
        """Removes what a build made (its image, or its virtualenv's folder)."""
        if record.kind == "image":
            if record.reference:
                await self._image_builder("").remove(record.reference)
        elif record.reference:
            await self._venv_builder().remove(record.reference)

    async def aclose(self) -> None:
        for builder in self._images.values():
            await builder.aclose()
        self._images.clear()


def _ref(key: str, config: StackBuildConfig) -> str:
    from plait.engine.builds._docker import image_reference

    return image_reference(key, config.registry)


_SOURCES = {
    "built": "built",
    "local": "found on this machine, reused",
    "pulled": "pulled from the container registry, reused",
}


@functools.cache
def _interpreter() -> str:
    import sys

    # a virtualenv sees the packages of the environment it was made from: that one's folder
    # is part of what it is
    v = sys.version_info
    return f"{sys.implementation.name}-{v.major}.{v.minor} {sys.prefix}"
