"""The `docker` group of benchmarks/run.py: from the call that starts a run to the first line of
its step's code, on the Docker runner, beside a bare `docker run` of the base image.

Set-up, as a user runs containers (docs/builds.md): a daemon (`plait server start
--foreground`, a fresh PLAIT_HOME, SQLite) whose active stack has a `docker` runner, a `docker`
image builder on the parent image $PLAIT_TEST_DOCKER_BASE, the container registry
$PLAIT_TEST_REGISTRY when set, and the local artifact store. Every run is made by a fresh client
process (`drive.py` in a throwaway project, as `python pipe.py` would be) that connects first,
then reads the wall clock just before `pipeline.run(...)`; the step's first line returns
`time.time()`. Both clocks are this host's: a container shares it.

  cold        the step's environment has a requirement no image has (a wheel made here with
              a new content): one image is built. Plait's own layers come from Docker's layer
              cache (same parent, same Plait; a first build, not counted, makes sure of it);
              the requirement's wheelhouse and layers are new, and the image is pushed
  truly cold  once: a parent image nothing was ever built on (the base image with a LABEL:
              a new image id, so Docker's layer cache has nothing for it) and a daemon home
              with no wheelhouse yet: every layer is built, Plait's dependencies installed
  warm        the same run again: the image is found on the Docker host, nothing is built
  after edit  the step's source changed (a new code archive is uploaded), nothing is built
  floor       `docker run --rm BASE python3 -c 'import time; print(time.time())'`: from before
              `docker run` to the printed time, measured beside each warm run
  chain       a 20-step chain (each step takes the previous one's output), one container per
              step, and the same chain on the local runner: wall time of the run / 20

For the one-step runs the runner keeps its containers (keep_containers=true) so that their
create and start times can be read (`docker inspect`); the chains run with the default
(containers removed as they end). Everything the group makes (images, the labelled parent and
what was built on it, containers, registry manifests, the daemon's home) is removed after it;
the base image stays, and so does Docker's cache of Plait's layers on it, which the tests
share (the registry, too, keeps the layers of the manifests removed until it is collected).
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import hashlib
import io
import itertools
import json
import statistics
import subprocess
import sys
import tarfile
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
"""The pipelines of benchmarks/containers.py (written by it, and edited by it between runs)."""

import time

import plait

ENV = plait.Environment(requirements={requirements!r})


@plait.step(runner="docker", environment=ENV, cache=False)
def first(tag: int) -> float:
    started = time.time()  # the step's code starts here
    edit = {edit}  # the benchmark edits this line: a change of the step's code
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
"""Runs one pipeline of pipe.py through $PLAIT_SERVER; prints what it saw as JSON."""

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
out = {
    "run_id": run.run_id, "status": str(run.status), "t0": t0, "t1": t1,
    "events": [
        {"step": e.step_id, "status": str(e.step_status or e.run_status),
         "time": e.time.timestamp()}
        for batch in client.watch(run.run_id) for e in batch
    ],
    "logs": [
        {"step": e.step_id, "text": e.text, "time": e.time.timestamp()}
        for e in client.logs(run.run_id)
    ],
}
if "first" in run.steps and str(run.status) == "SUCCEEDED":
    out["code_start"] = run.steps["first"].output()
print(json.dumps(out))
'''

_SOURCES = {
    "): built": "built",
    "): found on this machine": "local",
    "): pulled": "pulled",
}
"""The engine's last build log line of a step, as the build's source."""


def _wheel(folder: Path, tag: str) -> Path:
    """A tiny pure-Python wheel that no image has yet (``tag`` is in its content, and so in
    the key of every image that has it)."""
    name, version = "plait_bench_req", "1.0"
    info = f"{name}-{version}.dist-info"
    files = {
        f"{name}.py": f'TAG = "{tag}"\n'.encode(),
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n".encode(),
        f"{info}/WHEEL": b"Wheel-Version: 1.0\nGenerator: plait-bench\nRoot-Is-Purelib: true\n"
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


def _docker(*args: str, check: bool = True) -> str:
    done = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=600)
    if check and done.returncode != 0:
        raise RuntimeError(f"docker {' '.join(args)}: {done.stderr.strip()}")
    return done.stdout


def _docker_time(text: str) -> float:
    """A Docker timestamp (RFC 3339, nanoseconds, UTC) as seconds since the epoch."""
    head, _, frac = text.rstrip("Z").partition(".")
    return dt.datetime.fromisoformat(head).replace(tzinfo=dt.UTC).timestamp() + float(
        f"0.{frac or 0}"
    )


def docker_available() -> str:
    """Why the docker group cannot run here ("" when it can)."""
    try:
        done = subprocess.run(["docker", "info"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"docker info: {exc}"
    return "" if done.returncode == 0 else f"docker info: {done.stderr.strip()[:200]}"


def floor(base: str) -> float:
    """Seconds from before `docker run --rm BASE python3 ...` to the time it prints."""
    t0 = time.time()
    out = _docker("run", "--rm", base, "python3", "-c", "import time; print(time.time())")
    return float(out.strip().splitlines()[-1]) - t0


def import_floor(image: str) -> float:
    """Seconds from before `docker run --rm` of a step's image importing Plait's step
    entrypoint (`import plait.runners.step`; with --init and the host network, as the runner
    starts containers) to its end: the floor plus what importing Plait costs in a container."""
    t0 = time.time()
    _docker(
        "run", "--rm", "--init", "--network", "host", "--entrypoint", "python", image,
        "-c", "import plait.runners.step",
    )  # fmt: skip
    return time.time() - t0


class _Bench:
    """A daemon's stack and a throwaway project, and runs of its pipelines."""

    def __init__(self, tmp: Path, address: str, token: str, env: dict[str, str]) -> None:
        self.project = tmp / "project"
        self.project.mkdir()
        (self.project / "pyproject.toml").write_text('[project]\nname = "bench"\nversion = "0"\n')
        (self.project / "drive.py").write_text(_DRIVE)
        self.wheels = tmp / "wheels"  # outside the project: not in its code archive
        self.env = {k: v for k, v in env.items() if not k.startswith("PLAIT_")}
        self.env.update(PLAIT_SERVER=address, PLAIT_TOKEN=token, PLAIT_HOME=str(tmp / "client"))
        self.cli_env = {**env, "PLAIT_SERVER": address, "PLAIT_TOKEN": token}
        self.edits = 0
        self.requirements: list[str] = []
        self.runs: list[str] = []
        self.images: set[str] = set()

    def cli(self, *args: str) -> None:
        done = subprocess.run(
            [sys.executable, "-m", "plait", *args],
            env=self.cli_env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        if done.returncode != 0:
            raise RuntimeError(f"plait {' '.join(args)}: {done.stdout}{done.stderr}")

    def runner(self, *, keep: bool) -> None:
        """Registers (or replaces) the stack's Docker runner."""
        self.cli("component", "register", "dock", "--kind", "runner", "--flavor", "docker",
                 "-c", f"keep_containers={'true' if keep else 'false'}")  # fmt: skip

    def builder(self, parent: str) -> None:
        """Registers (or replaces) the stack's image builder, on ``parent``."""
        self.cli("component", "register", "builder", "--kind", "image_builder",
                 "--flavor", "docker", "-c", f"parent_image={parent}")  # fmt: skip

    def write(self, *, requirement: Path | None = None, edit: bool = False) -> None:
        """Writes pipe.py: with a new requirement (a new image), or an edit of the step."""
        if requirement is not None:
            self.requirements = [str(requirement)]
        self.edits += edit
        (self.project / "pipe.py").write_text(
            _PIPE.format(requirements=self.requirements, edit=self.edits, links=CHAIN_STEPS - 1)
        )

    def new_requirement(self) -> None:
        self.write(requirement=_wheel(self.wheels, uuid.uuid4().hex))

    def run(self, pipeline: str) -> dict[str, Any]:
        done = subprocess.run(
            [sys.executable, "drive.py", pipeline, "0"],
            cwd=self.project,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=900,
        )
        if done.returncode != 0:
            raise RuntimeError(f"drive.py {pipeline}: {done.stdout}{done.stderr}")
        out: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
        self.runs.append(out["run_id"])
        if out["status"] != "SUCCEEDED":
            raise RuntimeError(f"the run of {pipeline} ended {out['status']}: {out['logs']}")
        return out

    def one(self) -> dict[str, Any]:
        """A run of the one-step pipeline: seconds from `run` to the step's code, and the
        moments between, from the run's events and build log (batched by the engine every
        0.5 s at most: those times are when a batch arrived) and from `docker inspect`."""
        out = self.run("one")
        t0 = out["t0"]
        at: dict[str, float] = {}
        for e in out["events"]:
            if e["step"] == "first" and e["status"] in ("QUEUED", "RUNNING"):
                at.setdefault(e["status"].lower(), e["time"] - t0)
        source = ""
        build_log = []
        for entry in out["logs"]:
            for line in entry["text"].splitlines():
                if not line.startswith("[build]"):
                    continue
                build_log.append((round(entry["time"] - t0, 3), line))
                for marker, name in _SOURCES.items():
                    if "(build " in line and marker in line:
                        source = name
                        at["image_ready"] = entry["time"] - t0
        container = json.loads(_docker("inspect", f"plait-{out['run_id']}-first-1-1"))[0]
        at["container_created"] = _docker_time(container["Created"]) - t0
        at["container_started"] = _docker_time(container["State"]["StartedAt"]) - t0
        at["code_start"] = out["code_start"] - t0
        self.images.add(container["Config"]["Image"])
        return {
            "s": at["code_start"],
            "run_wall_s": out["t1"] - t0,
            "source": source,
            "at_s": dict(sorted(at.items(), key=lambda kv: kv[1])),
            "image": container["Config"]["Image"],
            "build_log": build_log,
        }

    def chain(self, runner: str) -> dict[str, float]:
        """A run of the 20-step chain on ``runner``: wall time per step, and medians of the
        times between a step's events (queued -> running -> succeeded -> the next queued)."""
        out = self.run(f"chain_{runner}")
        steps: dict[str, dict[str, float]] = {}
        for e in out["events"]:
            if e["step"]:
                steps.setdefault(e["step"], {}).setdefault(e["status"], e["time"])
        order = sorted(steps.values(), key=lambda s: s["QUEUED"])

        def median(xs: list[float]) -> float:
            return float(statistics.median(xs)) if xs else float("nan")

        return {
            "s_per_step": (out["t1"] - out["t0"]) / CHAIN_STEPS,
            "queued_to_running_s": median([s["RUNNING"] - s["QUEUED"] for s in order]),
            "running_to_succeeded_s": median([s["SUCCEEDED"] - s["RUNNING"] for s in order]),
            "succeeded_to_next_queued_s": median(
                [b["QUEUED"] - a["SUCCEEDED"] for a, b in itertools.pairwise(order)]
            ),
        }

    def remove_containers(self) -> None:
        for run_id in self.runs:
            ids = _docker("ps", "-aq", "--filter", f"label=plait.run={run_id}").split()
            if ids:
                _docker("rm", "-f", *ids, check=False)
        self.runs.clear()


def _delete_from_registry(reference: str) -> None:
    """Deletes an image's manifest from the registry its name starts with (plain HTTP: the
    registry of the tests is on loopback); the registry frees its layers when collected."""
    host, _, rest = reference.partition("/")
    repo, _, tag = rest.rpartition(":")
    url = f"http://{host}/v2/{repo}/manifests"
    accept = "application/vnd.docker.distribution.manifest.v2+json"
    with contextlib.suppress(OSError, urllib.error.URLError):
        head = urllib.request.Request(f"{url}/{tag}", method="HEAD", headers={"Accept": accept})
        with urllib.request.urlopen(head, timeout=10) as resp:
            digest = resp.headers.get("Docker-Content-Digest", "")
        if digest:
            delete = urllib.request.Request(f"{url}/{digest}", method="DELETE")
            urllib.request.urlopen(delete, timeout=10).close()


def _descendants(image_id: str) -> list[str]:
    """The images built on ``image_id``, intermediate ones included, children first."""
    ids = set(_docker("image", "ls", "-aq", "--no-trunc").split())
    parents: dict[str, str] = {}
    for image in json.loads(_docker("image", "inspect", *ids)) if ids else []:
        parents[image["Id"]] = image.get("Parent") or ""
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
    """The base image with a LABEL, tagged: an image id nothing was ever built on. Removed
    after, with every image built on it (a multi-stage build leaves untagged ones)."""
    tag = f"plait-bench-parent:{uuid.uuid4().hex[:12]}"
    context = io.BytesIO()
    with tarfile.open(fileobj=context, mode="w") as tar:
        data = f"FROM {base}\nLABEL plait.bench.parent={tag}\n".encode()
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


def _plait_layers_cached(build_log: list[tuple[float, str]]) -> bool:
    """Whether a build found Plait's layers in Docker's layer cache (the recipe's steps up to
    ``ENV PATH``, the last of them, said "Using cache")."""
    lines = [line for _, line in build_log]
    for i, line in enumerate(lines):
        if "ENV PATH=/opt/plait/bin" in line:
            return i + 1 < len(lines) and "Using cache" in lines[i + 1]
    return False


def bench_docker(repeat: int, base: str, registry: str = "") -> dict[str, Any]:
    """The docker group's figures (see the module docstring): medians of ``repeat`` tries,
    the truly cold build once."""
    from run import _daemon  # benchmarks/run.py: a daemon on a free port

    began = time.monotonic()
    samples: dict[str, list[dict[str, Any]]] = {"cold": [], "warm": [], "edit": []}
    floors: list[float] = []
    imports: list[float] = []
    chains: dict[str, list[dict[str, float]]] = {"docker": [], "local": []}
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        (tmp / "daemon").mkdir()
        with _daemon(str(tmp / "daemon")) as (address, token, env):
            bench = _Bench(tmp, address, token, env)
            try:
                bench.runner(keep=True)
                stack = ["-c", "dock", "-c", "builder", "-c", "local-artifacts"]
                if registry:
                    bench.cli("component", "register", "reg", "--kind", "container_registry",
                              "--flavor", "docker", "-c", f"uri={registry}")  # fmt: skip
                    stack += ["-c", "reg"]
                with _labelled_parent(base) as parent:
                    bench.builder(parent)
                    bench.cli("stack", "register", "bench", *stack, "--set")
                    bench.new_requirement()
                    try:
                        truly = bench.one()
                    finally:  # before the images built on the parent are removed
                        bench.remove_containers()
                bench.builder(base)
                # primes Docker's layer cache with Plait's layers on the base image (a no-op
                # when an earlier run or test built them): then every cold try below builds
                # the requirement's layers alone
                bench.new_requirement()
                prime = bench.one()
                for _ in range(repeat):
                    bench.new_requirement()
                    samples["cold"].append(bench.one())
                    floors.append(floor(base))
                    samples["warm"].append(bench.one())
                    bench.write(edit=True)
                    samples["edit"].append(bench.one())
                    imports.append(import_floor(samples["warm"][-1]["image"]))
                    bench.remove_containers()
                bench.runner(keep=False)
                for _ in range(repeat):
                    chains["docker"].append(bench.chain("docker"))
                    chains["local"].append(bench.chain("local"))
            finally:
                bench.remove_containers()
                for image in bench.images:
                    _docker("rmi", "-f", image, check=False)
                    if registry and image.startswith(registry + "/"):
                        _delete_from_registry(image)

    def median(xs: list[float]) -> float:
        return float(statistics.median(xs))

    out: dict[str, Any] = {
        "registry": registry,
        "repeat": repeat,
        "floor_s": median(floors),
        "floor_samples_s": floors,
        "import_floor_s": median(imports),
        "truly_cold": truly,
        "prime": prime,
        "prime_cached_plait_layers": _plait_layers_cached(prime["build_log"]),
    }
    for name, runs in samples.items():
        runs = sorted(runs, key=lambda r: r["s"])
        out[name] = {**runs[(len(runs) - 1) // 2], "samples_s": [r["s"] for r in runs]}
    for runner, tries in chains.items():
        chain: dict[str, Any] = {key: median([t[key] for t in tries]) for key in tries[0]}
        chain["samples_s_per_step"] = [t["s_per_step"] for t in tries]
        out[f"chain_{runner}"] = chain
    out["took_s"] = time.monotonic() - began
    return out


def report(figures: dict[str, Any]) -> bool:
    """Prints the docker group's figures; False when warm or after-edit is over target."""
    floor_s = figures["floor_s"]
    ok = True
    where = f", registry {figures['registry']}" if figures["registry"] else ", no registry"
    print(
        f"\ndocker runner, through a daemon (median of {figures['repeat']}{where}): from `run` "
        f"to the first step's code; floor = bare `docker run --rm` of the base image to its "
        f"Python's first line"
    )
    print(f"{'':12} {'s':>7} {'- floor':>8} {'x floor':>8}  (median of: samples s)")
    rows = [("floor", {"s": floor_s, "samples_s": figures["floor_samples_s"]})]
    rows += [("cold", figures["cold"]), ("warm", figures["warm"]), ("after edit", figures["edit"])]
    rows += [("truly cold", {**figures["truly_cold"], "samples_s": [figures["truly_cold"]["s"]]})]
    for name, r in rows:
        over = r["s"] - floor_s
        flag = ""
        if name in ("warm", "after edit"):
            target = over <= TARGET_OVER_FLOOR_S
            ok &= target
            flag = f"  target <= +{TARGET_OVER_FLOOR_S:g} s" + ("" if target else "  OVER TARGET")
        samples = ", ".join(f"{s:.2f}" for s in r["samples_s"])
        print(f"{name:12} {r['s']:7.2f} {over:+8.2f} {r['s'] / floor_s:8.1f}  ({samples}){flag}")
    warm = figures["warm"]["at_s"]
    print(
        f"  warm, where the time goes (s after `run`): queued {warm.get('queued', 0):.3f}, "
        f"image found {warm.get('image_ready', 0):.3f}, container created "
        f"{warm['container_created']:.3f}, started {warm['container_started']:.3f}, step "
        f"claimed (RUNNING) {warm.get('running', 0):.3f}, code {warm['code_start']:.3f}; "
        f"`docker run` of the image importing Plait: {figures['import_floor_s']:.2f} s"
    )
    for name in ("cold", "truly_cold"):
        at = figures[name]["at_s"]
        ready = at.get("image_ready", float("nan"))
        print(
            f"  {name.replace('_', ' ')}: image {figures[name]['source'] or '?'} and ready at "
            f"{ready:.1f} s, the code {at['code_start'] - ready:.2f} s later"
        )
    prime = figures["prime"]
    print(
        f"  first build on the base in this invocation (not in the medians): {prime['s']:.1f} s, "
        + (
            "Plait's layers from Docker's layer cache"
            if figures["prime_cached_plait_layers"]
            else "Plait's layers built (none were cached)"
        )
    )
    d, loc = figures["chain_docker"], figures["chain_local"]
    print(
        f"{CHAIN_STEPS}-step chain: docker {d['s_per_step']:.3f} s/step "
        f"({d['s_per_step'] / floor_s:.1f} x floor), local {loc['s_per_step'] * 1e3:.1f} ms/step; "
        f"docker / local {d['s_per_step'] / loc['s_per_step']:.0f} x. Per docker step: queued -> "
        f"running {d['queued_to_running_s']:.3f} s, running -> succeeded "
        f"{d['running_to_succeeded_s']:.3f} s, -> next queued "
        f"{d['succeeded_to_next_queued_s']:.3f} s"
    )
    print(f"(the docker group took {figures['took_s']:.0f} s)")
    return ok
