"""Retry policies, and fail_fast.

    python examples/retry_policies.py

`fetch` fails twice with a ConnectionError and is retried after 0.2 s, then 0.4 s (backoff 2,
capped at 1 s, jittered by up to 10%); `parse` raises a KeyError, which its retry_on does not
name, so it fails at once without using its retries. In a second pipeline, `fail_fast=True`:
when `check` fails, the slow sibling `train` still running is cancelled and the run ends FAILED
at once (without it, independent branches go on).
"""

import tempfile
import time
from pathlib import Path

import plait


@plait.step(
    retries=3,
    retry_delay=0.2,
    retry_backoff=2.0,
    retry_max_delay=1.0,
    retry_on=(ConnectionError, TimeoutError),
    no_retry_on=(PermissionError,),
)
def fetch(counter_file: str) -> str:
    path = Path(counter_file)
    attempts = int(path.read_text()) + 1 if path.exists() else 1
    path.write_text(str(attempts))
    if attempts < 3:
        raise ConnectionResetError(f"attempt {attempts}: the connection was reset")
    return f"fetched on attempt {attempts}"


@plait.step(retries=3, retry_on=(ConnectionError,))
def parse(text: str) -> dict:
    raise KeyError("no field 'id' in the payload")


@plait.pipeline
def ingest(counter_file: str):
    parse(fetch(counter_file))


@plait.step
def check() -> bool:
    raise ValueError("the validation set is empty")


@plait.step
def train(marker: str) -> str:
    Path(marker).touch()
    time.sleep(60)  # cancelled long before this ends
    return "trained"


@plait.pipeline(fail_fast=True)
def guarded(marker: str):
    check()
    train(marker)


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as tmp:
        run = ingest(counter_file=str(Path(tmp) / "attempts"))
        fetched = run.steps["fetch"]
        print(f"fetch: {fetched.status}, attempt {fetched.attempt}: {fetched.output()}")
        assert fetched.status == "SUCCEEDED" and fetched.attempt == 3
        events = [e for batch in plait.Client.default().watch(run.run_id) for e in batch]
        waits = [e.message for e in events if e.step_id == "fetch" and e.step_status == "RETRYING"]
        print("\n".join(f"  {m}" for m in waits))
        assert len(waits) == 2 and all(m.startswith("retrying in") for m in waits)
        parsed = run.steps["parse"]
        print(f"parse: {parsed.status}, attempt {parsed.attempt}: {parsed.error}")
        assert parsed.status == "FAILED" and parsed.attempt == 1
        assert parsed.error is not None and "builtins.LookupError" in parsed.error.types

        run = guarded(marker=str(Path(tmp) / "train-started"))
        for step_id, s in run.steps.items():
            print(f"{step_id}: {s.status}")
        assert run.status == "FAILED"
        assert run.steps["check"].status == "FAILED"
        assert run.steps["train"].status == "CANCELLED"  # stopped, not waited for
