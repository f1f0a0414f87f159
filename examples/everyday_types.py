"""Everyday types: numpy scalars, tuples, NaN and pandas objects, stored exactly.

python examples/everyday_types.py

What each output is stored as (its materializer) is in docs/types.md. A DataFrame is parquet
when pyarrow imports, else plait.pandas_npz (numpy and pandas alone); both read back equal.
"""

import math
from typing import Annotated

import numpy as np
import pandas as pd

import plait


@plait.step
def measurements() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "sensor": pd.Categorical(["a", "b", "a", "c"]),
            "value": [0.5, 1.5, np.nan, 2.0],
            "count": pd.array([3, None, 1, 4], dtype="Int64"),
        },
        index=pd.Index([10, 20, 30, 40], name="t"),
    )


@plait.step
def mean_value(df: pd.DataFrame) -> float:
    return df["value"].mean()  # a numpy.float64: stored as the float it is


@plait.step
def total_count(df: pd.DataFrame) -> int:
    return df["count"].sum()  # a numpy.int64: stored as an int


@plait.step
def any_missing(df: pd.DataFrame) -> bool:
    return df["value"].isna().any()  # a numpy.bool_: stored as a bool


@plait.step
def shape(df: pd.DataFrame) -> tuple[int, int]:
    return df.shape  # a tuple stays a tuple


@plait.step
def peak(df: pd.DataFrame) -> np.float32:
    return np.float32(df["value"].max())  # declared a numpy scalar: kept one


@plait.step
def ratio(total: int, size: tuple[int, int]) -> float:
    rows, _ = size
    return total / rows if rows else math.nan  # NaN and the infinities are stored too


@plait.step
def summary(
    df: pd.DataFrame,
) -> tuple[Annotated[pd.Series, "per_sensor"], Annotated[dict[str, tuple[int, ...]], "rows"]]:
    rows = {str(k): tuple(int(i) for i in v) for k, v in df.groupby("sensor").groups.items()}
    return df.groupby("sensor", observed=True)["value"].sum(), rows


@plait.step
def report(per_sensor: pd.Series, rows: dict[str, tuple[int, ...]]) -> str:
    return ", ".join(f"{k}: {per_sensor[k]} over {len(rows[k])} rows" for k in sorted(rows))


@plait.pipeline
def everyday():
    df = measurements()
    mean_value(df)
    any_missing(df)
    peak(df)
    ratio(total_count(df), shape(df))
    per_sensor, rows = summary(df)  # named outputs unpack; a plain tuple would not
    report(per_sensor, rows)


def main() -> None:
    run = everyday()
    assert run.status == "SUCCEEDED", run.status
    out = {s: step.output() for s, step in run.steps.items() if len(step.outputs) == 1}
    assert out["mean_value"] == 4.0 / 3 and type(out["mean_value"]) is float
    assert out["total_count"] == 8 and type(out["total_count"]) is int
    assert out["any_missing"] is True
    assert out["shape"] == (4, 3) and type(out["shape"]) is tuple
    assert out["peak"] == np.float32(2.0) and type(out["peak"]) is np.float32
    assert out["ratio"] == 2.0
    pd.testing.assert_frame_equal(out["measurements"], measurements.fn(), check_exact=True)
    steps = run.steps
    per_sensor = steps["summary"].output("per_sensor")
    assert per_sensor.to_dict() == {"a": 0.5, "b": 1.5, "c": 2.0}
    assert steps["summary"].output("rows") == {"a": (10, 30), "b": (20,), "c": (40,)}
    assert out["report"] == "a: 0.5 over 2 rows, b: 1.5 over 1 rows, c: 2.0 over 1 rows"
    frame_format = steps["measurements"].outputs["output"].materializer
    assert frame_format in ("plait.pandas", "plait.pandas_npz"), frame_format
    stored = {s: steps[s].outputs["output"].materializer for s in ("shape", "peak", "mean_value")}
    assert stored == {
        "shape": "plait.pyjson",
        "peak": "plait.numpy_scalar",
        "mean_value": "plait.json",
    }, stored
    print(f"mean {out['mean_value']:.3f}, shape {out['shape']}, frame as {frame_format}")


if __name__ == "__main__":
    main()
