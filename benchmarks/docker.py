"""The Docker runner's start-up: from the call that starts a run to the first step's code.

Through a daemon (`plait server start --foreground`, a fresh PLAIT_HOME, SQLite), with the
stack the documentation sets up (docs/builds.md): a `docker` runner (keep_containers=true, so
that the containers' create and start times can be read; this benchmark removes them), a
`docker` image builder on the parent image $PLAIT_TEST_DOCKER_BASE, the container registry
$PLAIT_TEST_REGISTRY when set, the local artifact store. Each run is made by a fresh client
process (`drive.py` in a throwaway project, as a user's `python pipe.py` would), which
connects, then takes the wall clock just before `pipeline.run(...)`; the step's first line
returns `time.time()`. Both clocks are this host's: the container shares it.

  cold        a requirement no image has (a new wheel, made here): one image is built. Plait's
              own layers come from Docker's layer cache (the same parent image, the same
              Plait); the requirement's layers are new, and pushed to the registry
  truly cold  once per invocation: a parent image whose id is new (the base image with a
              LABEL), so nothing is in the layer cache, in a daemon home that has made no
              wheels yet: every layer is built, Plait's dependencies installed
  warm        the same run again: the image is found on this host, nothing is built
  after edit  the step's source changed (a new code archive is uploaded), nothing is built
  floor       `docker run --rm BASE python3 -c 'import time; print(time.time())'`, from
              before `docker run` to the printed time, measured beside each warm run
  chain       a 20-step chain on the Docker runner (one container per step) and on the local
              runner: wall time of the run / 20

Everything it creates (images, labelled parent, containers, registry manifests, the daemon
and its home) is removed after; the base image is left alone.
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import hashlib
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

TARGET_OVER_FLOOR_S = 0.5
"""Warm and after-edit runs: at most this much slower than the floor (issue 10)."""
CHAIN_STEPS = 20

_PIPE = '''\
"""The pipelines of benchmarks/docker.py (written by it; edited by it between runs)."""

import time

import plait

ENV = plait.Environment(requirements={requirements!r})


@plait.step(runner="docker", environment=ENV, cache=False)
def first(tag: int) -> float:
    started = time.time()  # the step's code starts here
    edit = {edit}  # changed by the benchmark: an edit of the step's code
    return started + 0 * edit


@plait.pipeline
def one(tag: int = 0) -> None:
    first(tag)


@plait.step(runner="docker", environment=ENV, cache=False)
def link_docker(x: int) -> int:
    return x + 1


@plait.step(runner="local", cache=False)
def link_local(x: int) -> int:
    return x + 1


@plait.pipeline
def chain_docker(tag: int = 0) -> None:
    x = link_docker(tag)
    for _ in range({links}):
        x = link_docker(x)


@plait.pipeline
def chain_local(tag: int = 0) -> None:
    x = link_local(tag)
    for _ in range({links}):
        x = link_local(x)
'''

_DRIVE = '''\
"""Runs one pipeline of pipe.py through $PLAIT_SERVER and prints what it measured as JSON."""

import json
import sys
import time

import plait

import pipe

client = plait.Client()
client.list_pipelines()  # connected: what follows is the run alone
pipeline = getattr(pipe, sys.argv[1])
pipeline.compile()
t0 = time.time()
run = pipeline.run({"tag": int(sys.argv[2])}, client=client)
t1 = time.time()
events = [
    {"step": e.step_id, "status": str(e.step_status or e.run_status), "time": e.time.timestamp(),
     "message": e.message}
    for batch in client.watch(run.run_id) for e in batch
]
logs = [
    {"step": e.step_id, "text": e.text, "time": e.time.timestamp()}
    for e in client.logs(run.run_id)
]
out = {"run_id": run.run_id, "status": str(run.status), "t0": t0, "t1": t1, "events": events,
       "logs": logs}
if sys.argv[1] == "one" and str(run.status) == "SUCCEEDED":
    out["code_start"] = run.steps["first"].output()
    step = run.steps["first"]
    out["step_start"] = step.start_time.timestamp() if step.start_time else None
print(json.dumps(out))
'''


def _wheel(folder: Path, tag: str) -> Path:
    """A tiny pure-Python wheel that no image has yet (``tag`` is in its content)."""
    name, version = "plait_bench_req", "1.0"
    info = f"{name}-{version}.dist-info"
    files = {
        f"{name}.py": f'TAG = "{tag}"\n'.encode(),
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n".encode(),
        f"{info}/WHEEL": b"Wheel-Version: 1.0\nGenerator: bench\nRoot-Is-Purelib: true\n"
        b"Tag: py3-none-any\n",
    }

    def record(n: str, data: bytes) -> str:
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        return f"{n},sha256={digest},{len(data)}"

    files[f"{info}/RECORD"] = (
        "\n".join([*(record(n, d) for n, d in files.items()), f"{info}/RECORD,,"]) + "\n"
    ).encode()
    out = folder / tag / f"{name}-{version}-py3-none-any.whl"
    out.parent.mkdir(parents=True)
    with zipfile.ZipFile(out, "w") as z:
        for n, d in files.items():
            z.writestr(n, d)
    return out


def _docker(*args: str, check: bool = True, timeout: float = 600) -> str:
    done = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout)
    if check and done.returncode != 0:
        raise RuntimeError(f"docker {' '.join(args)}: {done.stderr.strip()}")
    return done.stdout


def _docker_time(text: str) -> float:
    """A Docker RFC 3339 timestamp (nanoseconds, Z) as seconds since the epoch."""
    head, _, frac = text.rstrip("Z").partition(".")
    base = dt.datetime.fromisoformat(head).replace(tzinfo=dt.UTC).timestamp()
    return base + float(f"0.{frac or 0}")


def floor(base: str) -> float:
    """Seconds from before `docker run --rm BASE python3 ...` to the time it prints."""
    t0 = time.time()
    out = _docker("run", "--rm", base, "python3", "-c", "import time; print(time.time())")
    return float(out.strip().splitlines()[-1]) - t0


def import_floor(image: str) -> float:
    """Seconds from before `docker run --rm IMAGE python -c 'import plait.runners.step'`
    (with --init and the host network, as the runner starts containers) to its end."""
    t0 = time.time()
    _docker(
        "run", "--rm", "--init", "--network", "host", "--entrypoint", "python", image,
        "-c", "import plait.runners.step",
    )  # fmt: skip
    return time.time() - t0


class _Bench:
    """A daemon, its stack and a throwaway project; one run at a time."""

    def __init__(self, tmp: Path, address: str, token: str, env: dict[str, str]) -> None:
        self.tmp = tmp
        self.project = tmp / "project"
        self.project.mkdir()
        (self.project / "pyproject.toml").write_text('[project]\nname = "bench"\nversion = "0"\n')
        (self.project / "drive.py").write_text(_DRIVE)
        self.wheels = tmp / "wheels"
        self.env = {k: v for k, v in env.items() if not k.startswith("PLAIT_")}
        self.env.update(PLAIT_SERVER=address, PLAIT_TOKEN=token, PLAIT_HOME=str(tmp / "client"))
        self.cli_env = {**env, "PLAIT_SERVER": address, "PLAIT_TOKEN": token}
        self.edit = 0
        self.requirements: list[str] = []
        self.runs: list[str] = []

    def cli(self, *args: str) -> str:
        done = subprocess.run(
            [sys.executable, "-m", "plait", *args],
            env=self.cli_env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        if done.returncode != 0:
            raise RuntimeError(f"plait {' '.join(args)}: {done.stdout}{done.stderr}")
        return done.stdout

    def builder(self, parent: str) -> None:
        """Registers (or re-registers) the image builder on ``parent``."""
        self.cli("component", "register", "builder", "--kind", "image_builder",
                 "--flavor", "docker", "-c", f"parent_image={parent}")  # fmt: skip

    def write(self, *, requirement: Path | None = None, edit: bool = False) -> None:
        """Writes pipe.py: with a new requirement (a new image), or an edit of the step."""
        if requirement is not None:
            self.requirements = [str(requirement)]
        if edit:
            self.edit += 1
        (self.project / "pipe.py").write_text(
            _PIPE.format(requirements=self.requirements, edit=self.edit, links=CHAIN_STEPS - 1)
        )

    def fresh_requirement(self) -> None:
        self.write(requirement=_wheel(self.wheels, uuid.uuid4().hex))

    def run(self, pipeline: str, tag: int = 0) -> dict[str, Any]:
        done = subprocess.run(
            [sys.executable, "drive.py", pipeline, str(tag)],
            cwd=self.project,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=900,
        )
        if done.returncode != 0:
            raise RuntimeError(f"drive.py {pipeline}: {done.stdout}{done.stderr}")
        out: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
        if out["status"] != "SUCCEEDED":
            raise RuntimeError(f"run of {pipeline} ended {out['status']}: {out['events']}")
        self.runs.append(out["run_id"])
        return out

    def one(self) -> dict[str, Any]:
        """One run of the one-step pipeline: its figures and where the time went."""
        out = self.run("one")
        t0 = out["t0"]
        phases: dict[str, float] = {}
        for e in out["events"]:
            if e["step"] == "first" and e["status"] in ("QUEUED", "RUNNING"):
                phases.setdefault(e["status"].lower(), e["time"] - t0)
            elif not e["step"] and e["status"] == "RUNNING":
                phases.setdefault("run_running", e["time"] - t0)
        built = [log for log in out["logs"] if log["text"].startswith(("image ", "[build] image "))]
        source = ""
        for log in out["logs"]:
            for word, name in (("built", "built"), ("found on this", "local"), ("pulled", "pulled")):
                if "(build " in log["text"] and f"): {word}" in log["text"]:
                    source = name
                    phases.setdefault("image_ready", log["time"] - t0)
        inspect = json.loads(_docker("inspect", f"plait-{out['run_id']}-first-1-1"))[0]
        phases["container_created"] = _docker_time(inspect["Created"]) - t0
        phases["container_started"] = _docker_time(inspect["State"]["StartedAt"]) - t0
        if out.get("step_start"):
            phases["step_start_recorded"] = out["step_start"] - t0
        phases["code_start"] = out["code_start"] - t0
        return {
            "s": out["code_start"] - t0,
            "run_wall_s": out["t1"] - t0,
            "source": source,
            "phases": phases,
            "image": inspect["Config"]["Image"],
        }

    def chain(self, runner: str) -> float:
        out = self.run(f"chain_{runner}")
        return float(out["t1"] - out["t0"]) / CHAIN_STEPS

    def remove_containers(self) -> None:
        for run_id in self.runs:
            ids = _docker("ps", "-aq", "--filter", f"label=plait.run={run_id}").split()
            if ids:
                _docker("rm", "-f", *ids, check=False)
        self.runs.clear()


def _delete_from_registry(reference: str) -> None:
    """Deletes an image's manifest from the (loopback, plain HTTP) registry it names."""
    host, _, rest = reference.partition("/")
    repo, _, tag = rest.rpartition(":")
    url = f"http://{host}/v2/{repo}/manifests"
    accept = "application/vnd.docker.distribution.manifest.v2+json"
    with contextlib.suppress(OSError, urllib.error.URLError):
        head = urllib.request.Request(f"{url}/{tag}", method="HEAD", headers={"Accept": accept})
        with urllib.request.urlopen(head, timeout=10) as resp:
            digest = resp.headers.get("Docker-Content-Digest", "")
        if digest:
            urllib.request.urlopen(
                urllib.request.Request(f"{url}/{digest}", method="DELETE"), timeout=10
            ).close()


