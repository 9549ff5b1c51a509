"""Dask plugins every DASH cluster runs: stop cancelled tasks, and blame the task that kills its worker."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import tempfile
import uuid
from time import time
from typing import Any

from distributed.diagnostics.plugin import NannyPlugin, SchedulerPlugin, WorkerPlugin
from distributed.protocol import pickle

from .errors import WorkerKilledError
from .tasks import RUNNING_FILE_ENV, cancel_running

__all__ = [
    "DashNannyPlugin",
    "DashWorkerPlugin",
    "WorkerDeathPlugin",
    "dask_setup",
    "describe_exit",
]

log = logging.getLogger(__name__)

# How long the scheduler waits for a nanny to say how its worker ended.
DEATH_REPORT_TIMEOUT = 5.0
_DEATHS_KEPT = 20


class DashWorkerPlugin(WorkerPlugin):
    """Dask cannot stop a thread that runs a released task; this plugin raises
    :class:`~dash_kernel.tasks.RemoteCancelled` in it, so Ctrl-C in a notebook really
    stops the remote work and frees the worker's slot."""

    name = "dash"
    idempotent = True

    def transition(self, key, start, finish, **kwargs) -> None:
        if start == "executing" and finish in ("released", "cancelled") and cancel_running(key):
            log.info("stopped cancelled task %s", key)


def describe_exit(exitcode: int | None) -> str:
    """How a worker process ended, as a person reads it: ``SIGSEGV``, ``exit status 3``."""
    if exitcode is None:
        return "it was lost"
    if exitcode < 0:
        with contextlib.suppress(ValueError):
            return signal.Signals(-exitcode).name
        return f"signal {-exitcode}"
    if exitcode == 255:
        return "killed by an unknown signal"
    return f"exit status {exitcode}"


class DashNannyPlugin(NannyPlugin):
    """Remembers how each worker process of this nanny ended and which DASH tasks it was
    running then (the worker keeps their keys in a file, see
    :data:`~dash_kernel.tasks.RUNNING_FILE_ENV`), and answers ``dash_death`` for the
    scheduler."""

    name = "dash-deaths"
    restart = False

    def setup(self, nanny: Any) -> None:
        self.nanny = nanny
        self.deaths: dict[str, dict[str, Any]] = {}
        self.changed = asyncio.Event()
        directory = nanny.local_directory or tempfile.gettempdir()
        self.path = os.path.join(directory, f"dash-running-{uuid.uuid4().hex}")
        nanny.env[RUNNING_FILE_ENV] = self.path
        nanny.handlers["dash_death"] = self.death
        # The nanny has no hook for its worker's exit: wrap the callback it hands to each
        # worker process (and to the one already running).
        original = nanny._on_worker_exit_sync

        def on_exit(exitcode: int) -> None:
            self._record(exitcode)
            original(exitcode)

        nanny._on_worker_exit_sync = on_exit
        if nanny.process is not None:
            nanny.process.on_exit = on_exit

    def _record(self, exitcode: int) -> None:
        address = self.nanny.worker_address
        try:
            with open(self.path) as file:
                keys = [line for line in file.read().split("\n") if line]
            os.remove(self.path)
        except OSError:
            keys = None  # the worker kept no record: nothing to blame
        if address is not None:
            self.deaths[address] = {"exitcode": exitcode, "keys": keys}
            while len(self.deaths) > _DEATHS_KEPT:
                self.deaths.pop(next(iter(self.deaths)))
        self.changed.set()

    async def death(self, comm: Any = None, address: str = "", timeout: float = 3.0) -> Any:
        """How the worker at ``address`` ended, once its process has: ``{"exitcode",
        "keys"}``; None if it is still running after ``timeout`` seconds."""
        deadline = time() + timeout
        while address not in self.deaths and time() < deadline:
            self.changed.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.changed.wait(), max(deadline - time(), 0))
        return self.deaths.get(address)

    def teardown(self, nanny: Any) -> None:
        with contextlib.suppress(OSError):
            os.remove(self.path)


