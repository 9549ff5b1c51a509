"""The running agent of a contributed machine: heartbeats, worker certificates, one nanny per worker.

``dash-worker join`` and ``start`` end in :meth:`Agent.run`, which runs until a signal, the
machine's revocation (exit 3) or the end of a drain (exit 0). Losing the scheduler or the
gateway is not an end: each worker is started again, with a fresh certificate and scheduler
address from the gateway, with backoff, for as long as it takes.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
import os
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

from distributed import Nanny

from dash_kernel.lifecycle import StopTrigger, arm_hard_exit
from dash_kernel.resources import format_resources
from dash_worker.credentials import CredentialStore, MachineConfig, new_key_and_csr
from dash_worker.gateway_client import GatewayClient, GatewayError, GatewayUnreachable
from dash_worker.plan import (
    CapsError,
    WorkerSpec,
    affinity_cores,
    plan_workers,
    with_gpu_locks,
)
from dash_worker.probe import GpuMonitor, utilisation
from dash_worker.serve import HARD_EXIT_AFTER, build_nanny, close_nannies, worker_security

__all__ = ["EXIT_ERROR", "EXIT_REVOKED", "EXIT_USAGE", "Agent", "AgentExit", "run_agent"]

log = logging.getLogger(__name__)

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_REVOKED = 0, 1, 2, 3
HEARTBEAT_ENV = "DASH_HEARTBEAT_INTERVAL"
DEFAULT_HEARTBEAT_INTERVAL = 5.0
MAX_BACKOFF = 30.0
# Heartbeats to an unreachable gateway back off less, so its return is noticed soon.
MAX_HEARTBEAT_BACKOFF = 10.0
# A nanny whose worker cannot register within this time gives up; the agent then asks the
# gateway again where the scheduler is.
NANNY_START_TIMEOUT = 60.0
# A worker that ran this long before it stopped is restarted without the built-up backoff.
STABLE_AFTER = 60.0
# Workers get a fresh certificate (and are restarted) after this fraction of its lifetime:
# a worker's listening socket keeps the certificate it started with.
RENEW_AFTER = 0.8
# While draining, this many heartbeats in a row with no running work end the agent.
IDLE_BEATS_TO_DRAINED = 2

API = "dash/api"


class AgentExit(Exception):
    """End the command with ``code`` after printing ``message``."""

    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


class _Finished(Exception):
    """The agent's outcome is decided; a supervisor that meets this just returns."""


def say(message: str) -> None:
    """A sentence for the person at the terminal (stderr, like the logs)."""
    print(message, file=sys.stderr, flush=True)


def _heartbeat_override() -> float | None:
    value = os.environ.get(HEARTBEAT_ENV)
    if not value:
        return None
    try:
        interval = float(value)
    except ValueError:
        raise AgentExit(
            EXIT_USAGE, f"{HEARTBEAT_ENV} must be a number of seconds; got {value!r}"
        ) from None
    if interval <= 0:
        raise AgentExit(EXIT_USAGE, f"{HEARTBEAT_ENV} must be positive; got {value!r}")
    return interval


class Backoff:
    """1, 2, 4, ... seconds, up to ``cap``."""

    def __init__(self, cap: float = MAX_BACKOFF):
        self.cap = cap
        self.delay = 1.0

    def next(self) -> float:
        delay, self.delay = self.delay, min(self.delay * 2, self.cap)
        return delay

    def reset(self) -> None:
        self.delay = 1.0


def _worker_host(scheduler: str, configured: str | None) -> str | None:
    # Workers of a loopback scheduler listen on loopback; otherwise Dask picks the
    # interface that routes to the scheduler.
    if configured:
        return configured
    host = scheduler.split("://", 1)[-1].rsplit(":", 1)[0].strip("[]")
    return host if host in ("127.0.0.1", "localhost", "::1") else None


def pin_to_cores(caps: Mapping[str, Any], workers: Sequence[WorkerSpec]) -> list[int] | None:
    """Pin this process (and so every worker it starts) to the capped number of cores."""
    if not hasattr(os, "sched_setaffinity"):
        log.warning(
            "this platform cannot pin processes to cores: the CPU cap is kept by thread counts only"
        )
        return None
    cores = affinity_cores(caps, workers, os.sched_getaffinity(0))
    # Every thread that exists now, not only this one: children inherit from the thread
    # that starts them.
    try:
        tids = [int(t) for t in os.listdir("/proc/self/task")]
    except OSError:
        tids = [0]
    for tid in tids:
        with contextlib.suppress(OSError):
            os.sched_setaffinity(tid, cores)
    return cores


