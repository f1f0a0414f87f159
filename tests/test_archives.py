"""Code travels as a content-addressed archive: packing, uploading once, recording on the run,
fetching and unpacking on a worker; DownloadBlob.

Real files, real git, real client processes, a real daemon and real `plait worker` processes.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import stat
import subprocess
import sys
import tarfile
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from processes import kill_group, run, wait_for
from test_security import PLAIT, Daemon

import plait
from plait._archive import (
    MANIFEST,
    MAX_BYTES,
    build_archive,
    list_source_files,
    pack_source,
    source_root,
)
from plait.api.v1 import artifact_service_pb2 as apb
from plait.api.v1 import artifact_service_pb2_grpc as apb_grpc
from plait.api.v1 import resources_pb2, run_service_pb2
from plait.errors import PipelineDefinitionError
from plait.ir.v1 import ir_pb2
from plait.runners.worker._blobs import RemoteBlobStore
from plait.runners.worker._code import CodeCache, UnsafeArchiveError, unpack

PIPE = '''
"""A pipeline script with a step of its own and steps in a package under src/."""

import json
import logging
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent / "src"))

import plait
from demo_pkg.steps import double


@plait.step
def add_one(x: int) -> int:
    return x + 1


@plait.pipeline(pool=os.environ.get("DEMO_POOL", ""))
def demo(x: int = 1) -> None:
    double(add_one(x))


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(name)s %(message)s")
    mode = sys.argv[1]
    if mode == "compile":
        from google.protobuf import json_format

        from plait._archive import pack_source, pipeline_root

        compiled = demo.compile()
        archive = pack_source(pipeline_root(demo.fn))
        spec = json_format.MessageToJson(compiled.spec)
        print(json.dumps({"version": compiled.version, "archive": archive.digest, "spec": spec}))
    else:
        x = int(sys.argv[2]) if len(sys.argv) > 2 else 1
        run = demo.run({"x": x}, wait=mode == "run")
        code = run.code
        print(json.dumps({
            "run_id": run.run_id,
            "status": str(run.status),
            "output": run.steps["double"].output() if mode == "run" else None,
            "version": run.pipeline_version,
            "archive": code.archive if code else "",
            "git_commit": code.git_commit if code else "",
            "git_dirty": code.git_dirty if code else None,
        }))
'''

STEPS = """
import plait

from demo_pkg.helpers import factor


@plait.step
def double(y: int) -> int:
    return y * factor()
"""


def make_project(folder: Path, factor: int = 2) -> Path:
    """A small project: pyproject.toml, a script, a package under src/, a README, ignored files."""
    (folder / "src" / "demo_pkg").mkdir(parents=True)
    (folder / "pyproject.toml").write_text('[project]\nname = "demo"\nversion = "0"\n')
    (folder / "README.md").write_text("# demo\n")
    (folder / "pipe.py").write_text(textwrap.dedent(PIPE))
    (folder / "src" / "demo_pkg" / "__init__.py").write_text("")
    (folder / "src" / "demo_pkg" / "steps.py").write_text(textwrap.dedent(STEPS))
    (folder / "src" / "demo_pkg" / "helpers.py").write_text(
        f"def factor() -> int:\n    return {factor}\n"
    )
    (folder / "tool.sh").write_text("#!/bin/sh\necho hi\n")
    (folder / "tool.sh").chmod(0o755)
    return folder


def client_env(home: Path, **extra: str) -> dict[str, str]:
    """A client's environment: its own PLAIT_HOME and config, nothing else of Plait's."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PLAIT_")}
    env["PLAIT_HOME"] = str(home)
    env["XDG_CONFIG_HOME"] = str(home.parent / f"{home.name}-config")
    env.update(extra)
    return env


def script(project: Path, env: dict[str, str], *args: str) -> tuple[dict[str, Any], str]:
    """Runs ``python pipe.py ARGS`` in the project; its JSON answer and its stderr."""
    out = run([sys.executable, project / "pipe.py", *args], env=env, cwd=project)
    assert out.returncode == 0, out.stderr
    answer: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return answer, out.stderr


