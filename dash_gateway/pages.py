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

# page -> its title; its <main> is static/<page>.html and its script static/<page>.js,
# placed in static/layout.html (the head, the navigation bar and the footer they share).
PAGES = {"dashboard": "DASH dashboard", "contribute": "Contribute a machine · DASH"}


def fill(template: str, values: dict[str, str]) -> str:
    """``template`` with each ``{{name}}`` replaced by ``values[name]``, HTML-escaped."""
    for key, value in values.items():
        template = template.replace("{{" + key + "}}", html.escape(value, quote=True))
    return template


class PageHandler(JupyterHandler):
    """One page: static HTML with the server's base URL filled in. It carries no data (the
    page's script fetches it), and nobody gets it without logging in."""

    auth_resource = AUTH_RESOURCE

    def initialize(self, page: str) -> None:
        self.page = page

    @web.authenticated
    @authorized
    async def get(self) -> None:
        layout = (static_dir() / "layout.html").read_text(encoding="utf-8")
        main = (static_dir() / f"{self.page}.html").read_text(encoding="utf-8")
        # The page's own markup first (it is ours, not escaped), then every value.
        template = layout.replace("{{main}}", main)
        for page in PAGES:
            current = ' aria-current="page"' if page == self.page else ""
            template = template.replace("{{current_" + page + "}}", current)
        template = fill(
            template,
            {
                "title": PAGES[self.page],
                "script": f"{self.page}.js",
                "base_url": self.base_url,
                "static": f"{self.base_url}dash/static/",
                "version": __version__,
                "user": username(self),
                "role": "operator" if is_operator(self) else "user",
            },
        )
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
