"""Materializers and the content-addressed artifact store, on real files."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from strategies import json_values

import plait
from plait._artifact_store import ArtifactCorruptedError, LocalArtifactStore
from plait._materializers import get_materializer, materializer_for, register_materializer


@given(json_values)
def test_json_able_values_round_trip_exactly(value: Any) -> None:
    m = materializer_for(value)
    if isinstance(value, str):
        assert m.name == "plait.str"
    else:
        assert m.name == "plait.json"
    back = m.load(m.save(value))
    assert back == value and type(back) is type(value)


@pytest.mark.parametrize(
    ("value", "name"),
    [
        (b"\x00\xff", "plait.bytes"),
        (bytearray(b"ab"), "plait.bytes"),
        ("héllo", "plait.str"),
        ([1, 2.5, None], "plait.json"),
    ],
)
def test_builtins_are_chosen_by_type(value: Any, name: str) -> None:
    m = materializer_for(value)
    assert m.name == name and not m.unsafe
    assert m.load(m.save(value)) == value


@pytest.mark.parametrize("value", [(1, 2), {1: "a"}, math.nan, [math.inf], object(), {1, 2}])
def test_inexact_json_is_refused_with_advice(value: Any) -> None:
    with pytest.raises(TypeError) as info:
        materializer_for(value)
    assert "register_materializer" in str(info.value) and "pickle" in str(info.value)


def test_numpy_round_trip_without_pickle() -> None:
    import numpy as np

    a = np.arange(12, dtype="int16").reshape(3, 4)
    m = materializer_for(a)
    assert m.name == "plait.numpy"
    back = m.load(m.save(a))
    assert isinstance(back, np.ndarray)
    assert back.dtype == a.dtype and back.shape == a.shape and (back == a).all()
    with pytest.raises(TypeError):
        materializer_for(np.array([object()], dtype=object))


def test_pandas_round_trip() -> None:
    import pandas as pd
    from pandas.testing import assert_frame_equal, assert_series_equal

    df = pd.DataFrame({"a": [1, 2, 3], "b": ["x", "y", "z"], "c": [0.5, None, 2.0]})
    m = materializer_for(df)
    assert m.name == "plait.pandas"
    assert_frame_equal(m.load(m.save(df)), df)
    s = pd.Series([1.0, 2.0], name="price")
    back = materializer_for(s).load(materializer_for(s).save(s))
    assert isinstance(back, pd.Series)
    assert_series_equal(back, s)


class Point:
    def __init__(self, x: int, y: int) -> None:
        self.x, self.y = x, y


class PointMaterializer:
    name = "tests.point"
    unsafe = False

    def can_save(self, value: object) -> bool:
        return isinstance(value, Point)

    def save(self, value: object) -> bytes:
        assert isinstance(value, Point)
        return f"{value.x},{value.y}".encode()

    def load(self, data: bytes) -> object:
        x, y = data.decode().split(",")
        return Point(int(x), int(y))


def test_custom_materializers() -> None:
    register_materializer(PointMaterializer())
    m = materializer_for(Point(1, 2))
    assert m.name == "tests.point"
    back = m.load(m.save(Point(1, 2)))
    assert isinstance(back, Point) and (back.x, back.y) == (1, 2)
    assert get_materializer("tests.point") is m
    replacement = PointMaterializer()
    register_materializer(replacement)  # the same name again replaces it
    assert get_materializer("tests.point") is replacement
    with pytest.raises(ValueError, match="built-in"):

        class Clash(PointMaterializer):
            name = "plait.json"

        register_materializer(Clash())
    with pytest.raises(ValueError, match="needs 'name'"):
        register_materializer(object())  # type: ignore[arg-type]


def test_pickle_only_by_name_and_marked_unsafe() -> None:
    m = materializer_for(Point(3, 4), "pickle")
    assert m.name == "plait.pickle" and m.unsafe
    assert get_materializer("pickle") is get_materializer("plait.pickle")
    back = m.load(m.save(Point(3, 4)))
    assert isinstance(back, Point) and back.x == 3
    with pytest.raises(TypeError, match="cannot store"):
        materializer_for("text", "numpy")
    with pytest.raises(LookupError, match="register_materializer"):
        get_materializer("nope")


def test_importing_materializers_loads_no_numpy_or_pandas() -> None:
    code = (
        "import sys, plait._materializers; "
        "assert 'numpy' not in sys.modules and 'pandas' not in sys.modules, "
        "sorted(m for m in sys.modules if m.startswith(('numpy', 'pandas')))"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_plait_exports_the_registration() -> None:
    assert plait.register_materializer is register_materializer


# ---- the store ----


@given(st.binary(max_size=2048))
def test_store_round_trip_and_dedup(tmp_path_factory: pytest.TempPathFactory, data: bytes) -> None:
    store = LocalArtifactStore(tmp_path_factory.mktemp("store"))
    a = store.put(data)
    b = store.put(data)
    assert a == b and a.size == len(data)
    assert store.get(a.digest) == data and store.exists(a.digest)
    files = [p for p in store.root.rglob("*") if p.is_file()]
    assert files == [store.path_for(a.digest)]  # one file, no temporary debris


def test_store_detects_corruption_and_missing_blobs(tmp_path: Path) -> None:
    store = LocalArtifactStore(tmp_path)
    blob = store.put(b"original")
    store.path_for(blob.digest).write_bytes(b"tampered")
    with pytest.raises(ArtifactCorruptedError):
        store.get(blob.digest)
    missing = "0" * 64
    assert not store.exists(missing)
    with pytest.raises(FileNotFoundError, match=missing):
        store.get(missing)


@pytest.mark.parametrize("digest", ["../../etc/passwd", "A" * 64, "abc", "0" * 63 + "/"])
def test_store_refuses_digests_that_are_not_digests(tmp_path: Path, digest: str) -> None:
    store = LocalArtifactStore(tmp_path)
    with pytest.raises(ValueError, match="not a sha256"):
        store.path_for(digest)
    assert not store.exists(digest)


def test_store_uris(tmp_path: Path) -> None:
    store = LocalArtifactStore.from_uri(tmp_path.as_uri())
    assert store.root == tmp_path.resolve()
    blob = store.put(b"x")
    assert blob.uri == store.path_for(blob.digest).as_uri()
    assert LocalArtifactStore.from_uri(str(tmp_path)).root == store.root
    with pytest.raises(ValueError, match="only local folders"):
        LocalArtifactStore.from_uri("s3://bucket/x")


def test_concurrent_writers_of_the_same_content(tmp_path: Path) -> None:
    code = (
        "import sys; from plait._artifact_store import LocalArtifactStore as S; "
        "s = S(sys.argv[1]); [s.put(b'same' * 10000) for _ in range(200)]"
    )
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path)]) for _ in range(4)]
    assert all(p.wait() == 0 for p in procs)
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert len(files) == 1 and os.path.getsize(files[0]) == 40000
