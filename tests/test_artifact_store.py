"""The content-addressed local artifact store, on real files."""

from __future__ import annotations

import hashlib
import os
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from plait._artifact_store import ArtifactCorruptedError, LocalArtifactStore, StoredBlob


def files_under(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


@given(st.binary(max_size=4096))
def test_put_then_get_round_trips_and_stores_once(
    tmp_path_factory: pytest.TempPathFactory, data: bytes
) -> None:
    store = LocalArtifactStore(tmp_path_factory.mktemp("store"))
    a = store.put(data)
    b = store.put(data)
    digest = hashlib.sha256(data).hexdigest()
    assert a == b == StoredBlob(digest, len(data), store.path_for(digest).as_uri())
    assert store.get(a.digest) == data and store.exists(a.digest)
    assert files_under(store.root) == [store.path_for(digest)]  # one file, no temporary debris


@given(st.lists(st.binary(max_size=64), min_size=1, max_size=8))
def test_different_bytes_get_different_blobs(
    tmp_path_factory: pytest.TempPathFactory, pieces: list[bytes]
) -> None:
    store = LocalArtifactStore(tmp_path_factory.mktemp("store"))
    blobs = {p: store.put(p) for p in pieces}
    assert len({b.digest for b in blobs.values()}) == len(blobs)
    assert len(files_under(store.root)) == len(blobs)
    assert all(store.get(b.digest) == p for p, b in blobs.items())


def test_the_layout_is_sha256_two_hex_digits_digest(tmp_path: Path) -> None:
    store = LocalArtifactStore(tmp_path / "store")
    assert not store.root.exists()  # created by the first put, not by the constructor
    blob = store.put(b"hello")
    digest = hashlib.sha256(b"hello").hexdigest()
    assert blob.digest == digest and blob.size == 5
    assert store.path_for(digest) == tmp_path / "store" / "sha256" / digest[:2] / digest
    assert (tmp_path / "store" / "sha256" / digest[:2] / digest).read_bytes() == b"hello"
    assert blob.uri == (tmp_path / "store" / "sha256" / digest[:2] / digest).as_uri()
    assert store.uri == (tmp_path / "store").as_uri()


def test_a_blob_already_there_is_not_written_again(tmp_path: Path) -> None:
    store = LocalArtifactStore(tmp_path)
    blob = store.put(b"same")
    path = store.path_for(blob.digest)
    before = path.stat()
    store.put(b"same")
    after = path.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)


@pytest.mark.parametrize("umask", [0o022, 0o000])
def test_blobs_are_owner_only_whatever_the_umask(tmp_path: Path, umask: int) -> None:
    """Artifacts are the user's data: other users read them through the control plane."""
    old = os.umask(umask)
    try:
        store = LocalArtifactStore(tmp_path / "store")
        blob = store.put(b"private")
        writer = store.writer()
        writer.write(b"uploaded")
        uploaded = writer.commit()
    finally:
        os.umask(old)
    assert stat.S_IMODE(store.root.stat().st_mode) == 0o700
    for b in (blob, uploaded):
        assert stat.S_IMODE(store.path_for(b.digest).stat().st_mode) == 0o600


def test_a_failed_write_leaves_no_temporary_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = LocalArtifactStore(tmp_path)

    def broken_replace(src: object, dst: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        store.put(b"data")
    monkeypatch.undo()
    assert files_under(tmp_path) == []
    assert store.get(store.put(b"data").digest) == b"data"


def test_concurrent_writers_of_the_same_content_leave_one_whole_file(tmp_path: Path) -> None:
    data = os.urandom(200_000)
    store = LocalArtifactStore(tmp_path)
    digest = hashlib.sha256(data).hexdigest()
    errors: list[BaseException] = []

    def write_and_read() -> None:
        try:
            for _ in range(20):
                store.put(data)
                assert store.get(digest) == data  # never half a blob
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=write_and_read) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert files_under(tmp_path) == [store.path_for(digest)]


