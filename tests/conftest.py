"""Fixtures shared by the whole test suite."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

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


@pytest.fixture(scope="session")
def server_url() -> str:
    """The SQLAlchemy URL of the test PostgreSQL server (scripts/test starts it)."""
    url = os.environ.get("PLAIT_TEST_POSTGRES_URL")
    if not url:
        message = "PLAIT_TEST_POSTGRES_URL is not set (scripts/test starts PostgreSQL and sets it)"
        if os.environ.get("CI"):
            pytest.fail(message)  # in CI a missing PostgreSQL is a failure, never a skip
        pytest.skip(message)
    return url


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--long",
        action="store_true",
        default=False,
        help="fuzz for thousands of examples per RPC rather than a few hundred (test_fuzz.py)",
    )


@pytest.fixture(scope="session")
def long_fuzz(request: pytest.FixtureRequest) -> bool:
    """Whether `--long` was given: the fuzz suite then sends thousands of requests per RPC."""
    return bool(request.config.getoption("--long"))


@pytest.fixture
def embedded(tmp_path: Path) -> dict[str, str]:
    """The environment of a CLI process on an embedded engine of its own (a fresh
    PLAIT_HOME, one worker, no server, token or CA from the caller's environment)."""
    env = {**os.environ, "PLAIT_HOME": str(tmp_path / "home"), "PLAIT_WORKERS": "1"}
    for key in ("PLAIT_SERVER", "PLAIT_TOKEN", "PLAIT_TLS_CA"):
        env.pop(key, None)
    return env


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A daemon for a test module (tests/test_security.Daemon), stopped after it; a module
    with a ``daemon`` fixture of its own uses that one."""
    from test_security import Daemon

    d = Daemon(tmp_path_factory.mktemp("daemon") / "home")
    try:
        yield d
    finally:
        d.stop()
