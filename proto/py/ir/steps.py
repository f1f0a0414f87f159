"""The graph a pipeline's steps draw, read from the IR alone (both sides need it)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from plait.ir.v1 import ir_pb2

if TYPE_CHECKING:
    import networkx as nx

__all__ = ["step_graph", "upstream_ids"]


def upstream_ids(step: ir_pb2.StepSpec) -> list[str]:
    """The ids of the steps whose outputs ``step`` reads, in first-use order."""
    out: list[str] = []

    def walk(b: ir_pb2.Binding) -> None:
        kind = b.WhichOneof("kind")
        if kind == "output" and b.output.step_id not in out:
            out.append(b.output.step_id)
        elif kind == "list":
            for i in b.list.items:
                walk(i)
        elif kind == "map":
            for e in b.map.entries:
                walk(e.value)

    for i in step.inputs:
        walk(i.binding)
    return out


def step_graph(spec: ir_pb2.PipelineSpec) -> nx.DiGraph:
    """The steps as a networkx graph: a node per step (attribute ``spec``, its IR), an edge
    from each step to each step that reads its outputs. networkx is imported here, when a graph
    is asked for, not by running a pipeline."""
    import networkx as nx

    graph = nx.DiGraph()
    for s in spec.steps:
        graph.add_node(s.id, spec=s)
        for up in upstream_ids(s):
            graph.add_edge(up, s.id)
    return graph
