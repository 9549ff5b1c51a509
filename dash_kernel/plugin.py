"""The worker plugin every DASH client installs: stops a running task its caller cancelled."""

from __future__ import annotations

import logging
import signal

from distributed.diagnostics.plugin import WorkerPlugin

from .tasks import cancel_running

__all__ = ["DashWorkerPlugin", "dask_setup"]

log = logging.getLogger(__name__)


class DashWorkerPlugin(WorkerPlugin):
    """Dask cannot stop a thread that runs a released task; this plugin raises
    :class:`~dash_kernel.tasks.RemoteCancelled` in it, so Ctrl-C in a notebook really
    stops the remote work and frees the worker's slot."""

    name = "dash"
    idempotent = True

    def transition(self, key, start, finish, **kwargs) -> None:
        if start == "executing" and finish in ("released", "cancelled") and cancel_running(key):
            log.info("stopped cancelled task %s", key)


def dask_setup(worker) -> None:
    """Preload hook for the workers of an embedded cluster.

    They are children of the user's kernel and share its process group, so the SIGINT
    of a notebook interrupt reaches them too. They ignore it: the interrupt is for the
    kernel, which cancels the remote work itself, and the nanny still stops them.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
