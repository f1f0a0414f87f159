"""The Docker image builder: an image per key, found locally, pulled, or built and pushed.

An image is tagged ``plait-env:<key[:40]>`` (``HOST:PORT[/PATH]/plait-env:<key[:40]>`` with a
container registry) and labelled ``plait.build.key`` / ``plait.build.digest``. :meth:`ensure`
looks for it in this order, and stops at the first that has it:

1. the local Docker host (source ``local``);
2. the stack's container registry, asked over the registry HTTP API v2 (plain HTTP for a
   registry the daemon treats as insecure, such as any on 127.0.0.0/8; HTTPS otherwise), and
   pulled (source ``pulled``). A registry that cannot be asked fails the build: the builder
   never guesses whether it holds the image;
3. a build through the daemon's build API (source ``built``), then a push to the registry.

The recipe (:data:`RECIPE_VERSION`), as a Dockerfile run on the parent image by its id::

    FROM <parent id> AS base
    FROM base AS deps                  a venv at /opt/plait with Plait's dependencies
    FROM base
    COPY --from=deps /opt/plait ...    (only the venv, not the wheels it came from)
    install the wheel of Plait         (a Plait edit rebuilds from here)
    ENV PATH=/opt/plait/bin:$PATH      so ``python`` is the venv's: it imports Plait
    apt-get install the apt packages   (an apt package change rebuilds from here)
    install the requirements           (a requirement change rebuilds only this)

The layers are in that order so that Docker's layer cache reuses Plait's layers for every
environment on one parent image. Every wheel is made on the host
(:mod:`plait.engine.builds._wheels`), so no build step reaches a Python package index (only
``apt-get`` reaches the parent's Debian mirrors, when there are apt packages). The image has
no entrypoint; its command is ``python``. Concurrent :meth:`ensure` calls for one key in one
process build it once (the control plane adds a claim in the store for other processes and
replicas).
"""

from __future__ import annotations

import contextlib
import io
import ipaddress
import json
import re
import shlex
import sys
import tarfile
import tempfile
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Literal

import anyio
import anyio.to_thread

from plait.engine.builds._errors import BuildError
from plait.engine.builds._key import image_material
from plait.engine.builds._wheels import (
    PROBE,
    Target,
    WheelCache,
    installed_plait,
    requirement_digests,
)
from plait.ir.builds import build_digest
from plait.ir.v1 import ir_pb2

if TYPE_CHECKING:
    import aiodocker
    import aiohttp

__all__ = ["RECIPE_VERSION", "REPOSITORY", "BuildError", "BuiltImage", "DockerImageBuilder"]

RECIPE_VERSION = "1"
"""The version of the recipe below; part of every key, so changing the recipe makes new
images. Bump it with every change of the generated Dockerfile."""
REPOSITORY = "plait-env"
"""The repository name of the images (under the registry's HOST:PORT[/PATH] when there is
one)."""
TAG_LENGTH = 40
"""Hex characters of the key in an image's tag (a Docker tag has at most 128)."""
KEY_LABEL = "plait.build.key"
DIGEST_LABEL = "plait.build.digest"

_MANIFEST_TYPES = ", ".join(
    [
        "application/vnd.docker.distribution.manifest.v2+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
        "application/vnd.oci.image.manifest.v1+json",
        "application/vnd.oci.image.index.v1+json",
    ]
)
_STEP = re.compile(r"^Step (\d+/\d+) : (.*)$", re.DOTALL)
_PIP = "--no-index --no-cache-dir --disable-pip-version-check --root-user-action=ignore"
_REGISTRY_TIMEOUT = 30.0

Log = Callable[[str], None]


@dataclass(frozen=True)
class BuiltImage:
    """An image :meth:`DockerImageBuilder.ensure` found, pulled or built."""

    reference: str
    """The image's name, to run it by (``[HOST:PORT/]plait-env:<key[:40]>``)."""
    image_id: str
    """``sha256:...`` on this Docker host."""
    size_bytes: int
    duration_seconds: float
    """How long finding, pulling or building (and pushing) it took."""
    source: Literal["local", "pulled", "built"]
    pushed_to: str
    """The reference in the registry (pushed now or found there); empty without a registry."""


