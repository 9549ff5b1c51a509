"""What the dashboard shows: workers, a user's sessions and work, storage use, as one JSON object."""

from __future__ import annotations

import asyncio
import datetime
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from dash_gateway.machines import (
    WorkerOptions,
    drains_for,
    live_workers,
    machine_record,
    with_drains,
    workers_by_machine,
)
from dash_gateway.policy import LOCAL_MACHINE
from dash_gateway.registry import OPERATOR, Registry
from dash_kernel._version import __version__
from dash_kernel.resources import GPU, VRAM

if TYPE_CHECKING:
    from dash_gateway.cluster import ClusterSupervisor
    from dash_gateway.storage import StorageService

log = logging.getLogger(__name__)

# Requests within this many seconds share one look at the scheduler and the registry.
SNAPSHOT_TTL = 0.5
# Listing objects may be slow (S3): a user's storage use is recounted at most this often.
STORAGE_TTL = 10.0
MB = 10**6


def iso_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def iso_from_epoch(moment: Any) -> str | None:
    if not isinstance(moment, (int, float)):
        return None
    return datetime.datetime.fromtimestamp(moment, datetime.timezone.utc).isoformat(
        timespec="seconds"
    )


@dataclass(frozen=True)
class Snapshot:
    """One look at the cluster, for every user: filtered per user by :func:`for_user`."""

    machines: list[dict[str, Any]]
    workers: list[dict[str, Any]]
    sessions: list[dict[str, Any]]
    work: list[dict[str, Any]]
    state: str
    scheduler: str
    error: str | None = None


def local_machine_record(workers: list[dict[str, Any]]) -> dict[str, Any]:
    """A machine record, shaped like the registry's, for the gateway's own local workers
    (they are not in the registry: nobody enrolled them)."""
    grouped = workers_by_machine(workers, [LOCAL_MACHINE])[LOCAL_MACHINE]
    cpus = sum(int(w.get("nthreads") or 0) for w in workers)
    memory = sum(int(w.get("memory_limit") or 0) for w in workers)
    gpus = [
        {"index": i, "name": "GPU", "vram": int((w.get("resources") or {}).get(VRAM) or 0)}
        for i, w in enumerate(w for w in workers if (w.get("resources") or {}).get(GPU))
    ]
    loads = [m.get("cpu") for w in workers if isinstance(m := w.get("metrics"), dict)]
    cpu_loads = [float(x) for x in loads if isinstance(x, (int, float))]
    used = sum(
        int(m.get("memory") or 0) for w in workers if isinstance(m := w.get("metrics"), dict)
    )
    # Rounded: Dask's metrics move on every worker heartbeat, and each move is a new
    # overview sent to every open page.
    used = round(used / 10 / MB) * 10 * MB
    hardware = {"cpus": cpus, "memory": memory, "gpus": gpus}
    return {
        "name": LOCAL_MACHINE,
        "owner": OPERATOR,
        "state": "active" if workers else "offline",
        "hardware": hardware,
        "caps": {"cpus": cpus, "memory": memory, "gpus": [g["index"] for g in gpus]},
        "created": None,
        "approved": None,
        "last_heartbeat": None,
        "utilisation": {
            # Dask's per-worker CPU metric is percent of one core: average over workers.
            "cpu_percent": round(sum(cpu_loads) / len(cpu_loads)) if cpu_loads else None,
            "memory_used": used,
            "memory_total": memory,
            "gpus": [],
        },
        "workers": grouped,
        "current_work": sum(w["processing"] for w in grouped),
        "local": True,
    }


def totals(machines: list[dict[str, Any]], workers: list[dict[str, Any]]) -> dict[str, int]:
    """Counts over the live workers (and the machines with any)."""
    gpus = sum(int((w.get("resources") or {}).get(GPU) or 0) for w in workers)
    used = sum(int((w.get("used_resources") or {}).get(GPU) or 0) for w in workers)
    online = [m for m in machines if m.get("workers")]
    return {
        "machines": len(online),
        "workers": len(workers),
        "gpus": gpus,
        "gpus_free": max(gpus - used, 0),
        # The cores machines share (a GPU worker's threads are not cores of their own).
        "cpus": sum(int((m.get("caps") or {}).get("cpus") or 0) for m in online),
    }


def for_user(
    snapshot: Snapshot, user: str, operator: bool, storage: dict[str, Any]
) -> dict[str, Any]:
    """The overview ``user`` may see: every worker, but only their own sessions and work
    (everyone's for the operator)."""

    def mine(row: Mapping[str, Any]) -> bool:
        return operator or row.get("user") == user

    sessions = [
        {**row, "started": iso_from_epoch(row.get("started"))}
        for row in snapshot.sessions
        if mine(row)
    ]
    overview: dict[str, Any] = {
        "time": iso_now(),
        "user": user,
        "operator": operator,
        "cluster": {
            "state": snapshot.state,
            "version": __version__,
            "scheduler": snapshot.scheduler,
        },
        "totals": totals(snapshot.machines, snapshot.workers),
        "workers": drains_for(snapshot.machines, user, operator),
        "sessions": sessions,
        "work": [row for row in snapshot.work if mine(row)],
        "storage": storage,
    }
    if snapshot.error:
        overview["error"] = snapshot.error
    return overview


