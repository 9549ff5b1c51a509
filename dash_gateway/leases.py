"""The pool, its leases and the broker: which user's cluster gets which slice of which machine.

The **pool** is every machine that offers capacity, cut into *slots*: one slot is what one
worker process may hold (N cores and a memory limit, or one GPU with its VRAM). A **lease**
is one worker process started on a slot for one user's cluster, with a certificate of that
cluster's CA for that machine only, so it can register with no other cluster. A worker
process never serves two users.

The **broker** asks each running user cluster what its work is waiting for (the scheduler
plugin's ``dash_demand``), lets the :class:`LeasePolicy` pick free slots for it, and has the
slot's :class:`LeaseBackend` start the worker. Leases end when their worker has been idle
(no task, no result held) for ``lease_idle_timeout``, when their cluster stops, or when their
process dies; demand that is left is then served again, elsewhere if need be.

Backends are where capacity comes from: :class:`LocalLeaseBackend` starts workers on the
gateway's own host (``--local-workers`` slots, the operator's share of the pool). Contributed
machines' agents and an existing Dask deployment's cluster manager plug in as backends too.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import shutil
import sys
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
from traitlets import Bool, Float, Instance, Int, List, Type
from traitlets.config import LoggingConfigurable

from dash_gateway.cluster import ChildProcess
from dash_gateway.policy import LOCAL_MACHINE
from dash_gateway.scheduler_rpc import call_scheduler
from dash_gateway.user_clusters import (
    UserClusters,
    same_process,
    scheduler_environment,
    stop_process,
)
from dash_kernel.files import write_atomic
from dash_kernel.resources import format_resources, session_worker_resources, worker_resources

log = logging.getLogger(__name__)

_RPC_ERRORS = (OSError, asyncio.TimeoutError, RuntimeError, ValueError)


@dataclass(frozen=True)
class Slot:
    """What one lease worker may hold on ``machine``; ``resources`` are what it declares."""

    machine: str
    index: int
    nthreads: int
    memory_limit: int | None
    resources: Mapping[str, float]
    kind: str = "worker"  # or "session": one remote session's worker, holding no core

    @property
    def key(self) -> str:
        if self.kind == "worker":
            return f"{self.machine}/{self.index}"
        return f"{self.machine}/{self.kind}-{self.index}"

    def fits(self, need: Mapping[str, float]) -> bool:
        """Could a worker on this slot run a task restricted to ``need`` (Dask's rule)?"""
        return all(self.resources.get(name, 0) >= amount for name, amount in need.items())

    def describe(self) -> str:
        return f"{self.machine} ({format_resources(self.resources)})"


@dataclass
class Lease:
    """One worker process on ``slot`` for ``user``'s cluster."""

    id: str
    user: str
    cluster_address: str
    slot: Slot
    granted_at: float = field(default_factory=time.time)
    registered_at: float | None = None
    state: str = "starting"  # starting -> running -> stopping
    idle_for: float = 0.0  # seconds its worker has had no task and no result

    @property
    def worker_name(self) -> str:
        """The name its worker registers under: ``<machine>-<lease id>``, as admission wants."""
        return f"{self.slot.machine}-{self.id}"

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "user": self.user,
            "machine": self.slot.machine,
            "worker": self.worker_name,
            "resources": dict(self.slot.resources),
            "state": self.state,
            "granted": self.granted_at,
            "registered": self.registered_at,
        }


@dataclass(frozen=True)
class Request:
    """Work of ``user`` waiting for a worker: ``count`` tasks needing ``resources``, seen
    waiting first at ``since`` (the broker's clock, for first come first served)."""

    user: str
    resources: Mapping[str, float]
    count: int
    since: float


