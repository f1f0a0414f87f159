"""Where Plait keeps its data, and which control plane a client talks to."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from plait.errors import PlaitError


def plait_home() -> Path:
    """``$PLAIT_HOME``, else ``$XDG_DATA_HOME/plait``, else ``~/.local/share/plait``."""
    home = os.environ.get("PLAIT_HOME")
    if home:
        return Path(home).expanduser().resolve()
    xdg = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return (Path(xdg) / "plait").resolve()


def config_path() -> Path:
    """The user's config file: ``$XDG_CONFIG_HOME/plait/config.json``."""
    xdg = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(xdg) / "plait" / "config.json"


def read_config() -> dict[str, Any]:
    try:
        data = json.loads(config_path().read_text())
    except FileNotFoundError:
        return {}
    except ValueError as exc:
        raise PlaitError(f"{config_path()} is not valid JSON: {exc}") from None
    return data if isinstance(data, dict) else {}


def write_config(data: dict[str, Any]) -> None:
    path = config_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")


def server_address() -> str | None:
    """The shared control plane to use: ``$PLAIT_SERVER`` (host:port), else the one saved by
    ``plait login``; None means the embedded engine."""
    env = os.environ.get("PLAIT_SERVER")
    if env is not None:
        return env or None  # PLAIT_SERVER="" forces the embedded engine
    server = read_config().get("server")
    return str(server) if server else None
