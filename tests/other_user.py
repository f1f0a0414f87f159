"""Another OS user on this machine, for trying the control plane's doors without a key.

Tests run as root; the attacker runs as ``nobody`` through ``setpriv``, with Debian's
``/usr/bin/python3.11`` (the test interpreter may live where ``nobody`` cannot read) and a
world-readable copy of just what a gRPC client needs: grpc, protobuf and Plait's generated API.
It imports nothing else of Plait, so what it reaches is what any local program could.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import google.protobuf
import grpc
import typing_extensions

ROOT = Path(__file__).resolve().parent.parent
PYTHON = "/usr/bin/python3.11"
NOBODY = 65534


class OtherUser:
    """Runs Python code as ``nobody``; the code prints one JSON value, which ``run`` returns."""

    def __init__(self) -> None:
        if os.geteuid() != 0:
            raise RuntimeError("the tests run as root, to act as another user with setpriv")
        if not Path(PYTHON).exists() or shutil.which("setpriv") is None:
            raise RuntimeError(f"{PYTHON} and setpriv (util-linux) are needed")
        self.dir = Path(tempfile.mkdtemp(prefix="plait-other-user-"))
        site = Path(grpc.__file__).parent.parent
        shutil.copytree(site / "grpc", self.dir / "grpc")
        shutil.copytree(Path(google.protobuf.__file__).parent.parent, self.dir / "google")
        shutil.copy(typing_extensions.__file__, self.dir)
        for layer in ("api", "ir"):
            package = self.dir / "plait" / layer
            shutil.copytree(ROOT / "proto" / "gen" / "plait" / layer, package)
            (package / "__init__.py").touch()
        (self.dir / "plait" / "__init__.py").touch()
        for path in [self.dir, *self.dir.rglob("*")]:
            path.chmod(0o755 if path.is_dir() else 0o644)

    def run(self, code: str, **values: Any) -> Any:
        """Runs ``code`` as nobody with ``values`` in a dict named ``given``."""
        script = f"import json\ngiven = json.loads({json.dumps(json.dumps(values))})\n{code}"
        out = subprocess.run(
            [
                "setpriv",
                f"--reuid={NOBODY}",
                f"--regid={NOBODY}",
                "--clear-groups",
                PYTHON,
                "-c",
                script,
            ],
            env={"PYTHONPATH": str(self.dir), "HOME": "/tmp", "PATH": "/usr/bin:/bin"},
            cwd="/",
            capture_output=True,
            text=True,
            timeout=120,
        )
        if out.returncode != 0:
            raise AssertionError(f"the other user's code failed:\n{out.stderr}")
        return json.loads(out.stdout.strip().splitlines()[-1])

    def close(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


ATTACK = r"""
import os
import grpc
from plait.api.v1 import pipeline_service_pb2 as pipelines, pipeline_service_pb2_grpc
from plait.api.v1 import run_service_pb2 as runs, run_service_pb2_grpc
from plait.api.v1 import task_service_pb2 as tasks, task_service_pb2_grpc
from plait.ir.v1 import ir_pb2

out = {}

def attempt(name, fn):
    try:
        fn()
        out[name] = "OK"
    except grpc.RpcError as exc:
        out[name] = exc.code().name
    except OSError as exc:
        out[name] = type(exc).__name__

home = given["home"]
out_file = given["marker"]
attempt("read_credential", lambda: open(os.path.join(home, "credentials.json")).read())
attempt("list_home", lambda: os.listdir(home))
if given.get("environ_of"):
    attempt("read_worker_environ", lambda: open(f"/proc/{given['environ_of']}/environ").read())

# a pipeline whose only step runs a shell command as the server's user
spec = ir_pb2.PipelineSpec(name="pwn")
step = spec.steps.add(id="pwn", name="pwn")
step.code.module, step.code.qualname = "subprocess", "getoutput"
command = ir_pb2.Literal(json=f'"touch {out_file}"')
step.inputs.add(name="cmd", binding=ir_pb2.Binding(literal=command))
key = [("authorization", "Bearer " + given["token"])] if given.get("token") else None
with grpc.insecure_channel(given["address"]) as channel:
    p = pipeline_service_pb2_grpc.PipelineServiceStub(channel)
    r = run_service_pb2_grpc.RunServiceStub(channel)
    t = task_service_pb2_grpc.TaskServiceStub(channel)
    register = pipelines.RegisterPipelineRequest(spec=spec)
    attempt("register", lambda: p.RegisterPipeline(register, metadata=key, timeout=30))
    create = runs.CreateRunRequest(pipeline_version="0" * 64)
    attempt("create_run", lambda: r.CreateRun(create, metadata=key, timeout=30))
    listing = runs.ListRunsRequest()
    attempt("list_runs", lambda: r.ListRuns(listing, metadata=key, timeout=30))
    hello = tasks.ConnectRequest(hello=tasks.WorkerHello(worker_id="evil", runner="local"))
    worker = lambda: list(t.Connect(iter([hello]), metadata=key, timeout=30))  # noqa: E731
    attempt("connect_as_worker", worker)
print(json.dumps(out))
"""
"""Tries every door an outsider would: the credential file, the home folder, a worker's
environment, registering and running a pipeline that runs a shell command, posing as a worker."""
