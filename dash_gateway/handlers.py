"""The DASH REST API: cluster status and mutual-TLS credentials for kernels."""

from __future__ import annotations

import json
from typing import Any

from jupyter_server.auth.decorator import authorized
from jupyter_server.base.handlers import APIHandler
from tornado import web

from dash_gateway.cluster import ClusterSupervisor
from dash_kernel._version import __version__

# How long /dash/api/cluster waits for a scheduler that is still starting.
SCHEDULER_WAIT = 30.0
AUTH_RESOURCE = "dash"


class DashAPIHandler(APIHandler):
    """Base of DASH API handlers: authenticated, authorized on the ``dash`` resource."""

    auth_resource = AUTH_RESOURCE

    def initialize(self, cluster: ClusterSupervisor) -> None:
        self.cluster = cluster

    def write_json(self, data: Any) -> None:
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps(data))


class StatusHandler(DashAPIHandler):
    """``GET /dash/api/status``: version, scheduler address, registered workers."""

    @web.authenticated
    @authorized
    async def get(self) -> None:
        workers: list[dict[str, Any]] = []
        error = None
        try:
            workers = await self.cluster.workers()
        except Exception as exc:
            # The page stays useful while the scheduler restarts: say why the list is empty.
            error = f"cannot reach the scheduler: {exc!r}"
        reply: dict[str, Any] = {
            "version": __version__,
            "scheduler": self.cluster.scheduler_address,
            "workers": workers,
            "state": self.cluster.state,
        }
        if error:
            reply["error"] = error
        self.write_json(reply)


class ClusterHandler(DashAPIHandler):
    """``GET /dash/api/cluster``: the scheduler address and a fresh client certificate."""

    @web.authenticated
    @authorized
    async def get(self) -> None:
        address = await self.cluster.wait_for_scheduler(SCHEDULER_WAIT)
        if not address:
            raise web.HTTPError(503, "the DASH scheduler is not running yet; try again shortly")
        user = self.current_user
        creds = self.cluster.client_credentials(getattr(user, "username", "") or "client")
        # A private key is in the body: keep it out of every cache.
        self.set_header("Cache-Control", "no-store")
        self.write_json(
            {"scheduler": address, "tls": {"ca": creds.ca, "cert": creds.cert, "key": creds.key}}
        )
