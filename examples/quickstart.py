"""Plait quick start: three steps, named outputs, an async step, run on the embedded engine.

    python examples/quickstart.py            # or: plait run examples/quickstart.py:demo -p n=100

Run it twice: the second time `load` and `stats` come from the cache.
"""

from typing import Annotated

import plait


@plait.step
def load(n: int) -> list[int]:
    print(f"loading {n} numbers")
    return list(range(n))


@plait.step
def stats(xs: list[int]) -> tuple[Annotated[int, "total"], Annotated[float, "mean"]]:
    plait.log_metadata({"count": len(xs)})
    return sum(xs), sum(xs) / len(xs)


@plait.step(cache=False)
async def report(total: int, mean: float) -> str:
    return f"{total}/{mean}"


@plait.pipeline
def demo(n: int = 10):
    total, mean = stats(load(n))
    report(total, mean)


if __name__ == "__main__":
    run = demo(n=100)  # runs to completion, returns a plait.Run
    assert run.status == "SUCCEEDED"
    assert run.steps["stats"].output("total") == 4950
    assert run.steps["report"].output() == "4950/49.5"
    for step_id, step_run in run.steps.items():
        print(f"{step_id:8} {step_run.status:10} {step_run.duration or 0:.3f}s")
    print(f"run {run.run_id}: {run.steps['report'].output()}")