def test_concurrent_writer_processes(tmp_path: Path) -> None:
    code = (
        "import sys; from plait._artifact_store import LocalArtifactStore as S; "
        "s = S(sys.argv[1]); [s.put(b'same' * 10000) for _ in range(200)]"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for _ in range(4):
            procs.append(subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], env=env))
        assert [p.wait(timeout=120) for p in procs] == [0, 0, 0, 0]
    finally:
        for p in procs:  # stopped even when one failed or hung
            p.kill()
            p.wait()
    files = files_under(tmp_path)
    assert len(files) == 1 and files[0].read_bytes() == b"same" * 10000


@pytest.mark.parametrize("tampered", [b"other bytes", b"ORIGINAL"], ids=["resized", "same size"])
def test_corruption_is_detected_and_a_later_put_repairs_it(tmp_path: Path, tampered: bytes) -> None:
    store = LocalArtifactStore(tmp_path)
    blob = store.put(b"original")
    path = store.path_for(blob.digest)
    path.write_bytes(tampered)
    with pytest.raises(ArtifactCorruptedError, match=blob.digest) as info:
        store.get(blob.digest)
    assert isinstance(info.value, ValueError)
    # moved aside: a file of the right size must not make put() skip the write
    assert not store.exists(blob.digest)
    assert path.with_name(f"{path.name}.corrupt").read_bytes() == tampered
    assert store.put(b"original") == blob
    assert store.get(blob.digest) == b"original"


def test_a_missing_blob_is_file_not_found_naming_digest_and_store(tmp_path: Path) -> None:
    store = LocalArtifactStore(tmp_path / "store")
    missing = "0" * 64
    assert not store.exists(missing)
    with pytest.raises(FileNotFoundError) as info:
        store.get(missing)
    assert missing in str(info.value) and str(store.root) in str(info.value)


@pytest.mark.parametrize(
    "digest",
    [
        "../../etc/passwd",
        "A" * 64,  # uppercase
        "abc",  # short
        "0" * 65,
        "0" * 63 + "/",
        "0" * 62 + "..",
        "/" + "0" * 63,
        "g" * 64,
        "",
        "0" * 64 + "\n",
    ],
)
def test_anything_but_a_sha256_hex_digest_is_refused(tmp_path: Path, digest: str) -> None:
    store = LocalArtifactStore(tmp_path)
    with pytest.raises(ValueError, match="not a sha256"):
        store.path_for(digest)
    with pytest.raises(ValueError, match="not a sha256"):
        store.get(digest)
    assert not store.exists(digest)


def test_stores_from_uris(tmp_path: Path) -> None:
    store = LocalArtifactStore.from_uri(tmp_path.as_uri())
    assert store.root == tmp_path.resolve()
    assert LocalArtifactStore.from_uri(str(tmp_path)).root == store.root
    assert LocalArtifactStore.from_uri(f"file://localhost{tmp_path}").root == store.root
    spaced = tmp_path / "with space"
    assert LocalArtifactStore.from_uri(spaced.as_uri()).root == spaced  # %20 decoded
    for uri in ("s3://bucket/x", "gs://bucket", "https://example.com/x", "file://server/share"):
        with pytest.raises(ValueError, match="only local folders"):
            LocalArtifactStore.from_uri(uri)


def test_a_blob_writer_stores_pieces_under_their_digest(tmp_path: Path) -> None:
    store = LocalArtifactStore(tmp_path)
    writer = store.writer()
    for piece in (b"ab", b"", b"cd"):
        writer.write(piece)
    assert writer.size == 4
    blob = writer.commit(hashlib.sha256(b"abcd").hexdigest())
    assert blob == store.put(b"abcd")
    assert store.get(blob.digest) == b"abcd"

    wrong = store.writer()
    wrong.write(b"xyz")
    with pytest.raises(ValueError, match="sha256"):
        wrong.commit("0" * 64)
    aborted = store.writer()
    aborted.write(b"never stored")
    aborted.abort()
    assert files_under(tmp_path) == [store.path_for(blob.digest)]
