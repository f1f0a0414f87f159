"""Modules imported on first use.

The embedded engine runs a pipeline on the default SQLite URL without SQLAlchemy (the store's
hot path talks to sqlite3 itself): importing it costs a third of a short run's process. The
modules that use it elsewhere hold a :func:`lazy_module` in its place, which imports it the
first time one of its names is read; type checkers see the real module (``TYPE_CHECKING``).
"""

from __future__ import annotations

import importlib
import types
from typing import Any

__all__ = ["lazy_module"]


class _LazyModule(types.ModuleType):
    def __getattr__(self, name: str) -> Any:
        module = importlib.import_module(self.__name__)
        # the module's names, copied: reads after the first skip this method
        self.__dict__.update(module.__dict__)
        return getattr(module, name)


def lazy_module(name: str) -> Any:
    """A stand-in for module ``name`` that imports it when one of its names is first read."""
    return _LazyModule(name)
