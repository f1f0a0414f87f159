"""Steps in containers, next to steps in local processes: see run.sh, which sets up the stack.

`train` runs on the Docker runner, in an image the stack's image builder made for its
environment (the parent image, Plait, and `six` from requirements.txt); `report` runs in the
local warm pool. The code is not in the image: editing a step builds nothing, and a rerun
reuses the image (`plait builds list`). See docs/docker.md and docs/builds.md.
"""

import os
import sys

import plait

TRAINER = plait.Environment(
    requirements_file="requirements.txt",  # beside this file: its lines, not its path, count
    env={"EPOCHS": "3"},  # a runtime variable: in the cache key, never in the build
)


@plait.step(
    runner="docker",
    environment=TRAINER,
    resources=plait.Resources(cpu=1, memory="512MiB"),
)
def train(rate: float) -> dict[str, float]:
    import six  # installed in the image only

    epochs = int(os.environ["EPOCHS"])
    print(f"training for {epochs} epochs in a container: {os.path.exists('/.dockerenv')}")
    return {"loss": round(1.0 / (1 + rate * epochs), 4), "six": float(six.__version__[:4])}


@plait.step(runner="local")
def report(metrics: dict[str, float]) -> str:
    return f"loss {metrics['loss']} (reported by {sys.prefix})"


@plait.pipeline
def containers(rate: float = 0.5) -> None:
    report(train(rate))


if __name__ == "__main__":
    first = containers.run(no_cache=True)
    assert first.status == "SUCCEEDED", {k: s.error for k, s in first.steps.items()}
    print("train:", first.steps["train"].output())
    print("report:", first.steps["report"].output())
    again = containers.run()  # same inputs: served from the cache, nothing runs or builds
    print("rerun:", {name: str(s.status) for name, s in again.steps.items()})
    assert all(str(s.status) == "CACHED" for s in again.steps.values())
