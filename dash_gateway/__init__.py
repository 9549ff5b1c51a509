"""DASH gateway: the Jupyter Server extension that serves the DASH API and supervises the cluster."""

from __future__ import annotations

from typing import Any


def _jupyter_server_extension_points() -> list[dict[str, Any]]:
    # Imported lazily so that `import dash_gateway` (e.g. by the scheduler subprocess,
    # `python -m dash_gateway.scheduler_process`) never pulls in jupyter_server.
    from dash_gateway.app import DashGateway

    return [{"module": "dash_gateway.app", "app": DashGateway}]