class Agent:
    """Runs one machine's workers against its gateway until revoked, drained or stopped."""

    def __init__(
        self,
        store: CredentialStore,
        config: MachineConfig,
        hardware: Mapping[str, Any],
        caps: Mapping[str, Any],
        workers: Sequence[WorkerSpec],
    ):
        self.store = store
        self.config = config
        self.hardware = hardware
        self.caps = caps
        self.workers = list(workers)
        self.client = GatewayClient(config.gateway, config.machine_token)
        self.options = config.options
        self.override = _heartbeat_override()
        self.interval = self.override or DEFAULT_HEARTBEAT_INTERVAL
        self.state: str | None = None
        self.scheduler: str | None = None
        self.expires: datetime.datetime | None = None
        self.fetched: datetime.datetime | None = None
        self.generation = 0
        self.monitor = GpuMonitor()
        self.shared_gpus = [w.gpu for w in self.workers if w.gpu is not None]
        self._nannies: dict[str, Nanny] = {}
        self._running: set[str] = set()
        self._idle_beats = 0
        self._gateway_down = False
        self._waited: str | None = None
        self._cert_lock: asyncio.Lock | None = None
        self._outcome: asyncio.Future[tuple[int, str]] | None = None

    async def _call(self, method: str, path: str, body: Any = None) -> Any:
        return await asyncio.to_thread(self.client.request, method, f"{API}/{path}", body)

    def _finish(self, code: int, message: str) -> None:
        assert self._outcome is not None
        if not self._outcome.done():
            self._outcome.set_result((code, message))
        raise _Finished

    def _revoked(self, exc: GatewayError) -> None:
        self._finish(
            EXIT_REVOKED,
            f"revoked: the gateway at {self.client.url} refused machine {self.config.name}: "
            f"{exc.message}. Its workers are stopped.",
        )

    async def run(self) -> int:
        """Run until the outcome is decided; returns the exit status."""
        self._cert_lock = asyncio.Lock()
        self._outcome = asyncio.get_running_loop().create_future()
        stop = StopTrigger(0, "dash-worker agent")
        try:
            # "starting": a machine drained earlier is active again once it is started.
            body = {**await self._heartbeat_body(), "starting": True}
            first = await self._call("POST", "agent/heartbeat", body)
        except GatewayUnreachable as exc:
            stop.close()
            say(f"dash-worker: {exc}")
            return EXIT_ERROR
        except GatewayError as exc:
            stop.close()
            say(
                f"dash-worker: the gateway at {self.client.url} refused machine "
                f"{self.config.name}: {exc.message}"
            )
            return EXIT_REVOKED if exc.status == 403 else EXIT_ERROR
        with contextlib.suppress(_Finished):
            await self._on_heartbeat(first)
        if self._outcome.done():
            stop.close()
            code, message = self._outcome.result()
            say(message)
            return code
        say(
            f"Machine {self.config.name} (owner {self.config.owner}) is {self.state} at "
            f"{self.client.url}; running {len(self.workers)} worker(s): "
            + ", ".join(w.name for w in self.workers)
        )
        tasks = [asyncio.create_task(self._supervise(w)) for w in self.workers]
        tasks += [
            asyncio.create_task(self._heartbeats()),
            asyncio.create_task(self._renewals()),
        ]
        stopping = asyncio.create_task(stop.wait())
        await asyncio.wait([self._outcome, stopping], return_when=asyncio.FIRST_COMPLETED)
        if self._outcome.done():
            code, message = self._outcome.result()
        else:
            code = EXIT_OK
            message = (
                f"stopped: the workers of {self.config.name} left the cluster; "
                "`dash-worker start` brings them back."
            )
        arm_hard_exit(HARD_EXIT_AFTER)
        # Taken before the supervisors are cancelled: one cancelled mid-start forgets its nanny.
        nannies = list(self._nannies.values())
        for task in [*tasks, stopping]:
            task.cancel()
        await asyncio.gather(*tasks, stopping, return_exceptions=True)
        await close_nannies(nannies + list(self._nannies.values()), "dash-worker-stop")
        self.monitor.close()
        stop.close()
        say(message)
        return code

    # -- heartbeats -----------------------------------------------------------------------

    async def _heartbeat_body(self) -> dict[str, Any]:
        load = await asyncio.to_thread(utilisation, self.shared_gpus, self.monitor)
        return {"utilisation": load, "workers": sorted(self._running)}

    async def _heartbeats(self) -> None:
        backoff = Backoff(cap=max(self.interval, MAX_HEARTBEAT_BACKOFF))
        delay = self.interval
        with contextlib.suppress(_Finished):
            while True:
                await asyncio.sleep(delay)
                body = await self._heartbeat_body()
                try:
                    reply = await self._call("POST", "agent/heartbeat", body)
                except GatewayUnreachable as exc:
                    if not self._gateway_down:
                        log.warning("%s; the workers keep running; retrying", exc)
                    self._gateway_down = True
                    delay = backoff.next()
                    continue
                except GatewayError as exc:
                    if exc.status == 403:
                        self._revoked(exc)
                    log.warning("heartbeat refused by the gateway: %s", exc.message)
                    delay = backoff.next()
                    continue
                self._gateway_back()
                backoff.reset()
                await self._on_heartbeat(reply)
                delay = self.interval

    async def _on_heartbeat(self, reply: Mapping[str, Any]) -> None:
        if not self.override and reply.get("heartbeat_interval"):
            self.interval = float(reply["heartbeat_interval"])
        state = str(reply.get("state") or "")
        if state != self.state:
            self._log_state(state)
        self.state = state
        if state == "revoked":
            self._revoked(GatewayError(403, "this machine was revoked", self.client.url))
        if state == "drained":
            self._drained()
        if state == "draining":
            await self._check_drained()
        else:
            self._idle_beats = 0
        scheduler = reply.get("scheduler")
        if scheduler and self.scheduler and scheduler != self.scheduler:
            log.warning(
                "the scheduler moved from %s to %s; restarting the workers",
                self.scheduler,
                scheduler,
            )
            self.scheduler = None
            await self._restart_all("scheduler-moved")

    def _log_state(self, state: str) -> None:
        meaning = {
            "active": "taking work",
            "pending": "waiting for an operator to approve it",
            "paused": "paused: its workers stay connected and take no new work",
            "draining": "draining: running work finishes, no new work starts; "
            "the agent exits when it is done",
        }
        log.info("machine %s is %s", self.config.name, meaning.get(state, state))

    async def _check_drained(self) -> None:
        try:
            record = await self._call("GET", "agent")
        except (GatewayUnreachable, GatewayError) as exc:
            if isinstance(exc, GatewayError) and exc.status == 403:
                self._revoked(exc)
            log.warning("could not read this machine's running work: %s", exc)
            return
        work = record.get("current_work") if isinstance(record, dict) else None
        self._idle_beats = self._idle_beats + 1 if work == 0 else 0
        if work:
            self._say_what_drain_waits_for(record, work)
        if self._idle_beats >= IDLE_BEATS_TO_DRAINED:
            self._drained()

    # What the drain last said it waits for: said again only when that changes.
    _drain_waits_for: str | None = None

    def _say_what_drain_waits_for(self, record: Mapping[str, Any], work: Any) -> None:
        drain = record.get("drain")
        message = drain.get("message") if isinstance(drain, dict) else None
        message = str(message or f"draining: {work} task(s) still running")
        if message != self._drain_waits_for:
            self._drain_waits_for = message
            log.info("%s", message)

    def _drained(self) -> None:
        self._finish(
            EXIT_OK,
            f"drained: machine {self.config.name} has no running work left and its workers "
            "are stopped.",
        )

    # -- certificates ---------------------------------------------------------------------

    async def _credentials(self, used: int) -> int:
        """Make sure a certificate newer than generation ``used`` is on disk; returns its
        generation. Workers restarting together share one request."""
        assert self._cert_lock is not None
        async with self._cert_lock:
            if self.generation > used and self.scheduler:
                return self.generation
            backoff = Backoff()
            while True:
                key, csr = new_key_and_csr(self.config.name)
                try:
                    reply = await self._call("POST", "agent/certificate", {"csr": csr})
                except GatewayUnreachable as exc:
                    self._waiting(f"{exc}; retrying, at most every {MAX_BACKOFF:.0f}s")
                    delay = backoff.next()
                except GatewayError as exc:
                    if exc.status == 403:
                        self._revoked(exc)
                    self._waiting(exc.message)
                    # 409 while pending; retry as often as heartbeats, to start soon after approval.
                    delay = self.interval if exc.status == 409 else backoff.next()
                else:
                    self._waited = None
                    self._gateway_back()
                    self._store_certificate(key, reply)
                    return self.generation
                await asyncio.sleep(delay)

    def _waiting(self, reason: str) -> None:
        # Said once per reason, not at every retry: waiting for approval can last days.
        if reason != self._waited:
            log.warning("waiting for a worker certificate: %s", reason)
            self._waited = reason
        else:
            log.debug("still waiting for a worker certificate: %s", reason)

    def _gateway_back(self) -> None:
        if self._gateway_down:
            log.info("the gateway at %s answers again", self.client.url)
            self._gateway_down = False

    def _store_certificate(self, key: str, reply: Mapping[str, Any]) -> None:
        self.store.write_ca(reply["ca"])
        self.store.write_worker_credentials(key, reply["cert"])
        self.scheduler = str(reply["scheduler"])
        self.fetched = datetime.datetime.now(datetime.timezone.utc)
        self.expires = parse_time(reply.get("expires"))
        self.generation += 1
        log.info(
            "new worker certificate (expires %s); scheduler at %s",
            reply.get("expires", "?"),
            self.scheduler,
        )

    async def _renewals(self) -> None:
        while True:
            await asyncio.sleep(min(self.interval, 60.0))
            if not (self.expires and self.fetched):
                continue
            renew_at = self.fetched + (self.expires - self.fetched) * RENEW_AFTER
            if datetime.datetime.now(datetime.timezone.utc) >= renew_at:
                log.warning(
                    "the workers' certificate expires at %s; restarting them with a fresh one",
                    self.expires.isoformat(),
                )
                self.fetched = self.expires = None
                self.scheduler = None
                await self._restart_all("certificate-renewal")

    async def _restart_all(self, reason: str) -> None:
        # Closing the nannies ends each supervisor's wait; they fetch new credentials.
        await close_nannies(list(self._nannies.values()), reason)

    # -- workers ----------------------------------------------------------------------------

    async def _supervise(self, spec: WorkerSpec) -> None:
        backoff = Backoff()
        used = 0
        with contextlib.suppress(_Finished):
            while True:
                used = await self._credentials(used)
                scheduler = self.scheduler
                assert scheduler is not None
                nanny = build_nanny(
                    scheduler,
                    name=spec.name,
                    nthreads=spec.nthreads,
                    memory_limit=spec.memory_limit,
                    resources=spec.resources,
                    security=worker_security(str(self.store.ca_file), str(self.store.worker_file)),
                    host=_worker_host(scheduler, self.options.get("host")),
                    local_directory=self.options.get("local_directory"),
                    env=spec.env,
                    death_timeout=NANNY_START_TIMEOUT,
                )
                self._nannies[spec.name] = nanny
                started = time.monotonic()
                try:
                    await nanny
                except Exception as exc:
                    why = (
                        f"it did not register within {NANNY_START_TIMEOUT:.0f}s"
                        if isinstance(exc, asyncio.TimeoutError)
                        else str(exc) or type(exc).__name__
                    )
                    log.warning(
                        "worker %s could not join the scheduler at %s: %s",
                        spec.name,
                        scheduler,
                        why,
                    )
                    await close_nannies([nanny], "dash-worker-start-failed")
                else:
                    self._running.add(spec.name)
                    log.info("worker %s is running at %s", spec.name, nanny.worker_address)
                    await nanny.finished()
                    log.warning(
                        "worker %s stopped (its scheduler %s closed it or went away)",
                        spec.name,
                        scheduler,
                    )
                finally:
                    self._running.discard(spec.name)
                    self._nannies.pop(spec.name, None)
                if time.monotonic() - started > STABLE_AFTER:
                    backoff.reset()
                delay = backoff.next()
                log.info("starting worker %s again in %.0fs", spec.name, delay)
                await asyncio.sleep(delay)


def parse_time(value: Any) -> datetime.datetime | None:
    """An ISO-8601 time from the gateway as an aware datetime (UTC if it names no zone)."""
    if not value:
        return None
    try:
        parsed = datetime.datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=datetime.timezone.utc)


def run_agent(
    store: CredentialStore,
    config: MachineConfig,
    hardware: Mapping[str, Any],
    caps: Mapping[str, Any],
    command: str,
) -> int:
    """Plan the workers, pin the cores, and run the agent's loop."""
    try:
        workers = plan_workers(
            config.name, hardware, caps, int(config.options.get("gpu_threads", 2))
        )
        workers = with_gpu_locks(workers, str(store.directory / "gpu-locks"))
        cores = pin_to_cores(caps, workers)
    except CapsError as exc:
        raise AgentExit(EXIT_USAGE, f"dash-worker {command}: error: {exc}") from None
    if cores is not None:
        log.info("pinned to %d core(s): %s", len(cores), ",".join(map(str, cores)))
    for w in workers:
        log.info(
            "plan: %s with %d thread(s), %s", w.name, w.nthreads, format_resources(w.resources)
        )
    return asyncio.run(Agent(store, config, hardware, caps, workers).run())
