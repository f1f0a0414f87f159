"""`plait builds …` over BuildService, and the flavors and keys stack components accept.

Against a real daemon on loopback (tokens on); build records are written into its store
directly (these tests are about listing, explaining and pruning records, not about building).
Pruning for real removes records without an image reference or folder (nothing to remove), and
a virtualenv folder made here; removing images is the Docker builder's tests' business.
"""

from __future__ import annotations

import json
import math
import os
import pty
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import anyio
import grpc
import pytest
import sqlalchemy as sa
from processes import run
from test_security import Daemon

from plait._models import BuildInfo
from plait.api.v1 import build_service_pb2 as pb
from plait.api.v1 import build_service_pb2_grpc, stack_service_pb2_grpc
from plait.api.v1 import stack_service_pb2 as stacks
from plait.cli._builds import age_text, diff_material, parse_duration, size_text
from plait.engine._flavors import FLAVORS
from plait.engine.api._builds import _prunable
from plait.engine.store import Store
from plait.engine.store import _schema as db
from plait.engine.store._builds import claim_build, fail_build, finish_build, mark_used
from plait.errors import InUseError
from plait.ir.canonical import digest_json

PLAIT = str(Path(sys.executable).parent / "plait")
DAY = 86400.0
PARENT_A = "sha256:" + "a" * 64
PARENT_B = "sha256:" + "b" * 64


# ---- build records, written into a store ----


def material(
    requirements: Sequence[str] = ("requests==2.32.3",),
    *,
    parent_id: str = PARENT_A,
    apt: Sequence[str] = (),
    python: str = "3.11",
) -> dict[str, Any]:
    """Key material shaped like an image builder's (its values are made up)."""
    return {
        "key_scheme": "plait.build.v1",
        "parent_image": "python:3.11-slim",
        "python_version": python,
        "requirements": sorted(requirements),
        "apt_packages": sorted(apt),
        "parent_image_id": parent_id,
        "plait_version": "0.1.0+0123456789ab",
        "recipe_version": "1",
        "file_digests": {},
    }


def put_build(
    url: str,
    mat: dict[str, Any],
    *,
    status: str = "READY",
    kind: str = "image",
    reference: str = "",
    size: int = 12 * 1024 * 1024,
    at: float | None = None,
    runs: Sequence[str] = (),
) -> str:
    """Writes a build record (claimed, then finished or failed) into the store at ``url``,
    made and last used at ``at``; returns its key."""
    key = digest_json(mat)
    when = time.time() if at is None else at
    env_part = {k: mat[k] for k in ("key_scheme", "parent_image", "python_version")}

    def write(conn: sa.Connection) -> None:
        claim_build(
            conn,
            key,
            kind=kind,
            build_digest=digest_json(env_part),
            material=mat,
            holder="test",
            now=when,
            ttl=3600.0,
        )
        if status == "READY":
            finish_build(
                conn,
                key,
                "test",
                reference=reference,
                image_id="sha256:" + "c" * 64 if kind == "image" else "",
                size_bytes=size,
                duration_seconds=12.5,
                source="built",
                pushed_to="",
                now=when,
            )
        elif status == "FAILED":
            fail_build(conn, key, "test", "pip could not find six==9", when)
        for run_id in runs:
            mark_used(conn, key, run_id, when)

    async def go() -> None:
        store = Store(url)
        try:
            await store.open()
            await store.write(write)
        finally:
            await store.aclose()

    anyio.run(go)
    return key


# ---- a daemon, its tokens, and the CLI against it ----


