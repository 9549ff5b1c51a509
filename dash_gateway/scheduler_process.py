"""Entry point of the supervised Dask scheduler subprocess (``python -m dash_gateway.scheduler_process``).

It must not import jupyter_server: user code that reaches the scheduler (``run_on_scheduler``,
pickled plugins) then runs here, never inside the Jupyter Server process.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import sys
import time

import dask
from distributed import Scheduler

from dash_gateway.scheduler_plugin import DashSchedulerPlugin
from dash_gateway.tls import security_for
from dash_kernel.files import write_atomic
from dash_kernel.lifecycle import StopTrigger, arm_hard_exit
from dash_kernel.plugin import WorkerDeathPlugin

log = logging.getLogger("dash_gateway.scheduler_process")

# After a shutdown is asked for, the process leaves within this many seconds, whatever hangs.
HARD_EXIT_AFTER = 10.0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line the gateway builds for this subprocess."""
    parser = argparse.ArgumentParser(
        prog="python -m dash_gateway.scheduler_process",
        description="Run the DASH cluster's Dask scheduler with mutual TLS.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="interface to listen on")
    parser.add_argument("--port", type=int, default=0, help="port to listen on (0: a free one)")
    parser.add_argument("--tls-ca", required=True, help="CA certificate (PEM file)")
    parser.add_argument("--tls-cert", required=True, help="scheduler certificate (PEM file)")
    parser.add_argument("--tls-key", required=True, help="scheduler private key (PEM file)")
    parser.add_argument(
        "--address-file", help="write {'address': 'tls://host:port', 'pid': N} here once listening"
    )
    parser.add_argument(
        "--policy-file",
        help="the gateway's cluster policy (JSON) to enforce; without it only workers with "
        "certificates for the machine 'local' may join",
    )
    parser.add_argument(
        "--parent-pid",
        type=int,
        default=None,
        help="exit when this process is no longer our parent (default: the parent at start; 0: never)",
    )
    parser.add_argument(
        "--idle-timeout",
        type=float,
        default=0.0,
        help="stop after this many seconds with no clients and no tasks (0: never); a backstop "
        "for a user's cluster whose gateway does not come back",
    )
    return parser.parse_args(argv)


def activity(scheduler: Scheduler) -> dict[str, int]:
    """How many clients (not Dask's internal fire-and-forget one) and tasks the scheduler has."""
    clients = [c for c in scheduler.clients if c != "fire-and-forget"]
    return {"clients": len(clients), "tasks": len(scheduler.tasks)}


async def stop_when_idle(scheduler: Scheduler, stop: StopTrigger, idle_timeout: float) -> None:
    """Set ``stop`` once the scheduler has had no clients and no tasks for ``idle_timeout`` s."""
    idle_since: float | None = None
    while not stop.is_set():
        if any(activity(scheduler).values()):
            idle_since = None
        elif idle_since is None:
            idle_since = time.monotonic()
        elif time.monotonic() - idle_since > idle_timeout:
            log.info("No clients and no tasks for %.0fs; stopping the scheduler", idle_timeout)
            stop.event.set()
            return
        await asyncio.sleep(min(1.0, idle_timeout / 4))


def write_address_file(path: str, address: str) -> None:
    """Atomically write the scheduler's address for the parent to pick up."""
    write_atomic(path, json.dumps({"address": address, "pid": os.getpid()}))


async def run(args: argparse.Namespace) -> int:
    """Start the scheduler, publish its address, and run until told to stop or orphaned."""
    security = security_for("scheduler", ca=args.tls_ca, cert=args.tls_cert, key=args.tls_key)
    parent_pid = os.getppid() if args.parent_pid is None else args.parent_pid
    stop = StopTrigger(parent_pid, "scheduler")

    # Dask's HTTP server has no authentication: serve only the health check, on the
    # scheduler's own interface and a free port (8787 would clash between gateways).
    dask.config.set({"distributed.scheduler.http.routes": ["distributed.http.health"]})
    plugin = DashSchedulerPlugin(args.policy_file)
    scheduler = Scheduler(
        plugins=[plugin, WorkerDeathPlugin()],
        host=args.host,
        port=args.port,
        protocol="tls",
        security=security,
        dashboard=False,
        dashboard_address=f"{args.host}:0" if ":" not in args.host else None,
        jupyter=False,
    )
    plugin.install(scheduler)  # before it listens, so no worker registers unchecked
    scheduler.handlers["dash_activity"] = lambda: activity(scheduler)
    await scheduler
    log.info("DASH scheduler listening at %s", scheduler.address)
    if args.address_file:
        write_address_file(args.address_file, scheduler.address)

    finished = asyncio.create_task(scheduler.finished())
    stopped = asyncio.create_task(stop.wait())
    idle = (
        asyncio.create_task(stop_when_idle(scheduler, stop, args.idle_timeout))
        if args.idle_timeout > 0
        else None
    )
    await asyncio.wait([finished, stopped], return_when=asyncio.FIRST_COMPLETED)
    code = 0
    if not stop.is_set():
        log.error("The scheduler closed by itself")
        code = 1
    else:
        arm_hard_exit(HARD_EXIT_AFTER)
        with contextlib.suppress(Exception):
            await scheduler.close(reason="dash-gateway-shutdown")
    stop.close()
    for task in (finished, stopped, idle):
        if task is not None:
            task.cancel()
    return code


def main(argv: list[str] | None = None) -> None:
    """Console entry: ``python -m dash_gateway.scheduler_process --tls-ca ... --address-file ...``."""
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="[%(levelname)1.1s %(asctime)s %(name)s] %(message)s"
    )
    sys.exit(asyncio.run(run(args)))


if __name__ == "__main__":
    main()
