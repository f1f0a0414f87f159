"""Faults inside the control plane end the runs they touch instead of hanging their clients."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import plait
from plait.engine._control_plane import ControlPlane
from plait.engine.scheduler import Completed


@plait.step
def first() -> int:
    return 1


@plait.step
def second(x: int) -> int:
    return x + 1


@plait.pipeline
def two() -> None:
    second(first())


@pytest.fixture
def client(tmp_path: Path) -> Iterator[plait.Client]:
    c = plait.Client(home=tmp_path / "home")
    yield c
    c.shutdown()


def test_a_failing_store_transaction_fails_the_run(
    client: plait.Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    # FAULT INJECTION (a fake, named as such): the tick that records a completion raises, as a
    # full disk or a broken database would make it. A healthy SQLite file cannot be made to.
    real_tick = ControlPlane._tick

    def faulty_tick(self: ControlPlane, conn: Any, inputs: Any, now: float) -> Any:
        if any(isinstance(i, Completed) and i.token.step_id == "first" for i in inputs):
            raise OSError("disk full (injected)")
        return real_tick(self, conn, inputs, now)

    monkeypatch.setattr(ControlPlane, "_tick", faulty_tick)
    run = two.run(client=client)
    assert run.status == "FAILED"
    assert {k: s.status for k, s in run.steps.items()} == {
        "first": "CANCELLED",
        "second": "CANCELLED",
    }
    messages = [e.message for batch in client.watch(run.run_id) for e in batch]
    assert any("disk full (injected)" in m for m in messages)
    monkeypatch.setattr(ControlPlane, "_tick", real_tick)
    # the control plane keeps working
    assert two.run(client=client).status == "SUCCEEDED"
