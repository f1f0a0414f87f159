"""The Plait engine: IR validation, the scheduler, the cache, the metadata store, the gRPC
control plane. It reads only IR, never the user's Python objects."""

from plait.engine._control_plane import ControlPlane, ControlPlaneConfig

__all__ = ["ControlPlane", "ControlPlaneConfig"]