@dataclass(frozen=True)
class _Registry:
    scheme: str | None
    """``http``/``https`` when the uri names it, else decided by the daemon's rules."""
    host: str
    """``HOST:PORT``"""
    path: str
    """The path under the host ("" or ``team/images``)."""

    @classmethod
    def parse(cls, uri: str) -> _Registry:
        text = uri.strip().rstrip("/")
        scheme = None
        for s in ("http", "https"):
            if text.startswith(f"{s}://"):
                scheme, text = s, text[len(s) + 3 :]
        host, _, path = text.partition("/")
        if not host:
            raise BuildError(f"container registry uri {uri!r}: expected HOST:PORT[/PATH]")
        return cls(scheme, host, path)

    def repository(self) -> str:
        """The images' repository inside the registry (``PATH/plait-env``)."""
        return f"{self.path}/{REPOSITORY}" if self.path else REPOSITORY


def image_reference(key: str, registry: str = "") -> str:
    """The name of the image of ``key`` (in ``registry``'s namespace when given)."""
    tag = key[:TAG_LENGTH]
    if not registry:
        return f"{REPOSITORY}:{tag}"
    reg = _Registry.parse(registry)
    return f"{reg.host}/{reg.repository()}:{tag}"


def _with_tag(reference: str) -> str:
    """``python`` → ``python:latest`` (what Docker means by it); references with a tag or a
    digest unchanged."""
    last = reference.rsplit("/", 1)[-1]
    return reference if (":" in last or "@" in last) else f"{reference}:latest"


def _short_line(text: str, limit: int = 160) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


