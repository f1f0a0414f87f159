"""Dynamic fan-out with ``step.map``: one step run per item of a list known only at run time.

python examples/fan_out.py       # or: plait run examples/fan_out.py:scores -p n_files=8

``load.map(list_files(...))`` runs ``load`` once per file that ``list_files`` returns, as the
step runs ``load[0]``, ``load[1]``, ...; each caches on its own item, so a rerun with one more
file runs only the new one. A map's result passed to a step arrives as a list, in order, and
can be mapped over again (``score.map(load.map(...))``). ``plait runs show RUN`` groups the
items in one row (``load[0..7]``).
"""

import plait


@plait.step
def list_files(n_files: int) -> list[str]:
    # in real life: list a bucket or a folder; the list is known only when this step runs
    return [f"part-{i:03d}.csv" for i in range(n_files)]


@plait.step
def load(name: str, scale: float = 1.0) -> list[float]:
    seed = int(name[5:8])
    return [scale * ((seed * 7 + k * 3) % 11) for k in range(4)]


@plait.step
def score(rows: list[float]) -> float:
    return sum(rows) / len(rows)


@plait.step
def best(scores: list[float]) -> float:
    return max(scores)


@plait.pipeline
def scores(n_files: int = 6, scale: float = 2.0):
    # a map over a step's list, with a fixed input; then a map over the map's results
    per_file = score.map(load.map(list_files(n_files), scale=scale))
    # a map over a list parameter or a list of values works the same: score.map([[1.0], [2.0]])
    best(per_file)


if __name__ == "__main__":
    first = scores(n_files=6)
    assert first.status == "SUCCEEDED", first.status
    per_file = first.output("score")  # a mapped step's output: the list of its items' outputs
    assert len(per_file) == 6 and first.output("best") == max(per_file)
    # one more file: the six items already made are served from the cache, one by one
    second = scores(n_files=7)
    cached = [k for k, s in second.steps.items() if k.startswith("load[") and s.cached]
    assert len(cached) == 6, cached
    assert not second.steps["load[6]"].cached
    print(
        f"{len(per_file)} files scored, best {first.output('best')}; rerun with 7 files: "
        f"{len(cached)} loads cached"
    )
