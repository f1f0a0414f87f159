"""Hypothesis strategies shared by the tests."""

from __future__ import annotations

from typing import Any

import networkx as nx
from hypothesis import strategies as st

json_values: st.SearchStrategy[Any] = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=10),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=5), children, max_size=4)
    ),
    max_leaves=15,
)
"""Values whose JSON round trip is exact."""


@st.composite
def dags(draw: st.DrawFn, max_steps: int = 12) -> nx.DiGraph:
    """Random DAGs on nodes 0..n-1."""
    n = draw(st.integers(1, max_steps))
    g = nx.DiGraph()
    g.add_nodes_from(range(n))
    g.add_edges_from((i, j) for j in range(n) for i in range(j) if draw(st.booleans()))
    return g  # edges only go forward, so it is acyclic