class DockerImageBuilder:
    """Builds, finds and publishes the images of environments with a Docker daemon.

    Args:
        home: ``PLAIT_HOME``; wheels and probes are cached under ``home/builds``.
        parent_image: the parent image of environments that name none; empty means
            ``python:<version>-slim`` (the environment's Python version, else this one's).
        docker_url: the daemon (``unix:///var/run/docker.sock``, ``tcp://...``); None: Docker's
            usual resolution (``DOCKER_HOST``, the socket).

    Attributes:
        build_count: how many builds this builder started (not found, not pulled).
    """

    def __init__(
        self, home: Path, *, parent_image: str = "", docker_url: str | None = None
    ) -> None:
        self.home = Path(home)
        self.parent_image = parent_image.strip()
        self.build_count = 0
        self._docker_url = docker_url
        self._docker: aiodocker.Docker | None = None
        self._http: aiohttp.ClientSession | None = None
        self._wheels = WheelCache(self.home)
        self._flights: dict[str, tuple[anyio.Lock, list[int]]] = {}
        self._targets: dict[str, Target] = {}
        self._schemes: dict[str, str] = {}

    # -- clients --------------------------------------------------------------------------

    def _client(self) -> aiodocker.Docker:
        if self._docker is None:
            try:
                import aiodocker
            except ImportError as exc:
                raise BuildError(
                    f"building images needs aiodocker: pip install 'plait[docker]' ({exc})"
                ) from None
            self._docker = aiodocker.Docker(url=self._docker_url)
        return self._docker

    def _session(self) -> aiohttp.ClientSession:
        if self._http is None:
            import aiohttp

            self._http = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=_REGISTRY_TIMEOUT)
            )
        return self._http

    @contextlib.asynccontextmanager
    async def _docker_errors(self, what: str) -> AsyncIterator[None]:
        """Maps the daemon's and the connection's errors to a :class:`BuildError`."""
        import aiodocker
        import aiohttp

        try:
            yield
        except aiodocker.DockerError as exc:
            raise BuildError(f"{what} failed: {exc.message}") from exc
        except (aiohttp.ClientError, OSError) as exc:
            where = self._docker_url or "the default Docker socket (DOCKER_HOST)"
            raise BuildError(
                f"{what} failed: the Docker daemon at {where} cannot be reached ({exc}); "
                f"start it or point the builder at it"
            ) from exc

    async def aclose(self) -> None:
        """Closes the connections to the daemon and to registries."""
        with anyio.CancelScope(shield=True):
            if self._http is not None:
                await self._http.close()
                self._http = None
            if self._docker is not None:
                await self._docker.close()
                self._docker = None

    # -- key material ---------------------------------------------------------------------

    def parent_reference(self, env: ir_pb2.Environment) -> str:
        """The parent image an environment's image is built on, after defaults."""
        version = env.python_version.strip() or f"{sys.version_info[0]}.{sys.version_info[1]}"
        parent = env.parent_image.strip() or self.parent_image or f"python:{version}-slim"
        return _with_tag(parent)

    async def _inspect(self, reference: str) -> dict[str, Any] | None:
        import aiodocker

        docker = self._client()
        async with self._docker_errors(f"looking up image {reference}"):
            try:
                return await docker.images.inspect(reference)
            except aiodocker.DockerError as exc:
                if exc.status == 404:
                    return None
                raise

    async def _resolve_parent(self, parent: str) -> str:
        image = await self._inspect(parent)
        if image is None:
            import aiodocker

            try:
                async with self._docker_errors(f"pulling the parent image {parent}"):
                    await self._client().images.pull(parent)
            except BuildError as exc:
                cause = exc.__cause__
                detail = cause.message if isinstance(cause, aiodocker.DockerError) else str(exc)
                raise BuildError(
                    f"the parent image {parent!r} is not present on the Docker host and could "
                    f"not be pulled ({detail}); build, load or pull it there first (docker "
                    f"build -t / docker load / docker pull), or set another parent_image on "
                    f"the environment or the image builder"
                ) from None
            image = await self._inspect(parent)
            if image is None:
                raise BuildError(f"the parent image {parent!r} vanished right after its pull")
        return str(image["Id"])

    async def material(self, env: ir_pb2.Environment, registry: str = "") -> dict[str, Any]:
        """The key material of the image for ``env`` (see :mod:`plait.engine.builds._key`).

        Resolves the parent image to its id on the Docker host (pulling it when it is not
        there), and digests local path requirements. The registry is not part of the key:
        the same image serves every stack.

        Raises:
            BuildError: the parent image is not present and cannot be pulled; a local
                requirement does not exist; the daemon cannot be reached.
        """
        del registry  # not in the key; the signature is shared with other builders
        parent = self.parent_reference(env)
        parent_id = await self._resolve_parent(parent)
        plait = await anyio.to_thread.run_sync(installed_plait)
        digests = await anyio.to_thread.run_sync(requirement_digests, list(env.requirements))
        return image_material(
            env,
            parent_image=parent,
            parent_image_id=parent_id,
            python_version=env.python_version.strip(),
            plait_version=plait.plait_version,
            recipe_version=RECIPE_VERSION,
            file_digests=digests,
        )

    # -- ensure ---------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _flight(self, key: str, log: Log) -> AsyncIterator[None]:
        """One holder per key at a time in this process; the others wait, then find it."""
        lock, users = self._flights.setdefault(key, (anyio.Lock(), [0]))
        users[0] += 1
        try:
            if lock.locked():
                log("the same image is being made for another request: waiting for it")
            async with lock:
                yield
        finally:
            users[0] -= 1
            if users[0] == 0:
                del self._flights[key]

    async def ensure(
        self,
        env: ir_pb2.Environment,
        *,
        key: str,
        material: Mapping[str, Any],
        registry: str = "",
        log: Log,
        pushed: bool = False,
    ) -> BuiltImage:
        """The image of ``key``: found locally, pulled from ``registry``, or built (then pushed
        to ``registry``). ``material`` is what :meth:`material` returned for ``env``, ``key``
        its :func:`~plait.engine.builds._key.material_key`. Progress goes to ``log``, a line at
        a time (build steps as ``step N/M: ...``). ``pushed``: the caller's records say the
        image is in ``registry`` already, so a local image is used without asking the
        registry again.

        Raises:
            BuildError: the registry cannot be reached or refuses; the build or a push fails;
                the daemon cannot be reached.
        """
        reference = image_reference(key, registry)
        async with self._flight(key, log):
            start = time.monotonic()
            image = await self._local(key, reference, log)
            source: Literal["local", "pulled", "built"] = "local"
            if image is None and registry and await self._registry_has(registry, key, log):
                image = await self._pull(key, reference, log)
                source = "pulled"
            if image is None:
                await self._build(env, key, material, reference, log)
                source = "built"
                image = await self._inspect(reference)
                if image is None:
                    raise BuildError(f"the build of {reference} left no image")
            pushed_to = ""
            if registry:
                if source == "built" or (
                    source == "local"
                    and not pushed
                    and not await self._registry_has(registry, key, log)
                ):
                    await self._push(reference, log)
                pushed_to = reference
            return BuiltImage(
                reference=reference,
                image_id=str(image["Id"]),
                size_bytes=int(image.get("Size") or 0),
                duration_seconds=time.monotonic() - start,
                source=source,
                pushed_to=pushed_to,
            )

    async def _local(self, key: str, reference: str, log: Log) -> dict[str, Any] | None:
        """The local image of ``key`` under ``reference``; an image of the key under another
        name (made without this registry) is tagged so."""
        image = await self._inspect(reference)
        if image is not None and _labels(image).get(KEY_LABEL) == key:
            log(f"image {reference} found on the Docker host")
            return image
        docker = self._client()
        async with self._docker_errors("listing images"):
            others = await docker.images.list(filters={"label": [f"{KEY_LABEL}={key}"]})
        for other in others:
            repo, _, tag = reference.rpartition(":")
            async with self._docker_errors(f"tagging image {other['Id']} as {reference}"):
                await docker.images.tag(str(other["Id"]), repo, tag=tag)
            log(f"image {other['Id'][:19]} of this key found on the Docker host: {reference}")
            return await self._inspect(reference)
        return None

    async def _scheme(self, reg: _Registry) -> str:
        """HTTP for a registry the daemon lets speak plain HTTP (in its insecure CIDRs, such
        as 127.0.0.0/8, or listed as insecure), HTTPS otherwise."""
        if reg.scheme:
            return reg.scheme
        if reg.host in self._schemes:
            return self._schemes[reg.host]
        async with self._docker_errors("reading the Docker daemon's registry settings"):
            info = await self._client().system.info()
        config = info.get("RegistryConfig") or {}
        index = (config.get("IndexConfigs") or {}).get(reg.host)
        scheme = "https"
        if index is not None:
            scheme = "https" if index.get("Secure", True) else "http"
        else:
            name = reg.host.rsplit(":", 1)[0].strip("[]") if ":" in reg.host else reg.host
            try:
                addresses = {a[4][0] for a in await anyio.getaddrinfo(name, None)}
            except OSError:
                addresses = set()
            cidrs = [ipaddress.ip_network(c) for c in config.get("InsecureRegistryCIDRs") or []]
            for address in addresses:
                ip = ipaddress.ip_address(str(address).split("%")[0])
                if any(ip in net for net in cidrs if net.version == ip.version):
                    scheme = "http"
        self._schemes[reg.host] = scheme
        return scheme

    async def _registry_has(self, registry: str, key: str, log: Log) -> bool:
        """Whether ``registry`` holds the image of ``key`` (a manifest HEAD)."""
        import aiohttp

        reg = _Registry.parse(registry)
        tag = key[:TAG_LENGTH]
        url = f"{await self._scheme(reg)}://{reg.host}/v2/{reg.repository()}/manifests/{tag}"
        try:
            async with self._session().head(url, headers={"Accept": _MANIFEST_TYPES}) as resp:
                status = resp.status
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            detail = str(exc) or type(exc).__name__
            raise BuildError(
                f"the container registry {registry} cannot be reached (HEAD {url}: {detail}); "
                f"whether it holds the image is unknown, so nothing was built or pulled: start "
                f"the registry, or fix the uri of the stack's container registry"
            ) from exc
        if status == 200:
            log(f"image {reg.host}/{reg.repository()}:{tag} found in the registry")
            return True
        if status == 404:
            log(f"image {reg.host}/{reg.repository()}:{tag} is not in the registry")
            return False
        if status in (401, 403):
            raise BuildError(
                f"the container registry {registry} refused to say whether it holds the image "
                f"(HTTP {status} for HEAD {url}): Plait does not log in to registries; use one "
                f"that allows anonymous pulls and pushes"
            )
        raise BuildError(
            f"the container registry {registry} answered HTTP {status} to HEAD {url}; whether "
            f"it holds the image is unknown, so nothing was built or pulled"
        )

    async def _pull(self, key: str, reference: str, log: Log) -> dict[str, Any]:
        docker = self._client()
        log(f"pulling {reference}")
        async with self._docker_errors(f"pulling {reference} from the registry"):
            async for item in docker.images.pull(reference, stream=True):
                _log_progress(item, log)
        image = await self._inspect(reference)
        if image is None or _labels(image).get(KEY_LABEL) != key:
            raise BuildError(
                f"the image pulled as {reference} is not the image of key {key} (its "
                f"{KEY_LABEL} label differs): the registry holds something else under that tag"
            )
        return image

    async def _push(self, reference: str, log: Log) -> None:
        docker = self._client()
        repo, _, tag = reference.rpartition(":")
        log(f"pushing {reference}")
        async with self._docker_errors(f"pushing {reference} to the registry"):
            async for item in docker.images.push(repo, tag=tag, stream=True):
                _log_progress(item, log)

    # -- building -------------------------------------------------------------------------

    async def _target(self, parent_id: str, declared: str, log: Log) -> tuple[Target, str]:
        """The parent image's Python (run once per image id, cached on disk) and user."""
        image = await self._inspect(parent_id)
        if image is None:
            raise BuildError(f"the parent image {parent_id} is no longer on the Docker host")
        user = str((image.get("Config") or {}).get("User") or "")
        target = self._targets.get(parent_id)
        cache = self.home / "builds" / "parents" / f"{parent_id.replace(':', '-')}.json"
        if target is None and cache.is_file():
            target = Target(**json.loads(cache.read_text()))
        if target is None:
            log(f"looking up the Python of the parent image {parent_id[:19]}")
            target = Target(**json.loads(await self._probe(parent_id)))
            cache.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            cache.write_text(json.dumps(target.__dict__))
        self._targets[parent_id] = target
        if declared and not (target.python + ".").startswith(declared + "."):
            raise BuildError(
                f"the environment asks for Python {declared}, but its parent image has Python "
                f"{target.python}: choose a parent image with that Python, or drop "
                f"python_version"
            )
        return target, user

    async def _probe(self, parent_id: str) -> str:
        docker = self._client()
        config: dict[str, Any] = {
            "Image": parent_id,
            "Entrypoint": ["python3", "-c", PROBE],
            "Cmd": [],
            "User": "0",
            "HostConfig": {"NetworkMode": "none"},
            "Labels": {"plait.probe": "python"},
        }
        async with self._docker_errors(f"running python3 in the parent image {parent_id[:19]}"):
            container = await docker.containers.create(config)
            try:
                await container.start()
                status = await container.wait()
                output = "".join(await container.log(stdout=True, stderr=True))
            finally:
                with anyio.CancelScope(shield=True):
                    await container.delete(force=True)
        if status.get("StatusCode") != 0:
            raise BuildError(
                f"the parent image {parent_id[:19]} cannot run python3 (exit "
                f"{status.get('StatusCode')}: {_short_line(output, 400)}): Plait's images need "
                f"Python 3 in the parent image (python3 on PATH)"
            )
        return output.strip().splitlines()[-1]

    async def _build(
        self,
        env: ir_pb2.Environment,
        key: str,
        material: Mapping[str, Any],
        reference: str,
        log: Log,
    ) -> None:
        self.build_count += 1
        parent_id = str(material["parent_image_id"])
        log(f"building {reference} on {material['parent_image']} ({parent_id[:19]})")
        target, user = await self._target(parent_id, str(material["python_version"]), log)
        plait = await anyio.to_thread.run_sync(installed_plait)
        if plait.plait_version != material["plait_version"]:
            raise BuildError(
                f"Plait changed since the image's key was computed ({material['plait_version']} "
                f"→ {plait.plait_version}): run again"
            )
        deps = await self._wheels.dependencies(plait, target, log)
        plait_wheel = await self._wheels.plait_wheel(plait, log)
        requirements = list(material.get("requirements") or [])
        reqs = None
        if requirements:
            reqs = await self._wheels.requirements(
                requirements,
                dict(material.get("file_digests") or {}),
                target,
                log,
                image_folder="/tmp/plait-reqs",
            )
        pip_wheel = next(deps.glob("pip-*.whl"), None)
        if pip_wheel is None:
            raise BuildError(f"the wheelhouse {deps} has no wheel of pip: remove it and retry")
        dockerfile = _dockerfile(
            parent_id=parent_id,
            apt_packages=list(material.get("apt_packages") or []),
            user=user,
            pip_wheel=pip_wheel.name,
            plait_wheel=plait_wheel.name,
            has_requirements=reqs is not None,
            key=key,
        )
        labels = {KEY_LABEL: key, DIGEST_LABEL: build_digest(env)}
        context = await anyio.to_thread.run_sync(
            _context, dockerfile, deps, plait_wheel, pip_wheel, reqs
        )
        try:
            await self._run_build(context, reference, labels, log)
        finally:
            context.close()

    async def _run_build(
        self, context: IO[bytes], reference: str, labels: dict[str, str], log: Log
    ) -> None:
        import aiodocker

        docker = self._client()
        tail: deque[str] = deque(maxlen=20)
        step = ""
        try:
            async with self._docker_errors(f"building {reference}"):
                stream = docker.images.build(
                    fileobj=context,
                    encoding="identity",
                    tag=reference,
                    labels=labels,
                    rm=True,
                    forcerm=True,
                    stream=True,
                )
                async for item in stream:
                    for line in str(item.get("stream") or "").splitlines():
                        line = line.rstrip()
                        m = _STEP.match(line)
                        if m:
                            step = f"step {m.group(1)}: {_short_line(m.group(2))}"
                            log(step)
                        elif line and not line.startswith(
                            (" ---> Running in", "Removing intermediate container")
                        ):
                            tail.append(line)
                            log(line)
                    if item.get("status"):
                        _log_progress(item, log)
        except BuildError as exc:
            cause = exc.__cause__
            if not isinstance(cause, aiodocker.DockerStreamError):
                raise
            output = "\n".join(tail)
            raise BuildError(
                f"building {reference} failed at {step or 'the start'}: {cause.message}; the "
                f"build's output ends with:\n{output}"
            ) from cause

    # -- removal --------------------------------------------------------------------------

    async def remove(self, reference: str, *, from_registry: bool = False) -> None:
        """Removes the image ``reference`` from the Docker host (nothing when it is not
        there); with ``from_registry``, also its manifest from the registry its name starts
        with (the registry frees the layers at its next garbage collection).

        Raises:
            BuildError: a container still uses the image, or a registry refuses the removal.
        """
        import aiodocker

        docker = self._client()
        async with self._docker_errors(f"removing image {reference}"):
            try:
                await docker.images.delete(reference)
            except aiodocker.DockerError as exc:
                if exc.status != 404:
                    raise
        if from_registry and "/" in reference:
            await self._remove_from_registry(reference)

    async def _remove_from_registry(self, reference: str) -> None:
        import aiohttp

        host, _, rest = reference.partition("/")
        repo, _, tag = rest.rpartition(":")
        reg = _Registry(None, host, "")
        base = f"{await self._scheme(reg)}://{host}/v2/{repo}/manifests"
        try:
            session = self._session()
            async with session.head(f"{base}/{tag}", headers={"Accept": _MANIFEST_TYPES}) as resp:
                if resp.status == 404:
                    return
                digest = resp.headers.get("Docker-Content-Digest", "")
            async with session.delete(f"{base}/{digest}") as resp:
                if resp.status not in (202, 404):
                    raise BuildError(
                        f"the container registry {host} refused to delete {reference} (HTTP "
                        f"{resp.status}; deletion may be disabled in its configuration)"
                    )
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            raise BuildError(f"the container registry {host} cannot be reached ({exc})") from exc


