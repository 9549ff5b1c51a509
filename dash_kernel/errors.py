"""Errors DASH raises for the user's input or the cluster's state, shown as one clear line."""

from __future__ import annotations

__all__ = ["DashError", "GatewayError", "NoWorkersError"]


class DashError(Exception):
    """Base of DASH's own errors. IPython shows them without a local traceback, since
    the message, not DASH's internals, is what the user needs."""

    def _render_traceback_(self) -> list[str]:
        return [f"\x1b[0;31m{type(self).__name__}\x1b[0m: {self}"]


class GatewayError(DashError):
    """The gateway could not be reached, or refused the request (for example a bad token)."""


class NoWorkersError(DashError):
    """No worker joined the cluster in time, so nothing could run."""
