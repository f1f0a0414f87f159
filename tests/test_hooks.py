"""Step hooks: ``on_success`` and ``on_failure`` on steps and pipelines, embedded and through a
daemon, run by real worker processes."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_security import Daemon

import plait
from plait.errors import PipelineDefinitionError

# ---- hooks (module level, so that workers import them) ----
# The workers inherit HOOK_LOG from the process that starts them: each hook call appends one
# JSON line there.


def _record(hook: str, ctx: plait.StepContext, **extra: Any) -> None:
    assert plait.get_step_context() == ctx  # the hook runs in the step's context
    line = {"hook": hook, "run": ctx.run_id, "step": ctx.step_id, "attempt": ctx.attempt}
    with open(os.environ["HOOK_LOG"], "a", encoding="utf-8") as f:
        f.write(json.dumps({**line, **extra}) + "\n")


def pipeline_success(context: plait.StepContext) -> None:
    _record("pipeline_success", context)


def pipeline_failure(context: plait.StepContext, error: BaseException) -> None:
    _record("pipeline_failure", context, error=f"{type(error).__name__}: {error}")


def own_success(context: plait.StepContext) -> None:
    print("own_success ran", flush=True)
    _record("own_success", context)


def own_failure(context: plait.StepContext, error: BaseException) -> None:
    _record("own_failure", context, error=f"{type(error).__name__}: {error}")


def exploding_success(context: plait.StepContext) -> None:
    raise RuntimeError(f"success hook of {context.step_id} exploded")


def exploding_failure(context: plait.StepContext, error: BaseException) -> None:
    raise RuntimeError(f"failure hook exploded on {error}")


async def async_success(context: plait.StepContext) -> None:
    _record("async_success", context)


# ---- steps and pipelines ----


@plait.step(cache=False)
def double(x: int) -> int:
    return 2 * x


@plait.step(cache=False, on_success=own_success, on_failure=own_failure)
def own_hooks(x: int) -> int:
    return x + 1


@plait.step(cache=False, retries=1)
def breaks(x: int) -> int:
    raise ValueError(f"bad value {x}")


@plait.step(cache=False, on_success=exploding_success)
def fine_but_hook_explodes(x: int) -> int:
    return x * 10


@plait.step(cache=False, on_failure=exploding_failure)
def breaks_and_hook_explodes(x: int) -> int:
    raise KeyError(f"missing {x}")


@plait.pipeline(on_success=pipeline_success, on_failure=pipeline_failure)
def hooked() -> None:
    double(1)
    own_hooks(2)
    breaks(3)
    double.with_options(id="async_hooked", on_success=async_success)(4)
    fine_but_hook_explodes(5)
    breaks_and_hook_explodes(6)


@plait.pipeline
def plain() -> None:
    double(1)


# ---- definition and compilation ----


def test_a_lambda_or_a_closure_is_refused_as_a_hook() -> None:
    with pytest.raises(PipelineDefinitionError, match="lambda or is defined inside a function"):
        plait.step(on_success=lambda ctx: None)(double.fn)

    def local(context: plait.StepContext) -> None: ...

    with pytest.raises(PipelineDefinitionError, match="module level"):
        double.with_options(on_success=local)
    with pytest.raises(PipelineDefinitionError, match=r"on_failure.*lambda"):
        plait.pipeline(on_failure=lambda ctx, err: None)(plain.fn)


def test_a_hook_must_take_the_arguments_it_is_called_with() -> None:
    with pytest.raises(PipelineDefinitionError, match=r"own_success\(context, error\)"):
        double.with_options(on_failure=own_success)
    with pytest.raises(PipelineDefinitionError, match="is not a function"):
        double.with_options(on_success="tests.hooks.notify")
    with pytest.raises(PipelineDefinitionError, match="is not a function"):
        double.with_options(on_success=double)


def test_hooks_compile_into_the_ir_and_a_steps_own_wins() -> None:
    spec = hooked.compile().spec
    settings = {s.id: s.settings for s in spec.steps}

    step_file = spec.steps[0].code.file  # hooks are found as step code is

    def ref(step: str, what: str) -> tuple[str, str, bool] | None:
        s = settings[step]
        if not s.HasField(what):
            return None
        code = getattr(s, what)
        assert code.code_digest and code.module == __name__ and code.file == step_file
        return code.qualname, "", code.is_async

    assert ref("double", "on_success") == ("pipeline_success", "", False)
    assert ref("double", "on_failure") == ("pipeline_failure", "", False)
    assert ref("own_hooks", "on_success") == ("own_success", "", False)
    assert ref("own_hooks", "on_failure") == ("own_failure", "", False)
    assert ref("async_hooked", "on_success") == ("async_success", "", True)
    assert ref("async_hooked", "on_failure") == ("pipeline_failure", "", False)
    # a pipeline without hooks has no hook fields (and keeps the version it had before hooks)
    plain_settings = plain.compile().spec.steps[0].settings
    assert not plain_settings.HasField("on_success")
    assert not plain_settings.HasField("on_failure")


def test_hooks_are_not_in_the_cache_key() -> None:
    from plait.engine._cache import key_material

    with_hooks = hooked.compile().spec.steps[0]
    without = plain.compile().spec.steps[0]
    assert with_hooks.settings.HasField("on_success")
    values = {"x": ("json", "1")}
    assert key_material(with_hooks, values) == key_material(without, values)


def test_a_hook_replaced_in_its_module_is_refused_at_compile_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def impostor(context: plait.StepContext) -> None: ...

    impostor.__module__, impostor.__qualname__ = __name__, "pipeline_success"
    pipe = plait.pipeline(on_success=impostor)(plain.fn)
    with pytest.raises(PipelineDefinitionError, match="cannot be found under that name"):
        pipe.compile()


# ---- runs ----


def _check_run(run: plait.Run, records: list[dict[str, Any]]) -> None:
    statuses = {k: s.status for k, s in run.steps.items()}
    assert statuses == {
        "double": "SUCCEEDED",
        "own_hooks": "SUCCEEDED",
        "breaks": "FAILED",
        "async_hooked": "SUCCEEDED",
        "fine_but_hook_explodes": "SUCCEEDED",
        "breaks_and_hook_explodes": "FAILED",
    }
    assert run.status == "FAILED"
    # a raising hook changes nothing: the outputs and the step's own error stand
    assert run.steps["fine_but_hook_explodes"].output() == 50
    err = run.steps["breaks_and_hook_explodes"].error
    assert err is not None and err.type == "builtins.KeyError" and "missing 6" in err.message

    mine = sorted(
        ((r["step"], r["hook"], r["attempt"], r.get("error")) for r in records),
        key=lambda r: (r[0], r[2]),
    )
    assert mine == [
        ("async_hooked", "async_success", 1, None),
        ("breaks", "pipeline_failure", 1, "ValueError: bad value 3"),  # once per attempt
        ("breaks", "pipeline_failure", 2, "ValueError: bad value 3"),
        ("double", "pipeline_success", 1, None),
        ("own_hooks", "own_success", 1, None),  # a step's own hook wins over its pipeline's
    ]
    assert {r["run"] for r in records} == {run.run_id}

    # a hook's output, and a raising hook's traceback, are in the step's logs
    assert "own_success ran" in run.logs("own_hooks")
    logs = run.logs("fine_but_hook_explodes")
    assert f"the on_success hook {__name__}.exploding_success of step" in logs
    assert "Traceback" in logs and "success hook of fine_but_hook_explodes exploded" in logs
    logs = run.logs("breaks_and_hook_explodes")
    assert "on_failure hook" in logs and "failure hook exploded on 'missing 6'" in logs


def _records(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture
def hook_log(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "hooks.jsonl"
    monkeypatch.setenv("HOOK_LOG", str(path))  # before the workers start: they inherit it
    return path


def test_hooks_run_on_the_embedded_engine(
    tmp_path: Path, hook_log: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PLAIT_WORKERS", "2")
    client = plait.Client(home=tmp_path / "home")
    try:
        run = hooked.run(client=client)
        _check_run(run, _records(hook_log))
    finally:
        client.shutdown()


@pytest.fixture
def daemon(tmp_path: Path, hook_log: Path) -> Iterator[Daemon]:
    d = Daemon(tmp_path / "daemon-home")  # its workers inherit HOOK_LOG
    try:
        yield d
    finally:
        d.stop()


def test_hooks_run_through_a_daemon(daemon: Daemon, hook_log: Path) -> None:
    client = plait.Client(daemon.address, token=daemon.credential)
    try:
        run = hooked.run(client=client)
        _check_run(run, _records(hook_log))
    finally:
        client.close()
