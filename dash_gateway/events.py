"""``GET /dash/api/overview`` and the live ``/dash/api/events`` WebSocket that follows it."""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

from jupyter_core.utils import ensure_async
from jupyter_server.auth.decorator import authorized, ws_authenticated
from jupyter_server.base.handlers import JupyterHandler
from jupyter_server.base.websocket import WebSocketMixin
from tornado import web, websocket

from dash_gateway.auth import is_operator, username
from dash_gateway.cluster import ClusterSupervisor
from dash_gateway.handlers import AUTH_RESOURCE, DashAPIHandler
from dash_gateway.overview import OverviewService

log = logging.getLogger(__name__)

# How often an open stream looks for changes: well inside the 2 s a change may take to show.
CHECK_INTERVAL = 0.5


def comparable(overview: dict[str, Any]) -> dict[str, Any]:
    """The overview without what changes every time (the clock)."""
    return {k: v for k, v in overview.items() if k != "time"}


class OverviewHandler(DashAPIHandler):
    """``GET /dash/api/overview``: workers, the caller's sessions, work and storage use."""

    def initialize(  # type: ignore[override]
        self, cluster: ClusterSupervisor, overview: OverviewService
    ) -> None:
        super().initialize(cluster)
        self.overview = overview

    @web.authenticated
    @authorized
    async def get(self) -> None:
        self.set_header("Cache-Control", "no-store")
        self.write_json(await self.overview.overview(username(self), is_operator(self)))


class EventsHandler(WebSocketMixin, websocket.WebSocketHandler, JupyterHandler):  # type: ignore[misc]
    """``/dash/api/events``: ``{"type": "overview", "data": ...}`` on connect and whenever
    the caller's overview changes. Authenticated like the REST API (token header,
    ``?token=``, or the login cookie); refused with 403 before the upgrade otherwise."""

    auth_resource = AUTH_RESOURCE

    def initialize(self, overview: OverviewService, interval: float = CHECK_INTERVAL) -> None:
        self.overview = overview
        self.interval = interval
        self._task: asyncio.Task[None] | None = None

    async def pre_get(self) -> None:
        allowed = await ensure_async(
            self.authorizer.is_authorized(self, self.current_user, "read", AUTH_RESOURCE)
        )
        if not allowed:
            raise web.HTTPError(403)

    @ws_authenticated
    async def get(self, *args: Any, **kwargs: Any) -> None:
        await self.pre_get()
        result = super().get(*args, **kwargs)
        if result is not None:
            await result

    def open(self, *args: Any, **kwargs: Any) -> None:
        super().open(*args, **kwargs)
        self.overview.streams.add(self)
        self._task = asyncio.ensure_future(
            self._follow(username(self), is_operator(self), self.interval)
        )

    async def _follow(self, user: str, operator: bool, interval: float) -> None:
        last: dict[str, Any] | None = None
        while self.ws_connection is not None:
            try:
                data = await self.overview.overview(user, operator)
            except Exception as exc:
                log.warning("Cannot build the overview for %s: %r", user, exc)
            else:
                if comparable(data) != last:
                    last = comparable(data)
                    try:
                        await self.write_message(json.dumps({"type": "overview", "data": data}))
                    except websocket.WebSocketClosedError:
                        return
            await asyncio.sleep(interval)

    def on_message(self, message: str | bytes) -> None:
        # The stream only speaks; what a client says is ignored.
        return None

    def on_close(self) -> None:
        self.overview.streams.discard(self)
        if self._task is not None:
            self._task.cancel()
            self._task = None
