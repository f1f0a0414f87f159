"""Materializers: how step outputs become bytes and back.

A materializer is chosen by the value's type when a step returns, and its name is stored with
the artifact, so the same materializer reads it back. Built in, in the order they are tried
(after any registered by the user, newest first):

========================  ==================================================================
``plait.bytes``           ``bytes``, ``bytearray``: as they are
``plait.str``             ``str``: UTF-8
``plait.json``            JSON-able builtins whose JSON round trip is exact (no tuples, no
                          non-str keys, no NaN or infinity)
``plait.numpy``           ``numpy.ndarray`` (not of object dtype): ``.npy``, no pickle
``plait.pandas``          ``pandas.DataFrame`` and ``Series``: parquet (needs pyarrow)
``plait.pickle``          anything picklable; never chosen by itself, only by name, and its
                          artifacts are marked unsafe (loading one runs code)
========================  ==================================================================

numpy, pandas and pyarrow are imported only when such a value is saved or loaded.
"""

from __future__ import annotations

import io
import json
import math
import pickle
from typing import Protocol

__all__ = [
    "Materializer",
    "get_materializer",
    "materializer_for",
    "register_materializer",
    "type_name",
]


class Materializer(Protocol):
    """Turns values of some types into bytes and back. Register one with
    :func:`plait.register_materializer` in the module that defines the steps using it."""

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


def _module_of(value: object) -> str:
    return type(value).__module__.partition(".")[0]


class BytesMaterializer:
    name = "plait.bytes"
    unsafe = False

    def can_save(self, value: object) -> bool:
        return isinstance(value, bytes | bytearray)

    def save(self, value: object) -> bytes:
        assert isinstance(value, bytes | bytearray)
        return bytes(value)

    def load(self, data: bytes) -> object:
        return data


class StrMaterializer:
    name = "plait.str"
    unsafe = False

    def can_save(self, value: object) -> bool:
        return isinstance(value, str)

    def save(self, value: object) -> bytes:
        assert isinstance(value, str)
        return value.encode()

    def load(self, data: bytes) -> object:
        return data.decode()


def _exact_json(value: object, depth: int = 0) -> bool:
    """Whether ``json.loads(json.dumps(value)) == value`` with the same types throughout."""
    if depth > 200:
        return False
    if value is None or type(value) in (bool, int, str):
        return True
    if type(value) is float:
        return math.isfinite(value)
    if type(value) is list:
        return all(_exact_json(v, depth + 1) for v in value)
    if type(value) is dict:
        return all(type(k) is str and _exact_json(v, depth + 1) for k, v in value.items())
    return False


class JsonMaterializer:
    name = "plait.json"
    unsafe = False

    def can_save(self, value: object) -> bool:
        return _exact_json(value)

    def save(self, value: object) -> bytes:
        return json.dumps(
            value, ensure_ascii=False, separators=(",", ":"), allow_nan=False
        ).encode()

    def load(self, data: bytes) -> object:
        return json.loads(data)


class NumpyMaterializer:
    name = "plait.numpy"
    unsafe = False

    def can_save(self, value: object) -> bool:
        if _module_of(value) != "numpy":
            return False
        import numpy as np

        return isinstance(value, np.ndarray) and value.dtype != object

    def save(self, value: object) -> bytes:
        import numpy as np

        assert isinstance(value, np.ndarray)
        buf = io.BytesIO()
        np.save(buf, value, allow_pickle=False)
        return buf.getvalue()

    def load(self, data: bytes) -> object:
        import numpy as np

        return np.load(io.BytesIO(data), allow_pickle=False)


class PandasMaterializer:
    name = "plait.pandas"
    unsafe = False

    def can_save(self, value: object) -> bool:
        if _module_of(value) != "pandas":
            return False
        import pandas as pd

        if not isinstance(value, pd.DataFrame | pd.Series):
            return False
        try:
            import pyarrow  # noqa: F401
        except ImportError:
            return False
        return True

    def save(self, value: object) -> bytes:
        import pandas as pd

        frame = value.to_frame() if isinstance(value, pd.Series) else value
        assert isinstance(frame, pd.DataFrame)
        buf = io.BytesIO()
        frame.to_parquet(buf, engine="pyarrow")
        # a Series comes back as a Series: its single column carries a marker in the metadata
        kind = b"S" if isinstance(value, pd.Series) else b"F"
        return kind + buf.getvalue()

    def load(self, data: bytes) -> object:
        import pandas as pd

        frame = pd.read_parquet(io.BytesIO(data[1:]), engine="pyarrow")
        if data[:1] == b"S":
            return frame.iloc[:, 0]
        return frame


class PickleMaterializer:
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
_PICKLE = PickleMaterializer()
_BY_NAME: dict[str, Materializer] = {m.name: m for m in (*_BUILTINS, _PICKLE)}
_USER: list[Materializer] = []


def register_materializer(materializer: Materializer) -> None:
    """Registers a materializer; it is tried before the built-ins, newest first.

    Register it in the module that defines the steps that use it: worker processes import that
    module, and so register it too. Registering a name again replaces the earlier one.

    Raises:
        ValueError: the name is a built-in's, or the object lacks part of the protocol.
    """
    for attr in ("name", "unsafe", "can_save", "save", "load"):
        if not hasattr(materializer, attr):
            raise ValueError(f"a materializer needs {attr!r}; {materializer!r} has none")
    name = materializer.name
    if not isinstance(name, str) or not name:
        raise ValueError("a materializer's name must be a non-empty string")
    if name in _BY_NAME and _BY_NAME[name] in (*_BUILTINS, _PICKLE):
        raise ValueError(f"{name!r} is a built-in materializer; choose another name")
    _USER[:] = [m for m in _USER if m.name != name]
    _USER.append(materializer)
    _BY_NAME[name] = materializer


def get_materializer(name: str) -> Materializer:
    """The materializer called ``name`` ("pickle" is short for "plait.pickle", and so on).

    Raises:
        LookupError: none has that name.
    """
    found = _BY_NAME.get(name) or _BY_NAME.get(f"plait.{name}")
    if found is None:
        raise LookupError(
            f"no materializer named {name!r} (known: {', '.join(sorted(_BY_NAME))}); a custom "
            f"materializer must be registered with plait.register_materializer in the module "
            f"that defines the step, so that every process that reads it registers it too"
        )
    return found


def materializer_for(value: object, requested: str = "") -> Materializer:
    """The materializer to store ``value`` with: ``requested`` by name, else the first that fits.

    Raises:
        TypeError: nothing fits (the message says what to do), or the requested one doesn't.
    """
    if requested:
        m = get_materializer(requested)
        if not m.can_save(value):
            raise TypeError(f"materializer {m.name!r} cannot store a {type_name(value)}")
        return m
    for m in (*reversed(_USER), *_BUILTINS):
        if m.can_save(value):
            return m
    raise TypeError(
        f"Plait does not know how to store a {type_name(value)}. Return JSON-able builtins "
        f"(no tuples), str, bytes, numpy arrays or pandas objects; or register a materializer "
        f"with plait.register_materializer(...); or opt into pickle for this step with "
        f'@plait.step(materializer="pickle") (unsafe: loading it runs code)'
    )


def type_name(value: object) -> str:
    """``builtins.int`` → ``int``; other types as ``module.QualName``."""
    t = type(value)
    return t.__qualname__ if t.__module__ == "builtins" else f"{t.__module__}.{t.__qualname__}"
