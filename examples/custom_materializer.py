"""Store your own types: register a materializer, or opt into pickle per step.

python examples/custom_materializer.py
"""

from dataclasses import dataclass

import plait


@dataclass
class Point:
    x: float
    y: float


class PointMaterializer:
    """Stores a Point as "x,y" text; safe to load (no code runs)."""

    name = "examples.point"
    unsafe = False

    def can_save(self, value: object) -> bool:
        return isinstance(value, Point)

    def save(self, value: object) -> bytes:
        assert isinstance(value, Point)
        return f"{value.x},{value.y}".encode()

    def load(self, data: bytes) -> object:
        x, y = data.decode().split(",")
        return Point(float(x), float(y))


# registered at import, so worker processes (which import this module) know it too
plait.register_materializer(PointMaterializer())


@plait.step
def make_point(x: float, y: float) -> Point:
    return Point(x, y)


@plait.step
def shift(p: Point, dx: float) -> Point:
    return Point(p.x + dx, p.y)


@plait.step(materializer="pickle")  # any picklable object; loading it runs code: opt-in only
def as_set(p: Point) -> set[float]:
    return {p.x, p.y}


@plait.pipeline
def geometry(dx: float = 1.5):
    as_set(shift(make_point(1.0, 2.0), dx))


if __name__ == "__main__":
    run = geometry()
    assert run.status == "SUCCEEDED", run.status
    assert run.steps["shift"].output() == Point(2.5, 2.0)
    assert run.steps["shift"].outputs["output"].materializer == "examples.point"
    pickled = run.steps["as_set"].outputs["output"]
    assert pickled.unsafe and run.steps["as_set"].output() == {2.5, 2.0}
    print(f"shifted: {run.steps['shift'].output()}; pickled artifact marked unsafe")
