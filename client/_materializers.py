"""Materializers: how step outputs become bytes and back.

A materializer is chosen by the value's type when a step returns, and its name is stored with
the artifact, so the same materializer reads it back. Built in, in the order they are tried
(after any registered by the user, newest first):

========================  ==================================================================
``plait.bytes``           ``bytes``, ``bytearray``: as they are (read back as ``bytes``)
``plait.str``             ``str``: UTF-8
``plait.json``            JSON-able builtins whose JSON round trip is exact: None, bool, int,
                          finite float, str, list, dict with str keys
``plait.pyjson``          the builtins JSON cannot hold exactly: tuples, NaN and infinities,
                          dicts with other keys, sets and frozensets (any nesting of them and
                          of the JSON types): JSON with those types tagged, no pickle
``plait.numpy``           ``numpy.ndarray`` without Python objects in it: ``.npy``, no pickle
``plait.numpy_scalar``    a numpy scalar (``numpy.float32(1.5)``) without Python objects in it:
                          a 0-d ``.npy``, read back as the same numpy scalar
``plait.pandas``          ``pandas.DataFrame`` and ``Series``: parquet (when pyarrow imports)
``plait.pandas_npz``      ``pandas.DataFrame`` and ``Series`` without pyarrow: a zip of ``.npy``
                          arrays and a JSON manifest, exact for the dtypes it takes (see
                          :class:`PandasNpzMaterializer`)
``plait.pickle``          anything picklable; never chosen by itself, only by name, and its
                          artifacts are marked unsafe (loading one runs code)
========================  ==================================================================

A built-in's name without the ``plait.`` prefix names it too (``"pickle"``, ``"json"`` …).
numpy, pandas and pyarrow are imported only when such a value is saved or loaded: a worker
that never sees one never pays for importing them.
"""

from __future__ import annotations

import importlib.util
import io
import json
import math
import pickle
import struct
import sys
import types
import typing
import zipfile
from collections.abc import Callable
from typing import Any, Protocol

__all__ = [
    "Materializer",
    "get_materializer",
    "materializer_for",
    "register_materializer",
    "type_name",
    "type_problem",
]


class Materializer(Protocol):
    """Turns values of some types into bytes and back.

    Any object with these attributes will do; it need not inherit from this class. Register one
    with :func:`plait.register_materializer` in the module that defines the steps using it, so
    that every process that imports those steps (workers included) registers it too.
    """

    name: str
    """A unique name, stored with every artifact it writes."""
    unsafe: bool
    """True when :meth:`load` can run arbitrary code (pickle)."""

    def can_save(self, value: object) -> bool:
        """Whether this materializer handles ``value``."""
        ...

    def save(self, value: object) -> bytes:
        """The bytes to store for ``value``."""
        ...

    def load(self, data: bytes) -> object:
        """The value back from its bytes."""
        ...


def _top_module(value: object) -> str:
    # the type's module tells numpy and pandas values apart without importing either
    return type(value).__module__.partition(".")[0]


_BYTES = (bytes, bytearray)


class BytesMaterializer:
    """``bytes`` and ``bytearray``, stored as they are; both read back as ``bytes``."""

    name = "plait.bytes"
    unsafe = False

    def can_save(self, value: object) -> bool:
        return isinstance(value, _BYTES)

    def save(self, value: object) -> bytes:
        if not isinstance(value, _BYTES):
            raise TypeError(f"{self.name} cannot store a {type_name(value)}")
        return bytes(value)

    def load(self, data: bytes) -> object:
        return bytes(data)


class StrMaterializer:
    """``str`` as UTF-8.

    A string with lone surrogates (not valid Unicode, but a legal Python ``str``) is kept
    exactly with the ``surrogatepass`` error handler; every other string is plain UTF-8.
    """

    name = "plait.str"
    unsafe = False

    def can_save(self, value: object) -> bool:
        return isinstance(value, str)

    def save(self, value: object) -> bytes:
        if not isinstance(value, str):
            raise TypeError(f"{self.name} cannot store a {type_name(value)}")
        return value.encode("utf-8", "surrogatepass")

    def load(self, data: bytes) -> object:
        return data.decode("utf-8", "surrogatepass")


_MAX_JSON_DEPTH = 200  # well inside json's and the interpreter's recursion limits


