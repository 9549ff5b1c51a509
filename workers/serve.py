"""``dash-worker serve``: N Dask nannies in one asyncio loop, with mutual TLS and DASH resources."""

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
from dash_kernel.resources import worker_resources

log = logging.getLogger(__name__)

NANNY_CLOSE_TIMEOUT = 5.0
# After a shutdown is asked for, the agent leaves within this many seconds, whatever hangs;
# its worker processes follow it (Dask's nanny pipe closes).
HARD_EXIT_AFTER = 10.0


def _security(args: argparse.Namespace) -> Security:
    return Security(
        require_encryption=True,
        tls_ca_file=args.tls_ca,
        tls_worker_cert=args.tls_cert,
        tls_worker_key=args.tls_key,
    )


def make_nannies(args: argparse.Namespace) -> list[Nanny]:
    """One nanny per worker, each declaring its threads and memory as DASH resources."""
    memory_limit = parse_memory_limit(args.memory_limit, args.nthreads, logger=log)
    # Dask's worker HTTP server has no authentication: keep only the health check. Nannies
    # hand this configuration to their worker processes.
    dask.config.set({"distributed.worker.http.routes": ["distributed.http.health"]})
    security = _security(args)
    return [
        Nanny(
            args.scheduler,
            nthreads=args.nthreads,
            memory_limit=memory_limit,
            resources=worker_resources(args.nthreads, memory_limit),
            name=f"{args.name_prefix}-{i}",
            security=security,
            host=args.host,
            protocol="tls",
            local_directory=args.local_directory,
            dashboard=False,
            preload=["dash_worker.session_host"],
        )
        for i in range(args.nworkers)
    ]


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
    with contextlib.suppress(Exception):
        await asyncio.gather(
            *(n.close(timeout=NANNY_CLOSE_TIMEOUT, reason="dash-worker-stop") for n in nannies),
            return_exceptions=True,
        )
    stop.close()
    stopping.cancel()
    return code


def main(args: argparse.Namespace) -> int:
    """Entry of ``dash-worker serve``; returns the exit status."""
    return asyncio.run(serve(args))
