"""Materializers: which one a value gets, and that its bytes bring the value back exactly."""

from __future__ import annotations

import enum
import io
import json
import math
import os
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from strategies import json_values

import plait
from plait import _materializers
from plait._materializers import (
    get_materializer,
    materializer_for,
    register_materializer,
    type_name,
)

BUILTIN_NAMES = ["plait.bytes", "plait.str", "plait.json", "plait.numpy", "plait.pandas"]


@pytest.fixture(autouse=True)
def _own_registry() -> Iterator[None]:
    """Each test starts with the registrations it found and leaves none of its own behind."""
    saved = dict(_materializers._USER)
    yield
    _materializers._USER.clear()
    _materializers._USER.update(saved)


def round_trip(value: Any, requested: str = "") -> tuple[str, Any]:
    m = materializer_for(value, requested)
    data = m.save(value)
    assert isinstance(data, bytes)
    return m.name, m.load(data)


# ---- builtins, str, bytes, JSON ----


@given(json_values)
def test_json_able_values_round_trip_exactly(value: Any) -> None:
    name, back = round_trip(value)
    assert name == ("plait.str" if isinstance(value, str) else "plait.json")
    assert back == value and type(back) is type(value)


any_text = st.text(st.characters(exclude_categories=[]) | st.characters(categories=["Cs"]))
"""Any Python str, lone surrogates (category Cs) included and drawn often."""


@given(st.lists(any_text, max_size=4) | st.dictionaries(any_text, any_text, max_size=4))
def test_any_text_survives_json_including_lone_surrogates(value: Any) -> None:
    name, back = round_trip(value)
    assert name == "plait.json" and back == value


@given(any_text)
def test_any_text_survives_str_including_lone_surrogates(value: str) -> None:
    assert round_trip(value) == ("plait.str", value)


def test_json_is_standard_compact_utf8_in_the_given_key_order() -> None:
    value = {"z": 1, "é": [True, None, 2.5], "a": {}}
    data = get_materializer("plait.json").save(value)
    assert data == '{"z":1,"é":[true,null,2.5],"a":{}}'.encode()
    assert list(json.loads(data)) == ["z", "é", "a"]
    assert get_materializer("plait.str").save("é") == "é".encode()


@pytest.mark.parametrize(
    ("value", "name"),
    [
        (b"\x00\xff", "plait.bytes"),
        (bytearray(b"ab"), "plait.bytes"),
        ("héllo", "plait.str"),
        ("", "plait.str"),
        (None, "plait.json"),
        (True, "plait.json"),
        (-0.0, "plait.json"),
        (10**300, "plait.json"),
        ([1, 2.5, None], "plait.json"),
        ({"a": [{"b": []}]}, "plait.json"),
    ],
)
def test_builtins_are_chosen_by_type(value: Any, name: str) -> None:
    m = materializer_for(value)
    assert m.name == name and not m.unsafe
    back = m.load(m.save(value))
    assert back == value
    if isinstance(value, float):  # -0.0 stays negative
        assert isinstance(back, float) and math.copysign(1, back) == math.copysign(1, value)


def test_bytearray_comes_back_as_bytes() -> None:
    assert round_trip(bytearray(b"ab")) == ("plait.bytes", b"ab")


class Color(enum.IntEnum):
    RED = 1


recursive: list[Any] = []
recursive.append(recursive)


@pytest.mark.parametrize(
    "value",
    [
        # tuples, sets, non-str keys and non-finite floats are stored exactly now
        # (plait.pyjson: tests/test_types.py)
        object(),
        Color.RED,  # an int subclass would come back as a plain int
        [10**5000],  # more digits than Python turns into text
        recursive,
        complex(1, 2),
    ],
    ids=lambda v: type(v).__name__,
)
def test_values_without_an_exact_json_form_are_refused_with_advice(value: Any) -> None:
    with pytest.raises(TypeError) as info:
        materializer_for(value)
    message = str(info.value)
    assert type_name(value) in message
    assert "register_materializer" in message and 'materializer="pickle"' in message
    assert "unsafe" in message


# ---- numpy ----


@given(
    hnp.arrays(
        dtype=hnp.scalar_dtypes() | hnp.byte_string_dtypes() | hnp.unicode_string_dtypes(),
        shape=hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4),
    )
)
def test_numpy_arrays_round_trip_bit_for_bit(a: Any) -> None:
    import numpy as np

    name, back = round_trip(a)
    assert name == "plait.numpy"
    assert type(back) is np.ndarray
    assert back.dtype == a.dtype and back.shape == a.shape
    assert back.tobytes() == a.tobytes()  # exact, NaN payloads and -0.0 included