def _int_fits_json(value: int) -> bool:
    # Python refuses to turn an int of more than sys.get_int_max_str_digits() digits into
    # text (and back), so json.dumps would fail on it; only huge ints pay for the exact check
    limit = sys.get_int_max_str_digits()
    if not limit or value.bit_length() * 0.30103 < limit - 1:
        return True
    try:
        str(value)
    except ValueError:
        return False
    return True


def _exact_json(value: object, depth: int = 0) -> bool:
    """Whether ``json.loads(json.dumps(value)) == value`` with the same types throughout."""
    if depth > _MAX_JSON_DEPTH:  # also ends the walk over a list that contains itself
        return False
    t = type(value)  # exact types: a subclass (an IntEnum, numpy.float64) would come back plain
    if value is None or t is bool or t is str:
        return True
    if t is int:
        assert isinstance(value, int)
        return _int_fits_json(value)
    if t is float:
        assert isinstance(value, float)
        return math.isfinite(value)
    if t is list:
        assert isinstance(value, list)
        return all(_exact_json(v, depth + 1) for v in value)
    if t is dict:
        assert isinstance(value, dict)
        return all(type(k) is str and _exact_json(v, depth + 1) for k, v in value.items())
    return False


# what json.dumps(value, **these options) would make anew on every call
_JSON_ENCODER = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False)
_JSON_ASCII_ENCODER = json.JSONEncoder(ensure_ascii=True, separators=(",", ":"))


class JsonMaterializer:
    """JSON-able builtins whose round trip through JSON is exact, as compact UTF-8 JSON."""

    name = "plait.json"
    unsafe = False

    def can_save(self, value: object) -> bool:
        return _exact_json(value)

    def save(self, value: object) -> bytes:
        # no second walk over the value: materializer_for() checked can_save() already
        text = _JSON_ENCODER.encode(value)
        try:
            return text.encode()
        except UnicodeEncodeError:
            # lone surrogates: JSON's \ud800 escapes keep them, and the text stays standard
            return _JSON_ASCII_ENCODER.encode(value).encode()

    def load(self, data: bytes) -> object:
        return json.loads(data)


_PYJSON_VERSION = 1
_CANONICAL_NAN = struct.pack(">d", math.nan)


class _NotExact(Exception):
    """A value (or part of one) `plait.pyjson` cannot hold exactly."""


def _pyjson_encode(value: object, depth: int = 0) -> object:
    """``value`` as JSON-able data in which tuples, sets, non-str dict keys and non-finite
    floats are tagged; every dict of the input becomes ``{"dict": [[key, value], ...]}``, so a
    JSON object in the output is always a tag."""
    if depth > _MAX_JSON_DEPTH:
        raise _NotExact("nested too deeply")
    t = type(value)
    if value is None or t is bool or t is str:
        return value
    if t is int:
        assert isinstance(value, int)
        if not _int_fits_json(value):
            raise _NotExact("an int with too many digits")
        return value
    if t is float:
        assert isinstance(value, float)
        if math.isfinite(value):
            return value
        if not math.isnan(value):
            return {"float": "inf" if value > 0 else "-inf"}
        bits = struct.pack(">d", value)  # a NaN's sign and payload are kept too
        return {"float": "nan"} if bits == _CANONICAL_NAN else {"float": "nan", "bits": bits.hex()}
    if t is list:
        assert isinstance(value, list)
        return [_pyjson_encode(v, depth + 1) for v in value]
    if t is tuple:
        assert isinstance(value, tuple)
        return {"tuple": [_pyjson_encode(v, depth + 1) for v in value]}
    if t is dict:
        assert isinstance(value, dict)
        return {
            "dict": [
                [_pyjson_encode(k, depth + 1), _pyjson_encode(v, depth + 1)]
                for k, v in value.items()
            ]
        }
    if t is set or t is frozenset:
        assert isinstance(value, set | frozenset)
        items = [_pyjson_encode(v, depth + 1) for v in value]
        # sorted by their text: equal sets give equal bytes (and one digest) in any process
        items.sort(key=lambda item: json.dumps(item, sort_keys=True, ensure_ascii=True))
        return {t.__name__: items}
    raise _NotExact(f"a {type_name(value)}")


