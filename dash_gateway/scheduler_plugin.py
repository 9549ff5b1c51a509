"""DASH policy inside the Dask scheduler: who may join, which machines take work, GPU slots.

Loaded by :mod:`dash_gateway.scheduler_process`, never by the gateway itself. It enforces:

- **Admission.** A worker registers only with a certificate of role ``worker`` (a client
  certificate cannot), whose serial is not revoked, for a machine the policy admits, and
  under a name of that machine (``<machine>`` or ``<machine>-...``).
- **Machine states** from the policy file: workers of revoked or removed machines are
  dropped; paused and draining ones are marked paused, so no new work is assigned to them
  while what they are running finishes.
- **GPU slots.** Work that asks for no GPU is restricted to CPU workers
  (:func:`dash_kernel.resources.placement_restrictions`).

Sessions on a draining machine are told so, on their own event topic, so that their
notebooks move them (checkpoint and restore) and the drain can end.

It also answers ``dash_workers``: plain data about each worker for the gateway,
``dash_work``: each user's remote sessions and other work, the user being the name in the
client certificate (``OU=client, CN=<user>``) of the client that submitted it, and
``dash_demand``: what the work waits for, which the gateway's broker leases workers for.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass
from time import time
from typing import Any

from distributed.core import Status
from distributed.diagnostics.plugin import SchedulerPlugin
from tornado.ioloop import PeriodicCallback

from dash_gateway.policy import ClusterPolicy, normalize_serial, read_policy
from dash_kernel.resources import placement_restrictions
from dash_kernel.sessions import NOTEBOOK_ANNOTATION

log = logging.getLogger(__name__)

POLL_INTERVAL = 0.5
_UNSCHEDULED = ("released", "waiting", "no-worker", "queued")
SESSION_PREFIX = "dash-session-"
# Task groups remembered per worker (most recent first) for "what ran on my machine".
RAN_KEPT = 20
# The certificate the gateway calls the scheduler with (role, name): a reserved user name.
GATEWAY_PEER = ("client", "dash-gateway")
# Scheduler task states as the dashboard counts them.
_WORK_STATES = {
    "memory": "done",
    "processing": "running",
    "erred": "erred",
    **dict.fromkeys(_UNSCHEDULED, "queued"),
}


@dataclass(frozen=True)
class PeerIdentity:
    """Who is on the other end of a TLS connection, from its verified certificate."""

    role: str
    name: str
    serial: str


def peer_identity(comm: Any) -> PeerIdentity | None:
    """The certificate subject of ``comm``'s peer, or None without a verified certificate."""
    cert = (getattr(comm, "extra_info", None) or {}).get("peercert")
    if not cert:
        return None
    subject = dict(rdn[0] for rdn in cert.get("subject", ()) if rdn)
    return PeerIdentity(
        role=str(subject.get("organizationalUnitName", "")),
        name=str(subject.get("commonName", "")),
        serial=normalize_serial(str(cert.get("serialNumber", "0"))),
    )


def admission_refusal(
    peer: PeerIdentity | None, worker_name: str, policy: ClusterPolicy
) -> str | None:
    """Why a worker named ``worker_name`` may not register, or None if it may."""
    if peer is None:
        return "no verified client certificate"
    if peer.role != "worker":
        return f"a {peer.role or 'role-less'} certificate cannot register a worker"
    if peer.serial in policy.revoked_serials:
        return f"certificate {peer.serial} of machine {peer.name!r} was revoked"
    if not policy.admits(peer.name):
        state = policy.machines.get(peer.name, "not registered")
        return f"machine {peer.name!r} is {state} and may not join"
    if worker_name != peer.name and not worker_name.startswith(peer.name + "-"):
        return f"machine {peer.name!r} may only register workers named {peer.name}-..."
    return None


