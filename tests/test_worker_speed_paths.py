"""The worker's fast paths give what the slower code they replace gave: the record of an output,
the JSON bytes, the materializer chosen, the blob read and written, the step's context made on
demand, and fds 1 and 2 around a step."""

from __future__ import annotations

import hashlib
import json
import os
import stat
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from strategies import json_values
from test_live_logs import Collect

from plait import _context, _materializers
from plait._artifact_store import LocalArtifactStore
from plait._materializers import JsonMaterializer, materializer_for, register_materializer
from plait._models import ArtifactInfo
from plait.api.v1 import resources_pb2 as res
from plait.api.v1 import task_service_pb2 as tasks
from plait.runners.worker import _execute
from plait.runners.worker._execute import _NOT_AWAITABLE, _Capture, _Fresh, _Saved, input_value

TOKEN = tasks.LeaseToken(run_id="r" * 32, step_id="noop_5", attempt=2, epoch=1)


@pytest.fixture
def own_registry() -> Iterator[None]:
    saved = dict(_materializers._USER)
    yield
    _materializers._USER.clear()
    _materializers._USER.update(saved)


def test_an_output_record_is_the_one_artifact_info_writes(tmp_path: Path) -> None:
    store = LocalArtifactStore(tmp_path)
    done = tasks.TaskCompleted()
    created = datetime(2026, 11, 27, 1, 2, 3, 456789, tzinfo=UTC)
    seconds = int((created - datetime(1970, 1, 1, tzinfo=UTC)).total_seconds())
    saved = _Saved(tasks.Task(token=TOKEN), store, seconds, 456789 * 1000, done.outputs)
    saved.put("output", {"a": [1, 2]}, "", "id1")
    saved.put("blob", b"\x00\x01", "", "id2")
    saved.put("pickled", {1, 2}, "pickle", "id3")
    expected = []
    for name, value, materializer, artifact_id in [
        ("output", {"a": [1, 2]}, "plait.json", "id1"),
        ("blob", b"\x00\x01", "plait.bytes", "id2"),
        ("pickled", {1, 2}, "plait.pickle", "id3"),
    ]:
        blob = store.put(_materializers.get_materializer(materializer).save(value))
        expected.append(
            ArtifactInfo(
                artifact_id=artifact_id,
                output=name,
                digest=blob.digest,
                size=blob.size,
                uri=blob.uri,
                materializer=materializer,
                data_type=_materializers.type_name(value),
                unsafe=materializer == "plait.pickle",
                run_id=TOKEN.run_id,
                step_id=TOKEN.step_id,
                created_at=created,
            ).to_proto()
        )
    assert list(done.outputs) == expected


@given(json_values)
def test_json_bytes_are_those_of_json_dumps(value: Any) -> None:
    expected = json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    assert JsonMaterializer().save(value) == expected.encode()


def test_json_keeps_lone_surrogates_as_escapes() -> None:
    value = ["\ud800", {"k": "\udfff x"}]
    data = JsonMaterializer().save(value)
    assert data == json.dumps(value, ensure_ascii=True, separators=(",", ":")).encode()
    assert JsonMaterializer().load(data) == value


def test_a_materializer_registered_after_a_lookup_is_chosen(own_registry: None) -> None:
    _materializers._USER.clear()
    assert materializer_for(5).name == "plait.json"
    assert materializer_for(b"x").name == "plait.bytes"

    class Ints:
        name = "test.ints"
        unsafe = False

        def can_save(self, value: object) -> bool:
            return type(value) is int

        def save(self, value: object) -> bytes:
            return str(value).encode()

        def load(self, data: bytes) -> object:
            return int(data)

    register_materializer(Ints())
    assert materializer_for(5).name == "test.ints"
    assert materializer_for("5").name == "plait.str"  # the built-ins still follow
    _materializers._USER.clear()
    assert materializer_for(5).name == "plait.json"


def test_no_type_the_executor_skips_the_awaitable_check_for_can_be_awaited() -> None:
    assert not any(hasattr(t, "__await__") for t in _NOT_AWAITABLE)

    class AwaitableInt(int):
        def __await__(self) -> Iterator[None]:
            yield None

    assert type(AwaitableInt(1)) not in _NOT_AWAITABLE  # exact types: a subclass is asked


@pytest.mark.parametrize("size", [0, 1, 4096, (1 << 20) + 3])
def test_a_blob_is_read_whole(tmp_path: Path, size: int) -> None:
    store = LocalArtifactStore(tmp_path)
    data = os.urandom(size)
    blob = store.put(data)
    assert store.get(blob.digest) == data


def test_a_blob_cut_short_is_read_to_its_end_and_refused(tmp_path: Path) -> None:
    store = LocalArtifactStore(tmp_path)
    blob = store.put(b"0123456789")
    path = store.path_for(blob.digest)
    path.chmod(0o600)
    path.write_bytes(b"01234")
    with pytest.raises(ValueError, match="do not match"):
        store.get(blob.digest)


