"""Errors DASH raises for the user's input or the cluster's state, shown as one clear line."""

from __future__ import annotations

from typing import Any

__all__ = ["DashError", "GatewayError", "NoWorkersError", "WorkerKilledError"]


class DashError(Exception):
    """Base of DASH's own errors. IPython shows them without a local traceback, since
    the message, not DASH's internals, is what the user needs."""

    def _render_traceback_(self) -> list[str]:
        return [f"\x1b[0;31m{type(self).__name__}\x1b[0m: {self}"]


class GatewayError(DashError):
    """The gateway could not be reached, or refused the request (for example a bad token)."""


class NoWorkersError(DashError):
    """No worker joined the cluster in time, so nothing could run."""


class WorkerKilledError(DashError):
    """A task killed the worker process running it (a segfault, ``os._exit``, the OOM
    killer): say which worker and how its process ended."""

    def __init__(self, worker: str, how: str, exitcode: int | None = None):
        self.worker = worker
        self.how = how
        self.exitcode = exitcode
        super().__init__(f"the task killed its worker {worker} ({how})")

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.worker, self.how, self.exitcode))