def _labels(image: Mapping[str, Any]) -> dict[str, str]:
    return dict((image.get("Config") or {}).get("Labels") or {})


_QUIET_STATUS = (
    "Downloading",
    "Extracting",
    "Waiting",
    "Verifying Checksum",
    "Pushing",
    "Preparing",
)


def _log_progress(item: Mapping[str, Any], log: Log) -> None:
    """A pull's or push's progress item as a line, without the per-chunk progress."""
    status = str(item.get("status") or "")
    if not status or status.startswith(_QUIET_STATUS):
        return
    log(f"{item['id']}: {status}" if item.get("id") else status)


def _dockerfile(
    *,
    parent_id: str,
    apt_packages: list[str],
    user: str,
    pip_wheel: str,
    plait_wheel: str,
    has_requirements: bool,
    key: str,
) -> str:
    """The recipe (see the module docstring)."""
    pip = f"/opt/plait/bin/python /tmp/plait-wheels/{pip_wheel}/pip install {_PIP}"
    lines = [
        f"# Plait image recipe {RECIPE_VERSION} (generated), key {key}",
        f"FROM {parent_id} AS base",
        "USER 0",
        "FROM base AS deps",
        "COPY deps/ /tmp/plait-wheels/",
        "RUN python3 -m venv --without-pip /opt/plait"
        f" && {pip} --find-links /tmp/plait-wheels -r /tmp/plait-wheels/requirements.txt",
        "FROM base",
        "COPY --from=deps /opt/plait /opt/plait",
        "COPY plait/ /tmp/plait-wheels/",
        f"RUN {pip} --no-deps /tmp/plait-wheels/{plait_wheel}"
        " && /opt/plait/bin/python -c 'import plait.runners.step' && rm -rf /tmp/plait-wheels",
        "ENV PATH=/opt/plait/bin:$PATH",
    ]
    if apt_packages:
        packages = " ".join(shlex.quote(p) for p in apt_packages)
        lines.append(
            "RUN apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q "
            f"--no-install-recommends {packages} && rm -rf /var/lib/apt/lists/*"
        )
    if has_requirements:
        reqs_pip = pip.replace("/tmp/plait-wheels/", "/tmp/plait-reqs/")
        lines += [
            "COPY reqs/ /tmp/plait-reqs/",
            f"RUN {reqs_pip} --find-links /tmp/plait-reqs -r /tmp/plait-reqs/requirements.txt"
            " && rm -rf /tmp/plait-reqs",
        ]
    if user and user not in ("0", "root"):
        lines.append(f"USER {user}")
    lines += ["ENTRYPOINT []", 'CMD ["python"]']
    return "\n".join(lines) + "\n"


