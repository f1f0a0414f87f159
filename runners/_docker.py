"""The Docker runner: each step attempt in a container of its own, from the step's image.

A container runs the one-shot entrypoint (``python -m plait.runners.step --lease TOKEN``): it
claims its attempt from the control plane over gRPC, runs the step, reports logs, metadata,
outputs and the result itself, and exits. This runner only starts containers, watches them and
says what happened when one ended without its step reporting (an exit code other than 0 or 5,
the kernel's out-of-memory killer, an image that is missing, a daemon that cannot be reached).

The container's name is the attempt's durable handle (``plait-RUN-STEP-ATTEMPT-EPOCH``): a
control plane that restarts lists the running containers labelled as its own and re-attaches
to them, so a step that runs on is not run again. See docs/docker.md.

``aiodocker`` (the ``plait[docker]`` extra) is imported when the runner starts, never by
importing this module.
"""

from __future__ import annotations

import hashlib
import ipaddress
import logging
import math
import os
import re
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlparse

import anyio
from anyio.abc import TaskGroup, TaskStatus

from plait.api.v1 import task_service_pb2 as tasks
from plait.runners._protocol import RunnerContext

if TYPE_CHECKING:
    from aiodocker import Docker
    from aiodocker.containers import DockerContainer

__all__ = ["ContainerOptions", "DockerRunner", "container_name"]

log = logging.getLogger("plait.runners.docker")

NETWORKS = ("host", "bridge")
"""The networks a step's container may join (see docs/docker.md)."""

CALL_TIMEOUT = 60.0
"""The longest a Docker call (create, start, inspect, kill, remove) may take: a daemon that
does not answer in that time is taken as unreachable and the attempt is reported lost."""
LIST_TIMEOUT = 15.0
"""The longest the listing of running containers at start may take (the control plane waits
for it); past it, alive() cannot tell and the attempts' leases decide."""
DAEMON_LOST_TIMEOUT = 60.0
"""How long a watched container's daemon may stay unreachable before its attempt is reported
lost (the container may live on, but nothing here can tell when it ends)."""
LOG_TAIL_LINES = 20
"""The last lines of a container's output quoted when its attempt is reported lost."""
LOG_TAIL_CHARS = 4000
"""…and at most this many characters of them."""

REPORTED_EXIT_CODES = frozenset({0, 5})
"""Exit codes of ``python -m plait.runners.step`` after which the step reported for itself:
0 (its completion or failure), 5 (cancelled). See ``plait.runners.step``."""

CONTAINER_HOME = "/tmp/plait"
"""PLAIT_HOME inside a container (its code cache): the container's own scratch space."""

LABEL_RUNNER = "plait.runner"
"""Marks a container as Plait's, with the name of the runner that started it."""
LABEL_HOME = "plait.home"
"""The PLAIT_HOME of the control plane the container reports to: a runner re-attaches only to
its own control plane's containers, not to those of another on the same daemon."""
LABEL_LEASE = "plait.lease"
"""The attempt's lease, ``RUN/STEP/ATTEMPT/EPOCH`` (as ``--lease`` takes it)."""
LABEL_KEEP = "plait.keep"
"""``true`` when the container is kept after it ends (keep_containers)."""
LABEL_GRACE = "plait.stop-grace"
"""Seconds between SIGTERM and SIGKILL when the container is stopped."""

_NAME_UNSAFE = re.compile(r"[^a-zA-Z0-9_.-]")
_STEP_NAME_MAX = 64


