"""The server's Dockerfile, built and run for real (base image made locally: scripts/docker.sh)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from processes import kill_group

import plait

ROOT = Path(__file__).resolve().parent.parent
pytestmark = [pytest.mark.docker, pytest.mark.slow]


def docker(
    *args: str, check: bool = True, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["docker", *args], capture_output=True, text=True, check=check, timeout=timeout
    )


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    base = os.environ.get("PLAIT_TEST_DOCKER_BASE")
    if not base:
        message = "PLAIT_TEST_DOCKER_BASE is not set (scripts/test starts Docker and sets it)"
        if os.environ.get("CI"):
            pytest.fail(message)  # in CI a missing Docker is a failure, never a skip
        pytest.skip(message)
    context = tmp_path_factory.mktemp("docker-context")
    shutil.copy(ROOT / "Dockerfile", context)
    shutil.copy(ROOT / ".dockerignore", context)
    # the documented build: wheels first, then an image build that needs no network
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            f"{ROOT}[postgres]",
            "-w",
            str(context / "wheelhouse"),
        ],
        check=True,
        timeout=600,
    )
    tag = f"plait-server:test-{os.getpid()}"
    docker("build", "-q", "--build-arg", f"BASE={base}", "-t", tag, str(context), timeout=600)
    yield tag
    docker("rmi", "-f", tag, check=False)


def test_the_server_image_serves_with_tokens_and_stops_gracefully(image: str) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    name = f"plait-test-{os.getpid()}"
    try:
        docker(
            "run",
            "-d",
            "--name",
            name,
            "--network",
            "host",
            image,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--auth",
        )
        address = f"127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while "ready" not in docker("logs", name).stderr:
            assert time.monotonic() < deadline, docker("logs", name).stderr
            time.sleep(0.2)
        token = docker("exec", name, "plait", "token", "create", "test").stdout.strip()
        assert token.startswith("plait_")
        with pytest.raises(plait.RpcError) as info:
            plait.Client(address, token="").list_runs()
        assert info.value.code == "UNAUTHENTICATED"
        client = plait.Client(address, token=token)
        assert client.list_runs() == []
        assert [name for name, _, _ in client.list_pipelines()] == []
        docker("stop", "-t", "30", name)
        state = docker("inspect", name, "--format", "{{.State.ExitCode}}").stdout.strip()
        assert state == "0"
        assert "SIGTERM: shutting down" in docker("logs", name).stderr
    finally:
        docker("rm", "-f", name, check=False)


def test_the_worker_in_a_container_example_runs_a_step_in_the_container(tmp_path: Path) -> None:
    base = os.environ.get("PLAIT_TEST_DOCKER_BASE")
    if not base:
        message = "PLAIT_TEST_DOCKER_BASE is not set (scripts/test starts Docker and sets it)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    env = {
        **os.environ,
        "BASE": base,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    }
    for key in ("PLAIT_SERVER", "PLAIT_TOKEN", "PLAIT_HOME"):
        env.pop(key, None)
    proc = subprocess.Popen(
        ["bash", str(ROOT / "examples" / "worker_in_container" / "run.sh")],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=900)
    finally:
        if proc.poll() is None:  # a hang: the script's trap stops its daemon and container
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.communicate(timeout=60)
            finally:
                kill_group(proc.pid)
                proc.wait()
    out = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
    assert out.returncode == 0, out.stdout + out.stderr
    # the step ran in the container (pipeline.py asserts it too), and the worker drained
    assert "(in a container: True)" in out.stdout
    assert "drained; exiting" in out.stdout