def _context(
    dockerfile: str, deps: Path, plait_wheel: Path, pip_wheel: Path, reqs: Path | None
) -> IO[bytes]:
    """The build context as an uncompressed tar (fixed times and owners)."""
    out = tempfile.TemporaryFile()  # noqa: SIM115 (the caller closes it after the build)

    def add(tar: tarfile.TarFile, name: str, data: bytes = b"", path: Path | None = None) -> None:
        info = tarfile.TarInfo(name)
        info.mtime, info.mode, info.uid, info.gid = 0, 0o644, 0, 0
        if path is not None:
            info.size = path.stat().st_size
            with path.open("rb") as f:
                tar.addfile(info, f)
        else:
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))

    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        add(tar, "Dockerfile", dockerfile.encode())
        for path in sorted(deps.iterdir()):
            if path.suffix == ".whl" or path.name == "requirements.txt":
                add(tar, f"deps/{path.name}", path=path)
        add(tar, f"plait/{plait_wheel.name}", path=plait_wheel)
        add(tar, f"plait/{pip_wheel.name}", path=pip_wheel)
        if reqs is not None:
            for path in sorted(reqs.iterdir()):
                if path.suffix == ".whl" or path.name == "requirements.txt":
                    add(tar, f"reqs/{path.name}", path=path)
            add(tar, f"reqs/{pip_wheel.name}", path=pip_wheel)
    out.seek(0)
    return out