@dataclass(frozen=True)
class ContainerOptions:
    """How one step's container runs; a field left None takes the runner's setting.

    The control plane passes the options of the run's stack runner component (keys
    ``network``, ``keep_containers``, ``stop_grace_seconds``) to :meth:`DockerRunner.submit`.
    """

    network: str | None = None
    """``host`` (the container shares the host's network) or ``bridge`` (Docker's default
    bridge; the control plane must listen on an address the bridge reaches)."""
    keep_containers: bool | None = None
    """Keep the container after it ends (to read its logs or inspect it); else it is removed."""
    stop_grace_seconds: float | None = None
    """Seconds between SIGTERM and SIGKILL when the container is stopped (cancel, timeout)."""

    def __post_init__(self) -> None:
        if self.network is not None and self.network not in NETWORKS:
            raise ValueError(
                f"network: expected one of {', '.join(NETWORKS)}, got {self.network!r}"
            )
        if self.stop_grace_seconds is not None and not (
            isinstance(self.stop_grace_seconds, int | float)
            and not isinstance(self.stop_grace_seconds, bool)
            and math.isfinite(self.stop_grace_seconds)
            and self.stop_grace_seconds >= 0
        ):
            raise ValueError(
                f"stop_grace_seconds: expected a number of seconds, 0 or more, got "
                f"{self.stop_grace_seconds!r}"
            )


def lease_text(token: tasks.LeaseToken) -> str:
    """``RUN/STEP/ATTEMPT/EPOCH``: the lease as ``plait.runners.step --lease`` takes it."""
    return f"{token.run_id}/{token.step_id}/{token.attempt}/{token.epoch}"


def container_name(token: tasks.LeaseToken) -> str:
    """The name of the container of an attempt: ``plait-RUN-STEP-ATTEMPT-EPOCH``, unique per
    attempt and lease epoch, and a valid Docker name (a step id with other characters than
    letters, digits, ``_.-``, or a long one, is cut and made unique by a digest of it)."""
    step = _NAME_UNSAFE.sub("-", token.step_id)
    if step != token.step_id or len(step) > _STEP_NAME_MAX:
        digest = hashlib.sha256(token.step_id.encode()).hexdigest()[:8]
        step = f"{step[:_STEP_NAME_MAX]}-{digest}"
    run = _NAME_UNSAFE.sub("-", token.run_id)
    return f"plait-{run}-{step}-{token.attempt}-{token.epoch}"


def local_store_path(uri: str) -> str | None:
    """The folder of a local artifact store (``file:///path`` or an absolute path), which a
    container can mount; None for a store elsewhere (read through the control plane)."""
    if not uri:
        return None
    parsed = urlparse(uri)
    if parsed.scheme == "file" and parsed.netloc in ("", "localhost"):
        return unquote(parsed.path)
    if parsed.scheme == "" and os.path.isabs(uri):
        return uri
    return None


def gateway_of(network: dict[str, Any]) -> str | None:
    """A Docker network's gateway address (from its inspection); None when it has none.

    Docker 20.10 leaves ``Gateway`` out of the default bridge's IPAM config until the daemon
    restarts; its gateway is then, as for any network whose gateway was not set, the first
    address of its (IPv4) subnet."""
    configs = (network.get("IPAM") or {}).get("Config") or []
    for config in configs:
        if config.get("Gateway"):
            return str(config["Gateway"])
    for config in configs:
        try:
            subnet = ipaddress.ip_network(config.get("Subnet") or "")
        except ValueError:
            continue
        if subnet.version == 4 and subnet.num_addresses > 2:
            return str(subnet.network_address + 1)
    return None


def _is_local_host(host: str) -> bool:
    host = host.strip("[]")
    return host in ("localhost", "0.0.0.0", "::", "::1") or host.startswith("127.")


def _mib(n: int) -> str:
    return f"{n / 2**20:g} MiB"


@dataclass
class _Container:
    """A container this runner started or re-attached to, until it ends."""

    name: str
    token: tasks.LeaseToken
    keep: bool
    grace: float
    ended: anyio.Event = field(default_factory=anyio.Event)
    started: bool = False
    """Created and started (a stop now goes to Docker)."""
    stopping: bool = False
    """Asked to stop (cancel): its end is expected."""


class _DockerError(Exception):
    """A Docker call failed; the message says what happened, for people."""