def uploads(stderr: str) -> list[str]:
    """The digests of the code archives a client process said it uploaded."""
    return [line.split()[4] for line in stderr.splitlines() if "uploaded code archive" in line]


def members(data: bytes) -> list[tarfile.TarInfo]:
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        return tar.getmembers()


def git(folder: Path, *args: str) -> str:
    out = subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@example.com", *args],
        cwd=folder,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
        env={**os.environ, "GIT_CONFIG_GLOBAL": os.devnull, "GIT_CONFIG_NOSYSTEM": "1"},
    )
    return out.stdout.strip()


# ---- packing ----


def test_the_same_tree_packs_to_the_same_archive_in_any_folder(tmp_path: Path) -> None:
    a = make_project(tmp_path / "a" / "proj")
    b = make_project(tmp_path / "elsewhere" / "deeper" / "proj")
    home = tmp_path / "home"
    first, again, other = (
        pack_source(a, home=home),
        pack_source(a, home=home),
        pack_source(b, home=home),
    )
    assert first.digest == again.digest == other.digest
    assert build_archive(a) == build_archive(b)
    data = build_archive(a)
    assert hashlib.sha256(data).hexdigest() == first.digest and len(data) == first.size

    entries = members(data)
    names = [m.name for m in entries]
    assert names[0] == MANIFEST and names[1:] == sorted(names[1:])
    assert set(names[1:]) == {
        "README.md",
        "pipe.py",
        "pyproject.toml",
        "src/demo_pkg/__init__.py",
        "src/demo_pkg/helpers.py",
        "src/demo_pkg/steps.py",
        "tool.sh",
    }
    for m in entries:
        assert m.isreg() and m.mtime == 0 and (m.uid, m.gid, m.uname, m.gname) == (0, 0, "", "")
        assert m.mode == (0o755 if m.name == "tool.sh" else 0o644)
        assert not m.name.startswith("/") and str(tmp_path) not in m.name
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        handle = tar.extractfile(MANIFEST)
        assert handle is not None
        manifest = json.loads(handle.read())
    listed = {f["path"]: f for f in manifest["files"]}
    readme = (a / "README.md").read_bytes()
    assert listed["README.md"]["size"] == len(readme)
    assert listed["README.md"]["sha256"] == hashlib.sha256(readme).hexdigest()
    assert listed["tool.sh"]["executable"] is True

    # an edit is a new archive; the record of the last one is owner-only
    (a / "README.md").write_text("# demo, edited\n")
    assert pack_source(a, home=home).digest not in (first.digest, "")
    records = list((home / "code" / "sources").iterdir())
    assert records and all(stat.S_IMODE(r.stat().st_mode) == 0o600 for r in records)
    assert stat.S_IMODE((home / "code").stat().st_mode) == 0o700


def _ignored_tree(root: Path) -> None:
    (root / "pyproject.toml").write_text("")
    (root / ".gitignore").write_text("data/\n*.log\n!keep.log\n/build\n")
    (root / "pkg").mkdir()
    (root / "pkg" / ".gitignore").write_text("secret_*.py\n")
    (root / "pkg" / "mod.py").write_text("x = 1\n")
    (root / "pkg" / "secret_key.py").write_text("KEY = 1\n")
    (root / "pkg" / "__pycache__").mkdir()
    (root / "pkg" / "__pycache__" / "mod.cpython-311.pyc").write_bytes(b"\0")
    (root / "data").mkdir()
    (root / "data" / "big.bin").write_bytes(b"\0" * 1000)
    (root / "build").mkdir()
    (root / "build" / "out.py").write_text("")
    (root / "sub" / "build").mkdir(parents=True)  # only the top build/ is ignored
    (root / "sub" / "build" / "kept.py").write_text("")
    (root / "run.log").write_text("log")
    (root / "keep.log").write_text("kept")
    (root / "local.txt").write_text("excluded by .git/info/exclude only")
    (root / "stray.pyc").write_bytes(b"\0")
    (root / ".venv").mkdir()
    (root / ".venv" / "pyvenv.cfg").write_text("home = /usr\n")
    (root / ".venv" / "lib.py").write_text("")
    (root / "myenv").mkdir()  # a virtualenv by another name
    (root / "myenv" / "pyvenv.cfg").write_text("home = /usr\n")
    (root / "myenv" / "site.py").write_text("")
    (root / "old_home").mkdir()  # a Plait home inside the project: never shipped
    (root / "old_home" / "plait.db").write_text("")
    (root / "old_home" / "credentials.json").write_text("{}")


