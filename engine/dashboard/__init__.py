"""The dashboard: a web UI the daemon serves on a port of its own (``--dashboard-port``).

Runs with their live graphs and logs, outputs, pipelines and their versions, stacks and builds,
read through the daemon's own gRPC API with each browser session's token (see
docs/dashboard-api.md and :mod:`plait.engine.dashboard._server`). The pages are static files in
``static/``, shipped in the wheel; nothing is fetched from the network.
"""

from plait.engine.dashboard._server import DEFAULT_DASHBOARD_PORT, Dashboard

__all__ = ["DEFAULT_DASHBOARD_PORT", "Dashboard"]
