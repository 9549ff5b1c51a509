"""``dash-worker serve``: N Dask nannies in one asyncio loop, with mutual TLS and DASH resources."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import threading

import dask
from distributed import Nanny
from distributed.security import Security
from distributed.worker_memory import parse_memory_limit

from dash_kernel.resources import worker_resources

log = logging.getLogger(__name__)

PARENT_POLL_INTERVAL = 0.5
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
        )
        for i in range(args.nworkers)
    ]


async def _watch_parent(parent_pid: int, stop: asyncio.Event) -> None:
    while not stop.is_set():
        if os.getppid() != parent_pid:
            log.warning("Parent process %d is gone; closing the workers", parent_pid)
            stop.set()
            return
        await asyncio.sleep(PARENT_POLL_INTERVAL)


async def serve(args: argparse.Namespace) -> int:
    """Run the nannies until a signal, the parent's death, or all of them finishing."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    parent_pid = os.getppid() if args.parent_pid is None else args.parent_pid
    background = []
    if parent_pid:
        background.append(asyncio.create_task(_watch_parent(parent_pid, stop)))

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
    background.append(stopping)
    await asyncio.wait([running, stopping], return_when=asyncio.FIRST_COMPLETED)

    code = 0
    if not stop.is_set():
        if running.exception() is not None:
            log.error("Workers failed: %r", running.exception())
        else:
            log.error("All workers finished unexpectedly")
        code = 1
    else:
        _arm_hard_exit()
        running.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await running
    with contextlib.suppress(Exception):
        await asyncio.gather(
            *(n.close(timeout=NANNY_CLOSE_TIMEOUT, reason="dash-worker-stop") for n in nannies),
            return_exceptions=True,
        )
    for task in background:
        task.cancel()
    return code


def _arm_hard_exit() -> None:
    timer = threading.Timer(HARD_EXIT_AFTER, os._exit, args=(1,))
    timer.daemon = True
    timer.start()


def main(args: argparse.Namespace) -> int:
    """Entry of ``dash-worker serve``; returns the exit status."""
    return asyncio.run(serve(args))
