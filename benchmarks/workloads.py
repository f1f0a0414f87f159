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


@plait.step(pool="bench")
def remote_noop(x: int) -> int:
    return x


@plait.pipeline
def pool_fan_out(n: int = 1000) -> None:
    """1,000 no-op steps (999 and their join) in the remote pool ``bench``."""
    join_remote([remote_noop(i) for i in range(999)])


@plait.step(pool="bench")
def join_remote(xs: list[int]) -> int:
    return len(xs)


@plait.pipeline
def pool_chain(n: int = 200) -> None:
    """200 no-op steps in a chain in the pool ``bench``: each becomes ready alone, so the time
    from its QUEUED event to its start is the dispatch latency."""
    x = remote_noop(0)
    for _ in range(199):
        x = remote_noop(x)


@plait.step(pool="load")
def load_root(seed: int) -> int:
    return seed


@plait.step(pool="load")
def load_branch(x: int, i: int) -> int:
    return x + i


@plait.step(pool="load")
def load_join(xs: list[int]) -> int:
    return sum(xs)


LOAD_STEPS = 100
"""Steps of one `load` run: a root, 98 branches, their join."""


@plait.pipeline
def load(seed: int = 0) -> None:
    """100 steps in the remote pool ``load``: a root fans out to 98 branches, which one step
    joins (fan-out and fan-in). ``seed`` tells the runs apart."""
    x = load_root(seed)
    load_join([load_branch(x, i) for i in range(LOAD_STEPS - 2)])
