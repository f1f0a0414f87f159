"""The Plait engine: IR validation, the scheduler, the cache, the metadata store, the gRPC
control plane. It reads only IR, never the user's Python objects.

Layers (see ARCHITECTURE.md): :mod:`.scheduler` (the state machine, no SQL), :mod:`.store`
(schema and repositories), :mod:`.api` (thin gRPC servicers), :mod:`._control_plane` (the loop
that ties them to the runners), :mod:`.admin` (the server's CLI commands, loaded by the CLI).
Importing this package loads none of them: ``ControlPlane`` is imported on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from plait.engine._control_plane import ControlPlane, ControlPlaneConfig

__all__ = ["ControlPlane", "ControlPlaneConfig"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from plait.engine import _control_plane

        return getattr(_control_plane, name)
    raise AttributeError(f"module 'plait.engine' has no attribute {name!r}")
