"""Hooks: a function called after each attempt of a step, on success or on failure.

    python examples/hooks.py

The pipeline's hooks apply to every step that names none; `send_report` names its own. Here
the hooks attach metadata to the step run (a real one would post to a chat channel or page
someone). A hook that raises is logged in the step's logs; it never changes the step's outcome.
See docs/hooks.md.
"""

import plait


def notify_success(context: plait.StepContext) -> None:
    plait.log_metadata({"notified": f"{context.step_id} succeeded"})


def notify_failure(context: plait.StepContext, error: BaseException) -> None:
    print(f"{context.step_id} failed on attempt {context.attempt}: {error!r}")
    plait.log_metadata({"notified": f"{type(error).__name__}: {error}"})


def report_sent(context: plait.StepContext) -> None:
    plait.log_metadata({"report": f"sent by run {context.run_id}"})


def broken_hook(context: plait.StepContext) -> None:
    raise RuntimeError("the chat service is down")


@plait.step
def clean(rows: list[int]) -> list[int]:
    return [r for r in rows if r >= 0]


@plait.step
def divide(rows: list[int], by: int) -> float:
    return sum(rows) / by


@plait.step(on_success=report_sent)
def send_report(rows: list[int]) -> str:
    return f"{len(rows)} rows"


@plait.step(on_success=broken_hook)
def archive(rows: list[int]) -> int:
    return len(rows)


@plait.pipeline(on_success=notify_success, on_failure=notify_failure)
def nightly(by: int = 0):
    rows = clean([3, -1, 4, 1, -5])
    divide(rows, by)
    send_report(rows)
    archive(rows)


if __name__ == "__main__":
    run = nightly()
    for step_id, s in run.steps.items():
        print(f"{step_id:12} {s.status:10} {s.metadata}")
    assert run.status == "FAILED"  # divide by zero
    assert run.steps["clean"].metadata == {"notified": "clean succeeded"}
    assert run.steps["divide"].status == "FAILED"
    assert run.steps["divide"].metadata == {"notified": "ZeroDivisionError: division by zero"}
    # a step's own hook wins over its pipeline's
    assert run.steps["send_report"].metadata == {"report": f"sent by run {run.run_id}"}
    # a hook that raised: the step still SUCCEEDED, and its logs hold the traceback
    assert run.steps["archive"].status == "SUCCEEDED"
    assert run.steps["archive"].output() == 3
    assert "RuntimeError: the chat service is down" in run.logs("archive")
    print(run.logs("divide"), end="")
