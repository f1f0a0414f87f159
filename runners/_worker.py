"""A worker process: connects to the control plane, runs the tasks it is given, reports back.

Run as ``python -m plait.runners._worker --address HOST:PORT --worker-id ID``. It keeps one
TaskService.Connect stream open; every report about a task goes over it. It holds no state the
control plane cannot recover: if it dies, its attempt is CRASHED and retried.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import importlib.util
import inspect
import os
import queue
import socket
import sys
import tempfile
import time
import traceback
from collections.abc import Iterator
from types import ModuleType
from typing import Any

import grpc

from plait import _context
from plait._artifact_store import LocalArtifactStore
from plait._materializers import get_materializer, materializer_for, type_name
from plait._step import code_digest
from plait.api.v1 import resources_pb2 as res
from plait.api.v1 import task_service_pb2 as tasks
from plait.api.v1 import task_service_pb2_grpc as tasks_grpc

_SCRIPT_MODULE = "__plait_main__"

STARTED_DELAY = 0.005
"""How long a step's TaskStarted report waits for the step to end (and be left out)."""

_DROP_STARTED = object()


class _Capture:
    """Captures what the step writes to file descriptors 1 and 2 (print, C code, children)."""

    def __init__(self) -> None:
        # kept open for the worker's life and reused by every step (closed at process exit)
        self._files = {fd: tempfile.TemporaryFile(mode="w+b") for fd in (1, 2)}  # noqa: SIM115
        self._saved: dict[int, int] = {}

    def __enter__(self) -> _Capture:
        sys.stdout.flush()
        sys.stderr.flush()
        for fd, f in self._files.items():
            f.seek(0)
            f.truncate()
            self._saved[fd] = os.dup(fd)
            os.dup2(f.fileno(), fd)
        return self

    def __exit__(self, *exc: object) -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        for fd, saved in self._saved.items():
            os.dup2(saved, fd)
            os.close(saved)
        self._saved.clear()

    def read(self) -> list[tuple[str, str]]:
        out = []
        for fd, name in ((1, "stdout"), (2, "stderr")):
            f = self._files[fd]
            f.seek(0)
            data = f.read()
            if data:
                out.append((name, data.decode("utf-8", "replace")))
        return out


