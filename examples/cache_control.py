"""Cache control: a file's content in the key, refreshing a step, asking why a step ran.

python examples/cache_control.py
"""

import tempfile
from pathlib import Path

import plait


@plait.step
def count_rows(data: Path) -> int:
    return len(data.read_text().splitlines()) - 1  # without the header


@plait.step
def fetch_rate(source: str) -> float:
    """Reads something outside Plait's view (an API, a table: here a file named by a plain
    string, so only its path is in the key): `plait run --refresh fetch_rate` reads it again."""
    return float(Path(source).read_text())


@plait.step
def revenue(rows: int, rate: float) -> float:
    return rows * rate


@plait.pipeline
def sales(data: plait.File, source: str) -> None:
    revenue(count_rows(data), fetch_rate(source))


def statuses(run: plait.Run) -> dict[str, str]:
    return {k: str(s.status) for k, s in run.steps.items()}


if __name__ == "__main__":
    folder = Path(tempfile.mkdtemp())
    csv, rate = folder / "sales.csv", folder / "rate.txt"
    csv.write_text("id,amount\n1,10\n2,20\n")
    rate.write_text("1.5")
    params = {"data": plait.File(csv), "source": str(rate)}

    first = sales.run(params, no_cache=True)
    assert first.steps["revenue"].output() == 3.0

    again = sales.run(params)  # same file content: everything cached
    assert set(statuses(again).values()) == {"CACHED"}, statuses(again)

    csv.write_text("id,amount\n1,10\n2,20\n3,30\n")  # overwritten at the same path
    grown = sales.run(params)  # the digest is read when each run is created
    print("csv overwritten:", statuses(grown))
    assert statuses(grown)["count_rows"] == "SUCCEEDED" and grown.steps["revenue"].output() == 4.5

    client = plait.Client.default()
    why = client.explain_step(grown.run_id, "count_rows")
    print("why count_rows ran:", why.reason)
    for d in why.differences:
        print("  ", d.describe())
    assert [(d.component, d.name) for d in why.differences] == [("parameter", "data")]

    rate.write_text("2.0")  # a plain string parameter: its path is in the key, not its content
    stale = sales.run(params)
    assert statuses(stale)["fetch_rate"] == "CACHED"
    fresh = client.run_pipeline(sales, params, refresh=["fetch_rate"])  # plait run --refresh
    print("refreshed:", statuses(fresh))
    assert statuses(fresh)["fetch_rate"] == "SUCCEEDED" and fresh.steps["revenue"].output() == 6.0

    cached = client.explain_step(fresh.run_id, "count_rows")
    print("count_rows:", cached.reason)
    assert cached.cached_from_run == grown.run_id
