"""Pipeline parameters: run parameters, structural parameters, and their checks.

python examples/parameters.py

A parameter only passed to steps is a *run parameter*: one version of the pipeline serves all
its values. A parameter the pipeline function uses as a value (``range(n)``, ``if ...:``,
``n - 1``, an f-string) has its call-time value there and is *structural*: the graph depends
on it, so its value is part of the version. See docs/parameters.md.
"""

import plait


@plait.step
def simulate(seed: int, i: int) -> float:
    return ((seed * 7919 + i * 104729) % 1000) / 1000


@plait.step
def average(scores: list[float], scale: float) -> float:
    return scale * sum(scores) / len(scores)


@plait.step
def label(text: str) -> str:
    return text.upper()


@plait.pipeline
def fan_out(n: int = 3, seed: int = 1, scale: float = 1.0, tag: str = "") -> None:
    # n is structural: range(n) shapes the graph (n leaves), so each n is its own version.
    scores = [simulate(seed, i, id=f"simulate_{i}") for i in range(n)]
    # seed and scale only go to steps: run parameters, any value runs the same version.
    average(scores, scale)
    # tag is structural too: Python decides here whether there is a label step at all.
    if tag:
        label(f"{tag}-{n}")


def statuses(run: plait.Run) -> dict[str, str]:
    return {k: str(s.status) for k, s in run.steps.items()}


if __name__ == "__main__":
    # the default n=3: three leaves; n=5: five. Each shape is a version of its own.
    three, five = fan_out.compile(), fan_out.compile({"n": 5})
    assert three.structural == {"n": "3", "tag": '""'} and five.structural["n"] == "5"
    assert three.version != five.version
    print("structural parameters:", dict(three.structural))
    # a run parameter's value is not in the version
    assert fan_out.compile({"seed": 42, "scale": 2.0}).version == three.version

    first = fan_out.run({"n": 5, "seed": 7}, no_cache=True)
    print("n=5:", statuses(first))
    assert first.status == "SUCCEEDED"
    assert sorted(first.steps) == ["average", *(f"simulate_{i}" for i in range(5))]

    # 1 for a float is 1.0: the same value, the same cache entries
    again = fan_out(n=5, seed=7, scale=1)
    print("scale=1 after 1.0:", statuses(again))
    assert set(statuses(again).values()) == {"CACHED"}

    # another n: the leaves it shares with n=5 come from the cache
    smaller = fan_out(n=2, seed=7)
    print("n=2:", statuses(smaller))
    assert statuses(smaller)["simulate_0"] == "CACHED"
    assert statuses(smaller)["average"] == "SUCCEEDED"  # other scores

    tagged = fan_out(n=2, seed=7, tag="demo")
    assert tagged.steps["label"].output() == "DEMO-2"
    print("tag=demo:", statuses(tagged))

    # values are checked against the annotations before anything runs
    try:
        fan_out.run({"seed": "abc"})
    except plait.ParameterError as exc:
        print("refused:", exc)
        assert "'seed'" in str(exc) and "int" in str(exc) and '"abc"' in str(exc)
    else:
        raise AssertionError("seed='abc' was accepted for an int")
