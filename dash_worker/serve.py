"""``dash-worker serve`` (the gateway's local workers), and the one way to build a DASH nanny."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os

import dask
from distributed import Nanny
from distributed.security import Security
from distributed.worker_memory import parse_memory_limit

from dash_kernel.lifecycle import StopTrigger, arm_hard_exit
from dash_kernel.resources import session_worker_resources, worker_resources

log = logging.getLogger(__name__)

NANNY_CLOSE_TIMEOUT = 5.0
# After a shutdown is asked for, the agent leaves within this many seconds, whatever hangs;
# its worker processes follow it (Dask's nanny pipe closes).
HARD_EXIT_AFTER = 10.0


def worker_security(ca: str, cert: str, key: str | None = None) -> Security:
    """Mutual TLS for DASH workers; ``key=None`` when ``cert`` holds the key as well."""
    return Security(
        require_encryption=True,
        tls_ca_file=ca,
        tls_worker_cert=cert,
        tls_worker_key=key,
    )


def build_nanny(
    scheduler: str,
    *,
    name: str,
    nthreads: int,
    memory_limit: int | None,
    resources: dict[str, float],
    security: Security,
    host: str | None = None,
    local_directory: str | None = None,
    env: dict[str, str] | None = None,
    death_timeout: float | None = None,
) -> Nanny:
    """The one way to build a DASH worker: mutual TLS, no dashboard, the session host and the
    GPU locks (:mod:`dash_worker.gpu_locks`, idle unless ``env`` configures them) preloaded."""
    # Dask's worker HTTP server has no authentication: keep only the health check. Nannies
    # hand this configuration to their worker processes.
    dask.config.set({"distributed.worker.http.routes": ["distributed.http.health"]})
    return Nanny(
        scheduler,
        nthreads=nthreads,
        memory_limit=memory_limit,
        resources=resources,
        name=name,
        security=security,
        host=host,
        protocol="tls",
        local_directory=local_directory,
        dashboard=False,
        preload=["dash_worker.session_host", "dash_worker.gpu_locks"],
        env=env or {},
        death_timeout=death_timeout,
    )


def make_nannies(args: argparse.Namespace) -> list[Nanny]:
    """One nanny per worker, each declaring its threads and memory as DASH resources."""
    if args.name and args.nworkers != 1:
        raise SystemExit("dash-worker serve: --name names one worker; use it with --nworkers 1")
    memory_limit = parse_memory_limit(args.memory_limit, args.nthreads, logger=log)
    security = worker_security(args.tls_ca, args.tls_cert, args.tls_key)
    return [
        build_nanny(
            args.scheduler,
            name=args.name or f"{args.name_prefix}-{i}",
            nthreads=args.nthreads,
            memory_limit=memory_limit,
            resources=(
                session_worker_resources(memory_limit)
                if args.session_worker
                else worker_resources(args.nthreads, memory_limit)
            ),
            security=security,
            host=args.host,
            local_directory=args.local_directory,
            death_timeout=args.death_timeout,
        )
        for i in range(args.nworkers)
    ]


async def close_nannies(nannies: list[Nanny], reason: str) -> None:
    """Close nannies (and so their worker processes), never raising."""
    with contextlib.suppress(Exception):
        await asyncio.gather(
            *(n.close(timeout=NANNY_CLOSE_TIMEOUT, reason=reason) for n in nannies),
            return_exceptions=True,
        )


async def serve(args: argparse.Namespace) -> int:
    """Run the nannies until a signal, the parent's death, or all of them finishing."""
    parent_pid = os.getppid() if args.parent_pid is None else args.parent_pid
    stop = StopTrigger(parent_pid, "workers")

    nannies = make_nannies(args)

    async def run_nannies() -> None:
        await asyncio.gather(*nannies)
        log.info(
            "%d worker(s) started: %s",
            len(nannies),
            ", ".join(f"{n.name} at {n.worker_address}" for n in nannies),
        )
        await asyncio.gather(*(n.finished() for n in nannies))

    running = asyncio.create_task(run_nannies())
    stopping = asyncio.create_task(stop.wait())
    await asyncio.wait([running, stopping], return_when=asyncio.FIRST_COMPLETED)

    code = 0
    if not stop.is_set():
        if running.exception() is not None:
            log.error("Workers failed: %r", running.exception())
        else:
            log.error("All workers finished unexpectedly")
        code = 1
    else:
        arm_hard_exit(HARD_EXIT_AFTER)
        running.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await running
    await close_nannies(nannies, "dash-worker-stop")
    stop.close()
    stopping.cancel()
    return code


def main(args: argparse.Namespace) -> int:
    """Entry of ``dash-worker serve``; returns the exit status."""
    return asyncio.run(serve(args))
