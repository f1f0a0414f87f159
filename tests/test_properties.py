"""Properties of real runs on random DAGs: ordering, data flow, and the IR round trip."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import networkx as nx
import pytest
from hypothesis import HealthCheck, given, settings
from strategies import dags

import plait
from plait._pipeline import compile_pipeline
from plait.engine._validate import validate_pipeline
from plait.ir.steps import step_graph
from plait.ir.v1 import ir_pb2


@plait.step
def node(i: int, ups: list[int]) -> int:
    return i + 10 * sum(ups)


def pipeline_for(g: nx.DiGraph) -> plait.Pipeline[[]]:
    def body() -> None:
        outs: dict[int, Any] = {}
        for j in sorted(g.nodes):
            outs[j] = node(j, [outs[i] for i in sorted(g.predecessors(j))], id=f"n{j}")

    body.__name__ = "dag"
    return plait.pipeline(body)


def expected(g: nx.DiGraph) -> dict[int, int]:
    value: dict[int, int] = {}
    for j in sorted(g.nodes):
        value[j] = j + 10 * sum(value[i] for i in sorted(g.predecessors(j)))
    return value


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[plait.Client]:
    c = plait.Client(home=Path(tmp_path_factory.mktemp("props")))
    yield c
    c.shutdown()


@settings(
    max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(dags())
def test_no_step_starts_before_its_upstreams(client: plait.Client, g: nx.DiGraph) -> None:
    run = pipeline_for(g).run(no_cache=True, client=client)
    assert run.status == "SUCCEEDED"
    want = expected(g)
    for j in g.nodes:
        assert run.steps[f"n{j}"].output() == want[j]
    seq: dict[tuple[str, str], int] = {}
    for batch in client.watch(run.run_id):
        for e in batch:
            if e.step_id:
                seq.setdefault((e.step_id, str(e.step_status)), e.sequence)
    for u, v in g.edges:
        assert seq[(f"n{u}", "SUCCEEDED")] < seq[(f"n{v}", "QUEUED")]


@settings(max_examples=50, deadline=None)
@given(dags(max_steps=15))
def test_compile_ir_graph_round_trip(g: nx.DiGraph) -> None:
    compiled = compile_pipeline(pipeline_for(g))
    relabel = {f"n{j}": j for j in g.nodes}
    assert set(nx.relabel_nodes(compiled.graph, relabel).edges) == set(g.edges)
    # the IR alone (as another language would send it) rebuilds the same graph
    again = ir_pb2.PipelineSpec.FromString(compiled.spec.SerializeToString())
    validate_pipeline(again)
    assert set(nx.relabel_nodes(step_graph(again), relabel).edges) == set(g.edges)
