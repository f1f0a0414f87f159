"""The cache: what a rerun skips and what it runs again.

python examples/caching.py
"""

import plait


@plait.step
def download(day: str) -> list[int]:
    return [len(day) * i for i in range(5)]


@plait.step
def parity(values: list[int]) -> int:
    return sum(values) % 2


@plait.step(cache_version="1")
def report(p: int) -> str:
    return "even" if p == 0 else "odd"


@plait.pipeline
def daily(day: str = "2026-11-24"):
    report(parity(download(day)))


def statuses(run: plait.Run) -> dict[str, str]:
    return {k: str(s.status) for k, s in run.steps.items()}


if __name__ == "__main__":
    first = daily.run(no_cache=True)  # a fresh start, whatever ran before
    print("first run:        ", statuses(first))
    again = daily()
    print("same inputs:      ", statuses(again))
    assert set(statuses(again).values()) == {"CACHED"}
    other_day = daily(day="2026-11-25")  # same length: download runs, parity's input is equal
    print("another parameter:", statuses(other_day))
    # download ran again (its parameter changed) but returned the same bytes: the rest is cached
    assert statuses(other_day) == {"download": "SUCCEEDED", "parity": "CACHED", "report": "CACHED"}
    new_day = daily(day="2026-11-2")  # different content downstream of download
    print("other content:    ", statuses(new_day))
    assert statuses(new_day)["download"] == "SUCCEEDED"
    bumped = daily.run({"day": "2026-11-24"}, no_cache=True)
    print("--no-cache:       ", statuses(bumped))
    assert set(statuses(bumped).values()) == {"SUCCEEDED"}