class DockerRunner:
    """Runs each step attempt in a container of its own, from the image in ``task.image``.

    The container runs ``python -m plait.runners.step --server ADDR --lease TOKEN`` as the
    control plane's user (when it mounts host folders), with ``PLAIT_TOKEN`` set to the
    control plane's worker secret, the source root (``task.code_root``) mounted read-only and
    a local artifact store mounted read-write, each at the same path as on the host. The
    step's ``resources`` become the container's limits: CPUs (``NanoCpus``), memory (no swap
    beyond it) and GPUs (a device request). See docs/docker.md.

    Args:
        name: the runner's name (steps choose it with ``@plait.step(runner=...)``).
        network: ``host`` (default) or ``bridge``: the network containers join.
        keep_containers: keep containers after they end (default: remove them).
        stop_grace_seconds: seconds between SIGTERM and SIGKILL when a container is stopped.
        docker_url: the Docker daemon (``unix:///var/run/docker.sock``, ``tcp://…``); None:
            ``DOCKER_HOST``, else the local socket. Host paths are mounted, so the daemon must
            run on the control plane's machine.
    """

    def __init__(
        self,
        name: str = "docker",
        *,
        network: str = "host",
        keep_containers: bool = False,
        stop_grace_seconds: float = 10.0,
        docker_url: str | None = None,
    ) -> None:
        ContainerOptions(network, keep_containers, stop_grace_seconds)  # checks them
        self.name = name
        self.network = network
        """The network of a container whose options name none."""
        self.keep_containers = keep_containers
        """Whether a container whose options do not say is kept after it ends."""
        self.stop_grace_seconds = float(stop_grace_seconds)
        """The grace period of a container whose options do not say."""
        self.docker_url = docker_url
        self._ctx: RunnerContext | None = None
        self._tg: TaskGroup | None = None
        self._docker: Docker | None = None
        self._unavailable = ""
        """Why no Docker client could be made (aiodocker missing, no socket); empty: one was."""
        self._containers: dict[str, _Container] = {}
        """The containers being started, running or ending, by name (their handle)."""
        self._snapshot = False
        """Whether the running containers were listed at start (else alive() cannot tell)."""
        self._gateways: dict[str, str] = {}
        self._warned: set[str] = set()

    # ---- the Runner protocol ----

    async def run(
        self, ctx: RunnerContext, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Connects to Docker, re-attaches to this control plane's running containers, and
        watches containers until cancelled. Then it stops watching and leaves running
        containers running: they are durable, and a restarted control plane re-attaches to
        them. A control plane that resumes nothing (the embedded engine, whose runs are
        cancelled when it stops) says so with ``ctx.resume`` false: its containers are
        removed (kept ones killed)."""
        self._ctx = ctx
        try:
            async with anyio.create_task_group() as tg:
                self._tg = tg
                self._open()
                await self._reattach(tg)
                task_status.started()
                await anyio.sleep_forever()
        finally:
            self._tg = None
            with anyio.CancelScope(shield=True):
                # RunnerContext.resume: whether a restarted control plane takes the runs up
                # (a context without it, from before it existed, is taken as resuming)
                if not getattr(ctx, "resume", True):
                    with anyio.move_on_after(CALL_TIMEOUT):
                        await self._remove_all()
                if self._docker is not None:
                    with anyio.move_on_after(5):
                        await self._docker.close()
                self._docker = None

    async def submit(self, task: tasks.Task, options: ContainerOptions | None = None) -> str:
        """Starts the task's container in the background; returns its name (the handle).

        A container that cannot be created or started is reported lost with what Docker said
        (``ctx.report_lost``), as is one that ends without its step reporting.

        Raises:
            ValueError: the task names no image (``task.image``).
            RuntimeError: the runner is not running.
        """
        if self._tg is None or self._ctx is None:
            raise RuntimeError(f"the {self.name} runner is not running")
        if not task.image:
            raise ValueError(
                "the task names no image (task.image): the docker runner runs a step in the "
                "image built for its environment"
            )
        name = container_name(task.token)
        opts = options or ContainerOptions()
        keep = opts.keep_containers
        grace = opts.stop_grace_seconds
        c = _Container(
            name,
            task.token,
            keep=self.keep_containers if keep is None else keep,
            grace=self.stop_grace_seconds if grace is None else float(grace),
        )
        self._containers[name] = c
        network = opts.network or self.network
        self._tg.start_soon(self._launch, c, task, network, name=f"docker-runner {name}")
        return name

    async def cancel(self, token: tasks.LeaseToken) -> None:
        """Stops the attempt's container: SIGTERM, then SIGKILL after the grace period (in the
        background: this returns at once)."""
        c = self._containers.get(container_name(token))
        if c is None or c.token != token or c.stopping or c.ended.is_set():
            return
        c.stopping = True
        if c.started and self._tg is not None:
            self._tg.start_soon(self._stop, c)
        # not started yet: the launcher sees `stopping` and starts nothing

    def alive(self, handle: str) -> bool | None:
        """Whether the container ``handle`` runs (or is starting): from the containers listed
        when the runner started and those it started since, without asking Docker. None when
        Docker could not be asked at start (the attempt's lease will tell)."""
        c = self._containers.get(handle)
        if c is not None:
            return not c.ended.is_set()
        return False if self._snapshot else None

    # ---- Docker ----

    def _open(self) -> None:
        try:
            import aiodocker
        except ImportError:
            self._unavailable = (
                "the docker runner needs aiodocker: install plait with the docker extra "
                "(pip install 'plait[docker]')"
            )
            log.error("%s", self._unavailable)
            return
        try:
            self._docker = aiodocker.Docker(url=self.docker_url)
        except Exception as exc:
            detail = str(exc) or "no Docker socket found; set DOCKER_HOST or docker_url"
            self._unavailable = f"cannot reach the Docker daemon: {detail}"
            log.error("%s", self._unavailable)

    def _client(self) -> Docker:
        if self._docker is None:
            raise _DockerError(self._unavailable or "the docker runner is not running")
        return self._docker

    async def _call(self, what: str, call: Any, bound: float = CALL_TIMEOUT) -> Any:
        """Awaits a Docker call within ``bound`` seconds; any failure becomes a _DockerError
        that says what was done and what Docker answered."""
        try:
            with anyio.fail_after(bound):
                return await call
        except TimeoutError:
            raise _DockerError(
                f"the Docker daemon did not answer within {bound:g} s ({what})"
            ) from None
        except _DockerError:
            raise
        except Exception as exc:
            raise _DockerError(_describe(exc, what)) from exc

    async def _gateway(self, network: str) -> str:
        """The gateway address of a Docker network: where its containers reach the host."""
        if network not in self._gateways:
            net = await self._call(
                f"inspecting network {network}", self._client().networks.get(network)
            )
            info = await self._call(f"inspecting network {network}", net.show())
            found = gateway_of(info)
            if found is None:
                raise _DockerError(f"the Docker network {network} has no gateway address")
            self._gateways[network] = found
        return self._gateways[network]

    async def _address(self, network: str) -> str:
        """The control plane's address as a container on ``network`` reaches it."""
        assert self._ctx is not None
        address = self._ctx.address
        if network == "host":
            return address
        host, _, port = address.rpartition(":")
        if not _is_local_host(host):
            return address  # a routable address: the bridge reaches it through the host
        gateway = await self._gateway(network)
        if host.strip("[]") not in ("0.0.0.0", "::") and host not in self._warned:
            self._warned.add(host)
            log.warning(
                "the control plane listens on %s, which containers on the %s network cannot "
                "reach: listen on %s (the bridge's gateway) or 0.0.0.0, or use network=host",
                host,
                network,
                gateway,
            )
        return f"{gateway}:{port}"

    async def _config(self, task: tasks.Task, c: _Container, network: str) -> dict[str, Any]:
        """The container's create request (the Docker Engine API's ContainerConfig)."""
        assert self._ctx is not None
        mounts: list[dict[str, Any]] = []
        if task.code_root:
            mounts.append(
                {
                    "Type": "bind",
                    "Source": task.code_root,
                    "Target": task.code_root,
                    "ReadOnly": True,
                }
            )
        store = local_store_path(task.artifact_store_uri)
        if store is not None:
            from plait._settings import private_dir

            private_dir(Path(store))  # a bind mount needs its folder; the store makes it lazily
            mounts.append({"Type": "bind", "Source": store, "Target": store, "ReadOnly": False})
        command = [
            "python",
            "-m",
            "plait.runners.step",
            "--server",
            await self._address(network),
            "--lease",
            lease_text(task.token),
            "--artifacts",
            "local" if store is not None else "remote",
            "--worker-id",
            c.name,
        ]
        env = [f"PLAIT_HOME={CONTAINER_HOME}", "PYTHONUNBUFFERED=1"]
        if self._ctx.token:
            env.append(f"PLAIT_TOKEN={self._ctx.token}")
        token = task.token
        labels = {
            LABEL_RUNNER: self.name,
            LABEL_HOME: str(self._ctx.home),
            LABEL_LEASE: lease_text(token),
            "plait.run": token.run_id,
            "plait.step": token.step_id,
            "plait.attempt": str(token.attempt),
            "plait.epoch": str(token.epoch),
            LABEL_KEEP: "true" if c.keep else "false",
            LABEL_GRACE: f"{c.grace:g}",
        }
        host: dict[str, Any] = {
            "NetworkMode": network,
            # a real init as PID 1: signals reach the step, and zombies are reaped
            "Init": True,
            "Mounts": mounts,
        }
        resources = task.step.settings.resources
        if resources.cpu > 0:
            host["NanoCpus"] = round(resources.cpu * 1e9)
        if resources.memory_bytes > 0:
            host["Memory"] = resources.memory_bytes
            host["MemorySwap"] = resources.memory_bytes  # no swap beyond the limit
        if resources.gpus > 0:
            host["DeviceRequests"] = [
                {"Driver": "", "Count": resources.gpus, "Capabilities": [["gpu"]]}
            ]
        config: dict[str, Any] = {
            "Image": task.image,
            # the whole command as the entrypoint: whatever ENTRYPOINT and CMD the image has
            # (a server image's, say) neither wraps it nor is appended to it
            "Entrypoint": command,
            "Env": env,
            "Labels": labels,
            "StopSignal": "SIGTERM",
            "HostConfig": host,
        }
        if mounts and hasattr(os, "getuid"):
            # files the step writes in the mounted store belong to the control plane's user
            config["User"] = f"{os.getuid()}:{os.getgid()}"
        return config

    async def _launch(self, c: _Container, task: tasks.Task, network: str) -> None:
        """Creates and starts the container, then watches it to its end."""
        created: DockerContainer | None = None
        try:
            docker = self._client()
            config = await self._config(task, c, network)
            try:
                created = await self._call(
                    f"creating container {c.name}", docker.containers.create(config, name=c.name)
                )
            except _DockerError as exc:
                raise _DockerError(_create_failed(str(exc), task.image)) from None
            if c.stopping:
                raise _DockerError("stopped before it started (the attempt was cancelled)")
            assert created is not None
            try:
                await self._call(f"starting container {c.name}", created.start())
            except _DockerError as exc:
                raise _DockerError(f"the step's container could not start: {exc}") from None
        except (_DockerError, OSError, ValueError) as exc:
            self._end(c)
            if created is not None and not c.keep:
                await self._remove(c.name, created)
            self._lost(c, f"{exc} (container {c.name}, image {task.image})")
            return
        c.started = True
        if c.stopping:  # cancelled while it was starting
            assert self._tg is not None
            self._tg.start_soon(self._stop, c)
        await self._watch(c, created)

    async def _watch(self, c: _Container, container: DockerContainer) -> None:
        """Waits for the container to end; reports its attempt lost when its step did not
        report, then removes it (unless kept)."""
        info = await self._wait(c, container)
        if info is None:
            return  # reported lost: the daemon went away, or the container vanished
        state = info.get("State") or {}
        code = int(state.get("ExitCode", -1))
        oom = bool(state.get("OOMKilled"))
        if oom or code not in REPORTED_EXIT_CODES:
            limit = int((info.get("HostConfig") or {}).get("Memory") or 0)
            what = _ended(code, oom, limit, c.stopping)
            tail = await self._tail(container)
            message = f"the step's container {c.name} {what}"
            if tail:
                message += f"; the last lines of its output:\n{tail}"
            self._end(c)
            self._lost(c, message)
        else:
            self._end(c)
        if not c.keep:
            await self._remove(c.name, container)

    async def _wait(self, c: _Container, container: DockerContainer) -> dict[str, Any] | None:
        """The container's inspection once it ended; None when its attempt had to be reported
        lost first (the daemon unreachable for DAEMON_LOST_TIMEOUT, the container removed)."""
        delay = 0.2
        away_since: float | None = None
        while True:
            try:
                await container.wait()  # no timeout: steps run as long as they run
            except Exception as exc:  # the connection broke (a daemon restart): look again
                log.debug("waiting for %s: %s", c.name, exc)
                await anyio.sleep(delay)
                delay = min(delay * 2, 5.0)
            try:
                info: dict[str, Any] = await self._call(
                    f"inspecting container {c.name}", container.show()
                )
            except _DockerError as exc:
                if "No such container" in str(exc):
                    self._end(c)
                    self._lost(c, f"the step's container {c.name} was removed while it ran")
                    return None
                now = time.monotonic()
                away_since = away_since or now
                if now - away_since > DAEMON_LOST_TIMEOUT:
                    self._end(c)
                    self._lost(
                        c,
                        f"lost contact with the Docker daemon while container {c.name} ran "
                        f"(for {DAEMON_LOST_TIMEOUT:g} s): {exc}",
                    )
                    return None
                await anyio.sleep(delay)
                delay = min(delay * 2, 5.0)
                continue
            away_since = None
            state = info.get("State") or {}
            if state.get("Running") or state.get("Restarting"):
                continue  # still running: wait again
            return info

    async def _tail(self, container: DockerContainer) -> str:
        """The last lines of the container's output (stdout and stderr), or "" when Docker
        cannot give them."""
        try:
            pieces = await self._call(
                "reading the container's logs",
                container.log(stdout=True, stderr=True, tail=LOG_TAIL_LINES),
            )
        except _DockerError:
            return ""
        lines = "".join(pieces).splitlines()[-LOG_TAIL_LINES:]
        text = "\n".join(line.rstrip() for line in lines).strip()
        return text[-LOG_TAIL_CHARS:]

    async def _stop(self, c: _Container) -> None:
        """SIGTERM, then SIGKILL once the grace period has passed without the container ending."""
        docker = self._docker
        if docker is None:
            return
        container = docker.containers.container(c.name)
        try:
            await self._call(f"stopping {c.name}", container.kill(signal="SIGTERM"))
        except _DockerError as exc:
            log.debug("SIGTERM to %s: %s", c.name, exc)
        with anyio.move_on_after(c.grace):
            await c.ended.wait()
            return
        try:
            await self._call(f"killing {c.name}", container.kill(signal="SIGKILL"))
        except _DockerError as exc:
            log.debug("SIGKILL to %s: %s", c.name, exc)

    async def _remove(self, name: str, container: DockerContainer) -> None:
        try:
            await self._call(f"removing {name}", container.delete(force=True))
        except _DockerError as exc:
            if "No such container" not in str(exc) and "already in progress" not in str(exc):
                log.warning("could not remove container %s: %s", name, exc)

    async def _reattach(self, tg: TaskGroup) -> None:
        """Lists this control plane's containers: watches those that run (their attempts go
        on), removes those that ended while no one watched (unless kept)."""
        assert self._ctx is not None
        if self._docker is None:
            return
        filters = {"label": [f"{LABEL_RUNNER}={self.name}", f"{LABEL_HOME}={self._ctx.home}"]}
        try:
            found = await self._call(
                "listing containers",
                self._docker.containers.list(all=True, filters=filters),
                LIST_TIMEOUT,
            )
        except _DockerError as exc:
            log.warning("cannot list containers to re-attach to: %s", exc)
            return
        self._snapshot = True
        for container in found:
            labels: dict[str, str] = container["Labels"] or {}
            names = container["Names"] or [container.id]
            name = str(names[0]).lstrip("/")
            keep = labels.get(LABEL_KEEP) == "true"
            token = _token(labels.get(LABEL_LEASE, ""))
            if container["State"] in ("running", "restarting", "paused") and token is not None:
                grace = _float(labels.get(LABEL_GRACE), self.stop_grace_seconds)
                c = _Container(name, token, keep=keep, grace=grace, started=True)
                self._containers[name] = c
                log.info("re-attached to container %s", name)
                tg.start_soon(self._watch, c, container, name=f"docker-runner {name}")
            elif not keep:
                tg.start_soon(self._remove, name, container)

    async def _remove_all(self) -> None:
        """Stops and removes (unless kept) every container this runner watches."""
        docker = self._docker
        if docker is None:
            return
        for c in list(self._containers.values()):
            container = docker.containers.container(c.name)
            try:
                if c.keep:
                    await self._call(f"killing {c.name}", container.kill(signal="SIGKILL"))
                else:
                    await self._call(f"removing {c.name}", container.delete(force=True))
            except _DockerError as exc:
                log.debug("stopping %s at shutdown: %s", c.name, exc)

    def _end(self, c: _Container) -> None:
        c.ended.set()
        if self._containers.get(c.name) is c:
            del self._containers[c.name]

    def _lost(self, c: _Container, message: str) -> None:
        log.warning("attempt %s lost: %s", lease_text(c.token), message)
        if self._ctx is not None:
            self._ctx.report_lost(c.token, message)


def _describe(exc: BaseException, what: str) -> str:
    from aiodocker.exceptions import DockerError

    if isinstance(exc, DockerError):
        if exc.status == 900:  # aiodocker's "cannot connect"
            return f"cannot reach the Docker daemon ({what}): {exc.message}"
        return f"{exc.message} ({what})"
    text = " ".join(str(exc).split()) or type(exc).__name__
    return f"{type(exc).__name__}: {text} ({what})"


def _create_failed(detail: str, image: str) -> str:
    if "No such image" in detail:
        return (
            f"the step's image {image} is not on the Docker daemon (the docker runner does not "
            f"pull images; the image builder puts them there): {detail}"
        )
    if detail.startswith(("cannot reach", "the Docker daemon did not answer")):
        return detail
    return f"the step's container could not be created: {detail}"


def _ended(code: int, oom: bool, memory: int, stopped: bool) -> str:
    """How a container ended, for people."""
    if oom:
        limit = f"limit {_mib(memory)}" if memory else "no limit set: the machine ran out"
        return f"was killed: out of memory ({limit}; exit code {code})"
    if stopped:
        return f"was stopped (the attempt was cancelled or timed out; exit code {code})"
    if code > 128:
        try:
            name = signal.Signals(code - 128).name
        except ValueError:
            name = f"signal {code - 128}"
        return f"was killed by {name} (exit code {code}) without its step reporting"
    reasons = {
        1: "the control plane refused the step or a report, or could not be reached",
        2: "the image's plait does not understand the command line",
        3: "no task came",
        4: "the attempt's lease was lost",
        126: "the image cannot run python",
        127: "the image has no python on its PATH",
    }
    why = reasons.get(code)
    return f"exited with code {code}" + (f" ({why})" if why else "") + " without its step reporting"


def _token(text: str) -> tasks.LeaseToken | None:
    parts = text.split("/")
    if len(parts) != 4 or not all(parts) or not parts[2].isdigit() or not parts[3].isdigit():
        return None
    return tasks.LeaseToken(
        run_id=parts[0], step_id=parts[1], attempt=int(parts[2]), epoch=int(parts[3])
    )


def _float(text: str | None, default: float) -> float:
    try:
        value = float(text) if text is not None else default
    except ValueError:
        return default
    return value if math.isfinite(value) and value >= 0 else default