class Worker:
    def __init__(self, address: str, worker_id: str, runner: str) -> None:
        self.address = address
        self.worker_id = worker_id
        self.runner = runner
        self._out: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._modules: dict[tuple[str, str], ModuleType] = {}
        self._digests: dict[Any, str] = {}
        self._stores: dict[str, LocalArtifactStore] = {}
        self._loop = asyncio.new_event_loop()
        self._capture = _Capture()

    def _requests(self) -> Iterator[tasks.ConnectRequest]:
        """The stream's messages. A step's TaskStarted waits STARTED_DELAY seconds: a step done
        by then sends only its completion, which carries the start time (one commit, not two)."""
        held: tasks.ConnectRequest | None = None
        deadline = 0.0
        while True:
            try:
                timeout = None if held is None else max(0.0, deadline - time.monotonic())
                item = self._out.get(timeout=timeout)
            except queue.Empty:
                assert held is not None
                yield held
                held = None
                continue
            if item is None:
                return
            if item is _DROP_STARTED:
                held = None
            elif item.HasField("started"):
                held, deadline = item, time.monotonic() + STARTED_DELAY
            else:
                if held is not None:
                    yield held
                    held = None
                yield item

    def send(self, request: tasks.ConnectRequest | object) -> None:
        self._out.put(request)

    def serve(self) -> None:
        self.send(
            tasks.ConnectRequest(
                hello=tasks.WorkerHello(
                    worker_id=self.worker_id,
                    runner=self.runner,
                    pid=os.getpid(),
                    hostname=socket.gethostname(),
                )
            )
        )
        with grpc.insecure_channel(self.address) as channel:
            stub = tasks_grpc.TaskServiceStub(channel)
            try:
                token = os.environ.get("PLAIT_WORKER_TOKEN", "")
                metadata = [("authorization", f"Bearer {token}")] if token else None
                for response in stub.Connect(self._requests(), metadata=metadata):
                    if response.HasField("assign"):
                        self.run(response.assign)
            except grpc.RpcError as exc:
                if exc.code() not in (grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE):
                    raise
            finally:
                self._out.put(None)

    # ---- one task ----

    def _module(self, code: Any) -> ModuleType:
        key = (code.module, code.file)
        module = self._modules.get(key)
        if module is not None:
            return module
        if code.module == "__main__":
            if not code.file:
                raise RuntimeError("the step is defined in __main__ without a source file")
            spec = importlib.util.spec_from_file_location(_SCRIPT_MODULE, code.file)
            if spec is None or spec.loader is None:
                raise ImportError(f"cannot load {code.file}")
            module = importlib.util.module_from_spec(spec)
            sys.modules[_SCRIPT_MODULE] = module
            spec.loader.exec_module(module)
        else:
            try:
                module = importlib.import_module(code.module)
            except ImportError:
                if not code.file:
                    raise
                spec = importlib.util.spec_from_file_location(code.module, code.file)
                if spec is None or spec.loader is None:
                    raise
                module = importlib.util.module_from_spec(spec)
                sys.modules[code.module] = module
                spec.loader.exec_module(module)
        self._modules[key] = module
        return module

    def _function(self, code: Any) -> Any:
        fn = self._lookup(code)
        if self._digest(fn) != code.code_digest:
            # the module changed since this worker imported it: import it afresh, once
            self._modules.pop((code.module, code.file), None)
            sys.modules.pop(_SCRIPT_MODULE if code.module == "__main__" else code.module, None)
            fn = self._lookup(code)
            if self._digest(fn) != code.code_digest:
                raise RuntimeError(
                    f"the code of {code.module}.{code.qualname} in this worker differs from the "
                    f"code the pipeline was compiled from (was the file edited during the run?)"
                )
        return fn

    def _lookup(self, code: Any) -> Any:
        obj: Any = self._module(code)
        for part in code.qualname.split("."):
            obj = getattr(obj, part)
        return getattr(obj, "fn", obj)

    def _digest(self, fn: Any) -> str:
        digest = self._digests.get(fn)
        if digest is None:
            digest = self._digests[fn] = code_digest(fn)
        return digest

    def _store(self, uri: str) -> LocalArtifactStore:
        store = self._stores.get(uri)
        if store is None:
            store = self._stores[uri] = LocalArtifactStore.from_uri(uri)
        return store

    def _value(self, v: tasks.Value, store: LocalArtifactStore) -> Any:
        kind = v.WhichOneof("kind")
        if kind == "json":
            import json

            return json.loads(v.json)
        if kind == "artifact":
            data = store.get(v.artifact.digest)
            return get_materializer(v.artifact.materializer).load(data)
        if kind == "list":
            return [self._value(i, store) for i in v.list.items]
        return {e.key: self._value(e.value, store) for e in v.map.entries}

    def run(self, task: tasks.Task) -> None:
        token = task.token
        start = tasks.TaskStarted(token=token)
        start.start_time.GetCurrentTime()
        self.send(tasks.ConnectRequest(started=start))
        env_before: dict[str, str | None] = {}
        failure: BaseException | None = None
        outputs: list[res.Artifact] = []
        ctx = _context.StepContext(
            run_id=token.run_id,
            step_id=token.step_id,
            attempt=token.attempt,
            pipeline=task.pipeline,
            output_locations={o.name: f"artifacts/{o.artifact_id}" for o in task.outputs},
            artifact_store_uri=task.artifact_store_uri,
            _report=self._report_metadata,
            _token=token,
        )
        for var in task.step.settings.environment.env:
            env_before[var.name] = os.environ.get(var.name)
            os.environ[var.name] = var.value
        with self._capture:
            reset = _context.set_context(ctx)
            try:
                store = self._store(task.artifact_store_uri)
                fn = self._function(task.step.code)
                kwargs = {i.name: self._value(i.value, store) for i in task.inputs}
                result = fn(**kwargs)
                if inspect.isawaitable(result):
                    result = self._loop.run_until_complete(result)
                outputs = self._store_outputs(task, result, store)
            except BaseException as exc:  # the step's own failure is data, whatever it is
                failure = exc
            finally:
                _context.reset_context(reset)
                for name, old in env_before.items():
                    if old is None:
                        os.environ.pop(name, None)
                    else:
                        os.environ[name] = old
        self.send(_DROP_STARTED)
        for stream, text in self._capture.read():
            self.send(
                tasks.ConnectRequest(logs=tasks.TaskLogs(token=token, stream=stream, text=text))
            )
        if failure is None:
            self.send(
                tasks.ConnectRequest(
                    completed=tasks.TaskCompleted(
                        token=token, outputs=outputs, start_time=start.start_time
                    )
                )
            )
            return
        tb = "".join(traceback.format_exception(failure))
        self.send(
            tasks.ConnectRequest(
                failed=tasks.TaskFailed(
                    token=token,
                    error=res.StepError(
                        type=f"{type(failure).__module__}.{type(failure).__qualname__}",
                        message=str(failure),
                        traceback=tb,
                    ),
                    start_time=start.start_time,
                )
            )
        )
        if isinstance(failure, KeyboardInterrupt | SystemExit):
            raise failure

    def _report_metadata(self, token: tasks.LeaseToken, output: str, text: str) -> None:
        self.send(
            tasks.ConnectRequest(metadata=tasks.TaskMetadata(token=token, output=output, json=text))
        )

    def _store_outputs(
        self, task: tasks.Task, result: Any, store: LocalArtifactStore
    ) -> list[res.Artifact]:
        specs = list(task.step.outputs)
        if not specs:
            return []
        if len(specs) == 1:
            values = [result]
        else:
            if not isinstance(result, tuple) or len(result) != len(specs):
                raise TypeError(
                    f"step {task.step.id!r} declares {len(specs)} outputs "
                    f"({', '.join(o.name for o in specs)}) and must return a tuple of that "
                    f"length, not {type(result).__name__}"
                )
            values = list(result)
        locations = {o.name: o.artifact_id for o in task.outputs}
        out = []
        now = time.time()
        for spec, value in zip(specs, values, strict=True):
            _check_type(task.step.id, spec, value)
            m = materializer_for(value, spec.materializer)
            blob = store.put(m.save(value))
            artifact = res.Artifact(
                artifact_id=locations[spec.name],
                name=f"artifacts/{locations[spec.name]}",
                output=spec.name,
                digest=blob.digest,
                size_bytes=blob.size,
                uri=blob.uri,
                materializer=m.name,
                data_type=type_name(value),
                unsafe=m.unsafe,
                run_id=task.token.run_id,
                step_id=task.token.step_id,
            )
            artifact.create_time.FromNanoseconds(int(now * 1e9))
            out.append(artifact)
        return out


_BUILTIN_TYPES: dict[str, type | tuple[type, ...]] = {
    "int": int,
    "float": (int, float),
    "str": str,
    "bytes": bytes,
    "bool": bool,
    "list": list,
    "dict": dict,
    "tuple": tuple,
    "set": set,
    "None": type(None),
}


def _check_type(step_id: str, spec: Any, value: Any) -> None:
    """A step that returns what it did not declare fails, naming the output."""
    expr = spec.type.expr
    base = expr.split("[", 1)[0]
    expected = _BUILTIN_TYPES.get(base)
    if expected is not None and not isinstance(value, expected):
        raise TypeError(
            f"step {step_id!r}: output {spec.name!r} is declared {expr} but the "
            f"step returned {type(value).__name__}"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m plait.runners._worker",
        description="A Plait worker process (started by a runner).",
    )
    parser.add_argument("--address", required=True, help="the control plane's host:port")
    parser.add_argument("--worker-id", required=True)
    parser.add_argument("--runner", default="local")
    opts = parser.parse_args(argv)
    try:
        Worker(opts.address, opts.worker_id, opts.runner).serve()
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
