"""The Docker runner against the real Docker daemon: steps in containers of their own, driven
by a real control plane served in this process.

The image the steps run in is made here from the project's wheels on top of the local base
image (scripts/docker.sh): a virtualenv with plait in which ``python -m plait.runners.step``
works. The control plane builds the image of a step of the runner named ``docker`` with the
stack's image builder (tested elsewhere); here the Docker runner is registered as
``docker-test`` instead, which the control plane hands tasks to as they are, and
:class:`ImageScaffold` — test scaffolding, not a runner of the product — sets ``task.image``
(and, per test, the container options, or where code and artifacts come from) before handing
the task to the real :class:`DockerRunner`. Steps ask for resources with ``resources=``.

Steps and tests meet through files in a folder inside the (mounted) local artifact store, never
through sleeps. Every container a test starts is removed after it, whatever happened (by the
``plait.home`` label of the test's control plane).
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib
import json
import os
import secrets
import socket
import struct
import subprocess
import sys
import textwrap
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import anyio
import pytest
from anyio.abc import TaskStatus
from processes import DEADLINE, wait_for

import plait
from plait.api.v1 import task_service_pb2 as tasks
from plait.runners import ContainerOptions, DockerRunner, LocalRunner, RunnerContext
from plait.runners._docker import container_name, gateway_of

ROOT = Path(__file__).resolve().parent.parent
pytestmark = [pytest.mark.docker, pytest.mark.slow]

RUNNER = "docker-test"
"""The name the tests' control planes know the Docker runner by (see the module docstring)."""

STEPS = '''
"""Steps of the Docker runner tests (imported by the tests, and by the step containers)."""

import os
import sys
import time
from pathlib import Path

import plait

RUNNER = "docker-test"
"""The Docker runner of the tests' control planes (behind the tests' scaffolding)."""


def in_container() -> bool:
    """Whether this runs in a step container: the runner gives each one an init as PID 1
    (the test machine may be a container itself, so /.dockerenv says nothing)."""
    return Path("/proc/1/comm").read_text().strip() == "docker-init"


@plait.step(runner=RUNNER, cache=False)
def where(n: int) -> dict:
    print(f"hello from a container, n={n}")
    return {
        "n": n,
        "in_container": in_container(),
        "uid": os.getuid(),
        "argv": sys.argv,
        "home": os.environ.get("PLAIT_HOME"),
    }


@plait.pipeline
def contained(n: int = 1) -> None:
    where(n)


@plait.step(cache=False)
def make(n: int) -> list:
    return [n, in_container()]


@plait.step(runner=RUNNER, cache=False)
def total(made: list) -> list:
    return [sum(range(made[0])), made[1], in_container()]


@plait.step(cache=False)
def report(totalled: list) -> list:
    return [*totalled, in_container()]


@plait.pipeline
def mixed(n: int = 4) -> None:
    report(total(make(n)))


@plait.step(runner=RUNNER, cache=False, resources={"cpu": 0.5, "memory": "256Mi"})
def limited() -> int:
    return os.cpu_count() or 0


@plait.step(runner=RUNNER, cache=False, resources=plait.Resources(gpus=1))
def on_gpu() -> int:
    return 1


@plait.pipeline
def resourced() -> None:
    limited()
    on_gpu()


# the entrypoint needs about 40 MiB (Python, gRPC, Plait) before the step starts: 96 MiB lets
# the step start, and its 200 MB cannot fit
@plait.step(runner=RUNNER, cache=False, resources=plait.Resources(memory="96Mi"))
def hog(mb: int) -> int:
    print(f"allocating {mb} MB", flush=True)
    time.sleep(0.5)  # the line above reaches the control plane before the end
    block = bytearray(mb * 2**20)
    for i in range(0, len(block), 4096):
        block[i] = 1
    return len(block)


@plait.pipeline
def hogging(mb: int = 200) -> None:
    hog(mb)


@plait.step(runner=RUNNER, cache=False)
def hold(d: str) -> str:
    """Says it started (a file), then waits for the file `go`."""
    Path(d, "started").write_text(str(os.getpid()))
    while not Path(d, "go").exists():
        time.sleep(0.05)
    return "released"


@plait.pipeline
def holding(d: str) -> None:
    hold(d)
'''

