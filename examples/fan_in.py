"""Fan-out and fan-in: many steps, joined by one that takes a list (or a dict) of their outputs.

python examples/fan_in.py        # or: plait run examples/fan_in.py:squares -p n=50
"""

import plait


@plait.step
def square(i: int) -> int:
    return i * i


@plait.step
def total(values: list[int]) -> int:
    return sum(values)


@plait.step
def describe(parts: dict[str, int]) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(parts.items()))


@plait.pipeline
def squares(n: int = 20):
    # 20 independent steps run concurrently on the worker pool: square, square_2, ...
    leaves = [square(i) for i in range(20)]
    # one input bound to a list of outputs: the step sees a plain list[int]
    total(leaves)
    # or to a dict of outputs; explicit ids name the invocations
    describe({"small": square(2, id="two"), "big": square(30, id="thirty")})


if __name__ == "__main__":
    run = squares()
    assert run.status == "SUCCEEDED", run.status
    assert run.steps["total"].output() == sum(i * i for i in range(20))
    assert run.steps["describe"].output() == "big=900, small=4"
    print(f"{len(run.steps)} steps; total = {run.steps['total'].output()}")