def _descendants(image_id: str) -> list[str]:
    """The images built on ``image_id`` (intermediate ones included), children first."""
    ids = _docker("image", "ls", "-aq", "--no-trunc").split()
    if not ids:
        return []
    parents = {
        i["Id"]: i.get("Parent", "") for i in json.loads(_docker("image", "inspect", *set(ids)))
    }
    out: list[str] = []

    def walk(parent: str) -> None:
        for child, p in parents.items():
            if p == parent:
                walk(child)
                out.append(child)

    walk(image_id)
    return out


@contextlib.contextmanager
def _labelled_parent(base: str) -> Iterator[str]:
    """The base image with a LABEL: a parent image id nothing was ever built on."""
    tag = f"plait-bench-parent:{uuid.uuid4().hex[:12]}"
    context = io.BytesIO()
    import tarfile

    with tarfile.open(fileobj=context, mode="w") as tar:
        data = f"FROM {base}\nLABEL plait.bench={tag}\n".encode()
        info = tarfile.TarInfo("Dockerfile")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    done = subprocess.run(
        ["docker", "build", "-q", "-t", tag, "-"],
        input=context.getvalue(),
        capture_output=True,
        timeout=120,
    )
    if done.returncode != 0:
        raise RuntimeError(f"docker build of {tag}: {done.stderr.decode()}")
    image_id = _docker("image", "inspect", "-f", "{{.Id}}", tag).strip()
    try:
        yield tag
    finally:
        for child in _descendants(image_id):
            _docker("rmi", "-f", child, check=False)
        _docker("rmi", "-f", tag, check=False)