class Server:
    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self.url = f"sqlite:///{daemon.home / 'plait.db'}"
        self.tokens = {
            "admin": daemon.credential,
            "user": daemon.token("create", "builds-user", "--role", "user"),
            "worker": daemon.token("create", "builds-worker", "--role", "worker"),
        }
        self._channels: dict[str, grpc.Channel] = {}

    def channel(self, who: str) -> grpc.Channel:
        if who not in self._channels:
            if who == "none":
                self._channels[who] = grpc.insecure_channel(self.daemon.address)
            else:
                token = self.tokens.get(who, "plait_000000000000_not-a-secret")
                credentials = grpc.composite_channel_credentials(
                    grpc.local_channel_credentials(grpc.LocalConnectionType.LOCAL_TCP),
                    grpc.access_token_call_credentials(token),
                )
                self._channels[who] = grpc.secure_channel(self.daemon.address, credentials)
        return self._channels[who]

    def builds(self, who: str = "user") -> build_service_pb2_grpc.BuildServiceStub:
        return build_service_pb2_grpc.BuildServiceStub(self.channel(who))

    def stacks(self, who: str = "user") -> stack_service_pb2_grpc.StackServiceStub:
        return stack_service_pb2_grpc.StackServiceStub(self.channel(who))

    def cli(self, *args: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
        """``plait ARGS`` as a remote client of the daemon (the local admin credential)."""
        out = run([PLAIT, *args], env=self.daemon.client_env(), timeout=60)
        if ok:
            assert out.returncode == 0, f"{args}: {out.stdout}{out.stderr}"
        return out

    def close(self) -> None:
        for channel in self._channels.values():
            channel.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    daemon = Daemon(tmp_path_factory.mktemp("builds") / "home")
    try:
        s = Server(daemon)
        try:
            yield s
        finally:
            s.close()
    finally:
        daemon.stop()


def rpc_error(call: Any, request: Any) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        call(request, timeout=30)
    return info.value.code(), info.value.details() or ""


# ---- listing, showing, explaining ----


def test_list_show_and_explain_one_build(server: Server) -> None:
    mat = material(["numpy==1.26.4", "six==1.15.0"], apt=["git"])
    key = put_build(server.url, mat, reference="plait-env:" + "1" * 40, runs=["run-one", "run-two"])
    listed = server.cli("builds", "list").stdout
    row = next(line for line in listed.splitlines() if key[:12] in line)
    for cell in ("image", "READY", "12.0 MiB", "2", f"plait-env:{'1' * 40}"):
        assert cell in row, row
    assert key not in listed  # 12 characters of it

    shown = server.cli("builds", "show", key[:8]).stdout
    assert f"build {key}" in shown and "status: READY" in shown
    assert "size: 12.0 MiB" in shown and "image id: sha256:ccc" in shown
    # the key material, pretty-printed, and the runs that used it
    assert json.loads(shown[shown.index("{") : shown.rindex("}") + 1]) == mat
    assert '  "requirements": [' in shown
    runs = shown[shown.index("runs (2") :]
    assert "run-one" in runs and "run-two" in runs

    explained = server.cli("builds", "explain", key[:10]).stdout
    assert f"build {key} (image, READY)" in explained
    assert "requirements:\n    - numpy==1.26.4\n    - six==1.15.0" in explained
    assert "apt_packages:\n    - git" in explained
    assert f"parent_image_id: {PARENT_A}" in explained
    assert "file_digests: (none)" in explained


def test_explain_two_builds_names_each_component_that_differs(server: Server) -> None:
    first = put_build(server.url, material(["six==1.15.0", "requests==2.32.3"]))
    second = put_build(
        server.url, material(["six==1.16.0", "requests==2.32.3", "tqdm"], parent_id=PARENT_B)
    )
    out = server.cli("builds", "explain", first[:12], second[:12]).stdout
    assert f"builds {first[:12]} and {second[:12]} differ in 2 components" in out
    lines = out.splitlines()
    at = lines.index("  requirements:")
    assert lines[at + 1 : at + 4] == ["    + six==1.16.0", "    + tqdm", "    - six==1.15.0"]
    assert (
        f"  parent_image_id: {PARENT_A} → {PARENT_B} (the image python:3.11-slim changed "
        "since the first was made)" in lines
    )
    # what is the same is not mentioned
    assert "requests" not in out and "python_version" not in out and "plait_version" not in out

    same = server.cli("builds", "explain", first[:12], first).stdout
    assert "have the same key material" in same


def test_show_and_explain_say_what_is_wrong_with_a_key(server: Server) -> None:
    out = server.cli("builds", "show", "abc", ok=False)
    assert out.returncode == 2 and "at least 6 of its first hex digits" in out.stderr
    out = server.cli("builds", "show", "ffffff0000", ok=False)
    assert out.returncode == 2 and "no build with id 'ffffff0000'" in out.stderr
    out = server.cli("builds", "explain", "ffffff0000", ok=False)
    assert out.returncode == 2 and "no build" in out.stderr


def test_the_cli_reads_builds_without_loading_the_engine(server: Server) -> None:
    """A remote client: the comparison of key material is the CLI's own, not the engine's."""
    a = put_build(server.url, material(["attrs==23.1.0"]))
    b = put_build(server.url, material(["attrs==23.2.0"]))
    code = (
        "import sys\n"
        "from plait.cli import cli\n"
        f"for args in (['builds', 'list'], ['builds', 'show', {a!r}],"
        f" ['builds', 'explain', {a!r}, {b!r}]):\n"
        "    try:\n"
        "        cli(args, prog_name='plait')\n"
        "    except SystemExit as e:\n"
        "        assert not e.code, e.code\n"
        "loaded = [m for m in sys.modules if m.startswith('plait.engine')]\n"
        "assert not loaded, loaded\n"
    )
    out = run([sys.executable, "-c", code], env=server.daemon.client_env(), timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "+ attrs==23.2.0" in out.stdout and "- attrs==23.1.0" in out.stdout


# ---- pruning ----


def test_prune_dry_run_lists_and_removes_nothing_then_prune_removes(server: Server) -> None:
    old = time.time() - 10 * DAY
    stale = put_build(server.url, material(["stale==1"]), status="FAILED", at=old)
    fresh = put_build(server.url, material(["fresh==1"]), status="FAILED")
    building = put_build(server.url, material(["busy==1"]), status="BUILDING", at=old)

    dry = server.cli("builds", "prune", "--dry-run").stdout  # unused for 7 days by default
    assert dry.startswith("would remove") and stale[:12] in dry
    assert fresh[:12] not in dry and building[:12] not in dry
    dry_all = server.cli("builds", "prune", "--dry-run", "--unused-for", "0").stdout
    assert stale[:12] in dry_all and fresh[:12] in dry_all and building[:12] not in dry_all
    listed = server.cli("builds", "list", "-n", "1000").stdout
    assert stale[:12] in listed and fresh[:12] in listed  # nothing was removed

    # not a terminal: no question asked
    removed = server.cli("builds", "prune", "--unused-for", "7d").stdout
    assert removed.startswith("removed 1 build") and stale[:12] in removed
    listed = server.cli("builds", "list", "-n", "1000").stdout
    assert stale[:12] not in listed and fresh[:12] in listed and building[:12] in listed

    # by key: any age
    removed = server.cli("builds", "prune", fresh[:8]).stdout
    assert removed.startswith("removed 1 build") and fresh[:12] in removed
    assert fresh[:12] not in server.cli("builds", "list", "-n", "1000").stdout

    # never one being built
    out = server.cli("builds", "prune", building[:8], ok=False)
    assert out.returncode == 2 and "is being built" in out.stderr
    out = server.cli("builds", "prune", "--unused-for", "soon", ok=False)
    assert out.returncode == 2 and "is not a duration" in out.stderr


def test_prune_on_a_terminal_asks_first(server: Server) -> None:
    key = put_build(server.url, material(["asked==1"]), status="FAILED")

    def prune(answer: str) -> str:
        controller, terminal = pty.openpty()
        try:
            os.write(controller, answer.encode() + b"\n")  # waits in the terminal's buffer
            out = subprocess.run(
                [PLAIT, "builds", "prune", key[:8]],
                env=server.daemon.client_env(),
                stdin=terminal,
                capture_output=True,
                text=True,
                timeout=60,
            )
        finally:
            os.close(terminal)
            os.close(controller)
        return out.stdout + out.stderr

    out = prune("n")
    assert "would remove 1 build" in out and "remove these 1 build(s)?" in out
    assert "Aborted" in out and key[:12] in server.cli("builds", "list").stdout
    out = prune("y")
    assert "removed 1 build" in out and key[:12] not in server.cli("builds", "list").stdout


def test_prune_over_grpc_reports_what_it_removes(server: Server) -> None:
    key = put_build(server.url, material(["grpc-prune==1"]))  # no reference: nothing to remove
    stub = server.builds("user")
    dry = stub.PruneBuilds(pb.PruneBuildsRequest(keys=[key[:10]], dry_run=True), timeout=30)
    assert [b.key for b in dry.builds] == [key]
    assert stub.GetBuild(pb.GetBuildRequest(key=key), timeout=30).build.key == key
    # too young for the age asked: kept
    kept = stub.PruneBuilds(pb.PruneBuildsRequest(keys=[key], unused_for_seconds=DAY), timeout=30)
    assert not kept.builds
    done = stub.PruneBuilds(pb.PruneBuildsRequest(keys=[key, key[:12]]), timeout=30)
    assert [b.key for b in done.builds] == [key] and done.freed_bytes == 12 * 1024 * 1024
    code, _ = rpc_error(stub.GetBuild, pb.GetBuildRequest(key=key))
    assert code == grpc.StatusCode.NOT_FOUND


def test_prune_removes_a_virtualenv_folder_and_keeps_what_it_cannot_remove(
    server: Server, tmp_path: Path
) -> None:
    mat = {**material(["venv-prune==1"]), "interpreter": "cpython-3.11"}
    folder = server.daemon.home / "builds" / "venvs" / digest_json(mat)
    (folder / "bin").mkdir(parents=True)
    (folder / "bin" / "python").write_text("")
    key = put_build(server.url, mat, kind="venv", reference=str(folder), size=4096)
    out = server.cli("builds", "prune", key[:8]).stdout
    assert out.startswith("removed 1 build, 4.0 KiB") and key[:12] in out
    assert not folder.exists()
    assert key[:12] not in server.cli("builds", "list").stdout

    # a folder that is not one of the builder's: refused by it; the record stays
    elsewhere = tmp_path / "not-a-build"
    elsewhere.mkdir()
    mat = {**material(["venv-prune==2"]), "interpreter": "cpython-3.11"}
    kept = put_build(server.url, mat, kind="venv", reference=str(elsewhere))
    code, details = rpc_error(server.builds().PruneBuilds, pb.PruneBuildsRequest(keys=[kept]))
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    assert details.startswith(f"could not remove build {kept[:12]} ({elsewhere})")
    assert elsewhere.is_dir() and kept[:12] in server.cli("builds", "list").stdout


def test_a_build_a_run_still_uses_is_never_pruned(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'plait.db'}"
    old = time.time() - 10 * DAY
    key = put_build(url, material(["in-use==1"]), at=old, runs=["r1"])

    async def set_up(status: str) -> None:
        store = Store(url)
        try:

            def write(conn: sa.Connection) -> None:
                conn.execute(sa.delete(db.runs))
                conn.execute(sa.delete(db.pipeline_versions))
                conn.execute(sa.delete(db.pipelines))
                conn.execute(db.pipelines.insert().values(name="p", created_at=old))
                conn.execute(
                    db.pipeline_versions.insert().values(
                        version="v", pipeline="p", spec=b"", created_at=old
                    )
                )
                conn.execute(
                    db.runs.insert().values(
                        id="r1",
                        pipeline="p",
                        version="v",
                        status=status,
                        parameters={},
                        no_cache=False,
                        created_at=old,
                    )
                )

            await store.write(write)
        finally:
            await store.aclose()

    async def prunable(keys: list[str]) -> list[str]:
        store = Store(url)
        try:
            found = await store.read(_prunable, keys, 7 * DAY, time.time())
            return [b.key for b in found]
        finally:
            await store.aclose()

    anyio.run(set_up, "RUNNING")
    assert anyio.run(prunable, []) == []
    with pytest.raises(InUseError, match="used by run\\(s\\) not ended yet: r1"):
        anyio.run(prunable, [key])
    anyio.run(set_up, "SUCCEEDED")
    assert anyio.run(prunable, []) == [key]
    assert anyio.run(prunable, [key[:8]]) == [key]


# ---- the API's edges: tokens and bad requests ----


def test_who_may_read_and_prune_builds(server: Server) -> None:
    calls = [
        ("ListBuilds", pb.ListBuildsRequest()),
        ("GetBuild", pb.GetBuildRequest(key="abcdef")),
        ("PruneBuilds", pb.PruneBuildsRequest(dry_run=True)),
    ]
    for method, request in calls:
        for who, expected in (
            ("worker", grpc.StatusCode.PERMISSION_DENIED),
            ("none", grpc.StatusCode.UNAUTHENTICATED),
            ("bogus", grpc.StatusCode.UNAUTHENTICATED),
        ):
            code, details = rpc_error(getattr(server.builds(who), method), request)
            assert code == expected, (method, who, code, details)
            if who == "worker":
                assert "a worker token may not call BuildService" in details
    key = put_build(server.url, material(["roles==1"]), status="FAILED")
    for who in ("user", "admin"):
        stub = server.builds(who)
        assert key in [b.key for b in stub.ListBuilds(pb.ListBuildsRequest(), timeout=30).builds]
        dry = stub.PruneBuilds(pb.PruneBuildsRequest(keys=[key], dry_run=True), timeout=30)
        assert [b.key for b in dry.builds] == [key]


def test_bad_requests_are_invalid_arguments(server: Server) -> None:
    stub = server.builds("user")
    cases = [
        (stub.GetBuild, pb.GetBuildRequest(key="abc"), "key: a build key, or at least 6"),
        (stub.GetBuild, pb.GetBuildRequest(key="zzzzzzzz"), "key: a build key"),
        (stub.ListBuilds, pb.ListBuildsRequest(limit=-1), "limit must not be negative"),
        (stub.ListBuilds, pb.ListBuildsRequest(kind="vm"), "kind: 'vm' is not a kind of build"),
        (stub.PruneBuilds, pb.PruneBuildsRequest(unused_for_seconds=-1), "unused_for_seconds"),
        (stub.PruneBuilds, pb.PruneBuildsRequest(unused_for_seconds=math.nan), "unused_for"),
        (stub.PruneBuilds, pb.PruneBuildsRequest(keys=["not hex"]), "keys: a build key"),
    ]
    for call, request, message in cases:
        code, details = rpc_error(call, request)
        assert code == grpc.StatusCode.INVALID_ARGUMENT, (request, details)
        assert details.startswith(message), details
    code, details = rpc_error(stub.GetBuild, pb.GetBuildRequest(key="0123456789"))
    assert code == grpc.StatusCode.NOT_FOUND and "no build with id" in details
    code, _ = rpc_error(stub.PruneBuilds, pb.PruneBuildsRequest(keys=["0123456789"]))
    assert code == grpc.StatusCode.NOT_FOUND
    big = stub.ListBuilds(pb.ListBuildsRequest(limit=10**9), timeout=30)  # clamped
    assert big.builds is not None


# ---- stack flavors are real ----


def _register(server: Server, kind: str, flavor: str, **config: Any) -> Any:
    component = stacks.Component(
        name="components/probe",
        kind=stacks.ComponentKind.Value(f"COMPONENT_KIND_{kind}"),
        flavor=flavor,
        config_json=json.dumps(config),
    )
    return server.stacks().RegisterComponent(
        stacks.RegisterComponentRequest(component=component), timeout=30
    )


REFUSED = [
    (
        ("RUNNER", "k8s", {}),
        "component 'probe': runner flavor 'k8s' is not known; valid: docker, local",
    ),
    (
        ("RUNNER", "docker", {"gpus": 1}),
        "component 'probe': unknown key 'gpus' for a docker runner; "
        "valid: keep_containers, network, stop_grace_seconds",
    ),
    (
        ("RUNNER", "local", {"workers": 4}),
        "component 'probe': unknown key 'workers' for a local runner; "
        "valid: none (a local runner takes no configuration)",
    ),
    (
        ("RUNNER", "docker", {"network": "overlay"}),
        "component 'probe': network of a docker runner must be one of host, bridge; "
        'got "overlay"',
    ),
    (
        ("RUNNER", "docker", {"keep_containers": "yes"}),
        "component 'probe': keep_containers of a docker runner must be true or false; got \"yes\"",
    ),
    (
        ("RUNNER", "docker", {"stop_grace_seconds": -1}),
        "component 'probe': stop_grace_seconds of a docker runner must be a number of seconds "
        "from 0 to 3600; got -1",
    ),
    (
        ("CONTAINER_REGISTRY", "docker", {}),
        "component 'probe': a docker container registry needs uri",
    ),
    (
        ("CONTAINER_REGISTRY", "docker", {"uri": "ftp://127.0.0.1:5000"}),
        "component 'probe': uri of a docker container registry must be the registry's "
        "HOST:PORT or HOST:PORT/PATH, after http:// or https:// to choose the protocol "
        '(e.g. 127.0.0.1:5000), not ftp://; got "ftp://127.0.0.1:5000"',
    ),
    (
        ("CONTAINER_REGISTRY", "docker", {"uri": "127.0.0.1:5000 "}),
        "component 'probe': uri of a docker container registry must be the registry's "
        "HOST:PORT or HOST:PORT/PATH",
    ),
    (
        ("CONTAINER_REGISTRY", "registry", {"uri": "127.0.0.1:5000"}),
        "component 'probe': container registry flavor 'registry' is not known; valid: docker",
    ),
    (
        ("IMAGE_BUILDER", "docker", {"parent_image": "not an image"}),
        "component 'probe': parent_image of a docker image builder must be an image reference",
    ),
    (
        ("IMAGE_BUILDER", "kaniko", {}),
        "component 'probe': image builder flavor 'kaniko' is not known; valid: docker",
    ),
    (
        ("ARTIFACT_STORE", "local", {"path": "/tmp/x"}),
        "component 'probe': unknown key 'path' for a local artifact store; valid: none",
    ),
    (
        ("ARTIFACT_STORE", "s3", {}),
        "component 'probe': artifact store flavor 's3' is not known; valid: local",
    ),
    (
        ("SECRETS", "vault", {}),
        "component 'probe': secrets flavor 'vault' is not known; "
        "valid: none (Plait has no secrets component yet)",
    ),
]


@pytest.mark.parametrize(("component", "message"), REFUSED, ids=[r[1][19:60] for r in REFUSED])
def test_unknown_flavors_keys_and_bad_values_are_refused_with_the_valid_ones(
    server: Server, component: tuple[str, str, dict[str, Any]], message: str
) -> None:
    kind, flavor, config = component
    with pytest.raises(grpc.RpcError) as info:
        _register(server, kind, flavor, **config)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (info.value.details() or "").startswith(message), info.value.details()


def test_every_flavor_and_key_is_accepted(server: Server) -> None:
    accepted = [
        ("RUNNER", "local", {}),
        ("RUNNER", "docker", {}),
        ("RUNNER", "docker", {"network": "bridge", "keep_containers": True}),
        ("RUNNER", "docker", {"network": "host", "stop_grace_seconds": 2.5}),
        ("ARTIFACT_STORE", "local", {}),
        ("IMAGE_BUILDER", "docker", {}),
        ("IMAGE_BUILDER", "docker", {"parent_image": "plait-test-base:bookworm"}),
        ("IMAGE_BUILDER", "docker", {"parent_image": "127.0.0.1:5000/py@sha256:" + "a" * 64}),
        ("CONTAINER_REGISTRY", "docker", {"uri": "127.0.0.1:5000"}),
        ("CONTAINER_REGISTRY", "docker", {"uri": "registry.example.com/team/ml"}),
        ("CONTAINER_REGISTRY", "docker", {"uri": "[::1]:5000"}),
        ("CONTAINER_REGISTRY", "docker", {"uri": "http://127.0.0.1:5000/"}),
        ("CONTAINER_REGISTRY", "docker", {"uri": "https://registry.example.com:443/ml"}),
    ]
    seen = set()
    for kind, flavor, config in accepted:
        got = _register(server, kind, flavor, **config).component
        assert got.flavor == flavor and json.loads(got.config_json) == config
        seen.add((kind, flavor))
        seen.update((kind, flavor, key) for key in config)
    assert seen >= {(k, f) for k, fs in FLAVORS.items() for f in fs}
    keys = {(k, f, key) for k, fs in FLAVORS.items() for f, spec in fs.items() for key in spec.keys}
    assert seen >= keys
    server.stacks().DeleteComponent(stacks.DeleteComponentRequest(name="components/probe"))


def test_components_stored_before_the_rules_are_still_read(server: Server) -> None:
    """A database may hold components registered before flavors were checked."""

    async def legacy() -> None:
        store = Store(server.url)
        try:

            def write(conn: sa.Connection) -> None:
                conn.execute(
                    db.components.insert().values(
                        name="old-ray",
                        kind="RUNNER",
                        flavor="ray",
                        config={"workers": 4},
                        created_at=0.0,
                    )
                )
                conn.execute(
                    db.stacks.insert().values(
                        name="old-stack",
                        components={"RUNNER": "old-ray", "ARTIFACT_STORE": "local-artifacts"},
                        created_at=0.0,
                    )
                )

            await store.write(write)
        finally:
            await store.aclose()

    anyio.run(legacy)
    listed = server.cli("component", "list").stdout
    assert "old-ray" in listed and '"workers":4' in listed
    assert "runner: old-ray (ray)" in server.cli("stack", "describe", "old-stack").stdout
    assert "used by: old-stack" in server.cli("component", "describe", "old-ray").stdout
    # replacing it is registering it: checked
    out = server.cli(
        "component", "register", "old-ray", "--kind", "runner", "--flavor", "ray", ok=False
    )
    assert out.returncode == 2 and "runner flavor 'ray' is not known" in out.stderr
    server.cli("stack", "delete", "old-stack")
    server.cli("component", "delete", "old-ray")


def test_component_register_help_lists_every_flavor_and_key() -> None:
    out = run([PLAIT, "component", "register", "--help"], env={**os.environ}, timeout=60)
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "gpus" not in text
    for kind, flavors in FLAVORS.items():
        for flavor, spec in flavors.items():
            assert f"{kind.lower()} {flavor}" in text, (kind, flavor)
            for key in spec.keys:
                assert f"{key}=" in text, key
        if not flavors:
            assert f"{kind.lower()}  " in text and "no flavor yet" in text


# ---- the pieces ----


def test_build_info_round_trips() -> None:
    b = BuildInfo(
        key="a" * 64,
        kind="venv",
        status="READY",
        build_digest="b" * 64,
        reference="/home/u/.plait/builds/venvs/aaa",
        size_bytes=123,
        duration_seconds=1.25,
        created_at=1700000000.5,
        last_used_at=1700000100.25,
        run_ids=("r2", "r1"),
        material=material(),
        source="local",
    )
    assert BuildInfo.from_proto(b.to_proto()) == b


def test_durations_sizes_and_ages() -> None:
    assert parse_duration("7d") == 7 * DAY and parse_duration("90") == 90
    assert parse_duration("1.5h") == 5400 and parse_duration("2w") == 14 * DAY
    with pytest.raises(ValueError, match="not a duration"):
        parse_duration("7 days")
    assert size_text(0) == "0 B" and size_text(1536) == "1.5 KiB"
    assert size_text(3 * 1024**3) == "3.0 GiB"
    assert age_text(59) == "59s" and age_text(3 * 3600 + 5) == "3h" and age_text(2 * DAY) == "2d"


def test_diff_of_mappings_and_missing_components() -> None:
    a = {"file_digests": {"w.whl": "1", "x.whl": "2"}, "old": 1, "same": [1]}
    b = {"file_digests": {"x.whl": "3", "y.whl": "4"}, "new": True, "same": [1]}
    assert diff_material(a, b) == [
        ["file_digests:", "  - w.whl: 1", "  ~ x.whl: 2 → 3", "  + y.whl: 4"],
        ["new: only in the second: true"],
        ["old: only in the first: 1"],
    ]