def test_a_step_reads_what_the_last_step_stored_from_memory(tmp_path: Path) -> None:
    store = LocalArtifactStore(tmp_path / "store")
    fresh = _Fresh()
    saved = _Saved(tasks.Task(token=TOKEN), store, 0, 0, tasks.TaskCompleted().outputs, fresh)
    saved.put("output", {"n": 41}, "", "id1")
    big = b"x" * (_execute.FRESH_BYTES + 1)
    saved.put("big", big, "", "id2")
    small, large = saved.records
    assert fresh.blobs == {small.digest: store.get(small.digest)}  # the big one is not kept
    for blob in store.root.rglob("*"):  # gone from the store: the next step reads memory
        if blob.is_file():
            blob.unlink()
    read = tasks.Value(artifact=res.Artifact(digest=small.digest, materializer="plait.json"))
    assert input_value(read, store, fresh) == {"n": 41}
    listed = tasks.Value(list=tasks.ValueList(items=[read, read]))
    assert input_value(listed, store, fresh) == [{"n": 41}, {"n": 41}]
    with pytest.raises(FileNotFoundError):  # not kept: from the store
        input_value(read, store, _Fresh())
    too_big = tasks.Value(artifact=res.Artifact(digest=large.digest, materializer="plait.bytes"))
    with pytest.raises(FileNotFoundError):
        input_value(too_big, store, fresh)


def test_a_put_makes_the_folder_of_its_blob_and_writes_it_owner_only(tmp_path: Path) -> None:
    store = LocalArtifactStore(tmp_path / "store")
    blobs = [store.put(bytes([i]) * 100) for i in range(40)]  # several in some folders
    for i, blob in enumerate(blobs):
        path = store.path_for(blob.digest)
        assert path.read_bytes() == bytes([i]) * 100
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert blob.digest == hashlib.sha256(bytes([i]) * 100).hexdigest()
    files = sorted(p for p in store.root.rglob("*") if p.is_file())
    assert files == sorted(store.path_for(b.digest) for b in blobs)  # no temporary debris


def test_the_step_context_is_made_once_and_only_when_asked_for() -> None:
    made: list[_context.StepContext] = []

    def make() -> _context.StepContext:
        ctx = _context.StepContext(
            run_id="r",
            step_id="s",
            attempt=1,
            pipeline="p",
            output_locations={"output": "artifacts/a"},
            artifact_store_uri="file:///x",
            _report=lambda token, output, text: None,
            _token=None,
        )
        made.append(ctx)
        return ctx

    reset = _context.set_context(_context.LazyContext(make))
    try:
        assert made == []
        first = _context.get_step_context()
        assert _context.get_step_context() is first and made == [first]
        _context.log_metadata({"a": 1}, output="output")
    finally:
        _context.reset_context(reset)
    with pytest.raises(plait_errors().NotInStepError):
        _context.get_step_context()


def plait_errors() -> Any:
    import plait.errors

    return plait.errors


def _identity(fd: int) -> tuple[int, int]:
    st_ = os.fstat(fd)
    return st_.st_dev, st_.st_ino


def _step(capture: _Capture, write: Any) -> Collect:
    reporter = Collect()
    with capture.follow(TOKEN, 10_000, reporter):  # type: ignore[arg-type]
        write()
    capture.report()
    return reporter


def test_each_step_logs_only_its_own_output_and_fds_1_and_2_come_back() -> None:
    before = [_identity(fd) for fd in (1, 2)]
    capture = _Capture()
    got = _step(capture, lambda: (os.write(1, b"first\n"), os.write(2, b"oops\n")))
    assert (got.text("stdout"), got.text("stderr")) == ("first\n", "oops\n")
    assert [_identity(fd) for fd in (1, 2)] == before
    got = _step(capture, lambda: os.write(1, b"2nd\n"))
    assert (got.text("stdout"), got.text("stderr")) == ("2nd\n", "")
    assert [_identity(fd) for fd in (1, 2)] == before
    assert _step(capture, lambda: None).got == []


def test_a_step_that_moves_or_replaces_fd_1_changes_no_other_step() -> None:
    before = _identity(1)
    capture = _Capture()

    def seek_then_write() -> None:
        os.write(1, b"abc\n")
        os.lseek(1, 1000, os.SEEK_SET)  # a write after it still goes to the end: no hole
        os.write(1, b"def\n")

    assert _step(capture, seek_then_write).text("stdout") == "abc\ndef\n"
    assert _step(capture, lambda: os.write(1, b"x\n")).text("stdout") == "x\n"

    def replace_fd_1() -> None:
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, 1)
        os.close(null)
        os.write(1, b"lost\n")

    assert _step(capture, replace_fd_1).text("stdout") == ""
    assert _identity(1) == before  # put back
    assert _step(capture, lambda: os.write(1, b"y\n")).text("stdout") == "y\n"