# ---- Docker, the images, and cleanup ----


def docker(
    *args: str, check: bool = True, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["docker", *args], capture_output=True, text=True, check=check, timeout=timeout
    )


def base_image() -> str:
    base = os.environ.get("PLAIT_TEST_DOCKER_BASE")
    if not base:
        message = "PLAIT_TEST_DOCKER_BASE is not set (scripts/test starts Docker and sets it)"
        if os.environ.get("CI"):
            pytest.fail(message)  # in CI a missing Docker is a failure, never a skip
        pytest.skip(message)
    return base


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """An image in which ``python`` (first on PATH) runs plait: the project's wheels made on
    the host, installed offline in a virtualenv on the local base image."""
    base = base_image()
    context = tmp_path_factory.mktemp("docker-runner-image")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", str(ROOT), "-w", str(context / "wheelhouse")],
        check=True,
        timeout=600,
    )
    (context / "Dockerfile").write_text(
        textwrap.dedent(
            """\
            ARG BASE
            FROM ${BASE}
            COPY wheelhouse/ /tmp/wheels/
            RUN python3 -m venv /opt/plait \\
             && /opt/plait/bin/pip install -q --no-cache-dir --no-index \\
                  --find-links /tmp/wheels plait \\
             && rm -rf /tmp/wheels
            ENV PATH=/opt/plait/bin:$PATH
            """
        )
    )
    tag = f"plait-docker-runner-test:{os.getpid()}"
    docker("build", "-q", "--build-arg", f"BASE={base}", "-t", tag, str(context), timeout=600)
    yield tag
    docker("rmi", "-f", tag, check=False)


