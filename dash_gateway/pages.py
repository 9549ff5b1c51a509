"""The gateway's web pages (``/dash/`` dashboard, ``/dash/contribute``) and their assets."""

from __future__ import annotations

import html
from typing import Any

from jupyter_server.auth.decorator import authorized
from jupyter_server.base.handlers import FileFindHandler, JupyterHandler
from tornado import web

from dash_gateway.auth import is_operator, username
from dash_gateway.handlers import AUTH_RESOURCE
from dash_kernel._version import __version__
from dash_nbext import static_dir

PAGES = {"dashboard": "dashboard.html", "contribute": "contribute.html"}


class PageHandler(JupyterHandler):
    """One page: a static HTML file with the server's base URL filled in. It carries no
    data (the page's script fetches it), and nobody gets it without logging in."""

    auth_resource = AUTH_RESOURCE

    def initialize(self, page: str) -> None:
        self.page = PAGES[page]

    @web.authenticated
    @authorized
    async def get(self) -> None:
        template = (static_dir() / self.page).read_text(encoding="utf-8")
        values = {
            "base_url": self.base_url,
            "static": f"{self.base_url}dash/static/",
            "version": __version__,
            "user": username(self),
            "role": "operator" if is_operator(self) else "user",
        }
        for key, value in values.items():
            template = template.replace("{{" + key + "}}", html.escape(value, quote=True))
        # Sets the _xsrf cookie that the page's POST and DELETE requests send back.
        _ = self.xsrf_token
        self.set_header("Cache-Control", "no-store")
        self.set_header("Content-Type", "text/html; charset=utf-8")
        self.finish(template)


class StaticHandler(FileFindHandler):
    """``/dash/static/<file>``: the pages' scripts and styles, for logged-in users only."""

    auth_resource = AUTH_RESOURCE

    @web.authenticated
    @authorized
    def get(self, path: str, include_body: bool = True) -> Any:
        return web.StaticFileHandler.get(self, path, include_body)

    @web.authenticated
    @authorized
    def head(self, path: str) -> Any:
        return web.StaticFileHandler.get(self, path, include_body=False)


def page_handlers() -> list[tuple[str, type, dict[str, Any]]]:
    """Routes of the pages and their assets, for ``DashGateway.initialize_handlers``."""
    return [
        (r"/dash/?", PageHandler, {"page": "dashboard"}),
        (r"/dash/contribute/?", PageHandler, {"page": "contribute"}),
        (r"/dash/static/(.*)", StaticHandler, {"path": str(static_dir())}),
    ]