def bench_docker(repeat: int, base: str, registry: str = "") -> dict[str, Any]:
    """The figures of the docker group (see the module docstring); median of ``repeat``."""
    from run import _daemon  # benchmarks/run.py: a daemon on a free port

    started = time.monotonic()
    images: set[str] = set()
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        home = tmp / "daemon"
        home.mkdir()
        with _daemon(str(home)) as (address, token, env):
            bench = _Bench(tmp, address, token, env)
            try:
                bench.cli("component", "register", "dock", "--kind", "runner",
                          "--flavor", "docker", "-c", "keep_containers=true")  # fmt: skip
                bench.builder(base)
                parts = ["-c", "dock", "-c", "builder", "-c", "local-artifacts"]
                if registry:
                    bench.cli("component", "register", "reg", "--kind", "container_registry",
                              "--flavor", "docker", "-c", f"uri={registry}")  # fmt: skip
                    parts += ["-c", "reg"]
                bench.cli("stack", "register", "bench", *parts, "--set")

                # truly cold: a parent nothing was built on, a home without wheels
                with _labelled_parent(base) as parent:
                    bench.builder(parent)
                    bench.fresh_requirement()
                    truly = bench.one()
                    images.add(truly["image"])
                    bench.remove_containers()
                    with contextlib.suppress(RuntimeError):
                        _docker("rmi", truly["image"])
                    bench.builder(base)

                samples: dict[str, list[dict[str, Any]]] = {
                    "cold": [], "warm": [], "edit": [],
                }  # fmt: skip
                floors: list[float] = []
                imports: list[float] = []
                for _ in range(repeat):
                    bench.fresh_requirement()
                    samples["cold"].append(bench.one())
                    images.add(samples["cold"][-1]["image"])
                    floors.append(floor(base))
                    samples["warm"].append(bench.one())
                    bench.write(edit=True)
                    samples["edit"].append(bench.one())
                    imports.append(import_floor(samples["warm"][-1]["image"]))
                    bench.remove_containers()
                chain_docker, chain_local = [], []
                for _ in range(repeat):
                    chain_docker.append(bench.chain("docker"))
                    bench.remove_containers()
                    chain_local.append(bench.chain("local"))
            finally:
                bench.remove_containers()
                for image in images:
                    _docker("rmi", "-f", image, check=False)
                    if registry and image.startswith(registry + "/"):
                        _delete_from_registry(image)

    def median(xs: list[float]) -> float:
        return float(statistics.median(xs))

    out: dict[str, Any] = {
        "floor_s": median(floors),
        "floor_samples_s": floors,
        "plait_import_in_container_s": median(imports),
        "truly_cold": truly,
        "chain_docker_s_per_step": median(chain_docker),
        "chain_local_s_per_step": median(chain_local),
        "chain_docker_samples": chain_docker,
        "chain_local_samples": chain_local,
        "registry": registry,
    }
    for name, runs in samples.items():
        best = sorted(runs, key=lambda r: r["s"])[len(runs) // 2]  # the median run
        out[name] = {**best, "samples_s": [r["s"] for r in runs]}
    out["took_s"] = time.monotonic() - started
    return out
