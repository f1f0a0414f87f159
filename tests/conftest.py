"""Fixtures shared by the whole test suite."""

from __future__ import annotations

from collections.abc import Iterator

import pytest


@pytest.fixture(autouse=True, scope="session")
def _isolated_plait_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """No test touches the user's data dir or server, even when pytest runs without scripts/test."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PLAIT_HOME", str(tmp_path_factory.mktemp("plait_home")))
        mp.delenv("PLAIT_SERVER", raising=False)
        # nor the user's `plait login`
        mp.setenv("XDG_CONFIG_HOME", str(tmp_path_factory.mktemp("xdg_config")))
        yield
