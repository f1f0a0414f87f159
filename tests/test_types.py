"""Everyday types: numpy scalars, tuples, NaN and pandas objects are stored exactly, a return
type nothing stores fails when the pipeline is traced, and a plain tuple unpacked says why."""

from __future__ import annotations

import io
import math
import os
import struct
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import pandas as pd
import processes
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from pandas.testing import assert_frame_equal, assert_series_equal

import plait
from plait import _materializers
from plait._materializers import get_materializer, materializer_for, type_problem
from plait._types import conform

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "everyday_types.py"


@pytest.fixture(autouse=True)
def _no_user_materializers() -> Iterator[None]:
    """No materializer of another test's is registered (it would let any type pass)."""
    saved = dict(_materializers._USER)
    _materializers._USER.clear()
    yield
    _materializers._USER.clear()
    _materializers._USER.update(saved)


def round_trip(value: Any) -> tuple[str, Any]:
    m = materializer_for(value)
    return m.name, m.load(m.save(value))


def same(a: Any, b: Any) -> bool:
    """Equal, with the same types all the way down, and floats equal bit for bit (NaN too)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        return struct.pack(">d", a) == struct.pack(">d", b)
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        return list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    return bool(a == b)


# ---- builtins JSON cannot hold: plait.pyjson ----

hashables = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=5),
    lambda inner: st.tuples(inner, inner) | st.frozensets(inner, max_size=3),
    max_leaves=6,
)
values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**40), max_value=10**40)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=5),
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.lists(inner, max_size=3).map(tuple)
        | st.dictionaries(hashables, inner, max_size=3)
        | st.sets(hashables, max_size=3)
    ),
    max_leaves=12,
)


@given(values)
def test_builtins_round_trip_exactly_tuples_nan_and_other_keys_included(value: Any) -> None:
    name, back = round_trip(value)
    assert name in ("plait.str", "plait.json", "plait.pyjson")
    if isinstance(value, set):
        assert type(back) is set and back == value
    else:
        assert same(back, value), (value, back)


@given(st.floats(allow_nan=True, allow_infinity=True))
def test_every_float_is_kept_bit_for_bit_nan_payloads_and_signs_included(x: float) -> None:
    name, back = round_trip(x)
    assert name == ("plait.json" if math.isfinite(x) else "plait.pyjson")
    assert struct.pack(">d", back) == struct.pack(">d", x)


def test_equal_sets_store_the_same_bytes_whatever_their_order() -> None:
    m = get_materializer("pyjson")
    a, b = {"x", "y", (1, 2), 3}, {3, (1, 2), "y", "x"}
    assert m.save(a) == m.save(b)
    assert m.save((1, 2)) == b'{"pyjson":1,"value":{"tuple":[1,2]}}'


@pytest.mark.parametrize(
    "value",
    [(1, object()), {1: complex(1, 2)}, [np.float64(1.0)], (10**5000,)],
    ids=["object", "complex", "numpy-in-a-list", "huge-int"],
)
def test_what_pyjson_cannot_hold_exactly_is_refused(value: Any) -> None:
    with pytest.raises(TypeError, match="register_materializer"):
        materializer_for(value)


# ---- numpy scalars ----


@given(hnp.arrays(hnp.scalar_dtypes(), ()))
def test_numpy_scalars_round_trip_bit_for_bit_as_numpy_scalars(a: Any) -> None:
    scalar = a[()]
    name, back = round_trip(scalar)
    assert name == "plait.numpy_scalar"
    assert type(back) is type(scalar) and back.dtype == scalar.dtype
    assert np.asarray(back).tobytes() == np.asarray(scalar).tobytes()


@given(hnp.from_dtype(np.dtype("f8")) | hnp.from_dtype(np.dtype("f4")))
def test_a_numpy_float_declared_float_is_stored_as_its_exact_float(scalar: Any) -> None:
    value = conform(scalar, "float")
    assert type(value) is float
    assert value == float(scalar) or (math.isnan(value) and math.isnan(scalar))
    _, back = round_trip(value)
    assert struct.pack(">d", back) == struct.pack(">d", value)


@given(
    st.one_of(
        st.integers(np.iinfo(np.int64).min, np.iinfo(np.int64).max).map(np.int64),
        st.integers(0, np.iinfo(np.uint64).max).map(np.uint64),
        st.integers(-128, 127).map(np.int8),
    )
)
def test_a_numpy_int_declared_int_is_stored_as_its_int(scalar: Any) -> None:
    value = conform(scalar, "int")
    assert type(value) is int and value == int(scalar)
    assert round_trip(value) == ("plait.json", value)


def test_declared_types_convert_numpy_items_and_leave_the_rest() -> None:
    assert conform(np.bool_(True), "bool") is True
    assert same(conform((np.int64(1), np.float64(2.5)), "tuple[int, float]"), (1, 2.5))
    assert same(conform([np.float64(1.0)], "list[float]"), [1.0])
    assert same(conform({"n": np.int64(3)}, "dict[str, int]"), {"n": 3})
    assert same(conform((np.int64(1), np.int64(2)), "tuple[int, ...]"), (1, 2))
    assert same(conform(np.float64(0.5), "float | None"), 0.5)
    kept = np.float64(0.5)
    assert conform(kept, "numpy.float64") is kept and conform(kept, "Any") is kept
    third = np.longdouble(1) / 3
    if np.finfo(np.longdouble).nmant > 52:  # more bits than a float: not converted
        assert conform(third, "float") is third
    pair = (1, 2)
    assert conform(pair, "tuple[int, int]") is pair  # nothing changed, nothing copied


# ---- pandas without pyarrow: plait.pandas_npz ----

FRAMES = {
    "mixed": pd.DataFrame({"a": [1, 2, 3], "b": ["x", "y", "z"], "c": [0.5, None, 2.0]}),
    "named-index": pd.DataFrame({"a": [1, 2]}, index=pd.Index(["x", "y"], name="key")),
    "int-labels": pd.DataFrame({0: [1], 1: [2]}),
    "tz": pd.DataFrame({"t": pd.to_datetime(["2024-01-01", None]).tz_localize("Europe/Paris")}),
    "category": pd.DataFrame({"c": pd.Categorical(["p", "q", "p"], ordered=True)}),
    "empty": pd.DataFrame(),
    "nullable": pd.DataFrame(
        {
            "i": pd.array([1, None], dtype="Int64"),
            "b": pd.array([True, None], dtype="boolean"),
            "f": pd.array([1.5, None], dtype="Float32"),
        }
    ),
    "objects-and-strings": pd.DataFrame(
        {
            "o": pd.Series(["x", None, 1.5, (1, 2)], dtype=object),
            "s": pd.array(["a", None, "c", "d"], dtype="string"),
        }
    ),
    "duplicate-labels": pd.DataFrame([[1, 2]], columns=["a", "a"]),
    "multi-index": pd.DataFrame(
        {"x": [1.0, 2.0]},
        index=pd.MultiIndex.from_tuples([(1, "a"), (2, "b")], names=["n", None]),
    ),
    "date-range": pd.DataFrame(
        {"x": [1, 2, 3]}, index=pd.date_range("2024-01-01", periods=3, freq="D")
    ),
    "narrow-dtypes": pd.DataFrame(
        {
            "td": pd.to_timedelta([1, 2], unit="s"),
            "f16": np.array([1, np.nan], dtype=np.float16),
            "u8": np.array([1, 255], dtype=np.uint8),
            "c": np.array([1 + 2j, -0.0], dtype=np.complex128),
        }
    ),
    "tuple-labels": pd.DataFrame({("a", 1): [1], ("b", 2): [2]}),
}


@pytest.mark.parametrize("name", FRAMES)
def test_frames_round_trip_exactly_without_pyarrow(name: str) -> None:
    df = FRAMES[name]
    m = get_materializer("plait.pandas_npz")
    data = m.save(df)
    back = m.load(data)
    assert isinstance(back, pd.DataFrame)
    assert_frame_equal(back, df, check_exact=True, check_index_type=True, check_column_type=True)
    assert back.equals(df)
    assert m.save(back) == data  # the same frame, the same bytes: one digest


@pytest.mark.parametrize("label", ["price", None, 5, ("a", 1)])
def test_series_round_trip_exactly_without_pyarrow(label: Any) -> None:
    s = pd.Series([1.0, np.nan, -0.0], name=label, index=[10, 20, 30])
    m = get_materializer("pandas_npz")
    back = m.load(m.save(s))
    assert isinstance(back, pd.Series)
    assert_series_equal(back, s, check_exact=True, check_index_type=True)
    assert back.name == label


def test_the_npz_archive_is_npy_files_and_a_manifest_and_refuses_pickles() -> None:
    data = get_materializer("pandas_npz").save(pd.DataFrame({"a": [1, 2]}))
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        assert archive.namelist() == ["manifest.json", "0.npy"]
        assert np.load(io.BytesIO(archive.read("0.npy"))).tolist() == [1, 2]


@pytest.mark.parametrize(
    "df",
    [
        pd.DataFrame({"p": pd.period_range("2024-01", periods=2, freq="M")}),
        pd.DataFrame({"o": pd.Series([object()], dtype=object)}),
    ],
    ids=["period", "object"],
)
def test_what_the_fallback_cannot_hold_is_a_type_error_with_advice(df: pd.DataFrame) -> None:
    with pytest.raises(TypeError, match="pyarrow") as info:
        get_materializer("pandas_npz").save(df)
    assert 'materializer="pickle"' in str(info.value)


NO_PYARROW = 'import sys; sys.modules["pyarrow"] = None  # a Python without pyarrow\n'
"""A sitecustomize that makes `import pyarrow` fail (pandas then works without it), in
every process started with it on PYTHONPATH: the client, the daemon and their workers."""


@pytest.fixture
def no_pyarrow(tmp_path: Path) -> dict[str, str]:
    """An environment whose Python cannot import pyarrow (simulated: see NO_PYARROW)."""
    site = tmp_path / "no_pyarrow"
    site.mkdir()
    (site / "sitecustomize.py").write_text(NO_PYARROW)
    path = os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH", "")) if p)
    return {"PYTHONPATH": path}


def test_without_pyarrow_a_frame_is_stored_with_pandas_alone(no_pyarrow: dict[str, str]) -> None:
    code = (
        "import pandas as pd\n"
        "from plait._materializers import materializer_for\n"
        "import importlib.util\n"
        "assert importlib.util.find_spec('pyarrow') is None\n"
        "df = pd.DataFrame({'a': [1.5, None], 'b': ['x', None]})\n"
        "m = materializer_for(df)\n"
        "assert m.name == 'plait.pandas_npz', m.name\n"
        "pd.testing.assert_frame_equal(m.load(m.save(df)), df, check_exact=True)\n"
        "print('ok')\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, **no_pyarrow},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0 and out.stdout == "ok\n", out.stderr


def test_with_pyarrow_a_frame_is_parquet() -> None:
    assert materializer_for(pd.DataFrame({"a": [1]})).name == "plait.pandas"


# ---- a return type nothing stores: refused when the pipeline is traced ----


class Point:
    def __init__(self, x: int) -> None:
        self.x = x


class PointMaterializer:
    name = "tests.point"
    unsafe = False

    def can_save(self, value: object) -> bool:
        return isinstance(value, Point)

    def save(self, value: object) -> bytes:
        assert isinstance(value, Point)
        return str(value.x).encode()

    def load(self, data: bytes) -> object:
        return Point(int(data))


@plait.step
def first(marker: str) -> int:
    Path(marker).write_text("ran")
    return 1


@plait.step
def make_point(x: int) -> Point:
    return Point(x)


@plait.step
def arrays() -> tuple[np.ndarray, int]:
    return np.zeros(2), 2


@plait.step
def points() -> list[Point] | None:
    return None


@plait.pipeline
def with_point(marker: str = "") -> None:
    make_point(first(marker))


@plait.pipeline
def with_arrays() -> None:
    arrays()


@plait.pipeline
def with_points() -> None:
    points()


def test_a_return_type_without_a_materializer_fails_before_any_step_runs(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    with pytest.raises(plait.PipelineDefinitionError) as info:
        with_point(marker=str(marker))
    message = str(info.value)
    assert "step 'make_point'" in message and "test_types.Point" in message
    assert "register_materializer" in message and 'materializer="pickle"' in message
    assert not marker.exists()  # nothing ran: the error came while tracing


def test_items_of_containers_and_unions_are_checked_and_a_tuple_hints_at_names() -> None:
    with pytest.raises(plait.PipelineDefinitionError, match=r"numpy\.ndarray") as info:
        with_arrays.compile()
    assert 'Annotated[numpy.ndarray, "x"]' in str(info.value)
    with pytest.raises(plait.PipelineDefinitionError, match=r"test_types\.Point"):
        with_points.compile()


def test_a_registered_materializer_or_pickle_lets_the_type_through() -> None:
    plait.register_materializer(PointMaterializer())
    with_point.compile()  # compiles: the user's materializer may store it
    _materializers._USER.clear()
    plait.pipeline(lambda: make_point.with_options(materializer="pickle")(1))


@pytest.mark.parametrize(
    ("tp", "problem"),
    [
        (int, None),
        (Any, None),
        (tuple[int, ...], None),
        (dict[tuple[int, int], set[str]], None),
        (np.float32, None),
        (np.ndarray, None),
        (pd.DataFrame, None),
        (Annotated[float, "mean"], None),
        (complex, "complex"),
        (list[complex], "complex"),
        (int | Point, "test_types.Point"),
        (np.ma.MaskedArray, "numpy.ma.MaskedArray"),
        (list[pd.DataFrame], "pandas.DataFrame"),
    ],
)
def test_type_problem(tp: Any, problem: str | None) -> None:
    assert type_problem(tp) == problem


# ---- a plain tuple unpacked ----


@plait.step
def pair() -> tuple[int, int]:
    return 1, 2


@plait.step
def named_pair() -> tuple[Annotated[int, "a"], Annotated[int, "b"]]:
    return 1, 2


@plait.step
def add(a: int, b: int) -> int:
    return a + b


def test_unpacking_a_plain_tuple_says_to_name_the_items() -> None:
    @plait.pipeline
    def unpacks() -> None:
        a, b = pair()
        add(a, b)

    with pytest.raises(plait.PipelineValidationError) as info:
        unpacks.compile()
    message = str(info.value)
    assert "tuple[int, int]" in message and 'Annotated[int, "a"]' in message
    assert "step 'pair'" in message


# ---- end to end: embedded, and through the daemon ----


@plait.step
def mean() -> float:
    return np.arange(4).mean()  # numpy.float64


@plait.step
def total() -> int:
    return np.arange(4).sum()  # numpy.int64


@plait.step
def big() -> int:
    return np.uint64(2**64 - 1)


@plait.step
def flag() -> bool:
    return np.bool_(True)


@plait.step
def single() -> np.float32:
    return np.float32(0.1)


@plait.step
def bad_mean() -> float:
    return np.array([np.nan]).mean()


@plait.step
def shape() -> tuple[int, int]:
    return np.zeros((2, 3)).shape  # a tuple of ints


@plait.step
def nested() -> tuple[tuple[int, ...], list[tuple[str, float]]]:
    return (np.int64(1), 2, 3), [("a", np.float64(0.5))]


@plait.step
def area(size: tuple[int, int]) -> int:
    assert type(size) is tuple
    return size[0] * size[1]


@plait.pipeline
def everyday_types() -> None:
    mean()
    total()
    big()
    flag()
    single()
    bad_mean()
    area(shape())
    nested()
    named_pair()


def test_numpy_scalars_and_tuples_through_the_embedded_engine() -> None:
    run = everyday_types()
    assert run.status == "SUCCEEDED", {s: r.error for s, r in run.steps.items() if r.error}
    out = {s: r.output() for s, r in run.steps.items() if len(r.outputs) == 1}
    assert same(out["mean"], 1.5) and same(out["total"], 6) and out["flag"] is True
    assert same(out["big"], 2**64 - 1)
    assert type(out["single"]) is np.float32 and out["single"] == np.float32(0.1)
    assert type(out["bad_mean"]) is float and math.isnan(out["bad_mean"])
    assert same(out["shape"], (2, 3)) and out["area"] == 6
    assert same(out["nested"], ((1, 2, 3), [("a", 0.5)]))
    assert run.steps["named_pair"].output("b") == 2
    stored = {s: r.outputs["output"].materializer for s, r in run.steps.items() if s in out}
    assert stored["shape"] == "plait.pyjson" and stored["mean"] == "plait.json"
    assert stored["single"] == "plait.numpy_scalar" and stored["bad_mean"] == "plait.pyjson"


def run_example(env: dict[str, str], tmp_path: Path) -> str:
    env = {"PLAIT_HOME": str(tmp_path / "home"), "PLAIT_WORKERS": "2", **env}
    full = {**os.environ, **env}
    if "PLAIT_SERVER" not in env:
        full.pop("PLAIT_SERVER", None)
    out = processes.run([sys.executable, EXAMPLE], env=full, cwd=tmp_path, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


def test_the_example_without_pyarrow_embedded(no_pyarrow: dict[str, str], tmp_path: Path) -> None:
    assert "frame as plait.pandas_npz" in run_example(no_pyarrow, tmp_path)


@pytest.mark.parametrize("pyarrow", [True, False], ids=["pyarrow", "no-pyarrow"])
def test_the_example_through_the_daemon(
    pyarrow: bool, no_pyarrow: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from test_security import Daemon

    if not pyarrow:  # the daemon's workers too
        monkeypatch.setenv("PYTHONPATH", no_pyarrow["PYTHONPATH"])
    daemon = Daemon(tmp_path / "daemon")
    try:
        stdout = run_example(daemon.client_env(), tmp_path)
    finally:
        daemon.stop()
    assert f"frame as plait.pandas{'' if pyarrow else '_npz'}" in stdout