class WorkerDeathPlugin(SchedulerPlugin):
    """When a worker process dies, blame only the DASH task it was running.

    Dask counts a death against every task that was assigned to the worker and retries
    them elsewhere until ``allowed-failures`` workers have died: a task that segfaults
    kills four workers and fails other work assigned to them. Here the nanny says which
    task its worker ran and how it ended: that task fails at once with
    :class:`~dash_kernel.errors.WorkerKilledError` (or uses one of its ``retries``), and
    every other task is rerun without being counted. Deaths a nanny cannot explain (a
    machine that vanished) are left to Dask.
    """

    name = "dash-worker-deaths"

    def __init__(self) -> None:
        self._pending: dict[str, asyncio.Future[Any]] = {}

    async def start(self, scheduler: Any) -> None:
        self.scheduler = scheduler
        self._remove_worker = scheduler.remove_worker
        scheduler.remove_worker = self.remove_worker_first_blaming
        scheduler.handlers["unregister"] = self.remove_worker_first_blaming
        await scheduler.register_nanny_plugin(
            comm=None,
            plugin=pickle.dumps(DashNannyPlugin()),
            name=DashNannyPlugin.name,
            idempotent=True,
        )

    async def remove_worker_first_blaming(
        self, address: str, *, stimulus_id: str, expected: bool = False, close: bool = True
    ) -> Any:
        """``Scheduler.remove_worker``, after settling the blame for an unexpected death."""
        ws = self.scheduler.workers.get(self.scheduler.coerce_address(address))
        if ws is not None and not expected and ws.processing and ws.nanny:
            await self._blame_once(ws, stimulus_id)
        return await self._remove_worker(
            address, stimulus_id=stimulus_id, expected=expected, close=close
        )

    async def _blame_once(self, ws: Any, stimulus_id: str) -> None:
        # The closed stream, the nanny's unregister and failed sends all remove the worker.
        pending = self._pending.get(ws.address)
        if pending is None:
            pending = self._pending[ws.address] = asyncio.ensure_future(
                self._blame(ws, stimulus_id)
            )
            pending.add_done_callback(lambda _: self._pending.pop(ws.address, None))
        await asyncio.shield(pending)

    async def _blame(self, ws: Any, stimulus_id: str) -> None:
        try:
            death = await asyncio.wait_for(
                self.scheduler.rpc(ws.nanny).dash_death(address=ws.address),
                DEATH_REPORT_TIMEOUT,
            )
        except Exception as exc:  # an old nanny, or one gone with its machine
            log.info("no death report for %s from its nanny: %r", ws.address, exc)
            return
        if not death or death.get("keys") is None:
            return
        culprits = set(death["keys"])
        recommendations: dict[Any, str] = {}
        for ts in list(ws.processing):
            if str(ts.key) not in culprits:
                ts.suspicious = -1  # Dask adds one: this death does not count against it
            elif ts.retries > 0:
                ts.retries -= 1
                ts.suspicious = -1
            else:
                recommendations.update(self._fail(ts, ws, death["exitcode"], stimulus_id))
        if recommendations:
            self.scheduler.transitions(recommendations, stimulus_id=stimulus_id)

    def _fail(self, ts: Any, ws: Any, exitcode: int, stimulus_id: str) -> dict[Any, str]:
        error = WorkerKilledError(str(ws.name), describe_exit(exitcode), exitcode)
        log.error("Task %s killed its worker %s (%s)", ts.key, ws.name, describe_exit(exitcode))
        return self.scheduler.transition(
            ts.key,
            "erred",
            exception=pickle.dumps(error),
            exception_text=str(error),
            cause=ts.key,
            stimulus_id=stimulus_id,
            worker=ws.address,
        )


def dask_setup(worker) -> None:
    """Preload hook for the workers of an embedded cluster.

    They are children of the user's kernel and share its process group, so the SIGINT
    of a notebook interrupt reaches them too. They ignore it: the interrupt is for the
    kernel, which cancels the remote work itself, and the nanny still stops them.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
