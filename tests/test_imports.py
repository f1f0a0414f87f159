"""Import contracts: what importing a module must not load, checked in a fresh interpreter.

A worker must not drag in the engine and its database stack, the SDK must stay light, the engine
must not need the tracer or the CLI, and the error tree must not need gRPC.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

ENGINE = ["plait.engine", "plait.engine.*"]

# (id, the statement run, the modules it must not load; "x.*" forbids x's submodules too)
CONTRACTS = [
    ("plait", "import plait", [*ENGINE, "sqlalchemy", "alembic"]),
    # `import plait` may defer its names: using them must not load the engine either
    (
        "plait-public-names",
        "import plait; [getattr(plait, name) for name in plait.__all__]",
        [*ENGINE, "sqlalchemy", "alembic"],
    ),
    ("plait.runners", "import plait.runners", [*ENGINE, "sqlalchemy", "aiodocker", "aiohttp"]),
    # a worker process: neither the runners it is not (the local pool, Docker) nor anyio
    (
        "plait.runners.worker",
        "import plait.runners.worker.__main__, plait.runners.worker._stream",
        [*ENGINE, "sqlalchemy", "anyio", "plait.runners._local", "plait.runners._docker"],
    ),
    (
        "plait.engine",
        "import plait.engine",
        ["plait._pipeline", "plait._step", "plait.cli", "click"],
    ),
    # the whole control plane, loaded as a daemon or an embedded engine loads it
    (
        "plait.engine-control-plane",
        "from plait.engine import ControlPlane",
        ["plait._pipeline", "plait._step", "plait.cli", "click", "plait.runners.worker"],
    ),
    # the store stands alone: no scheduler loop, no runners, no gRPC
    (
        "plait.engine.store",
        "import plait.engine.store",
        ["plait.engine._control_plane", "plait.engine.api", "plait.runners", "grpc"],
    ),
    # the state machine: no SQL, no gRPC
    (
        "plait.engine.scheduler",
        "import plait.engine.scheduler",
        ["sqlalchemy", "grpc", "plait.engine.store", "plait.engine.api"],
    ),
    ("plait.errors", "import plait.errors", ["grpc"]),
    # a pipeline's digest reads no message options: protobuf's descriptor_pb2 would cost a
    # short run a few milliseconds (a map's entry type is the one that has them)
    (
        "plait.ir.canonical-digest",
        "from plait.ir.canonical import message_digest; from plait.ir.v1 import ir_pb2; "
        "message_digest(ir_pb2.PipelineSpec(name='p', steps=[ir_pb2.StepSpec(name='s')]))",
        ["google.protobuf.descriptor_pb2"],
    ),
]

CODE = """
import sys
{statement}
forbidden = {forbidden!r}

def matches(name, pattern):
    if pattern.endswith(".*"):
        return name.startswith(pattern[:-1])
    # a top-level package forbids its submodules too (grpc forbids grpc._channel)
    return name == pattern or ("." not in pattern and name.startswith(pattern + "."))

loaded = sorted(n for n in sys.modules if any(matches(n, p) for p in forbidden))
if loaded:
    print("\\n".join(loaded))
    sys.exit(1)
"""


@pytest.mark.parametrize(
    ("statement", "forbidden"), [c[1:] for c in CONTRACTS], ids=[c[0] for c in CONTRACTS]
)
def test_import_does_not_load(statement: str, forbidden: list[str]) -> None:
    out = subprocess.run(
        [sys.executable, "-c", CODE.format(statement=statement, forbidden=forbidden)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode != 1 or not out.stdout, (
        f"`{statement}` loaded what it must not:\n{out.stdout}"
    )
    assert out.returncode == 0, f"`{statement}` failed:\n{out.stderr}"
