"""Materializers: how step outputs become bytes and back.

A materializer is chosen by the value's type when a step returns, and its name is stored with
the artifact, so the same materializer reads it back. Built in, in the order they are tried
(after any registered by the user, newest first):

========================  ==================================================================
``plait.bytes``           ``bytes``, ``bytearray``: as they are (read back as ``bytes``)
``plait.str``             ``str``: UTF-8
``plait.json``            JSON-able builtins whose JSON round trip is exact: None, bool, int,
                          finite float, str, list, dict with str keys (no tuples, no
                          non-str keys, no NaN or infinity)
``plait.numpy``           ``numpy.ndarray`` without Python objects in it: ``.npy``, no pickle
``plait.pandas``          ``pandas.DataFrame`` and ``Series``: parquet (needs pyarrow)
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
import sys
from typing import Protocol

__all__ = [
    "Materializer",
    "get_materializer",
    "materializer_for",
    "register_materializer",
    "type_name",
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


class BytesMaterializer:
    """``bytes`` and ``bytearray``, stored as they are; both read back as ``bytes``."""

    name = "plait.bytes"
    unsafe = False

    def can_save(self, value: object) -> bool:
        return isinstance(value, bytes | bytearray)

    def save(self, value: object) -> bytes:
        if not isinstance(value, bytes | bytearray):
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


class JsonMaterializer:
    """JSON-able builtins whose round trip through JSON is exact, as compact UTF-8 JSON."""

    name = "plait.json"
    unsafe = False

    def can_save(self, value: object) -> bool:
        return _exact_json(value)

    def save(self, value: object) -> bytes:
        # no second walk over the value: materializer_for() checked can_save() already
        text = json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
        try:
            return text.encode()
        except UnicodeEncodeError:
            # lone surrogates: JSON's \ud800 escapes keep them, and the text stays standard
            return json.dumps(value, ensure_ascii=True, separators=(",", ":")).encode()

    def load(self, data: bytes) -> object:
        return json.loads(data)


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
    NumpyMaterializer(),
    PandasMaterializer(),
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
    for m in (*reversed(_USER.values()), *_BUILTINS):
        if m.can_save(value):
            return m
    hint = ""
    if _top_module(value) == "pandas" and not _has_pyarrow():
        hint = " pandas objects are stored as parquet, which needs pyarrow (plait[pandas])."
    raise TypeError(
        f"Plait does not know how to store a {type_name(value)}.{hint} Return JSON-able "
        f"builtins (None, bool, int, finite float, str, list, dict with str keys; no tuples), "
        f"str, bytes, numpy arrays or pandas objects; or register a materializer for the type "
        f"with plait.register_materializer(...); or opt into pickle for this step with "
        f'@plait.step(materializer="pickle") (unsafe: loading it runs code)'
    )


def type_name(value: object) -> str:
    """The value's type as ``module.QualName``, e.g. ``builtins.int``, ``numpy.ndarray``."""
    t = type(value)
    return f"{t.__module__}.{t.__qualname__}"