class LeaseBackend(LoggingConfigurable):
    """Where lease workers run: offers slots, starts and stops one worker per lease."""

    def slots(self) -> list[Slot]:
        """The slots this backend offers now (leased or not)."""
        raise NotImplementedError

    async def start(self, lease: Lease, clusters: UserClusters) -> None:
        """Start ``lease``'s worker (return once it is starting, not registered)."""
        raise NotImplementedError

    async def stop(self, lease: Lease) -> None:
        """Stop ``lease``'s worker and wait until it is gone."""
        raise NotImplementedError

    def exited(self, lease: Lease) -> bool:
        """Has ``lease``'s worker process ended by itself?"""
        raise NotImplementedError

    async def adopt(self) -> list[Lease]:
        """Leases a previous gateway left running (``keep_running``), to be taken over."""
        return []

    async def close(self) -> None:
        """Stop every worker this backend started (unless they are kept running)."""


class LocalLeaseBackend(LeaseBackend):
    """Leases on the gateway's own host: ``workers`` slots of ``threads`` threads each.

    Each lease is a ``dash-worker serve`` subprocess (one nanny, one worker) in a working
    directory of its own, with an allow-listed environment and its cluster's certificate.
    """

    workers = Int(1, help="Slots on this host (the gateway's --local-workers).").tag(config=True)
    threads = Int(1, help="Threads of each local lease worker.").tag(config=True)
    memory_limit = Int(0, help="Memory limit of each local lease worker in bytes (0: none).").tag(
        config=True
    )
    sessions = Int(
        0,
        help="Session slots on this host: each a worker for one remote session, which holds "
        "none of the workers' cores (an idle session needs memory, not a core).",
    ).tag(config=True)

    keep_running = Bool(
        False,
        help="Leave lease workers running when the gateway exits, for the next gateway to adopt; "
        "a worker whose scheduler is gone for death_timeout seconds then exits by itself.",
    ).tag(config=True)
    death_timeout = Float(
        120.0, help="Seconds a kept lease worker waits for a scheduler it lost before it exits."
    ).tag(config=True)

    def __init__(self, run_root: Path, records: Path | None = None, **kwargs: Any):
        super().__init__(**kwargs)
        self.run_root = run_root
        # Where leases left running are recorded, for the next gateway (never user-visible).
        self.records = records
        self._processes: dict[str, ChildProcess] = {}
        self._adopted: dict[str, tuple[int, float]] = {}  # lease id -> (pid, create time)

    def slots(self) -> list[Slot]:
        memory = self.memory_limit or None
        resources = worker_resources(self.threads, memory)
        slots = [
            Slot(LOCAL_MACHINE, i, self.threads, memory, resources) for i in range(self.workers)
        ]
        session = session_worker_resources(memory)
        slots += [
            Slot(LOCAL_MACHINE, i, 1, memory, session, kind="session") for i in range(self.sessions)
        ]
        return slots

    async def start(self, lease: Lease, clusters: UserClusters) -> None:
        run_dir = self.run_root / lease.id
        shutil.rmtree(run_dir, ignore_errors=True)
        (run_dir / "tmp").mkdir(parents=True, mode=0o700)
        os.chmod(run_dir, 0o700)
        host = _loopback_host(lease.cluster_address)
        creds = clusters.identity(lease.user).lease_worker(LOCAL_MACHINE, hosts=[host or ""])
        ca, cert, key = creds.write(run_dir, "worker")
        argv = [
            sys.executable, "-m", "dash_worker", "serve",
            "--scheduler", lease.cluster_address,
            "--nworkers", "1",
            "--nthreads", str(lease.slot.nthreads),
            "--memory-limit", str(lease.slot.memory_limit or 0),
            "--tls-ca", ca, "--tls-cert", cert, "--tls-key", key,
            "--name", lease.worker_name,
            "--local-directory", str(run_dir),
            "--parent-pid", "0" if self.keep_running else str(os.getpid()),
        ]  # fmt: skip
        if self.keep_running:
            argv += ["--death-timeout", str(self.death_timeout)]
        if host:
            argv += ["--host", host]
        if lease.slot.kind == "session":
            argv.append("--session-worker")
        process = ChildProcess(f"lease {lease.id} ({lease.user})")
        log_file = str(run_dir / "worker.log") if self.keep_running else None
        process.spawn(argv, scheduler_environment(run_dir), cwd=str(run_dir), log_file=log_file)
        self._processes[lease.id] = process
        if self.keep_running and self.records is not None and process.pid is not None:
            record = {
                **lease.to_json(),
                "cluster_address": lease.cluster_address,
                "slot": lease.slot.key,
                "pid": process.pid,
                "create_time": psutil.Process(process.pid).create_time(),
            }
            self.records.mkdir(parents=True, exist_ok=True, mode=0o700)
            write_atomic(self.records / f"{lease.id}.json", json.dumps(record))

    async def stop(self, lease: Lease) -> None:
        process = self._processes.pop(lease.id, None)
        if process is not None:
            await process.terminate()
        adopted = self._adopted.pop(lease.id, None)
        if adopted is not None:
            await asyncio.to_thread(stop_process, *adopted)
        self._forget(lease.id)

    def exited(self, lease: Lease) -> bool:
        adopted = self._adopted.get(lease.id)
        if adopted is not None:
            return not same_process(*adopted)
        process = self._processes.get(lease.id)
        return process is None or process.exited() is not None

    async def adopt(self) -> list[Lease]:
        if self.records is None or not self.records.is_dir():
            return []
        slots = {slot.key: slot for slot in self.slots()}
        out = []
        for path in sorted(self.records.glob("L*.json")):
            try:
                record = json.loads(path.read_text())
                pid, started = int(record["pid"]), float(record["create_time"])
                lease = Lease(
                    str(record["id"]),
                    str(record["user"]),
                    str(record["cluster_address"]),
                    slots[str(record["slot"])],
                    granted_at=float(record["granted"]),
                    registered_at=record.get("registered"),
                    state="running",
                )
            except (OSError, ValueError, KeyError, TypeError):
                log.warning("Ignoring the unreadable lease record %s", path)
                path.unlink(missing_ok=True)
                continue
            if not same_process(pid, started):
                self._forget(lease.id)
                continue
            self._adopted[lease.id] = (pid, started)
            out.append(lease)
        return out

    def _forget(self, lease_id: str) -> None:
        if self.records is not None:
            (self.records / f"{lease_id}.json").unlink(missing_ok=True)
        shutil.rmtree(self.run_root / lease_id, ignore_errors=True)

    async def close(self) -> None:
        if not self.keep_running:
            await asyncio.gather(*(p.terminate() for p in self._processes.values()))
            for lease_id, adopted in list(self._adopted.items()):
                await asyncio.to_thread(stop_process, *adopted)
                self._forget(lease_id)
        self._processes.clear()
        self._adopted.clear()

    def close_now(self) -> None:
        if not self.keep_running:
            for process in self._processes.values():
                process.terminate_now()
            for adopted in self._adopted.values():
                stop_process(*adopted)
        self._processes.clear()
        self._adopted.clear()