class OverviewService:
    """Builds overviews; shared by the REST handler and every open event stream."""

    def __init__(
        self,
        cluster: ClusterSupervisor,
        registry: Registry,
        options: WorkerOptions,
        storage: StorageService | None = None,
        *,
        snapshot_ttl: float = SNAPSHOT_TTL,
        storage_ttl: float = STORAGE_TTL,
    ):
        self.cluster = cluster
        self.registry = registry
        self.options = options
        self.storage = storage
        self.snapshot_ttl = snapshot_ttl
        self.storage_ttl = storage_ttl
        self._snapshot: tuple[float, Snapshot] | None = None
        self._snapshot_task: asyncio.Task[Snapshot] | None = None
        self._usage: dict[str, tuple[float, dict[str, int]]] = {}
        self._usage_tasks: dict[str, asyncio.Task[dict[str, int]]] = {}
        # Event streams, closed when the server stops (see close()).
        self.streams: set[Any] = set()

    async def overview(self, user: str, operator: bool) -> dict[str, Any]:
        """The overview JSON for ``user`` (see the README's API section)."""
        snapshot, usage = await asyncio.gather(self.snapshot(), self.storage_use(user))
        return for_user(snapshot, user, operator, usage)

    async def snapshot(self) -> Snapshot:
        """A recent look at the cluster (at most ``snapshot_ttl`` old)."""
        if self._snapshot is not None and time.monotonic() - self._snapshot[0] < self.snapshot_ttl:
            return self._snapshot[1]
        # One look at a time: callers that arrive meanwhile wait for the same answer.
        return await _shared(self, "_snapshot_task", self._take_snapshot)

    async def _take_snapshot(self) -> Snapshot:
        started = time.monotonic()
        workers = await live_workers(self.cluster)
        error = None
        try:
            work = await self._work()
        except Exception as exc:
            # Decoration on the worker list: say why it is missing, never fail for it.
            log.debug("No work summary from the scheduler: %r", exc)
            work, error = {}, f"cannot ask the scheduler about work: {exc}"
        machines = self.registry.machines()
        grouped = workers_by_machine(workers, (m.name for m in machines))
        timeout = self.options.heartbeat_timeout
        records = [machine_record(m, grouped[m.name], timeout) for m in machines]
        with_drains(records, workers, list(work.get("sessions") or []))
        local = [w for w in workers if w.get("machine") == LOCAL_MACHINE]
        if local:
            records.insert(0, local_machine_record(local))
        snapshot = Snapshot(
            machines=records,
            workers=workers,
            sessions=list(work.get("sessions") or []),
            work=list(work.get("work") or []),
            state=self.cluster.state,
            scheduler=self.cluster.scheduler_address,
            error=error,
        )
        self._snapshot = (started, snapshot)
        return snapshot

    async def _work(self) -> dict[str, Any]:
        if self.cluster.ca is None:
            return {}
        return await self.cluster.dash_work()

    async def storage_use(self, user: str) -> dict[str, Any]:
        """``{"backend": ..., "objects": n, "bytes": n}`` for ``user``, recounted at most
        every ``storage_ttl`` seconds."""
        if self.storage is None:
            return {"backend": None, "objects": 0, "bytes": 0}
        cached = self._usage.get(user)
        if cached is None or time.monotonic() - cached[0] >= self.storage_ttl:
            try:
                await _shared_per_key(self._usage_tasks, user, lambda: self._count(user))
            except Exception as exc:
                log.warning("Cannot count the stored objects of %s: %r", user, exc)
                if cached is None:
                    return {"backend": self.storage.description, "objects": None, "bytes": None}
            cached = self._usage[user]
        return {"backend": self.storage.description, **cached[1]}

    async def _count(self, user: str) -> dict[str, int]:
        assert self.storage is not None
        started = time.monotonic()
        usage = await self.storage.run(self.storage.usage, user)
        self._usage[user] = (started, usage)
        return usage

    async def close(self) -> None:
        """Close every event stream (the server is stopping)."""
        for stream in list(self.streams):
            stream.close(1001, "the server is shutting down")
        self.streams.clear()


async def _shared(owner: Any, attr: str, make: Callable[[], Awaitable[Any]]) -> Any:
    task = getattr(owner, attr)
    if task is None or task.done():
        task = asyncio.ensure_future(make())
        setattr(owner, attr, task)
    return await asyncio.shield(task)


async def _shared_per_key(
    tasks: dict[str, asyncio.Task[Any]], key: str, make: Callable[[], Awaitable[Any]]
) -> Any:
    task = tasks.get(key)
    if task is None or task.done():
        task = tasks[key] = asyncio.ensure_future(make())
        task.add_done_callback(lambda t: tasks.pop(key, None) if tasks.get(key) is t else None)
    return await asyncio.shield(task)
