"""Per-user tenancy as the gateway's handlers see it: each user's own cluster, and the pool.

:class:`PerUserClusters` answers what the API and the dashboard ask of "the cluster" (its
workers, its sessions and work, its state) across every user's cluster and the broker's
leases, and hands each user the address and credentials of their own cluster only. It
stands where :class:`~dash_gateway.cluster.ClusterSupervisor` stands in the single-tenant
mode (``--scheduler-address``, or ``tenancy = "shared"``).
"""

from __future__ import annotations

import asyncio
import atexit
import logging
from pathlib import Path
from typing import Any

from dash_gateway.leases import Broker
from dash_gateway.scheduler_rpc import call_scheduler
from dash_gateway.tls import CertificateAuthority
from dash_gateway.user_clusters import ClusterAccess, UserClusters

log = logging.getLogger(__name__)

_RPC_ERRORS = (OSError, asyncio.TimeoutError, RuntimeError)


class PerUserClusters:
    """Every user's cluster on leases from the pool, behind one object for the handlers."""

    tenancy = "per-user"
    scheduler_address = ""

    def __init__(self, data_dir: str, clusters: UserClusters, broker: Broker):
        self.data_dir = Path(data_dir)
        self.clusters = clusters
        self.broker = broker
        self.state = "stopped"
        # The gateway's own CA: it signs contributed machines' certificates.
        self.ca: CertificateAuthority | None = None

    # ----- lifecycle -------------------------------------------------------------------

    async def start(self) -> None:
        self.ca = CertificateAuthority(self.data_dir / "tls")
        await self.clusters.start()
        atexit.register(self.broker.close_now)
        await self.broker.start()
        self.state = "running"

    async def stop(self) -> None:
        await self.broker.close()
        atexit.unregister(self.broker.close_now)
        await self.clusters.close()
        if self.state != "stopped":
            log.info("DASH clusters stopped")
        self.state = "stopped"

    # ----- a user's own cluster --------------------------------------------------------

    async def access(self, username: str) -> ClusterAccess:
        """``username``'s cluster (started if need be) and fresh client credentials for it."""
        access = await self.clusters.ensure(username)
        # Before its user's first call, so that what they ask for is checked against the pool.
        await self.broker.tell_pool(username)
        self.broker.poke()
        return access

    def pool(self, username: str) -> list[dict[str, Any]]:
        return self.broker.pool(username)

    async def wait_for_scheduler(self, timeout: float) -> str:
        # Contributed machines join users' clusters through leases, not one scheduler.
        return ""

    # ----- across clusters, for the gateway's pages ------------------------------------

    async def workers(self) -> list[dict[str, Any]]:
        """Every lease's worker, as ``/dash/api/status`` lists workers."""
        return [
            {
                "name": lease.worker_name,
                "address": None,
                "resources": dict(lease.slot.resources),
                "nthreads": lease.slot.nthreads,
                "memory_limit": lease.slot.memory_limit,
                "status": lease.state,
                "user": lease.user,
            }
            for lease in self.broker.leases()
        ]

    async def dash_workers(self) -> list[dict[str, Any]]:
        """The scheduler plugin's worker rows of every cluster, each with its user."""
        rows: list[dict[str, Any]] = []
        for user, reply in await self._ask_all("dash_workers"):
            for row in reply if isinstance(reply, list) else ():
                if isinstance(row, dict):
                    rows.append({**row, "user": user})
        return sorted(rows, key=lambda row: str(row.get("name")))

    async def dash_work(self) -> dict[str, Any]:
        """Every cluster's sessions and work; each row names its cluster's user, whatever
        its scheduler thinks (only that user's clients can reach it)."""
        sessions: list[dict[str, Any]] = []
        work: list[dict[str, Any]] = []
        for user, reply in await self._ask_all("dash_work"):
            if not isinstance(reply, dict):
                continue
            sessions += [{**s, "user": user} for s in reply.get("sessions") or ()]
            work += [{**w, "user": user} for w in reply.get("work") or ()]
        return {"sessions": sessions, "work": work}

    async def _ask_all(self, op: str) -> list[tuple[str, Any]]:
        running = self.clusters.running()

        async def ask(user: str, address: str) -> tuple[str, Any]:
            try:
                args = self.clusters.identity(user).control()
                return user, await call_scheduler(address, args, op)
            except _RPC_ERRORS as exc:
                log.debug("%s's scheduler did not answer %s: %r", user, op, exc)
                return user, None

        return list(
            await asyncio.gather(*(ask(user, rec.address) for user, rec in running.items()))
        )