class DashSchedulerPlugin(SchedulerPlugin):
    """Admission, machine states and GPU-slot placement for the DASH cluster."""

    name = "dash-policy"

    def __init__(
        self, policy_file: str | os.PathLike[str] | None, poll_interval: float = POLL_INTERVAL
    ):
        self.policy_file = os.fspath(policy_file) if policy_file else None
        self.poll_interval = poll_interval
        self.policy = ClusterPolicy()
        self._policy_mtime: float | None = None
        # Worker name -> the identity its certificate proved at registration.
        self.identities: dict[str, PeerIdentity] = {}
        self._names: dict[str, str] = {}  # address -> worker name
        self._held: set[str] = set()
        self._callback: PeriodicCallback | None = None
        self._client_users: dict[str, str] = {}  # client id -> user in its certificate
        self._owners: dict[Any, str] = {}  # task key -> user whose client submitted it
        self._session_started: dict[str, float] = {}  # session task key -> start time
        # worker name -> task prefix -> {"name", "done", "erred", "last"}, oldest first
        self._ran: dict[str, dict[str, dict[str, Any]]] = {}
        self._asked_to_move: set[str] = set()  # session task keys told their machine drains
        self._idle_since: dict[str, float] = {}  # worker address -> when it last had work
        self._joined: dict[str, float] = {}  # worker address -> when it registered
        # The gateway's pool as this cluster's user may see it; None: not a leasing cluster.
        self.pool: list[dict[str, Any]] | None = None

    def install(self, scheduler: Any) -> None:
        """Take over worker registration; call before the scheduler listens."""
        if getattr(self, "scheduler", None) is scheduler:
            return
        self.scheduler = scheduler
        self._add_worker = scheduler.handlers["register-worker"]
        scheduler.handlers["register-worker"] = self._register_worker
        scheduler.handlers["dash_workers"] = self.dash_workers
        scheduler.handlers["dash_work"] = self.dash_work
        scheduler.handlers["dash_demand"] = self.dash_demand
        scheduler.handlers["dash_pool"] = self.dash_pool
        scheduler.handlers["dash_set_pool"] = self.dash_set_pool

    async def start(self, scheduler: Any) -> None:
        self.install(scheduler)
        self._reload()
        self._callback = PeriodicCallback(self.enforce, self.poll_interval * 1000)
        self._callback.start()

    async def close(self) -> None:
        if self._callback is not None:
            self._callback.stop()

    # ----- admission -------------------------------------------------------------------

    async def _register_worker(self, comm: Any, **msg: Any) -> Any:
        self._reload()
        peer = peer_identity(comm)
        name = str(msg.get("name", ""))
        refusal = admission_refusal(peer, name, self.policy)
        if refusal:
            log.warning("Refused worker %r from %s: %s", name, comm.peer_address, refusal)
            await comm.write({"status": "error", "message": f"DASH: {refusal}", "time": time()})
            return None
        assert peer is not None
        self.identities[name] = peer
        return await self._add_worker(comm, **msg)

    def add_worker(self, scheduler: Any, worker: str) -> None:
        self._names[worker] = str(scheduler.workers[worker].name)
        self._joined[worker] = time()

    def remove_worker(self, scheduler: Any, worker: str, **kwargs: Any) -> None:
        name = self._names.pop(worker, None)
        self._idle_since.pop(worker, None)
        self._joined.pop(worker, None)
        if name is not None:
            self.identities.pop(name, None)
            self._held.discard(name)

    # ----- machine states --------------------------------------------------------------

    def _reload(self) -> None:
        if self.policy_file is None:
            return
        try:
            mtime = os.stat(self.policy_file).st_mtime_ns
        except FileNotFoundError:
            mtime = None
        if mtime == self._policy_mtime:
            return
        try:
            self.policy = read_policy(self.policy_file)
        except (OSError, ValueError) as exc:
            # Keep enforcing the last good policy rather than admitting everyone.
            log.error("Cannot read the cluster policy %s: %r", self.policy_file, exc)
            return
        self._policy_mtime = mtime

    async def enforce(self) -> None:
        """Apply the current policy to the connected workers."""
        self._reload()
        for ws in list(self.scheduler.workers.values()):
            peer = self.identities.get(ws.name)
            if peer is None:
                continue
            refusal = admission_refusal(peer, str(ws.name), self.policy)
            if refusal:
                log.warning("Removing worker %s: %s", ws.name, refusal)
                await self.scheduler.remove_worker(
                    ws.address, stimulus_id=f"dash-policy-{time()}", close=True
                )
            elif not self.policy.takes_new_work(peer.name):
                self._held.add(ws.name)
                if ws.status == Status.running:
                    self.scheduler.handle_worker_status_change(
                        Status.paused, ws, stimulus_id=f"dash-hold-{time()}"
                    )
                if self.policy.machines.get(peer.name) == "draining":
                    self._ask_sessions_to_move(ws, peer.name)
            elif ws.name in self._held:
                self._held.discard(ws.name)
                if ws.status == Status.paused:
                    self.scheduler.handle_worker_status_change(
                        Status.running, ws, stimulus_id=f"dash-release-{time()}"
                    )

    def _ask_sessions_to_move(self, ws: Any, machine: str) -> None:
        """Tell the notebooks whose sessions run on a draining machine (on the session's
        own topic, which its DASH kernel follows): it checkpoints and moves the session
        before its next cell, and the drain can finish."""
        for ts in ws.processing:
            key = ts.key
            session = isinstance(key, str) and key.startswith(SESSION_PREFIX)
            if session and key not in self._asked_to_move:
                self._asked_to_move.add(key)
                log.info("Asking session %s to leave draining machine %s", key, machine)
                self.scheduler.log_event(
                    f"{key}-out", {"op": "draining", "worker": str(ws.name), "machine": machine}
                )

    # ----- placement -------------------------------------------------------------------

    def update_graph(self, scheduler: Any, *, tasks: Iterable[Any] = (), **kwargs: Any) -> None:
        tasks = list(tasks)
        user = self.client_user(kwargs.get("client"))
        if user is not None:
            for key in tasks:
                self._owners.setdefault(key, user)
        # Called before the new tasks are transitioned, so the restriction decides placement.
        for key in tasks:
            ts = scheduler.tasks.get(key)
            if ts is None or ts.run_spec is None or ts.state not in _UNSCHEDULED:
                continue
            restrictions = placement_restrictions(ts.resource_restrictions)
            if restrictions != (ts.resource_restrictions or {}):
                ts.resource_restrictions = restrictions

    # ----- owners ----------------------------------------------------------------------

    def client_user(self, client: Any) -> str | None:
        """The user named in client ``client``'s certificate, or None if it has none."""
        if not isinstance(client, str):
            return None
        user = self._client_users.get(client)
        if user is None:
            batched = self.scheduler.client_comms.get(client)
            peer = peer_identity(getattr(batched, "comm", None))
            if peer is None or peer.role != "client" or not peer.name:
                return None
            user = self._client_users[client] = peer.name
        return user

    def remove_client(self, scheduler: Any, client: str) -> None:
        self._client_users.pop(client, None)

    def transition(self, key: Any, start: str, finish: str, *args: Any, **kwargs: Any) -> None:
        if finish == "forgotten":
            self._owners.pop(key, None)
            self._session_started.pop(key, None)
            self._asked_to_move.discard(key)
        elif finish == "processing" and isinstance(key, str) and key.startswith(SESSION_PREFIX):
            self._session_started[key] = time()
        elif start == "processing" and finish in ("memory", "erred"):
            self._record_run(key, finish, kwargs.get("worker"))

    def _record_run(self, key: Any, finish: str, address: Any) -> None:
        """Count a finished task under its worker, by kind (Dask's task prefix)."""
        ws = self.scheduler.workers.get(address) if isinstance(address, str) else None
        ts = self.scheduler.tasks.get(key)
        if ws is None or ts is None:
            return
        session = isinstance(key, str) and key.startswith(SESSION_PREFIX)
        kind = "session" if session else str(ts.prefix.name)
        history = self._ran.setdefault(str(ws.name), {})
        entry = history.pop(kind, None) or {"name": kind, "done": 0, "erred": 0}
        entry["done" if finish == "memory" else "erred"] += 1
        entry["last"] = time()
        history[kind] = entry  # now the most recent
        while len(history) > RAN_KEPT:
            history.pop(next(iter(history)))

    def owner(self, ts: Any) -> str | None:
        """Who submitted task ``ts``: recorded at submission, else a client that wants it."""
        user = self._owners.get(ts.key)
        if user is None:
            for client in ts.who_wants or ():
                user = self.client_user(client.client_key)
                if user is not None:
                    break
        return user

    # ----- queries ---------------------------------------------------------------------

    def dash_work(self, comm: Any = None) -> dict[str, list[dict[str, Any]]]:
        """Every user's remote sessions and other work (grouped by Dask task group), as
        plain data for the gateway, which shows each user only their own."""
        peer = peer_identity(comm) if comm is not None else None
        if comm is not None and (peer is None or (peer.role, peer.name) != GATEWAY_PEER):
            # Users' clients reach the scheduler too: everyone's work is for the gateway only.
            raise PermissionError("dash_work answers only the DASH gateway")
        sessions: list[dict[str, Any]] = []
        groups: dict[tuple[str | None, str], dict[str, Any]] = {}
        for key, ts in self.scheduler.tasks.items():
            state = _WORK_STATES.get(ts.state)
            if state is None:
                continue
            user = self.owner(ts)
            if isinstance(key, str) and key.startswith(SESSION_PREFIX):
                if state in ("running", "queued"):
                    sessions.append(self._session_row(key, ts, user, state))
                continue
            name = str(ts.group.name)
            row = groups.get((user, name))
            if row is None:
                row = groups[(user, name)] = {
                    "name": name,
                    "prefix": str(ts.prefix.name),
                    "user": user,
                    "total": 0,
                    **dict.fromkeys(("done", "running", "queued", "erred"), 0),
                }
            row[state] += 1
            row["total"] += 1
        work = sorted(groups.values(), key=lambda r: (str(r["user"]), r["name"]))
        return {"sessions": sorted(sessions, key=lambda r: r["id"]), "work": work}

    def _session_row(self, key: str, ts: Any, user: str | None, state: str) -> dict[str, Any]:
        ws = ts.processing_on if state == "running" else None
        peer = self.identities.get(ws.name) if ws is not None else None
        notebook = (ts.annotations or {}).get(NOTEBOOK_ANNOTATION)
        return {
            "id": key[len(SESSION_PREFIX) :],
            "notebook": notebook if isinstance(notebook, str) else None,
            "user": user,
            "worker": str(ws.name) if ws is not None else None,
            "machine": peer.name if peer else None,
            "resources": dict(ts.resource_restrictions or {}),
            "state": state,
            "started": self._session_started.get(key) if ws is not None else None,
        }

    def dash_demand(self, comm: Any = None) -> dict[str, Any]:
        """What this cluster's work asks of the pool, for the gateway's broker.

        ``pending``: tasks that wait for a worker (Dask's ``no-worker`` and ``queued``, and
        those assigned to a worker beyond its threads), counted by the resources they need.
        ``workers``: each worker's name, running task count, whether it holds results, and
        how long it has had nothing to do, so that idle leases can be released.
        """
        peer = peer_identity(comm) if comm is not None else None
        if comm is not None and (peer is None or (peer.role, peer.name) != GATEWAY_PEER):
            raise PermissionError("dash_demand answers only the DASH gateway")
        now = time()
        pending: dict[tuple[tuple[str, float], ...], dict[str, Any]] = {}

        def need(ts: Any) -> None:
            resources = placement_restrictions(ts.resource_restrictions)
            group = tuple(sorted(resources.items()))
            row = pending.setdefault(group, {"resources": resources, "count": 0})
            row["count"] += 1

        for ts in self.scheduler.unrunnable:
            need(ts)
        for ts in self.scheduler.queued:
            need(ts)
        workers = []
        for ws in self.scheduler.workers.values():
            beyond = len(ws.processing) - ws.nthreads
            if beyond > 0:
                for ts in sorted(ws.processing, key=lambda t: t.priority)[-beyond:]:
                    need(ts)
            busy = bool(ws.processing or ws.has_what)
            if busy:
                self._idle_since.pop(ws.address, None)
            idle_since = None if busy else self._idle_since.setdefault(ws.address, now)
            workers.append(
                {
                    "name": str(ws.name),
                    "processing": len(ws.processing),
                    "holds_data": bool(ws.has_what),
                    "idle_for": 0.0 if idle_since is None else now - idle_since,
                    "joined": self._joined.get(ws.address),
                }
            )
        return {"pending": list(pending.values()), "workers": workers}

    def dash_set_pool(self, comm: Any = None, pool: Any = None) -> None:
        """The broker's word on the pool: its slots, each free, this user's or another's."""
        peer = peer_identity(comm) if comm is not None else None
        if comm is not None and (peer is None or (peer.role, peer.name) != GATEWAY_PEER):
            raise PermissionError("only the DASH gateway tells a cluster about its pool")
        self.pool = [dict(row) for row in pool or () if isinstance(row, dict)]

    def dash_pool(self) -> list[dict[str, Any]] | None:
        """The pool this cluster leases its workers from (None if it leases none): what work
        may ask for, and why it waits."""
        return self.pool

    def dash_workers(self) -> list[dict[str, Any]]:
        """Plain data about every worker (no pickles), for the gateway."""
        rows = []
        for ws in self.scheduler.workers.values():
            peer = self.identities.get(ws.name)
            rows.append(
                {
                    "name": str(ws.name),
                    "address": ws.address,
                    "machine": peer.name if peer else None,
                    "status": ws.status.name,
                    "processing": len(ws.processing),
                    "resources": dict(ws.resources),
                    "used_resources": dict(ws.used_resources),
                    "nthreads": ws.nthreads,
                    "memory_limit": ws.memory_limit,
                    "metrics": {
                        "cpu": ws.metrics.get("cpu"),
                        "memory": ws.metrics.get("memory"),
                    },
                    "ran": [dict(e) for e in reversed(self._ran.get(str(ws.name), {}).values())],
                }
            )
        return sorted(rows, key=lambda row: row["name"])