def _loopback_host(address: str) -> str | None:
    host = address.split("://", 1)[-1].rsplit(":", 1)[0].strip("[]")
    return host if host in ("127.0.0.1", "localhost", "::1") else None


class LeasePolicy(LoggingConfigurable):
    """Decides which waiting work gets which free slot. Subclass to change the order
    (fair share, priorities) or to take slots back (preemption)."""

    max_leases_per_user = Int(
        0, help="The most leases one user's cluster may hold at once (0: no limit)."
    ).tag(config=True)
    reclaim_idle_after = Float(
        2.0,
        help="Seconds a lease must have been idle before it is ended for another user's "
        "waiting work (before lease_idle_timeout).",
    ).tag(config=True)

    def grants(
        self, requests: list[Request], free: list[Slot], leases: list[Lease]
    ) -> list[tuple[Request, Slot]]:
        raise NotImplementedError

    def reclaims(self, unmet: list[Request], leases: list[Lease]) -> list[Lease]:
        """Leases to end so that ``unmet`` work (which found no free slot) can have their
        slots. By default: other users' leases idle for ``reclaim_idle_after`` seconds, so
        that a finished notebook's workers do not keep another user waiting."""
        out: list[Lease] = []
        for request in sorted(unmet, key=lambda r: r.since):
            if self.at_cap(request.user, leases):
                continue
            remaining = request.count
            for lease in sorted(leases, key=lambda x: -x.idle_for):
                if remaining <= 0:
                    break
                if (
                    lease not in out
                    and lease.user != request.user
                    and lease.state == "running"
                    and lease.idle_for >= self.reclaim_idle_after
                    and lease.slot.fits(request.resources)
                ):
                    out.append(lease)
                    remaining -= max(lease.slot.nthreads, 1)
        return out

    def at_cap(self, user: str, leases: Iterable[Lease]) -> bool:
        held = sum(1 for lease in leases if lease.user == user)
        return bool(self.max_leases_per_user) and held >= self.max_leases_per_user