EXPECTED = {
    ".gitignore",
    "keep.log",
    "local.txt",
    "pkg/.gitignore",
    "pkg/mod.py",
    "pyproject.toml",
    "sub/build/kept.py",
}


def test_gitignore_is_respected_with_and_without_git(tmp_path: Path) -> None:
    root = tmp_path / "proj"
    root.mkdir()
    _ignored_tree(root)
    assert set(list_source_files(root)) == EXPECTED

    assert shutil.which("git"), "git is needed for this test"
    git(root, "init", "-q")
    git(root, "add", "pkg/mod.py")  # one tracked file, the rest untracked: both are shipped
    (root / ".git" / "info").mkdir(exist_ok=True)
    (root / ".git" / "info" / "exclude").write_text("local.txt\n")  # git's own rules count
    assert set(list_source_files(root)) == EXPECTED - {"local.txt"}
    names = {m.name for m in members(build_archive(root))}
    assert names == {MANIFEST} | EXPECTED - {"local.txt"}


def test_a_huge_root_is_refused_with_what_to_do(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "proj"
    (root / "code").mkdir(parents=True)
    (root / "pyproject.toml").write_text("")
    (root / "code" / "steps.py").write_text("")
    with open(root / "dataset.bin", "wb") as fh:
        fh.truncate(MAX_BYTES + 1)  # sparse: big to the packer, nothing on the disk
    with pytest.raises(PipelineDefinitionError) as info:
        pack_source(root, home=tmp_path / "home")
    message = str(info.value)
    assert str(root) in message and "PLAIT_SOURCE_ROOT" in message and ".gitignore" in message

    assert source_root(root / "code" / "steps.py") == root
    monkeypatch.setenv("PLAIT_SOURCE_ROOT", str(root / "code"))
    assert source_root(root / "code" / "steps.py") == root / "code"
    assert pack_source(source_root(root / "code" / "steps.py"), home=tmp_path / "home").files == 1


# ---- the IR and the version ----


@plait.step(pool="gpu")
def on_gpu(x: int) -> int:
    return x


@plait.step
def anywhere(x: int) -> int:
    return x


@plait.pipeline(pool="cpu")
def pooled(x: int = 1) -> None:
    anywhere(on_gpu(x))


def test_a_pipelines_pool_is_the_default_of_its_steps_and_code_refs_are_relative() -> None:
    spec = pooled.compile().spec
    assert {s.id: s.settings.pool for s in spec.steps} == {"on_gpu": "gpu", "anywhere": "cpu"}
    assert on_gpu.with_options(pool="tpu").settings.pool == "tpu"
    # this module's source root is the project (pyproject.toml): its path from there
    for s in spec.steps:
        assert (s.code.module, s.code.file) == (__name__, "tests/test_archives.py")


def test_the_same_code_in_two_folders_is_the_same_version(tmp_path: Path) -> None:
    a = make_project(tmp_path / "one" / "proj")
    b = make_project(tmp_path / "two" / "nested" / "proj")
    env = client_env(tmp_path / "home")
    in_a, _ = script(a, env, "compile")
    in_b, _ = script(b, env, "compile")
    assert in_a["version"] == in_b["version"]
    assert in_a["archive"] == in_b["archive"]
    spec = json.loads(in_a["spec"])
    codes = {s["id"]: s["code"] for s in spec["steps"]}
    assert codes["add_one"]["module"] == "__main__" and codes["add_one"]["file"] == "pipe.py"
    assert codes["double"]["module"] == "demo_pkg.steps"
    assert codes["double"]["file"] == "src/demo_pkg/steps.py"
    assert str(tmp_path) not in in_a["spec"] and str(tmp_path) not in in_b["spec"]

    # a README edit: the same version, another archive
    (a / "README.md").write_text("# demo\n\nMore words.\n")
    edited, _ = script(a, env, "compile")
    assert edited["version"] == in_a["version"]
    assert edited["archive"] != in_a["archive"]


# ---- a daemon: uploads, runs, DownloadBlob ----


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    d = Daemon(tmp_path / "daemon-home")
    try:
        yield d
    finally:
        d.stop()


def blob_path(d: Daemon, digest: str) -> Path:
    return d.home / "artifacts" / "sha256" / digest[:2] / digest


def test_one_edit_uploads_one_archive_and_the_run_records_it(
    tmp_path: Path, daemon: Daemon
) -> None:
    project = make_project(tmp_path / "proj")
    env = client_env(tmp_path / "client-home", PLAIT_SERVER=daemon.address)
    env["PLAIT_TOKEN"] = daemon.credential

    first, err = script(project, env, "run", "3")
    assert (first["status"], first["output"]) == ("SUCCEEDED", 8)
    assert uploads(err) == [first["archive"]]
    assert blob_path(daemon, first["archive"]).is_file()

    again, err = script(project, env, "run", "4")  # nothing changed: nothing sent
    assert (again["status"], again["output"]) == ("SUCCEEDED", 10)
    assert uploads(err) == [] and again["archive"] == first["archive"]

    # one file edited: one new archive, and the workers run the new code (for a new input: the
    # cache key holds the step's own code, not the helpers it calls)
    (project / "src" / "demo_pkg" / "helpers.py").write_text("def factor() -> int:\n    return 3\n")
    edited, err = script(project, env, "run", "6")
    assert (edited["status"], edited["output"]) == ("SUCCEEDED", 21)
    assert uploads(err) == [edited["archive"]] and edited["archive"] != first["archive"]
    assert edited["version"] == first["version"]  # the step's code did not change

    client = plait.Client(daemon.address, token=daemon.credential)
    try:
        recorded = client.get_run(edited["run_id"]).code
        assert recorded is not None and recorded.archive == edited["archive"]
        assert (recorded.git_commit, recorded.git_dirty) == ("", False)  # not a git tree
        assert client.get_run(first["run_id"]).code == client.get_run(again["run_id"]).code
    finally:
        client.close()

    # a server that lost the archive (or is another one at the same address) gets it again
    blob_path(daemon, edited["archive"]).unlink()
    lost, err = script(project, env, "run", "7")
    assert (lost["status"], lost["output"]) == ("SUCCEEDED", 24)
    assert uploads(err) == [edited["archive"]]


def test_git_commit_and_dirty_flag_are_recorded(tmp_path: Path) -> None:
    project = make_project(tmp_path / "proj")
    git(project, "init", "-q")
    git(project, "add", ".")
    git(project, "commit", "-q", "-m", "first")
    commit = git(project, "rev-parse", "HEAD")
    env = client_env(tmp_path / "home")  # the embedded engine

    clean, _ = script(project, env, "run")
    assert (clean["status"], clean["output"]) == ("SUCCEEDED", 4)
    assert (clean["git_commit"], clean["git_dirty"]) == (commit, False)

    (project / "notes.txt").write_text("untracked, not ignored: shipped, so the tree is dirty")
    dirty, _ = script(project, env, "run")
    assert (dirty["git_commit"], dirty["git_dirty"]) == (commit, True)
    # the embedded engine runs the code in place: no archive (a daemon's runs get one)
    assert dirty["archive"] == clean["archive"] == ""

    (project / ".gitignore").write_text("notes.txt\n")
    git(project, "add", ".gitignore")
    git(project, "commit", "-q", "-m", "ignore notes")
    clean_again, _ = script(project, env, "run")
    assert clean_again["git_commit"] == git(project, "rev-parse", "HEAD") != commit
    assert clean_again["git_dirty"] is False


def _call_code(fn: Callable[[], object]) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        fn()
    code = info.value.code()  # type: ignore[attr-defined]
    assert isinstance(code, grpc.StatusCode)
    return code


def test_download_blob(tmp_path: Path, daemon: Daemon) -> None:
    client = plait.Client(daemon.address, token=daemon.credential)
    channel = grpc.insecure_channel(daemon.address)
    try:
        data = os.urandom(3 * 1024 * 1024 + 17)  # several chunks, the last one short
        digest = client.upload_artifact(data)
        metadata = (("authorization", f"Bearer {daemon.credential}"),)
        blobs = RemoteBlobStore(channel, metadata)
        assert blobs.get(digest) == data
        stored = blobs.put(b"written by a worker")
        assert stored.digest == hashlib.sha256(b"written by a worker").hexdigest()
        assert blobs.get(stored.digest) == b"written by a worker"

        stub = apb_grpc.ArtifactServiceStub(channel)

        def download(d: str, meta: Any = metadata) -> list[apb.DownloadBlobResponse]:
            return list(stub.DownloadBlob(apb.DownloadBlobRequest(digest=d), metadata=meta))

        first = download(digest)[0]
        assert first.size_bytes == len(data)
        empty = client.upload_artifact(b"")
        assert [(m.data, m.size_bytes) for m in download(empty)] == [(b"", 0)]
        assert _call_code(lambda: download("0" * 64)) == grpc.StatusCode.NOT_FOUND
        with pytest.raises(FileNotFoundError):
            blobs.get("0" * 64)
        assert _call_code(lambda: download("../../etc/passwd")) == grpc.StatusCode.INVALID_ARGUMENT
        assert _call_code(lambda: download(digest, None)) == grpc.StatusCode.UNAUTHENTICATED

        # stored bytes that rotted: the stream ends with DATA_LOSS, not with wrong bytes
        path = blob_path(daemon, digest)
        path.write_bytes(b"x" + data[1:])
        assert _call_code(lambda: download(digest)) == grpc.StatusCode.DATA_LOSS
    finally:
        channel.close()
        client.close()


# ---- the worker's side: unpacking ----


def _tar(entries: list[tuple[tarfile.TarInfo, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in entries:
            tar.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return buf.getvalue()


def _file(name: str, data: bytes) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info, data


def _manifest(*files: tuple[str, bytes]) -> tuple[tarfile.TarInfo, bytes]:
    listed = [
        {"path": n, "size": len(d), "sha256": hashlib.sha256(d).hexdigest(), "executable": False}
        for n, d in files
    ]
    return _file(MANIFEST, json.dumps({"format": 1, "files": listed}).encode())


def _link(name: str, target: str, kind: bytes) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info, b""


BAD = b"owned = True\n"
UNSAFE: dict[str, bytes] = {
    "parent": _tar([_manifest(("../evil.py", BAD)), _file("../evil.py", BAD)]),
    "absolute": _tar([_manifest(("/tmp/evil.py", BAD)), _file("/tmp/evil.py", BAD)]),
    "symlink": _tar([_manifest(), _link("link", "/etc", tarfile.SYMTYPE)]),
    "symlink then file": _tar(
        [
            _manifest(("link/evil.py", BAD)),
            _link("link", "..", tarfile.SYMTYPE),
            _file("link/evil.py", BAD),
        ]
    ),
    "hardlink": _tar([_manifest(), _link("passwd", "/etc/passwd", tarfile.LNKTYPE)]),
    "not listed": _tar([_manifest(), _file("extra.py", BAD)]),
    "wrong bytes": _tar([_manifest(("a.py", b"x = 1\n")), _file("a.py", b"x = 2\n")]),
    "twice": _tar([_manifest(("a.py", BAD)), _file("a.py", BAD), _file("a.py", BAD)]),
    "missing": _tar([_manifest(("a.py", BAD), ("b.py", BAD)), _file("a.py", BAD)]),
    "no manifest": _tar([_file("a.py", BAD)]),
    "dot parts": _tar([_manifest(("a/./b.py", BAD)), _file("a/./b.py", BAD)]),
    "not a tar": b"\x1f\x8b this is not a tar archive" * 40,
}


@pytest.mark.parametrize("case", sorted(UNSAFE))
def test_unpacking_refuses_unsafe_archives(tmp_path: Path, case: str) -> None:
    cache = tmp_path / "home" / "code"
    target = cache / "x" / "unpacked"
    with pytest.raises(UnsafeArchiveError):
        unpack(UNSAFE[case], target)
    assert not target.exists()
    assert not list((cache / "x").iterdir())  # no debris
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert written == [] and not Path("/tmp/evil.py").exists()


def test_a_packed_root_unpacks_whole_owner_only_and_once(tmp_path: Path) -> None:
    project = make_project(tmp_path / "proj")
    data = build_archive(project)
    digest = hashlib.sha256(data).hexdigest()
    fetched: list[str] = []

    def fetch(d: str) -> bytes:
        fetched.append(d)
        return data

    cache = CodeCache(tmp_path / "worker-home")
    root = cache.root(digest, fetch)
    assert root == tmp_path / "worker-home" / "code" / digest
    assert cache.root(digest, fetch) == root and fetched == [digest]  # once per digest
    files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    assert files == list_source_files(project)
    for p in root.rglob("*"):
        mode = stat.S_IMODE(p.stat().st_mode)
        assert mode & 0o077 == 0, p
    assert stat.S_IMODE((root / "tool.sh").stat().st_mode) == 0o700
    assert (root / "src" / "demo_pkg" / "helpers.py").read_bytes() == (
        project / "src" / "demo_pkg" / "helpers.py"
    ).read_bytes()

    with pytest.raises(UnsafeArchiveError):  # bytes that are not the digest's
        CodeCache(tmp_path / "other-home").root("0" * 64, fetch)
    assert not (tmp_path / "other-home" / "code" / ("0" * 64)).exists()


# ---- a remote worker ----


def test_a_worker_elsewhere_runs_the_pipeline_from_the_archive(
    tmp_path: Path, daemon: Daemon
) -> None:
    """A `plait worker` in another folder, with its own PLAIT_HOME, artifacts through the
    control plane, and no access to the client's files (they are gone before it starts)."""
    project = make_project(tmp_path / "client" / "proj", factor=5)
    env = client_env(tmp_path / "client-home", PLAIT_SERVER=daemon.address, DEMO_POOL="far")
    env["PLAIT_TOKEN"] = daemon.credential
    started, err = script(project, env, "start", "1")
    assert uploads(err) == [started["archive"]]
    shutil.rmtree(tmp_path / "client")  # the worker cannot read what is not there

    worker_home = tmp_path / "worker-home"
    elsewhere = tmp_path / "worker-cwd"
    elsewhere.mkdir()
    worker_env = {k: v for k, v in os.environ.items() if not k.startswith("PLAIT_")}
    worker_env.update(
        PLAIT_HOME=str(worker_home),
        XDG_CONFIG_HOME=str(tmp_path / "worker-config"),
        PLAIT_TOKEN=daemon.token("create", "far-workers", "--role", "worker"),
    )
    worker_env.pop("PYTHONPATH", None)
    log = tmp_path / "worker.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [
                PLAIT,
                "worker",
                "--server",
                daemon.address,
                *("--pool", "far"),
                "--artifacts",
                "remote",
            ],
            env=worker_env,
            cwd=elsewhere,
            stdout=out,
            stderr=out,
            start_new_session=True,
        )
    client = plait.Client(daemon.address, token=daemon.credential)
    try:
        done = client.wait(started["run_id"])
        assert done.status == "SUCCEEDED", (
            [(s.step_id, s.status, s.error) for s in done.steps.values()],
            log.read_text(errors="replace"),
        )
        assert done.steps["double"].output() == 10
        assert done.code is not None and done.code.archive == started["archive"]
        unpacked = worker_home / "code" / started["archive"]
        wait_for(unpacked.is_dir, "the worker's code cache holding the archive")
        assert (unpacked / "src" / "demo_pkg" / "helpers.py").read_text().endswith("return 5\n")
        assert stat.S_IMODE((worker_home / "code").stat().st_mode) == 0o700
        assert not list(elsewhere.iterdir())  # nothing written where it was started
    finally:
        client.close()
        kill_group(proc.pid)
        proc.kill()
        proc.wait()


def test_a_process_packs_a_root_again_only_when_something_changed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from plait import _archive

    root = tmp_path / "proj"
    root.mkdir()
    (root / "pyproject.toml").write_text("[project]\nname = 'p'\n")
    (root / "a.py").write_text("A = 1\n")
    old = time.time() - 60  # older than the racy window: stat alone may vouch for them
    for f in root.iterdir():
        os.utime(f, (old, old))
    listings = []
    real = _archive._listing

    def counted(r: Path) -> Any:
        listings.append(r)
        return real(r)

    monkeypatch.setattr(_archive, "_listing", counted)
    home = tmp_path / "home"
    first = _archive.pack_source(root, home=home)
    assert _archive.pack_source(root, home=home).digest == first.digest
    assert len(listings) == 1  # nothing changed: no second listing (no git, no walk)
    (root / "sub").mkdir()
    (root / "sub" / "b.py").write_text("B = 2\n")  # a new file in a new folder
    second = _archive.pack_source(root, home=home)
    assert second.digest != first.digest and len(listings) == 2
    os.utime(root / "a.py", (old, old + 1))  # touched: looked at again
    assert _archive.pack_source(root, home=home).digest == second.digest
    assert len(listings) == 3


@pytest.mark.parametrize("linked", [False, True], ids=["clone", "git-worktree"])
def test_a_git_commit_is_seen_by_a_process_that_packed_the_root_before(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, linked: bool
) -> None:
    from plait import _archive

    repo = tmp_path / "repo"
    repo.mkdir()
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@example.com"]
    (repo / "pyproject.toml").write_text("[project]\nname = 'p'\n")
    (repo / "a.py").write_text("A = 1\n")
    subprocess.run([*git, "init", "-q", str(repo)], check=True)
    subprocess.run([*git, "-C", str(repo), "add", "."], check=True)
    subprocess.run([*git, "-C", str(repo), "commit", "-qm", "one"], check=True)
    root = repo
    if linked:
        root = tmp_path / "linked"
        subprocess.run([*git, "-C", str(repo), "worktree", "add", "-q", str(root)], check=True)
    old = time.time() - 60
    for f in ("pyproject.toml", "a.py"):
        os.utime(root / f, (old, old))
    listings = []
    real = _archive._listing
    monkeypatch.setattr(_archive, "_listing", lambda r: listings.append(r) or real(r))
    home = tmp_path / "home"
    first = _archive.pack_source(root, home=home)
    assert _archive.pack_source(root, home=home) == first and len(listings) == 1
    # a commit that touches no file of the root: only git's refs change
    empty_commit = [*git, "-C", str(root), "commit", "-q", "--allow-empty", "-m", "two"]
    subprocess.run(empty_commit, check=True)
    after = _archive.pack_source(root, home=home)
    assert after.git_commit != first.git_commit and after.digest == first.digest
    assert len(listings) == 2


def test_a_daemon_never_runs_code_from_a_clients_local_path(tmp_path: Path) -> None:
    # a CreateRun that names a folder instead of an archive: only an embedded engine (the
    # client's own process) may run code in place; a daemon's workers must not import from it
    secret = tmp_path / "elsewhere"
    secret.mkdir()
    (secret / "far_steps.py").write_text(
        textwrap.dedent(
            """
            import plait

            @plait.step
            def touch(path: str) -> None:
                open(path, "w").close()

            @plait.pipeline
            def far(path: str) -> None:
                touch(path)
            """
        )
    )
    sys.path.insert(0, str(secret))
    try:
        import far_steps  # type: ignore[import-not-found]
    finally:
        sys.path.remove(str(secret))
        sys.modules.pop("far_steps", None)
    daemon = Daemon(tmp_path / "home")
    try:
        client = plait.Client(daemon.address, token=daemon.credential)
        version = client.register(far_steps.far)
        marker = tmp_path / "ran"
        request = run_service_pb2.CreateRunRequest(
            pipeline_version=version,
            parameters=[ir_pb2.NamedValue(name="path", json=json.dumps(str(marker)))],
            code=resources_pb2.CodeSource(local_root=str(secret)),
        )
        run_id = client._runs.CreateRun(request, metadata=client._metadata).run.run_id
        done = client.wait(run_id)
        client.close()
    finally:
        daemon.stop()
    assert done.status == "FAILED" and not marker.exists()
    error = done.steps["touch"].error
    assert error is not None and "far_steps" in error.message, error
