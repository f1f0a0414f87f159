"""Inside a step: who am I, and metadata for the step run and for an output.

python examples/context_and_metadata.py
plait runs show RUN_ID        # shows the metadata
"""

import plait


@plait.step
def train(epochs: int) -> float:
    ctx = plait.get_step_context()
    # (run_id, step_id, attempt) is an idempotency key for side effects outside Plait
    print(f"run {ctx.run_id} step {ctx.step_id} attempt {ctx.attempt}")
    print(f"the model will be stored as {ctx.output_locations['output']}")
    loss = 1.0 / (1 + epochs)
    plait.log_metadata({"epochs": epochs, "device": "cpu"})  # on the step run
    plait.log_metadata({"loss": loss}, output="output")  # on the output artifact
    return loss


@plait.pipeline
def training(epochs: int = 3):
    train(epochs)


if __name__ == "__main__":
    run = training()
    step = run.steps["train"]
    assert step.metadata == {"epochs": 3, "device": "cpu"}
    assert step.outputs["output"].metadata == {"loss": 0.25}
    print(run.logs("train"), end="")
    print(f"step metadata {step.metadata}, output metadata {step.outputs['output'].metadata}")