class FirstComeFirstServed(LeasePolicy):
    """The request waiting longest first; each gets the smallest free slot that fits it
    (so a GPU slot is not spent on CPU work), one worker per ``nthreads`` waiting tasks,
    up to the user's cap."""

    def grants(
        self, requests: list[Request], free: list[Slot], leases: list[Lease]
    ) -> list[tuple[Request, Slot]]:
        free = sorted(free, key=lambda s: (len(s.resources), s.nthreads, s.key))
        held = list(leases)
        out: list[tuple[Request, Slot]] = []
        for request in sorted(requests, key=lambda r: r.since):
            remaining = request.count
            while remaining > 0 and not self.at_cap(request.user, held):
                slot = next((s for s in free if s.fits(request.resources)), None)
                if slot is None:
                    break
                free.remove(slot)
                out.append((request, slot))
                held.append(Lease("pending", request.user, "", slot))
                remaining -= max(slot.nthreads, 1)
        return out


class Broker(LoggingConfigurable):
    """Matches every user cluster's waiting work with free slots of the pool."""

    lease_idle_timeout = Float(
        60.0,
        help="Seconds a lease worker may sit with no task and no result before it is "
        "released back to the pool.",
    ).tag(config=True)
    poll_interval = Float(0.5, help="Seconds between looks at the clusters' demand.").tag(
        config=True
    )
    lease_start_timeout = Float(
        60.0, help="Seconds a lease worker has to register before it is given up and retried."
    ).tag(config=True)
    policy_class = Type(
        FirstComeFirstServed,
        klass=LeasePolicy,
        help="Decides which waiting work gets which free slot.",
    ).tag(config=True)
    policy = Instance(LeasePolicy)
    backends = List(Instance(LeaseBackend))

    def __init__(self, clusters: UserClusters, **kwargs: Any):
        super().__init__(**kwargs)
        self.clusters = clusters
        self.policy = self.policy_class(parent=self)
        self._leases: dict[str, Lease] = {}
        self._backend_of: dict[str, LeaseBackend] = {}
        self._waiting_since: dict[tuple[str, tuple[tuple[str, float], ...]], float] = {}
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._told: dict[str, tuple[str, list[dict[str, Any]]]] = {}

    # ----- lifecycle -------------------------------------------------------------------

    async def start(self) -> None:
        """Take over the leases a previous gateway left running whose cluster is adopted too
        (the rest are stopped), then start brokering."""
        running = self.clusters.running()
        for backend in self.backends:
            for lease in await backend.adopt():
                self._leases[lease.id] = lease
                self._backend_of[lease.id] = backend
                record = running.get(lease.user)
                if record is None or record.address != lease.cluster_address:
                    await self._end(lease, "its cluster is gone")
                else:
                    log.info("Adopted lease %s: %s's worker on %s", lease.id, lease.user,
                             lease.slot.describe())  # fmt: skip
        self._task = asyncio.create_task(self._run(), name="dash-broker")

    async def close(self) -> None:
        """Stop brokering; end every lease unless its backend keeps them running."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        kept = [lease for lease in self.leases() if self._keeps(lease)]
        await asyncio.gather(
            *(self._end(lease, "the gateway stops") for lease in self.leases() if lease not in kept)
        )
        for backend in self.backends:
            await backend.close()

    def _keeps(self, lease: Lease) -> bool:
        return bool(getattr(self._backend_of.get(lease.id), "keep_running", False))

    def close_now(self) -> None:
        """Last resort at interpreter exit: leave no lease worker behind."""
        for backend in self.backends:
            close_now = getattr(backend, "close_now", None)
            if close_now is not None:
                close_now()

    def poke(self) -> None:
        """Look at the demand now (a cluster was just handed out, say)."""
        self._wake.set()

    # ----- queries ---------------------------------------------------------------------

    def leases(self, user: str | None = None) -> list[Lease]:
        """Every lease, or ``user``'s."""
        return [lease for lease in self._leases.values() if user is None or lease.user == user]

    def slots(self) -> list[Slot]:
        return [slot for backend in self.backends for slot in backend.slots()]

    def pool(self, user: str) -> list[dict[str, Any]]:
        """The pool as ``user`` may see it: each slot, and whether it is free, theirs (and
        still starting) or another user's (never whose)."""
        held = {lease.slot.key: lease for lease in self._leases.values()}
        rows = []
        for slot in self.slots():
            lease = held.get(slot.key)
            mine = lease is not None and lease.user == user
            rows.append(
                {
                    "name": slot.key,
                    "machine": slot.machine,
                    "resources": dict(slot.resources),
                    "leased": None if lease is None else ("you" if mine else "other"),
                    # Only of the user's own leases: is its worker still on its way?
                    "starting": bool(mine and lease.state == "starting"),
                }
            )
        return rows

    # ----- the loop --------------------------------------------------------------------

    async def _run(self) -> None:
        while True:
            try:
                await self.step()
            except Exception:
                log.exception("The lease broker failed a round; trying again")
            self._wake.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.poll_interval)

    async def step(self) -> None:
        """One round: end leases that are over, then grant leases for waiting work."""
        running = self.clusters.running()
        for lease in self.leases():
            record = running.get(lease.user)
            if record is None or record.address != lease.cluster_address:
                await self._end(lease, "its cluster stopped")
            elif self._backend_of[lease.id].exited(lease):
                await self._end(lease, "its worker process exited")
        demands = await asyncio.gather(
            *(self._demand(user, record.address) for user, record in running.items())
        )
        requests: list[Request] = []
        for (user, _), demand in zip(running.items(), demands, strict=True):
            if demand is not None:
                requests += await self._account(user, demand)
        free = self._free_slots()
        grants = self.policy.grants(requests, free, self.leases())
        for request, slot in grants:
            await self._grant(request.user, running[request.user].address, slot)
        unmet = _unmet(requests, grants)
        for lease in self.policy.reclaims(unmet, self.leases()):
            # Its slot is free for the waiting work at the next round.
            await self._end(lease, f"idle for {lease.idle_for:.0f}s while other work waits")
        await asyncio.gather(*(self.tell_pool(user) for user in running))

    async def tell_pool(self, user: str, *, force: bool = False) -> None:
        """Tell ``user``'s scheduler what the pool looks like to them, if it changed."""
        record = self.clusters.running().get(user)
        if record is None:
            return
        rows = self.pool(user)
        if not force and self._told.get(user) == (record.address, rows):
            return
        try:
            args = self.clusters.identity(user).control()
            await call_scheduler(record.address, args, "dash_set_pool", pool=rows)
        except _RPC_ERRORS as exc:
            log.debug("Could not tell %s's scheduler about the pool: %r", user, exc)
            return
        self._told[user] = (record.address, rows)

    async def _demand(self, user: str, address: str) -> dict[str, Any] | None:
        try:
            args = self.clusters.identity(user).control()
            reply = await call_scheduler(address, args, "dash_demand", timeout=5)
        except _RPC_ERRORS as exc:
            log.debug("%s's scheduler did not report its demand: %r", user, exc)
            return None
        return reply if isinstance(reply, dict) else None

    async def _account(self, user: str, demand: dict[str, Any]) -> list[Request]:
        """Update ``user``'s leases from their scheduler's view; what still waits, as requests."""
        mine = {lease.worker_name: lease for lease in self.leases(user)}
        for row in demand.get("workers") or ():
            lease = mine.get(str(row.get("name")))
            if lease is None:
                continue
            if lease.state == "starting":
                joined = row.get("joined")
                lease.state = "running"
                lease.registered_at = float(joined) if joined else time.time()
                log.info(
                    "Lease %s: %s's worker on %s registered in %.2fs",
                    lease.id, user, lease.slot.describe(), lease.registered_at - lease.granted_at,
                )  # fmt: skip
            idle_for = lease.idle_for = float(row.get("idle_for") or 0.0)
            if lease.state == "running" and idle_for >= self.lease_idle_timeout:
                await self._end(lease, f"idle for {idle_for:.0f}s")
        now = time.time()
        for lease in self.leases(user):
            if lease.state == "starting" and now - lease.granted_at > self.lease_start_timeout:
                await self._end(
                    lease, f"it did not register within {self.lease_start_timeout:.0f}s"
                )
        # Work that starting leases will take does not ask twice.
        starting = [lease for lease in self.leases(user) if lease.state == "starting"]
        requests = []
        seen = set()
        for row in demand.get("pending") or ():
            need = {str(k): float(v) for k, v in (row.get("resources") or {}).items()}
            count = int(row.get("count") or 0)
            for lease in starting:
                if count > 0 and lease.slot.fits(need):
                    count -= max(lease.slot.nthreads, 1)
                    starting.remove(lease)
            group = (user, tuple(sorted(need.items())))
            seen.add(group)
            since = self._waiting_since.setdefault(group, time.monotonic())
            if count > 0:
                requests.append(Request(user, need, count, since))
        for group in [g for g in self._waiting_since if g[0] == user and g not in seen]:
            del self._waiting_since[group]
        return requests

    def _free_slots(self) -> list[Slot]:
        taken = {lease.slot.key for lease in self._leases.values()}
        return [slot for slot in self.slots() if slot.key not in taken]

    async def _grant(self, user: str, address: str, slot: Slot) -> None:
        backend = next(b for b in self.backends if slot in b.slots())
        lease = Lease(f"L{secrets.token_hex(4)}", user, address, slot)
        self._leases[lease.id] = lease
        self._backend_of[lease.id] = backend
        log.info("Lease %s: %s to %s's cluster", lease.id, slot.describe(), user)
        try:
            await backend.start(lease, self.clusters)
        except Exception:
            log.exception("Lease %s could not start its worker", lease.id)
            await self._end(lease, "its worker did not start")

    async def _end(self, lease: Lease, why: str) -> None:
        if self._leases.pop(lease.id, None) is None:
            return
        lease.state = "stopping"
        log.info("Lease %s (%s, %s) ends: %s", lease.id, lease.user, lease.slot.describe(), why)
        backend = self._backend_of.pop(lease.id)
        with contextlib.suppress(Exception):
            await backend.stop(lease)


def _unmet(requests: list[Request], grants: list[tuple[Request, Slot]]) -> list[Request]:
    """What of ``requests`` the grants leave waiting."""
    served: dict[int, int] = {}
    for request, slot in grants:
        served[id(request)] = served.get(id(request), 0) + max(slot.nthreads, 1)
    out = []
    for request in requests:
        left = request.count - served.get(id(request), 0)
        if left > 0:
            out.append(Request(request.user, request.resources, left, request.since))
    return out