def test_numpy_layout_and_memmaps(tmp_path: Any) -> None:
    import numpy as np

    a = np.arange(12, dtype=">i4").reshape(3, 4).T  # big-endian, not C-contiguous
    name, back = round_trip(a)
    assert name == "plait.numpy" and back.dtype == a.dtype and (back == a).all()
    mm = np.lib.format.open_memmap(tmp_path / "a.npy", mode="w+", dtype="f8", shape=(3,))
    mm[:] = [1.0, 2.0, 3.0]
    name, back = round_trip(mm)
    assert name == "plait.numpy" and type(back) is np.ndarray and back.tolist() == [1, 2, 3]


def test_numpy_values_that_would_need_pickle_or_lose_something_are_refused() -> None:
    import numpy as np

    refused = [
        np.array([object()], dtype=object),
        np.zeros(2, dtype=[("a", "i4"), ("b", object)]),  # an object field
        np.ma.array([1, 2], mask=[False, True]),  # the mask would be lost
    ]
    for value in refused:
        with pytest.raises(TypeError, match="register_materializer"):
            materializer_for(value)
        with pytest.raises(TypeError, match=r"plait\.numpy"):
            materializer_for(value, "numpy")
    with pytest.raises(TypeError):
        get_materializer("plait.numpy").save(refused[0])


