"""A pipeline whose steps take a moment, run on two control-plane replicas (see run.sh)."""

from __future__ import annotations

import time

import plait


@plait.step
def slow_square(x: int) -> int:
    time.sleep(1.0)
    return x * x


@plait.step
def total(xs: list[int]) -> int:
    return sum(xs)


@plait.pipeline
def squares(n: int = 6) -> int:
    return total([slow_square(i) for i in range(6)])
