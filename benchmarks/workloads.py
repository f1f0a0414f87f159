"""No-op pipelines for the benchmarks (a module, so worker processes can import the steps)."""

from __future__ import annotations

import plait


@plait.step
def noop(x: int) -> int:
    return x


@plait.step
def join(xs: list[int]) -> int:
    return len(xs)


@plait.pipeline
def chain(n: int = 1000) -> None:
    x = noop(0)
    for _ in range(999):
        x = noop(x)


@plait.pipeline
def fan_out(n: int = 1000) -> None:
    join([noop(i) for i in range(999)])


@plait.pipeline
def one_step() -> None:
    noop(1)
