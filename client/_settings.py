"""Where Plait keeps its data, and which control plane a client talks to."""

from __future__ import annotations

import os
from pathlib import Path


def plait_home() -> Path:
    """``$PLAIT_HOME``, else ``$XDG_DATA_HOME/plait``, else ``~/.local/share/plait``."""
    home = os.environ.get("PLAIT_HOME")
    if home:
        return Path(home).expanduser().resolve()
    xdg = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return (Path(xdg) / "plait").resolve()


def server_address() -> str | None:
    """``$PLAIT_SERVER`` (host:port) when a shared control plane is configured."""
    return os.environ.get("PLAIT_SERVER") or None