def _pyjson_decode(data: object) -> object:
    if isinstance(data, list):
        return [_pyjson_decode(v) for v in data]
    if not isinstance(data, dict):
        return data
    ((tag, payload),) = ((k, v) for k, v in data.items() if k != "bits")
    if tag == "tuple":
        return tuple(_pyjson_decode(v) for v in payload)
    if tag == "dict":
        return {_pyjson_decode(k): _pyjson_decode(v) for k, v in payload}
    if tag == "set":
        return {_pyjson_decode(v) for v in payload}
    if tag == "frozenset":
        return frozenset(_pyjson_decode(v) for v in payload)
    if tag == "float":
        if "bits" in data:
            value: float = struct.unpack(">d", bytes.fromhex(data["bits"]))[0]
            return value
        return float(payload)
    raise ValueError(f"plait.pyjson: unknown tag {tag!r}")


def _pyjson_dumps(value: object) -> bytes:
    encoded = {"pyjson": _PYJSON_VERSION, "value": _pyjson_encode(value)}
    text = json.dumps(encoded, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    try:
        return text.encode()
    except UnicodeEncodeError:  # lone surrogates: as in plait.json
        return json.dumps(encoded, ensure_ascii=True, separators=(",", ":")).encode()


class PyJsonMaterializer:
    """Builtins that JSON cannot hold exactly, as JSON with their types tagged.

    Tuples (``tuple[int, int]`` outputs), NaN and the infinities, dicts with keys other than
    str (``{1: "a"}``, ``{(0, 1): 2.5}``), sets and frozensets, in any nesting of them and of
    the JSON types, come back with the same types and values: a NaN with its sign and payload,
    a dict in its order. Exact types only: a ``NamedTuple`` or an ``IntEnum`` would come back
    plain, so they are refused. The text is ``{"pyjson": 1, "value": ...}``, where every JSON
    object inside ``value`` is a tag: ``{"tuple": [...]}``, ``{"dict": [[key, value], ...]}``,
    ``{"set": [...]}`` (items sorted by their JSON text, so equal sets store equal bytes),
    ``{"frozenset": [...]}``, ``{"float": "nan" | "inf" | "-inf"}`` (a NaN other than
    Python's own adds ``"bits"``: its 8 bytes in hex, big-endian).
    """

    name = "plait.pyjson"
    unsafe = False

    def can_save(self, value: object) -> bool:
        try:
            _pyjson_encode(value)
        except (_NotExact, RecursionError):
            return False
        return True

    def save(self, value: object) -> bytes:
        try:
            return _pyjson_dumps(value)
        except (_NotExact, RecursionError) as exc:
            raise TypeError(f"{self.name} cannot store this {type_name(value)}: {exc}") from None

    def load(self, data: bytes) -> object:
        document = json.loads(data)
        if not isinstance(document, dict) or document.get("pyjson") != _PYJSON_VERSION:
            raise ValueError("not a plait.pyjson document (version 1)")
        return _pyjson_decode(document["value"])


class NumpyMaterializer:
    """``numpy.ndarray`` as ``.npy``, never pickled; arrays holding Python objects are refused.

    Only plain arrays (and memory maps, read back as plain arrays): a subclass such as a
    masked array would lose what makes it one.
    """

    name = "plait.numpy"
    unsafe = False

    def can_save(self, value: object) -> bool:
        if _top_module(value) != "numpy":
            return False
        import numpy as np

        if type(value) not in (np.ndarray, np.memmap):
            return False
        assert isinstance(value, np.ndarray)
        return not value.dtype.hasobject  # object fields too, not only dtype=object

    def save(self, value: object) -> bytes:
        if not self.can_save(value):
            raise TypeError(f"{self.name} cannot store a {type_name(value)}")
        import numpy as np

        assert isinstance(value, np.ndarray)
        buf = io.BytesIO()
        np.save(buf, value, allow_pickle=False)
        return buf.getvalue()

    def load(self, data: bytes) -> object:
        import numpy as np

        return np.load(io.BytesIO(data), allow_pickle=False)


class NumpyScalarMaterializer:
    """A numpy scalar (``numpy.float32(1.5)``, ``numpy.int64(7)``, ``numpy.datetime64(...)``)
    as a 0-d ``.npy``, read back as the same numpy scalar, bit for bit; never pickled.

    A step declared ``-> float``, ``-> int`` or ``-> bool`` that returns a numpy scalar stores
    the Python value instead (the worker converts it when that is exact); this one keeps the
    numpy type for outputs declared as numpy scalars or not at all.
    """

    name = "plait.numpy_scalar"
    unsafe = False

    def can_save(self, value: object) -> bool:
        if _top_module(value) != "numpy":
            return False
        import numpy as np

        return isinstance(value, np.generic) and not np.asarray(value).dtype.hasobject

    def save(self, value: object) -> bytes:
        if not self.can_save(value):
            raise TypeError(f"{self.name} cannot store a {type_name(value)}")
        import numpy as np

        buf = io.BytesIO()
        np.save(buf, np.asarray(value), allow_pickle=False)
        return buf.getvalue()

    def load(self, data: bytes) -> object:
        import numpy as np

        array = np.load(io.BytesIO(data), allow_pickle=False)
        if array.shape != ():
            raise ValueError(f"{self.name}: the array has shape {array.shape}, not ()")
        return array[()]


_PANDAS_KEY = b"plait.pandas"
"""Parquet schema metadata that says whether the file holds a DataFrame or a Series."""


class PandasMaterializer:
    """``pandas.DataFrame`` and ``Series`` as parquet (with pyarrow).

    The file is plain parquet that any parquet reader opens; a Series is stored as a one-column
    table with a marker in the schema metadata (key ``plait.pandas``), so that it comes back as a
    Series with its name. ``DataFrame.attrs`` are not kept.
    """

    name = "plait.pandas"
    unsafe = False

    def can_save(self, value: object) -> bool:
        if _top_module(value) != "pandas" or not _has_pyarrow():
            return False
        import pandas as pd

        return isinstance(value, pd.DataFrame | pd.Series)

    def save(self, value: object) -> bytes:
        if not self.can_save(value):
            raise TypeError(f"{self.name} cannot store a {type_name(value)}")
        import pandas as pd
        import pyarrow as pa
        import pyarrow.parquet as pq

        if isinstance(value, pd.Series):
            frame = value.to_frame()  # an unnamed Series becomes column 0
            marker = {"kind": "series", "unnamed": value.name is None}
        else:
            frame = value
            marker = {"kind": "frame"}
        try:
            table = pa.Table.from_pandas(frame)
        except pa.ArrowException as exc:  # e.g. a column of arbitrary Python objects
            raise TypeError(
                f"{self.name} cannot store this {type_name(value)} as parquet ({exc}); "
                f'convert the columns, or use @plait.step(materializer="pickle") (unsafe)'
            ) from exc
        metadata = dict(table.schema.metadata or {})
        metadata[_PANDAS_KEY] = json.dumps(marker).encode()
        buf = io.BytesIO()
        pq.write_table(table.replace_schema_metadata(metadata), buf)
        return buf.getvalue()

    def load(self, data: bytes) -> object:
        import pandas as pd
        import pyarrow.parquet as pq

        # pandas does the arrow-to-pandas conversion (dtypes as pandas reads parquet itself);
        # the marker is in the footer, which read_schema reads without the data
        frame = pd.read_parquet(io.BytesIO(data), engine="pyarrow")
        metadata = pq.read_schema(io.BytesIO(data)).metadata or {}
        marker = json.loads(metadata.get(_PANDAS_KEY, b'{"kind": "frame"}'))
        if marker.get("kind") != "series":
            return frame
        series = frame.iloc[:, 0]
        if marker.get("unnamed"):
            series.name = None
        return series


_NPZ_MANIFEST = "manifest.json"
_ZIP_TIME = (1980, 1, 1, 0, 0, 0)  # fixed: the same frame gives the same bytes (one digest)


class PandasNpzMaterializer:
    """``pandas.DataFrame`` and ``Series`` with pandas and numpy alone, for a Python without
    pyarrow: a zip of ``.npy`` arrays (``0.npy``, ``1.npy`` …, never pickled) and a
    ``manifest.json`` that says how they make the frame.

    Exact, dtype for dtype (``DataFrame.equals`` and ``assert_frame_equal(check_exact=True,
    check_index_type=True, check_column_type=True)`` hold): numpy dtypes (ints, uints,
    floats with their NaN payloads, complex, bool, ``datetime64`` and ``timedelta64`` in
    their unit); the nullable ``Int*``/``UInt*``/``Float*``/``boolean`` dtypes with their
    missing values; ``category`` (categories, codes, ordered); ``datetime64[unit, tz]``
    (instants and the zone's name); the ``str``/``string`` dtypes (storage and missing value
    marker); ``object`` columns whose values ``plait.pyjson`` stores (str, None, int, float
    with NaN, bool, tuples …). The row index and the column labels are kept the same way,
    ``RangeIndex``, ``MultiIndex``, names and a ``DatetimeIndex``'s ``freq`` included, and so
    are duplicate column labels and a Series' name. Not kept: ``DataFrame.attrs`` and
    ``flags`` (parquet keeps neither). Other dtypes (``Period``, ``Interval``, sparse, arrow)
    and object columns of other values are refused with a TypeError.
    """

    name = "plait.pandas_npz"
    unsafe = False

    def can_save(self, value: object) -> bool:
        if _top_module(value) != "pandas":
            return False
        import pandas as pd

        return isinstance(value, pd.DataFrame | pd.Series)

    def save(self, value: object) -> bytes:
        if not self.can_save(value):
            raise TypeError(f"{self.name} cannot store a {type_name(value)}")
        import pandas as pd

        arrays: list[Any] = []
        try:
            if isinstance(value, pd.Series):
                manifest: dict[str, Any] = {
                    "kind": "series",
                    "name": _pyjson_encode(value.name),
                    "index": _npz_index(value.index, arrays),
                    "data": _npz_values(value.array, arrays),
                }
            else:
                assert isinstance(value, pd.DataFrame)
                manifest = {
                    "kind": "frame",
                    "index": _npz_index(value.index, arrays),
                    "columns": _npz_index(value.columns, arrays),
                    "data": [
                        _npz_values(value.iloc[:, i].array, arrays) for i in range(value.shape[1])
                    ],
                }
        except _NotExact as exc:
            raise TypeError(
                f"{self.name} cannot store this {type_name(value)}: {exc}. Install pyarrow "
                f"(plait[pandas]) to store it as parquet, convert the column, or use "
                f'@plait.step(materializer="pickle") (unsafe)'
            ) from None
        manifest["pandas_npz"] = 1
        import numpy as np

        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as archive:
            text = json.dumps(manifest, ensure_ascii=True, separators=(",", ":"))
            archive.writestr(zipfile.ZipInfo(_NPZ_MANIFEST, _ZIP_TIME), text)
            for i, array in enumerate(arrays):
                npy = io.BytesIO()
                np.save(npy, array, allow_pickle=False)
                archive.writestr(zipfile.ZipInfo(f"{i}.npy", _ZIP_TIME), npy.getvalue())
        return buf.getvalue()

    def load(self, data: bytes) -> object:
        import numpy as np
        import pandas as pd

        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            manifest = json.loads(archive.read(_NPZ_MANIFEST))
            if manifest.get("pandas_npz") != 1:
                raise ValueError("not a plait.pandas_npz archive (version 1)")

            def array(i: int) -> Any:
                return np.load(io.BytesIO(archive.read(f"{i}.npy")), allow_pickle=False)

            index = _npz_index_back(manifest["index"], array)
            if manifest["kind"] == "series":
                values = _npz_values_back(manifest["data"], array)
                return pd.Series(values, index=index, name=_pyjson_decode(manifest["name"]))
            columns = _npz_index_back(manifest["columns"], array)
            frame = pd.DataFrame(
                {i: pd.Series(_npz_values_back(d, array)) for i, d in enumerate(manifest["data"])}
            )
            if not manifest["data"]:
                frame = pd.DataFrame(index=index)
            frame.index = index
            frame.columns = columns
            return frame


def _npz_values(values: Any, arrays: list[Any]) -> dict[str, Any]:
    """How one column (an ExtensionArray) is stored: arrays appended to ``arrays``, the rest
    in the manifest entry returned."""
    import numpy as np
    import pandas as pd

    def add(array: Any) -> int:
        arrays.append(np.ascontiguousarray(array))
        return len(arrays) - 1

    dtype = values.dtype
    if type(values) is pd.arrays.NumpyExtensionArray:  # not its subclass StringArray
        dtype = values.to_numpy().dtype  # the numpy dtype, not pandas' wrapper of it
    if isinstance(dtype, np.dtype):
        if not dtype.hasobject:
            return {"numpy": add(values.to_numpy())}
        if dtype != np.dtype(object):
            raise _NotExact(f"a column of dtype {dtype}")
        return {"object": [_pyjson_encode(v) for v in values.to_numpy()]}
    if isinstance(dtype, pd.CategoricalDtype):
        return {
            "category": {
                "codes": add(values.codes),
                "categories": _npz_index(dtype.categories, arrays),
                "ordered": bool(dtype.ordered),
            }
        }
    if isinstance(dtype, pd.DatetimeTZDtype):
        naive = pd.Series(values).dt.tz_convert("UTC").dt.tz_localize(None)
        return {"datetime_tz": {"utc": add(naive.to_numpy()), "tz": str(dtype.tz)}}
    if isinstance(dtype, pd.StringDtype):
        na = getattr(dtype, "na_value", pd.NA)
        strings = [None if v is na or v is None else str(v) for v in values]
        marker = "nan" if isinstance(na, float) else "NA"
        return {"string": {"storage": dtype.storage, "na_value": marker, "values": strings}}
    numpy_dtype = getattr(dtype, "numpy_dtype", None)
    if isinstance(
        values, pd.arrays.IntegerArray | pd.arrays.FloatingArray | pd.arrays.BooleanArray
    ):
        assert numpy_dtype is not None
        fill = False if numpy_dtype == np.dtype(bool) else 0
        data = values.to_numpy(dtype=numpy_dtype, na_value=fill)
        return {"masked": {"dtype": str(dtype), "data": add(data), "mask": add(values.isna())}}
    raise _NotExact(f"a column of dtype {dtype}")


def _npz_values_back(entry: dict[str, Any], array: Callable[[int], Any]) -> Any:
    import numpy as np
    import pandas as pd

    ((kind, spec),) = entry.items()
    if kind == "numpy":
        return array(spec)
    if kind == "object":
        items = [_pyjson_decode(v) for v in spec]
        out = np.empty(len(items), dtype=object)
        for i, item in enumerate(items):  # one by one: numpy would unpack tuples
            out[i] = item
        return pd.array(out, dtype=object)
    if kind == "category":
        categories = _npz_index_back(spec["categories"], array)
        return pd.Categorical.from_codes(
            array(spec["codes"]), dtype=pd.CategoricalDtype(categories, ordered=spec["ordered"])
        )
    if kind == "datetime_tz":
        utc = pd.Series(array(spec["utc"])).dt.tz_localize("UTC").dt.tz_convert(spec["tz"])
        return utc.array
    if kind == "string":
        na = np.nan if spec["na_value"] == "nan" else pd.NA
        try:
            dtype = pd.StringDtype(spec["storage"], na_value=na)
        except TypeError:  # a pandas before 2.3 has no na_value
            dtype = pd.StringDtype(spec["storage"])
        return pd.array([na if v is None else v for v in spec["values"]], dtype=dtype)
    if kind == "masked":
        dtype = pd.api.types.pandas_dtype(spec["dtype"])
        cls = dtype.construct_array_type()
        return cls(array(spec["data"]), array(spec["mask"]))
    raise ValueError(f"plait.pandas_npz: unknown column kind {kind!r}")


def _npz_index(index: Any, arrays: list[Any]) -> dict[str, Any]:
    import pandas as pd

    if isinstance(index, pd.RangeIndex):
        entry: dict[str, Any] = {"range": [index.start, index.stop, index.step]}
    elif isinstance(index, pd.MultiIndex):
        entry = {
            "levels": [_npz_index(level, arrays) for level in index.levels],
            "codes": [_npz_values(pd.array(c), arrays) for c in index.codes],
        }
        entry["names"] = [_pyjson_encode(n) for n in index.names]
        return {"multi": entry}
    else:
        entry = {"values": _npz_values(index.array, arrays)}
        freq = getattr(index, "freqstr", None)
        if freq is not None:
            entry["freq"] = freq
    entry["name"] = _pyjson_encode(index.name)
    return entry


def _npz_index_back(entry: dict[str, Any], array: Callable[[int], Any]) -> Any:
    import pandas as pd

    if "multi" in entry:
        spec = entry["multi"]
        return pd.MultiIndex(
            levels=[_npz_index_back(level, array) for level in spec["levels"]],
            codes=[_npz_values_back(c, array) for c in spec["codes"]],
            names=[_pyjson_decode(n) for n in spec["names"]],
        )
    name = _pyjson_decode(entry["name"])
    if "range" in entry:
        return pd.RangeIndex(*entry["range"], name=name)
    values = _npz_values_back(entry["values"], array)
    if "freq" in entry:  # a DatetimeIndex or TimedeltaIndex with a frequency
        cls = pd.DatetimeIndex if values.dtype.kind == "M" else pd.TimedeltaIndex
        return cls(values, freq=entry["freq"], name=name)
    return pd.Index(values, name=name, dtype=values.dtype, copy=False)


def _has_pyarrow() -> bool:
    return importlib.util.find_spec("pyarrow") is not None  # finds it without importing it


class PickleMaterializer:
    """Anything picklable (protocol 5). Unsafe: loading runs code, so it is only used by name."""

    name = "plait.pickle"
    unsafe = True

    def can_save(self, value: object) -> bool:
        return True

    def save(self, value: object) -> bytes:
        return pickle.dumps(value, protocol=5)

    def load(self, data: bytes) -> object:
        return pickle.loads(data)


_BUILTINS: tuple[Materializer, ...] = (
    BytesMaterializer(),
    StrMaterializer(),
    JsonMaterializer(),
    PyJsonMaterializer(),
    NumpyMaterializer(),
    NumpyScalarMaterializer(),
    PandasMaterializer(),
    PandasNpzMaterializer(),
)
"""Tried in this order, after the user's."""
_PICKLE: Materializer = PickleMaterializer()
_BUILTIN_BY_NAME: dict[str, Materializer] = {m.name: m for m in (*_BUILTINS, _PICKLE)}
_RESERVED = {*_BUILTIN_BY_NAME, *(n.removeprefix("plait.") for n in _BUILTIN_BY_NAME)}
"""Names a user's materializer may not take: the built-ins' and their short forms."""
_USER: dict[str, Materializer] = {}
"""The user's, by name, oldest registration first (a dict keeps insertion order)."""


def register_materializer(materializer: Materializer) -> None:
    """Registers a materializer; it is tried before the built-ins, the newest first.

    Register it in the module that defines the steps that use it: worker processes import that
    module, and so register it too. Registering a name again replaces the earlier one (and makes
    it the newest).

    Args:
        materializer: any object with ``name``, ``unsafe``, ``can_save``, ``save`` and ``load``.

    Raises:
        ValueError: the name is a built-in's, or the object lacks part of the protocol.
    """
    for attr in ("can_save", "save", "load"):
        if not callable(getattr(materializer, attr, None)):
            raise ValueError(f"a materializer needs a method {attr!r}; {materializer!r} has none")
    name = getattr(materializer, "name", None)
    if not isinstance(name, str) or not name:
        raise ValueError(f"a materializer needs a non-empty str 'name'; {materializer!r} has none")
    if not isinstance(getattr(materializer, "unsafe", None), bool):
        raise ValueError(
            f"materializer {name!r} needs a bool 'unsafe' (True when load() can run code)"
        )
    if name in _RESERVED:
        raise ValueError(
            f"{name!r} is the name of a built-in materializer; give yours another name"
        )
    _USER.pop(name, None)
    _USER[name] = materializer


def get_materializer(name: str) -> Materializer:
    """The materializer called ``name``.

    A built-in's name without ``plait.`` names it too: ``"pickle"`` is ``"plait.pickle"``.

    Raises:
        LookupError: none has that name.
    """
    found = _USER.get(name)
    if found is None:
        found = _BUILTIN_BY_NAME.get(name)
    if found is None:
        found = _BUILTIN_BY_NAME.get(f"plait.{name}")
    if found is None:
        known = ", ".join(sorted({*_BUILTIN_BY_NAME, *_USER}))
        raise LookupError(
            f"no materializer named {name!r} (known here: {known}). A custom materializer must "
            f"be registered with plait.register_materializer in the module that defines the "
            f"step, so that every process that imports the step registers it too"
        )
    return found


def materializer_for(value: object, requested: str = "") -> Materializer:
    """The materializer to store ``value`` with.

    Args:
        value: a step's output.
        requested: a materializer's name (a step's ``materializer=`` setting); empty to choose
            by type: the user's materializers, newest first, then the built-ins except pickle.

    Raises:
        LookupError: no materializer has the requested name.
        TypeError: nothing fits (the message says what to do), or the requested one doesn't.
    """
    if requested:
        m = get_materializer(requested)
        if not m.can_save(value):
            raise TypeError(f"materializer {m.name!r} cannot store a {type_name(value)}")
        return m
    if _USER:  # no tuple of them all built per call: a worker asks for every output
        for m in reversed(tuple(_USER.values())):
            if m.can_save(value):
                return m
    for m in _BUILTINS:
        if m.can_save(value):
            return m
    raise TypeError(
        f"Plait does not know how to store a {type_name(value)}. {_STORABLE} Or register a "
        f"materializer for the type with plait.register_materializer(...); or opt into pickle "
        f'for this step with @plait.step(materializer="pickle") (unsafe: loading it runs code)'
    )


_STORABLE = (
    "Return builtins (None, bool, int, float, str, bytes, and lists, tuples, dicts and sets "
    "of them), numpy arrays or scalars, or pandas DataFrames or Series."
)

_BUILTIN_CLASSES: tuple[type, ...] = (
    type(None),
    bool,
    int,
    float,
    str,
    bytes,
    bytearray,
    list,
    tuple,
    dict,
    set,
    frozenset,
)
"""The builtin classes some built-in materializer stores (exactly these, not subclasses)."""


def _class_storable(cls: type, item: bool) -> bool:
    """Whether a built-in may store a value declared ``cls``: ``cls`` is a class they store, or
    a base class of one (``numbers.Real``, ``Sequence``), or a numpy scalar type. numpy's and
    pandas' classes count only when they are imported (an annotation that names them has), and
    not for an ``item`` of a container (JSON and pyjson hold builtins only)."""
    np = sys.modules.get("numpy")
    if np is not None and not item and issubclass(cls, np.generic):
        return cls is not np.object_
    storable = list(_BUILTIN_CLASSES)
    pd = sys.modules.get("pandas")
    if np is not None and not item:
        storable += [np.ndarray, np.memmap, np.generic]
    if pd is not None and not item:
        storable += [pd.DataFrame, pd.Series]
    for known in storable:
        try:
            if issubclass(known, cls):
                return True
        except TypeError:  # a Protocol that is not runtime-checkable, and the like
            return True
    return False


_CONTAINER_MODULES = ("builtins", "collections.abc", "typing")
"""Where the generic classes whose arguments are their items' types come from."""


def type_problem(tp: Any, *, item: bool = False) -> str | None:
    """The part of the type ``tp`` that no materializer stores, or None when one may.

    Used when a pipeline is traced, so that a step whose return type nothing stores fails
    before any step runs. It refuses only what it is sure of: a class that no built-in
    stores, nor any subclass of it, while no materializer of the user's is registered (Plait
    can ask a materializer about a value, not about a type); ``Any``, type variables and
    typing constructs it does not model pass. The items of a builtin container are checked
    too (``list[Point]``, ``tuple[numpy.ndarray, int]``), and every member of a union.

    Args:
        tp: a type annotation.
        item: ``tp`` is the type of a container's items.
    """
    from plait._types import is_any, strip_annotated, type_expr

    tp = strip_annotated(tp)
    if _USER or is_any(tp):
        return None
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return next((p for a in args if (p := type_problem(a, item=item)) is not None), None)
    while hasattr(tp, "__supertype__"):  # a NewType: its base type
        tp = tp.__supertype__
        origin, args = typing.get_origin(tp), typing.get_args(tp)
    cls = origin if origin is not None else tp
    if not isinstance(cls, type) or cls is object or typing.is_typeddict(cls):
        return None  # Any, Literal, a TypeVar …; a TypedDict's values are plain dicts
    if not _class_storable(cls, item):
        return type_expr(tp)
    if cls.__module__ in _CONTAINER_MODULES:  # list[T], tuple[T, ...], Mapping[K, V] …
        items = (a for a in args if a is not Ellipsis)
        return next((p for a in items if (p := type_problem(a, item=True)) is not None), None)
    return None


def type_name(value: object) -> str:
    """The value's type as ``module.QualName``, e.g. ``builtins.int``, ``numpy.ndarray``."""
    t = type(value)
    return f"{t.__module__}.{t.__qualname__}"
