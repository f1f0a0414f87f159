"""gRPC's transport for a process that talks to, or is, a Plait control plane.

gRPC chooses its I/O code when it starts, from ``GRPC_EXPERIMENTS``. From 1.6x it moves TCP
onto its EventEngine, whose reads and writes pass through threads of its own: on our 2-core
machines a message pair over a stream costs ~0.38 ms that way and ~0.26 ms on gRPC's older
polling code, which every version from 1.66 to 1.85 still ships (measured:
``benchmarks/README.md``, "gRPC's transport"). A step costs one such pair, so :func:`tune`
asks for the older code, before gRPC is imported, in processes that have not chosen.

Setting ``GRPC_EXPERIMENTS`` yourself (any value, even empty) leaves gRPC as you set it; so
does a gRPC outside the versions checked (an experiment gRPC no longer knows would be logged
as an error at every start).

gRPC also prints its INFO lines to standard error unless ``GRPC_VERBOSITY`` says otherwise
(such as ``Got goaway [2] ... Server shutdown``, logged by a worker whose engine stops while
its stream is open): :func:`tune` sets it to ``ERROR``, gRPC's documented default, when it is
unset.
"""

from __future__ import annotations

import os

EXPERIMENTS = "-event_engine_client,-event_engine_listener"
"""What :func:`tune` sets ``GRPC_EXPERIMENTS`` to."""
VERBOSITY = "ERROR"
"""What :func:`tune` sets ``GRPC_VERBOSITY`` to."""
CHECKED = ((1, 66), (1, 85))
"""The gRPC versions (major, minor; first and last) that know both experiments and were
measured."""


def grpcio_version() -> tuple[int, int] | None:
    """The installed grpcio's (major, minor), read from its files without importing it (the
    import starts gRPC); None when it is not found."""
    from importlib.util import find_spec

    try:
        spec = find_spec("grpc")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        try:
            with open(os.path.join(folder, "_grpcio_metadata.py"), encoding="utf-8") as f:
                text = f.read()  # __version__ = """1.85.3"""
        except OSError:
            continue
        parts = text.partition("=")[2].strip().strip("\"'").split(".")
        if len(parts) >= 2 and parts[0].isdigit() and parts[1].isdigit():
            return int(parts[0]), int(parts[1])
    return None


def tune() -> None:
    """Sets ``GRPC_EXPERIMENTS`` for gRPC's older TCP code when it is unset and the installed
    gRPC is one of the versions checked, and ``GRPC_VERBOSITY`` to ``ERROR`` when it is unset.
    They apply to this process if gRPC starts after it, and to every process started from it
    (the workers among them)."""
    os.environ.setdefault("GRPC_VERBOSITY", VERBOSITY)
    if "GRPC_EXPERIMENTS" in os.environ:
        return
    version = grpcio_version()
    if version is not None and CHECKED[0] <= version <= CHECKED[1]:
        os.environ["GRPC_EXPERIMENTS"] = EXPERIMENTS