def test_numpy_blobs_are_plain_npy_that_refuse_pickles() -> None:
    import numpy as np

    data = get_materializer("plait.numpy").save(np.arange(3))
    assert np.load(io.BytesIO(data)).tolist() == [0, 1, 2]
    pickled = io.BytesIO()
    np.save(pickled, np.array([object()], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="allow_pickle"):
        get_materializer("plait.numpy").load(pickled.getvalue())


# ---- pandas ----


def test_dataframes_round_trip() -> None:
    import pandas as pd
    from pandas.testing import assert_frame_equal

    frames = [
        pd.DataFrame({"a": [1, 2, 3], "b": ["x", "y", "z"], "c": [0.5, None, 2.0]}),
        pd.DataFrame({"a": [1, 2]}, index=pd.Index(["x", "y"], name="key")),
        pd.DataFrame({0: [1], 1: [2]}),  # column names that are not strings
        pd.DataFrame({"t": pd.to_datetime(["2024-01-01", None]).tz_localize("UTC")}),
        pd.DataFrame({"c": pd.Categorical(["p", "q", "p"])}),
        pd.DataFrame(),
    ]
    for df in frames:
        name, back = round_trip(df)
        assert name == "plait.pandas"
        assert_frame_equal(back, df)


@pytest.mark.parametrize("series_name", ["price", None, 5])
def test_series_come_back_as_series_with_their_name(series_name: Any) -> None:
    import pandas as pd
    from pandas.testing import assert_series_equal

    s = pd.Series([1.0, 2.0, None], name=series_name, index=[10, 20, 30])
    name, back = round_trip(s)
    assert name == "plait.pandas"
    assert isinstance(back, pd.Series)
    assert_series_equal(back, s)


def test_pandas_blobs_are_plain_parquet() -> None:
    import pandas as pd
    import pyarrow.parquet as pq

    data = get_materializer("pandas").save(pd.Series([1, 2], name="n"))
    assert pq.read_table(io.BytesIO(data)).column("n").to_pylist() == [1, 2]


def test_pandas_values_parquet_cannot_hold_are_a_type_error_with_advice() -> None:
    import pandas as pd

    df = pd.DataFrame({"a": [object()]})
    m = materializer_for(df)
    with pytest.raises(TypeError, match="pickle"):
        m.save(df)


def test_without_pyarrow_pandas_values_take_the_exact_fallback(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import pandas as pd

    monkeypatch.setattr(_materializers, "_has_pyarrow", lambda: False)
    assert materializer_for(pd.DataFrame({"a": [1]})).name == "plait.pandas_npz"
    assert materializer_for(pd.Series([1.5])).name == "plait.pandas_npz"


# ---- registration, names, pickle ----


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


class ListMaterializer:
    """Claims lists, which plait.json would otherwise take."""

    unsafe = False

    def __init__(self, name: str) -> None:
        self.name = name

    def can_save(self, value: object) -> bool:
        return isinstance(value, list)

    def save(self, value: object) -> bytes:
        return repr(value).encode()

    def load(self, data: bytes) -> object:
        return data


def test_a_registered_materializer_is_used_for_its_type() -> None:
    with pytest.raises(TypeError):
        materializer_for(Point(1, 2))
    register_materializer(PointMaterializer())
    name, back = round_trip(Point(1, 2))
    assert name == "tests.point"
    assert isinstance(back, Point) and (back.x, back.y) == (1, 2)
    assert get_materializer("tests.point").name == "tests.point"
    assert materializer_for(Point(1, 2), "tests.point").name == "tests.point"


def test_registered_materializers_come_before_the_builtins_newest_first() -> None:
    assert materializer_for([1]).name == "plait.json"
    first, second = ListMaterializer("tests.first"), ListMaterializer("tests.second")
    register_materializer(first)
    assert materializer_for([1]) is first
    register_materializer(second)
    assert materializer_for([1]) is second
    again = ListMaterializer("tests.first")
    register_materializer(again)  # the same name again replaces it, and it is now the newest
    assert materializer_for([1]) is again
    assert get_materializer("tests.first") is again
    assert materializer_for({"a": 1}).name == "plait.json"  # not a list: still the built-in


@pytest.mark.parametrize("name", [*BUILTIN_NAMES, "plait.pickle", "json", "pickle", "numpy"])
def test_builtin_names_cannot_be_taken(name: str) -> None:
    with pytest.raises(ValueError, match="built-in"):
        register_materializer(ListMaterializer(name))
    assert get_materializer(name).name.startswith("plait.")


class NoLoad:
    name = "tests.noload"
    unsafe = False

    def can_save(self, value: object) -> bool:
        return False

    def save(self, value: object) -> bytes:
        return b""


class NoUnsafe(PointMaterializer):
    unsafe = None  # type: ignore[assignment]


class EmptyName(PointMaterializer):
    name = ""


@pytest.mark.parametrize(
    ("materializer", "match"),
    [
        (object(), "'can_save'"),
        (NoLoad(), "'load'"),
        (NoUnsafe(), "'unsafe'"),
        (EmptyName(), "name"),
    ],
)
def test_registering_something_that_is_not_a_materializer_fails(
    materializer: Any, match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        register_materializer(materializer)


def test_pickle_is_only_used_by_name_and_is_marked_unsafe() -> None:
    with pytest.raises(TypeError, match="pickle"):
        materializer_for(Point(3, 4))  # never chosen by itself
    name, back = round_trip(Point(3, 4), "pickle")
    assert name == "plait.pickle" and get_materializer(name).unsafe
    assert isinstance(back, Point) and (back.x, back.y) == (3, 4)
    assert round_trip((1, 2), "plait.pickle") == ("plait.pickle", (1, 2))
    assert all(not get_materializer(n).unsafe for n in BUILTIN_NAMES)


@pytest.mark.parametrize("name", [*BUILTIN_NAMES, "plait.pickle"])
def test_short_names_are_aliases_of_the_builtins(name: str) -> None:
    assert get_materializer(name.removeprefix("plait.")) is get_materializer(name)
    assert get_materializer(name).name == name


def test_a_requested_materializer_that_cannot_store_the_value_is_a_type_error() -> None:
    with pytest.raises(TypeError) as info:
        materializer_for("text", "numpy")
    assert "'plait.numpy'" in str(info.value) and "builtins.str" in str(info.value)
    with pytest.raises(TypeError, match=r"builtins\.tuple"):
        materializer_for((1, 2), "json")


def test_an_unknown_name_is_a_lookup_error_that_says_what_to_do() -> None:
    register_materializer(PointMaterializer())
    with pytest.raises(LookupError) as info:
        get_materializer("tests.nope")
    message = str(info.value)
    assert "'tests.nope'" in message and "plait.json" in message and "tests.point" in message
    assert "register_materializer" in message and "module that defines the step" in message
    with pytest.raises(LookupError):
        materializer_for(1, "tests.nope")


def test_type_names() -> None:
    import numpy as np

    assert type_name(1) == "builtins.int"
    assert type_name(Point(0, 0)) == f"{__name__}.Point"
    assert type_name(np.zeros(1)) == "numpy.ndarray"


def test_plait_exports_the_registration() -> None:
    assert plait.register_materializer is register_materializer
    assert plait.Materializer is _materializers.Materializer


# ---- import cost ----


def test_importing_and_using_materializers_for_builtins_loads_no_numpy_or_pandas() -> None:
    code = (
        "import sys\n"
        "import plait._materializers as m\n"
        "for v in (b'', 's', [1], {'a': None}, (1,), object()):\n"
        "    try:\n"
        "        m.materializer_for(v)\n"
        "    except TypeError:\n"
        "        pass\n"
        "heavy = {'numpy', 'pandas', 'pyarrow'}\n"
        "loaded = sorted(n for n in sys.modules if n.split('.')[0] in heavy)\n"
        "assert not loaded, loaded\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    subprocess.run([sys.executable, "-c", code], check=True, env=env)