@pytest.fixture(scope="module")
def stubborn_image(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """An image whose ``python`` ignores SIGTERM and never ends: only SIGKILL stops it."""
    base = base_image()
    context = tmp_path_factory.mktemp("stubborn-image")
    (context / "python").write_text("#!/bin/sh\ntrap '' TERM\nwhile :; do sleep 0.1; done\n")
    (context / "Dockerfile").write_text(
        "ARG BASE\nFROM ${BASE}\nCOPY python /usr/local/bin/python\n"
        "RUN chmod 755 /usr/local/bin/python\n"
    )
    tag = f"plait-docker-runner-stubborn:{os.getpid()}"
    docker("build", "-q", "--build-arg", f"BASE={base}", "-t", tag, str(context), timeout=600)
    yield tag
    docker("rmi", "-f", tag, check=False)


def containers(home: Path) -> list[dict[str, Any]]:
    """The containers (running or not) of the control plane of ``home``, inspected."""
    ids = docker("ps", "-aq", "--filter", f"label=plait.home={home}").stdout.split()
    if not ids:
        return []
    found = docker("inspect", *ids, check=False).stdout
    return list(json.loads(found or "[]"))


def inspect(name: str) -> dict[str, Any] | None:
    out = docker("inspect", name, check=False)
    if out.returncode != 0:
        return None
    return dict(json.loads(out.stdout)[0])


@pytest.fixture
def home(tmp_path: Path) -> Iterator[Path]:
    """The test's PLAIT_HOME; every container labelled with it is removed after the test."""
    home = tmp_path / "home"
    home.mkdir()
    try:
        yield home
    finally:
        ids = docker("ps", "-aq", "--filter", f"label=plait.home={home}", check=False)
        if ids.stdout.split():
            docker("rm", "-f", *ids.stdout.split(), check=False)


@pytest.fixture(scope="module")
def steps(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ModuleType]:
    """The steps module, in a folder of its own (its source root, shipped as the code
    archive, or mounted), imported here as the step containers import it."""
    folder = tmp_path_factory.mktemp("docker_steps")
    (folder / "docker_steps.py").write_text(textwrap.dedent(STEPS))
    sys.path.insert(0, str(folder))
    try:
        yield importlib.import_module("docker_steps")
    finally:
        sys.path.remove(str(folder))
        sys.modules.pop("docker_steps", None)


# ---- the control plane ----


class ImageScaffold:
    """TEST SCAFFOLDING, not a product runner: sets ``task.image`` (which the control plane
    will set once the image builder is wired in) and what a test asks for, then hands the task
    to the real DockerRunner it wraps."""

    def __init__(self, runner: DockerRunner, image: str) -> None:
        self.runner = runner
        self.name = runner.name
        self.image = image
        self.options: ContainerOptions | None = None
        """Passed to submit, as the control plane passes the stack component's config."""
        self.code_root = ""
        """When set: the code is imported from this folder (mounted) rather than the archive,
        as for an embedded engine's client."""
        self.remote_artifacts = False
        """Name no local store: artifacts and code stream through the control plane."""
        self.handles: dict[str, str] = {}
        """The handle submit returned, by step id."""
        self.pools: Any = None
        """The control plane's task pools (set by Plane)."""

    async def run(
        self, ctx: RunnerContext, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        await self.runner.run(ctx, task_status=task_status)

    async def submit(self, task: tasks.Task) -> str | None:
        task.image = task.image or self.image
        if self.code_root:
            task.code_archive = ""
            task.code_root = self.code_root
        if self.remote_artifacts:
            task.artifact_store_uri = ""
        # the control plane keeps a task with an image for the container to claim (by its
        # lease); it saw none here, so the scaffolding does what it would have done
        self.pools.hold(task)
        handle = await self.runner.submit(task, self.options)
        self.handles[task.token.step_id] = handle
        return handle

    async def cancel(self, token: tasks.LeaseToken) -> None:
        await self.runner.cancel(token)

    def alive(self, handle: str) -> bool | None:
        return self.runner.alive(handle)


class Plane:
    """A control plane served in this process (a thread of its own) with the local runner and
    the Docker runner (behind the scaffolding), and a client of it."""

    def __init__(
        self,
        home: Path,
        image: str,
        *,
        runner: DockerRunner | None = None,
        address: str = "127.0.0.1:0",
        resume: bool = False,
        crash_retries: int = 0,
    ) -> None:
        from anyio.from_thread import start_blocking_portal

        from plait.engine import ControlPlane, ControlPlaneConfig

        self.runner = runner or DockerRunner(RUNNER, stop_grace_seconds=2)
        self.scaffold = ImageScaffold(self.runner, image)
        self.cp = ControlPlane(
            ControlPlaneConfig(home=home, resume=resume, crash_retries=crash_retries),
            runners={"local": LocalRunner(2, prestart=0), RUNNER: self.scaffold},
        )
        self.scaffold.pools = self.cp.pools
        self._portal_cm = start_blocking_portal("asyncio")
        self.portal = self._portal_cm.__enter__()
        try:
            self._future, self.port = self.portal.start_task(self.cp.serve, address)
        except BaseException:
            self._portal_cm.__exit__(None, None, None)
            raise
        self.client = plait.Client(f"127.0.0.1:{self.port}", token=self.cp.owner_secret)
        self.store = home / "artifacts"

    def close(self) -> None:
        self.client.close()
        with contextlib.suppress(Exception):
            self.portal.call(self.cp.stop)
            self._future.result(timeout=60)
        self._portal_cm.__exit__(None, None, None)

    def step(self, run_id: str, step_id: str) -> plait.StepRun:
        return self.client.get_run(run_id).steps[step_id]


@contextlib.contextmanager
def plane(home: Path, image: str, **kwargs: Any) -> Iterator[Plane]:
    p = Plane(home, image, **kwargs)
    try:
        yield p
    finally:
        p.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def message_of(step: plait.StepRun) -> str:
    assert step.error is not None, step
    return step.error.message


# ---- steps in containers, through a control plane ----


def test_a_step_runs_in_a_container_of_its_own_and_reports_back(
    image: str, home: Path, steps: ModuleType
) -> None:
    with plane(home, image) as p:
        run = steps.contained.run({"n": 7}, client=p.client)
        assert run.status == "SUCCEEDED", run
        out = run.steps["where"].output()
        assert out["n"] == 7 and out["in_container"] is True
        # the one-shot entrypoint, on the host network, artifacts from the mounted store
        argv = out["argv"]
        assert argv[argv.index("--server") + 1] == f"127.0.0.1:{p.port}"
        assert argv[argv.index("--artifacts") + 1] == "local"
        assert out["uid"] == os.getuid()  # files in the mounted store are the control plane's
        logs = "".join(e.text for e in p.client.logs(run.run_id, "where"))
        assert "hello from a container, n=7" in logs
        handle = p.scaffold.handles["where"]
        assert handle.startswith(f"plait-{run.run_id}-where-1-")
        # removed once it ended (the watcher removes it just after the step reported)
        wait_for(lambda: inspect(handle) is None, "the step's container was removed")


def test_a_pipeline_mixes_the_local_runner_and_docker_per_step(
    image: str, home: Path, steps: ModuleType
) -> None:
    with plane(home, image) as p:
        run = steps.mixed.run({"n": 4}, client=p.client)
        assert run.status == "SUCCEEDED", run
        # make (local) → total (docker) → report (local)
        assert run.steps["report"].output() == [6, False, True, False]
        assert set(p.scaffold.handles) == {"total"}


def test_code_from_a_mounted_source_root_and_artifacts_through_the_control_plane(
    image: str, home: Path, steps: ModuleType
) -> None:
    with plane(home, image) as p:
        p.scaffold.code_root = str(Path(steps.__file__).parent)
        run = steps.mixed.run({"n": 5}, client=p.client)
        assert run.status == "SUCCEEDED", run
        assert run.steps["report"].output() == [10, False, True, False]

        p.scaffold.code_root = ""
        p.scaffold.remote_artifacts = True
        run = steps.contained.run({"n": 3}, client=p.client)
        assert run.status == "SUCCEEDED", run
        argv = run.steps["where"].output()["argv"]
        assert argv[argv.index("--artifacts") + 1] == "remote"


def test_resources_land_on_the_container_and_keep_containers_keeps_it(
    image: str, home: Path, steps: ModuleType
) -> None:
    with plane(home, image) as p:
        p.scaffold.options = ContainerOptions(keep_containers=True)
        run = steps.resourced.run(client=p.client)
        assert run.steps["limited"].status == "SUCCEEDED", run
        handle = p.scaffold.handles["limited"]
        # the step reported, and its process ends just after
        wait_for(lambda: (inspect(handle) or {})["State"]["Status"] == "exited", "it exited")
        info = inspect(handle)
        assert info is not None, "keep_containers: the container is kept"
        assert info["State"]["ExitCode"] == 0
        host = info["HostConfig"]
        assert host["NanoCpus"] == 500_000_000
        assert host["Memory"] == host["MemorySwap"] == 256 * 2**20
        assert host["NetworkMode"] == "host" and host["Init"] is True
        labels = info["Config"]["Labels"]
        assert labels["plait.run"] == run.run_id and labels["plait.step"] == "limited"
        assert labels["plait.lease"] == f"{run.run_id}/limited/1/1"
        assert labels["plait.runner"] == RUNNER and labels["plait.home"] == str(home)
        assert "PLAIT_TOKEN=" + p.cp.worker_secret in info["Config"]["Env"]

        # gpus: a device request (kept too, whether it could start or not)
        info = inspect(p.scaffold.handles["on_gpu"])
        assert info is not None
        (request,) = info["HostConfig"]["DeviceRequests"]
        assert request["Count"] == 1 and request["Capabilities"] == [["gpu"]]
        gpu = run.steps["on_gpu"]
        if gpu.status != "SUCCEEDED":  # a machine without GPUs (or NVIDIA's runtime)
            assert gpu.status == "CRASHED", run
            assert "the step's container could not start" in message_of(gpu), message_of(gpu)


def test_out_of_memory_ends_the_attempt_crashed_and_says_so(
    image: str, home: Path, steps: ModuleType
) -> None:
    # (a 32 MiB limit would kill the entrypoint while it imports grpc, before the step starts)
    with plane(home, image) as p:
        run = steps.hogging.run({"mb": 200}, client=p.client)
        step = run.steps["hog"]
        assert step.status == "CRASHED", run
        message = message_of(step)
        assert "out of memory (limit 96 MiB" in message, message
        assert p.scaffold.handles["hog"] in message
        logs = "".join(e.text for e in p.client.logs(run.run_id, "hog"))
        assert "allocating 200 MB" in logs  # it was the step that ran out
        wait_for(lambda: not containers(home), "the container was removed")


def test_a_missing_image_crashes_the_attempt_with_a_clear_message(
    image: str, home: Path, steps: ModuleType
) -> None:
    with plane(home, "plait-no-such-image:nope") as p:
        run = steps.contained.run({"n": 1}, client=p.client)
        step = run.steps["where"]
        assert step.status == "CRASHED", run
        message = message_of(step)
        assert "the step's image plait-no-such-image:nope is not on the Docker daemon" in message
        assert not containers(home)


def test_an_unreachable_docker_daemon_crashes_the_attempt(
    image: str, home: Path, tmp_path: Path, steps: ModuleType
) -> None:
    runner = DockerRunner(RUNNER, docker_url=f"unix://{tmp_path}/no-docker.sock")
    with plane(home, image, runner=runner) as p:
        run = steps.contained.run({"n": 1}, client=p.client)
        step = run.steps["where"]
        assert step.status == "CRASHED", run
        assert "cannot reach the Docker daemon" in message_of(step), message_of(step)


def test_cancelling_a_run_stops_and_removes_its_container(
    image: str, home: Path, steps: ModuleType
) -> None:
    with plane(home, image) as p:
        d = p.store / "markers"
        d.mkdir(parents=True)
        run = steps.holding.run({"d": str(d)}, client=p.client, wait=False)
        wait_for(lambda: (d / "started").exists(), "the step started in its container")
        handle = p.scaffold.handles["hold"]
        assert (inspect(handle) or {}).get("State", {}).get("Running")
        p.client.cancel_run(run.run_id)
        ended = p.client.wait(run.run_id)
        assert ended.status == "CANCELLED", ended
        assert not (d / "go").exists()
        wait_for(lambda: inspect(handle) is None, "the cancelled step's container was removed")


def test_a_restarted_control_plane_reattaches_to_a_running_container(
    image: str, home: Path, steps: ModuleType
) -> None:
    port = free_port()
    address = f"127.0.0.1:{port}"
    d = home / "artifacts" / "markers"  # inside the mounted store: the step sees it
    d.mkdir(parents=True)
    with plane(home, image, address=address, resume=True) as first:
        run = steps.holding.run({"d": str(d)}, client=first.client, wait=False)
        wait_for(lambda: (d / "started").exists(), "the step started in its container")
        handle = first.scaffold.handles["hold"]
        secret = first.cp.worker_secret
    # the control plane stopped (not killed): its container runs on
    info = inspect(handle)
    assert info is not None and info["State"]["Running"], info
    with plane(home, image, address=address, resume=True) as second:
        # a resuming control plane keeps the secret its containers report with
        assert second.cp.worker_secret == secret
        assert second.runner.alive(handle) is True  # listed at start: re-attached
        assert second.runner.alive("plait-someone-else-1-1") is False
        (d / "go").write_text("")
        ended = second.client.wait(run.run_id)
        assert ended.status == "SUCCEEDED", ended
        step = ended.steps["hold"]
        assert step.attempt == 1 and step.output() == "released"  # the same attempt went on
        assert "hold" not in second.scaffold.handles  # nothing submitted again
        wait_for(lambda: inspect(handle) is None, "the re-attached container was removed")
        assert second.runner.alive(handle) is False


def test_the_bridge_network_reaches_the_control_plane_at_the_gateway(
    image: str, home: Path, steps: ModuleType
) -> None:
    # the host's address on the bridge, read off its interface (Docker 20.10 leaves the
    # gateway out of the default bridge's IPAM config until its daemon restarts)
    options = docker("network", "inspect", "bridge", "--format", "{{json .Options}}")
    gateway = _ipv4_of(json.loads(options.stdout)["com.docker.network.bridge.name"])
    with plane(home, image, address="0.0.0.0:0") as p:
        p.scaffold.options = ContainerOptions(network="bridge")
        run = steps.contained.run({"n": 2}, client=p.client)
        assert run.status == "SUCCEEDED", run
        argv = run.steps["where"].output()["argv"]
        assert argv[argv.index("--server") + 1] == f"{gateway}:{p.port}"


def _ipv4_of(interface: str) -> str:
    """A network interface's IPv4 address (SIOCGIFADDR)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        request = struct.pack("256s", interface.encode()[:15])
        return socket.inet_ntoa(fcntl.ioctl(s.fileno(), 0x8915, request)[20:24])


def test_a_networks_gateway_is_its_subnets_first_address_when_docker_leaves_it_out() -> None:
    def ipam(*configs: dict[str, str]) -> dict[str, Any]:
        return {"IPAM": {"Driver": "default", "Config": list(configs)}}

    assert gateway_of(ipam({"Subnet": "172.17.0.0/16"})) == "172.17.0.1"  # Docker 20.10
    assert gateway_of(ipam({"Subnet": "10.5.0.0/24", "Gateway": "10.5.0.254"})) == "10.5.0.254"
    assert gateway_of(ipam({"Subnet": "fd00::/64"}, {"Subnet": "10.9.0.0/24"})) == "10.9.0.1"
    assert gateway_of(ipam()) is None
    assert gateway_of({"IPAM": None}) is None


# ---- the runner on its own ----


def with_runner(
    runner: DockerRunner,
    home: Path,
    body: Callable[[list[tuple[tasks.LeaseToken, str]]], Coroutine[Any, Any, None]],
) -> None:
    """Runs ``runner`` with a context whose control plane is nowhere (nothing answers on
    port 1) and calls ``body`` with the list of attempts it reports lost."""
    lost: list[tuple[tasks.LeaseToken, str]] = []

    async def main() -> None:
        ctx = RunnerContext(
            address="127.0.0.1:1",
            home=home,
            report_lost=lambda token, message: lost.append((token, message)),
        )
        async with anyio.create_task_group() as tg:
            await tg.start(runner.run, ctx)
            with anyio.fail_after(DEADLINE):
                await body(lost)
            tg.cancel_scope.cancel()

    anyio.run(main)


async def until(condition: Callable[[], bool]) -> None:
    """Polls a condition on the outside world (Docker's state, the reports so far) in a thread:
    there is no event to wait on."""
    while not await anyio.to_thread.run_sync(condition):  # noqa: ASYNC110
        await anyio.sleep(0.05)


def a_task(step_id: str, image: str) -> tasks.Task:
    token = tasks.LeaseToken(run_id=secrets.token_hex(16), step_id=step_id, attempt=1, epoch=1)
    return tasks.Task(token=token, image=image)


def a_bad_task(step_id: str, image: str) -> tasks.Task:
    """A task whose lease the entrypoint refuses at once (no run id): it exits 2."""
    return tasks.Task(token=tasks.LeaseToken(step_id=step_id, attempt=1, epoch=1), image=image)


def test_cancel_sends_sigterm_then_sigkill_after_the_grace_period(
    image: str, stubborn_image: str, home: Path
) -> None:
    runner = DockerRunner(stop_grace_seconds=1)

    async def body(lost: list[tuple[tasks.LeaseToken, str]]) -> None:
        # the entrypoint (which keeps trying to reach the control plane) ends on SIGTERM
        polite = a_task("polite", image)
        handle = await runner.submit(polite)
        await until(lambda: bool((inspect(handle) or {}).get("State", {}).get("Running")))
        await runner.cancel(polite.token)
        await until(lambda: len(lost) == 1)
        assert lost[0][0] == polite.token
        assert "was stopped" in lost[0][1] and "exit code 143" in lost[0][1], lost[0][1]
        # one that ignores SIGTERM is killed once the grace period has passed
        stubborn = a_task("stubborn", stubborn_image)
        handle = await runner.submit(stubborn)
        await until(lambda: bool((inspect(handle) or {}).get("State", {}).get("Running")))
        await runner.cancel(stubborn.token)
        await until(lambda: len(lost) == 2)
        assert lost[1][0] == stubborn.token
        assert "was stopped" in lost[1][1] and "exit code 137" in lost[1][1], lost[1][1]
        await until(lambda: not containers(home))

    with_runner(runner, home, body)


def test_a_container_that_ends_without_reporting_is_reported_with_its_last_output(
    image: str, home: Path
) -> None:
    async def body(lost: list[tuple[tasks.LeaseToken, str]]) -> None:
        handle = await runner.submit(a_bad_task("nowhere", image))
        await until(lambda: len(lost) == 1)
        message = lost[0][1]
        assert f"the step's container {handle} exited with code 2" in message, message
        assert "the last lines of its output" in message and "--lease" in message, message

    runner = DockerRunner()
    with_runner(runner, home, body)


def test_a_new_runner_reattaches_to_running_containers_and_removes_ended_ones(
    stubborn_image: str, image: str, home: Path
) -> None:
    first = DockerRunner(stop_grace_seconds=0)
    handles: dict[str, str] = {}

    def running(name: str) -> Callable[[], bool]:
        return lambda: bool((inspect(handles[name]) or {}).get("State", {}).get("Running"))

    async def start(lost: list[tuple[tasks.LeaseToken, str]]) -> None:
        keep = ContainerOptions(keep_containers=True)
        handles["runs-on"] = await first.submit(a_task("runs-on", stubborn_image), keep)
        handles["ends-unwatched"] = await first.submit(a_task("ends-unwatched", stubborn_image))
        handles["ends"] = await first.submit(a_bad_task("ends", image), keep)
        await until(running("runs-on"))
        await until(running("ends-unwatched"))
        # `ends` exits at once (its lease is refused) and is kept, as asked
        await until(lambda: len(lost) == 1)
        assert first.alive(handles["runs-on"]) is True
        assert first.alive(handles["ends"]) is False

    with_runner(first, home, start)
    # the runner stopped watching; its containers run on
    assert running("runs-on")() and running("ends-unwatched")()
    assert inspect(handles["ends"]) is not None
    docker("kill", handles["ends-unwatched"])  # it ends while no runner watches

    second = DockerRunner()

    async def reattach(lost: list[tuple[tasks.LeaseToken, str]]) -> None:
        assert second.alive(handles["runs-on"]) is True
        assert second.alive(handles["ends-unwatched"]) is False
        assert second.alive(handles["ends"]) is False
        # ended while unwatched, not kept: removed at start (its attempt is the control
        # plane's to retry: alive() said it is gone)
        await until(lambda: inspect(handles["ends-unwatched"]) is None)
        docker("kill", handles["runs-on"])  # it ends: the new runner watched it
        await until(lambda: len(lost) == 1)
        assert handles["runs-on"] in lost[0][1] and "SIGKILL" in lost[0][1], lost[0][1]
        assert second.alive(handles["runs-on"]) is False

    with_runner(second, home, reattach)
    # kept ones (the label says so): nothing removed them
    assert inspect(handles["runs-on"]) is not None and inspect(handles["ends"]) is not None


# ---- no Docker needed ----


def test_container_names_are_valid_and_unique_per_attempt() -> None:
    import re

    names = set()
    for step in ("train", "train/x", "train_x", "évaluer", "x" * 300, "map.3", "a b"):
        for attempt, epoch in ((1, 1), (1, 2), (2, 1)):
            token = tasks.LeaseToken(run_id="ab" * 16, step_id=step, attempt=attempt, epoch=epoch)
            name = container_name(token)
            assert re.fullmatch(r"[a-zA-Z0-9][a-zA-Z0-9_.-]+", name), name
            assert len(name) < 128
            names.add(name)
    assert len(names) == 7 * 3


def test_container_options_are_checked() -> None:
    with pytest.raises(ValueError, match="network"):
        ContainerOptions(network="overlay")
    with pytest.raises(ValueError, match="stop_grace_seconds"):
        ContainerOptions(stop_grace_seconds=-1)
    with pytest.raises(ValueError, match="network"):
        DockerRunner(network="none")
    assert ContainerOptions() == ContainerOptions(None, None, None)


def test_importing_plait_runners_does_not_import_aiodocker() -> None:
    code = (
        "import sys, plait.runners; "
        "print([m for m in ('aiodocker', 'aiohttp') if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
