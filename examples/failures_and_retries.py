"""Failures, retries and skipped branches.

    python examples/failures_and_retries.py

A flaky step fails twice and succeeds on its third attempt (retries=2). A broken step fails for
good: its downstream step is SKIPPED, while an independent branch still finishes, and the run
is FAILED. run.raise_for_status() turns that into a plait.StepFailedError naming the step.
"""

import tempfile
from pathlib import Path

import plait


@plait.step(retries=2)
def flaky(counter_file: str) -> str:
    path = Path(counter_file)
    attempts = int(path.read_text()) + 1 if path.exists() else 1
    path.write_text(str(attempts))
    if attempts < 3:
        raise ConnectionError(f"attempt {attempts}: the service is busy")
    return f"worked on attempt {attempts}"


@plait.step
def broken() -> int:
    raise ValueError("bad input data")


@plait.step
def after_broken(x: int) -> int:
    return x + 1


@plait.step
def independent() -> str:
    return "still ran"


@plait.pipeline
def resilient(counter_file: str):
    flaky(counter_file)
    after_broken(broken())
    independent()


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as tmp:
        run = resilient(counter_file=str(Path(tmp) / "attempts"))
    for step_id, s in run.steps.items():
        print(f"{step_id:13} {s.status:10} attempt {s.attempt}")
    assert run.status == "FAILED"
    assert run.steps["flaky"].status == "SUCCEEDED" and run.steps["flaky"].attempt == 3
    assert run.steps["broken"].status == "FAILED"
    assert run.steps["after_broken"].status == "SKIPPED"
    assert run.steps["independent"].output() == "still ran"
    error = run.steps["broken"].error
    assert error is not None and error.type == "builtins.ValueError"
    try:
        run.raise_for_status()
    except plait.StepFailedError as exc:
        print(f"raise_for_status: {exc}")
        assert exc.step_id == "broken"
    else:
        raise AssertionError("expected StepFailedError")
