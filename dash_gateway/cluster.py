"""Supervision of the cluster's processes: the Dask scheduler and the local worker agent."""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import datetime
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import psutil
from distributed.core import CommClosedError

from dash_gateway.policy import LOCAL_MACHINE, policy_path
from dash_gateway.scheduler_rpc import call_scheduler, scheduler_identity, workers_from_identity
from dash_gateway.tls import CertificateAuthority, Credentials

log = logging.getLogger(__name__)

POLL_INTERVAL = 0.25
TERMINATE_GRACE = 10.0
BACKOFF_MIN, BACKOFF_MAX = 1.0, 30.0
# A child that stayed up this long is considered healthy again: its next death restarts at once.
HEALTHY_AFTER = 60.0
# Never handed to processes that run user code (Dask workers, the scheduler).
SECRET_ENV = ("DASH_TOKEN", "JUPYTER_TOKEN", "JPY_API_TOKEN", "JUPYTERHUB_API_TOKEN")
GATEWAY_CLIENT_LIFETIME = datetime.timedelta(days=30)


def child_environment() -> dict[str, str]:
    """The environment for the scheduler and worker agent: ours, minus any secret token."""
    return {k: v for k, v in os.environ.items() if k not in SECRET_ENV}


class ChildProcess:
    """One supervised subprocess, started in its own session so a terminal's Ctrl-C reaches
    only the gateway, which then shuts the child down in order."""

    def __init__(self, name: str):
        self.name = name
        self.proc: subprocess.Popen[bytes] | None = None
        self.started_at = 0.0
        self.failures = 0

    def spawn(
        self,
        argv: Sequence[str],
        env: dict[str, str],
        cwd: str | None = None,
        log_file: str | None = None,
    ) -> None:
        """Start the process in ``cwd``; stdout/stderr go to the gateway's own, or to ``log_file``
        (for a child that may outlive the gateway and its terminal)."""
        if log_file is None:
            self.proc = subprocess.Popen(
                list(argv), env=env, cwd=cwd, stdin=subprocess.DEVNULL, start_new_session=True
            )
        else:
            with open(log_file, "ab") as out:
                self.proc = subprocess.Popen(
                    list(argv), env=env, cwd=cwd, stdin=subprocess.DEVNULL,
                    stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                )  # fmt: skip
        self.started_at = time.monotonic()
        log.debug("Started %s (pid %d): %s", self.name, self.proc.pid, " ".join(argv))

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def exited(self) -> int | None:
        """The exit status if the process has ended, else None (also None if never started)."""
        return self.proc.poll() if self.proc else None

    def next_backoff(self) -> float:
        """Seconds to wait before restarting after an unexpected exit."""
        if time.monotonic() - self.started_at > HEALTHY_AFTER:
            self.failures = 0
        delay = min(BACKOFF_MAX, BACKOFF_MIN * 2**self.failures)
        self.failures += 1
        return delay

    async def terminate(self, grace: float = TERMINATE_GRACE) -> None:
        """SIGTERM, wait up to ``grace`` seconds, then SIGKILL; reap its descendants too."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        descendants = _descendants(proc.pid)
        if proc.poll() is None:
            log.debug("Stopping %s (pid %d)", self.name, proc.pid)
            proc.terminate()
            deadline = time.monotonic() + grace
            while proc.poll() is None and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            if proc.poll() is None:
                log.warning(
                    "%s (pid %d) ignored SIGTERM for %.0fs; killing it", self.name, proc.pid, grace
                )
                _kill_group(proc)
                await asyncio.to_thread(proc.wait)
        await asyncio.to_thread(_reap, descendants)

    def terminate_now(self, grace: float = 5.0) -> None:
        """Blocking :meth:`terminate`, for interpreter exit when the event loop is gone."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        descendants = _descendants(proc.pid)
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(grace)
            except subprocess.TimeoutExpired:
                _kill_group(proc)
                proc.wait()
        _reap(descendants)


def _descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    # Only while the child is not yet reaped: then its pid, and so its process group id,
    # cannot have been reused by an unrelated process.
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        proc.kill()


def _reap(procs: list[psutil.Process], timeout: float = 5.0) -> None:
    """Wait for processes that should be exiting on their own; kill whatever is left."""
    if not procs:
        return
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    for p in alive:
        log.warning("Killing leftover process %d (%s)", p.pid, _describe(p))
        with contextlib.suppress(psutil.Error):
            p.kill()
    psutil.wait_procs(alive, timeout=timeout)


def _describe(p: psutil.Process) -> str:
    try:
        return " ".join(p.cmdline())[:120]
    except psutil.Error:
        return "?"


class ClusterSupervisor:
    """Starts, watches and stops the DASH cluster: a TLS Dask scheduler subprocess (unless an
    existing scheduler is given) and one agent subprocess running the local workers."""

    def __init__(
        self,
        *,
        data_dir: str,
        scheduler_address: str = "",
        scheduler_host: str = "127.0.0.1",
        scheduler_port: int = 0,
        local_workers: int = 0,
        worker_threads: int = 1,
        worker_memory_limit: int | None = None,
        start_timeout: float = 60.0,
    ):
        self.data_dir = Path(data_dir)
        self.external_scheduler = scheduler_address
        self.scheduler_host = scheduler_host
        self.scheduler_port = scheduler_port
        self.local_workers = local_workers
        self.worker_threads = worker_threads
        self.worker_memory_limit = worker_memory_limit
        self.start_timeout = start_timeout

        self.state = "stopped"
        self.scheduler_address = ""
        self.ca: CertificateAuthority | None = None
        self.scheduler = ChildProcess("scheduler")
        self.agent = ChildProcess("worker agent")
        self._run_dir: Path | None = None
        self._task: asyncio.Task[None] | None = None
        self._address_known: asyncio.Event | None = None
        self._gateway_client: tuple[dict[str, Any], float] | None = None

    # ----- lifecycle -------------------------------------------------------------------

    def start(self) -> None:
        """Begin starting the cluster in the background of the running event loop."""
        if self._task is not None:
            return
        self.state = "starting"
        self._address_known = asyncio.Event()
        self.ca = CertificateAuthority(self.data_dir / "tls")
        self._run_dir = self._make_run_dir()
        atexit.register(self._stop_now)
        self._task = asyncio.create_task(self._supervise(), name="dash-cluster-supervisor")

    async def stop(self) -> None:
        """Stop the workers, then the scheduler; wait until every process is gone."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
            self._task = None
        # Workers first, so they leave the scheduler cleanly.
        await self.agent.terminate()
        await self.scheduler.terminate()
        self._remove_run_dir()
        atexit.unregister(self._stop_now)
        if self.state != "stopped":
            log.info("DASH cluster stopped")
        self.state = "stopped"

    def _stop_now(self) -> None:
        # Last resort at interpreter exit (e.g. the server's loop ended by KeyboardInterrupt
        # without running extension shutdown hooks): leave no process behind.
        self.agent.terminate_now()
        self.scheduler.terminate_now()
        self._remove_run_dir()

    async def wait_for_scheduler(self, timeout: float) -> str:
        """The scheduler's address, waiting up to ``timeout`` seconds for it to be known."""
        if not self.scheduler_address and self._address_known is not None:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._address_known.wait(), timeout)
        return self.scheduler_address

    # ----- supervision -----------------------------------------------------------------

    async def _supervise(self) -> None:
        try:
            if self.external_scheduler:
                self._set_address(self.external_scheduler)
                log.info("Using the existing Dask scheduler at %s", self.scheduler_address)
            else:
                await self._start_scheduler()
            self._start_agent()
            await self._wait_for_workers()
            while True:
                await asyncio.sleep(POLL_INTERVAL)
                code = self.scheduler.exited()
                if code is not None:
                    self.state = "degraded"
                    delay = self.scheduler.next_backoff()
                    log.error(
                        "The Dask scheduler exited unexpectedly (status %s); restarting it and "
                        "the local workers in %.0fs",
                        code,
                        delay,
                    )
                    await self.agent.terminate()
                    await self.scheduler.terminate()
                    await asyncio.sleep(delay)
                    await self._start_scheduler()
                    self._start_agent()
                    await self._wait_for_workers()
                    continue
                code = self.agent.exited()
                if code is not None:
                    self.state = "degraded"
                    delay = self.agent.next_backoff()
                    log.error(
                        "The local worker agent exited unexpectedly (status %s); restarting it in %.0fs",
                        code,
                        delay,
                    )
                    await self.agent.terminate()
                    await asyncio.sleep(delay)
                    self._start_agent()
                    await self._wait_for_workers()
        except asyncio.CancelledError:
            raise
        except Exception:
            self.state = "failed"
            log.exception("DASH cluster supervision failed")

    async def _start_scheduler(self) -> None:
        """Start the scheduler subprocess; retry with backoff until it publishes its address."""
        assert self.ca is not None and self._run_dir is not None
        address_file = self._run_dir / "scheduler.json"
        while True:
            with contextlib.suppress(FileNotFoundError):
                address_file.unlink()
            creds = self.ca.issue("scheduler", "dash-scheduler", hosts=[self.scheduler_host])
            ca, cert, key = creds.write(self._run_dir, "scheduler")
            argv = [
                sys.executable, "-m", "dash_gateway.scheduler_process",
                "--host", self.scheduler_host,
                "--port", str(self.scheduler_port),
                "--tls-ca", ca, "--tls-cert", cert, "--tls-key", key,
                "--address-file", str(address_file),
                "--policy-file", str(policy_path(self.data_dir)),
                "--parent-pid", str(os.getpid()),
            ]  # fmt: skip
            self.scheduler.spawn(argv, child_environment())
            log.info("Starting the Dask scheduler (pid %d)", self.scheduler.pid)
            address = await self._read_address(address_file)
            if address:
                # Keep the port across restarts, so kernels and workers find it again.
                self.scheduler_port = int(address.rsplit(":", 1)[1])
                self._set_address(address)
                log.info("Dask scheduler listening at %s", address)
                return
            await self.scheduler.terminate()
            delay = self.scheduler.next_backoff()
            log.error("The Dask scheduler did not start; retrying in %.0fs", delay)
            await asyncio.sleep(delay)

    async def _read_address(self, address_file: Path) -> str:
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if address_file.exists():
                return str(json.loads(address_file.read_text())["address"])
            code = self.scheduler.exited()
            if code is not None:
                log.error("The Dask scheduler exited during start-up (status %s)", code)
                return ""
            await asyncio.sleep(0.1)
        log.error("The Dask scheduler did not report its address within %.0fs", self.start_timeout)
        return ""

    def _start_agent(self) -> None:
        if self.local_workers <= 0:
            return
        assert self.ca is not None and self._run_dir is not None
        creds = self.ca.issue("worker", LOCAL_MACHINE, hosts=[self._worker_host() or ""])
        ca, cert, key = creds.write(self._run_dir, "worker")
        argv = [
            sys.executable, "-m", "dash_worker", "serve",
            "--scheduler", self.scheduler_address,
            "--nworkers", str(self.local_workers),
            "--nthreads", str(self.worker_threads),
            "--memory-limit", str(self.worker_memory_limit or "auto"),
            "--tls-ca", ca, "--tls-cert", cert, "--tls-key", key,
            "--name-prefix", LOCAL_MACHINE,
            "--parent-pid", str(os.getpid()),
        ]  # fmt: skip
        host = self._worker_host()
        if host:
            argv += ["--host", host]
        self.agent.spawn(argv, child_environment())
        log.info(
            "Starting %d local worker(s) (pid %d), %d thread(s) each",
            self.local_workers,
            self.agent.pid,
            self.worker_threads,
        )

    def _worker_host(self) -> str | None:
        # Local workers talk to a loopback scheduler over loopback; otherwise let Dask pick
        # an interface the scheduler (and clients) can reach.
        host = self.scheduler_address.split("://", 1)[-1].rsplit(":", 1)[0].strip("[]")
        if host in ("127.0.0.1", "localhost", "::1"):
            return host
        return None

    async def _wait_for_workers(self) -> None:
        """Wait (up to ``start_timeout``) for the local workers to register, then log the outcome."""
        started = time.monotonic()
        names: list[str] = []
        while True:
            try:
                names = [str(w["name"]) for w in await self.workers()]
            except (OSError, CommClosedError, asyncio.TimeoutError) as exc:
                log.debug("Scheduler not answering yet: %r", exc)
            local = [n for n in names if n.startswith("local-")]
            if len(local) >= self.local_workers:
                self.state = "running"
                self.agent.failures = self.scheduler.failures = 0
                log.info(
                    "DASH cluster ready: scheduler %s, %d worker(s)%s",
                    self.scheduler_address,
                    len(names),
                    f" ({', '.join(names)})" if names else "",
                )
                return
            elapsed = time.monotonic() - started
            if elapsed > self.start_timeout or self.agent.exited() is not None:
                self.state = "degraded"
                log.warning(
                    "Only %d of %d local worker(s) registered with %s after %.0fs; "
                    "see the worker log above",
                    len(local),
                    self.local_workers,
                    self.scheduler_address,
                    elapsed,
                )
                return
            await asyncio.sleep(POLL_INTERVAL)

    # ----- queries ---------------------------------------------------------------------

    async def workers(self) -> list[dict[str, Any]]:
        """Workers registered with the scheduler, as in ``/dash/api/status``."""
        if not self.scheduler_address:
            return []
        info = await scheduler_identity(self.scheduler_address, self._gateway_connection_args())
        return workers_from_identity(info)

    async def dash_workers(self) -> list[dict[str, Any]]:
        """Live workers with their machine and running task count (the scheduler plugin's
        ``dash_workers``); [] while no scheduler is known."""
        if not self.scheduler_address:
            return []
        rows = await call_scheduler(
            self.scheduler_address, self._gateway_connection_args(), "dash_workers"
        )
        if not isinstance(rows, list):
            raise RuntimeError(f"unexpected dash_workers reply: {type(rows).__name__}")
        return rows

    async def dash_work(self) -> dict[str, Any]:
        """Every user's sessions and work (the scheduler plugin's ``dash_work``); {} while
        no scheduler is known."""
        if not self.scheduler_address:
            return {}
        reply = await call_scheduler(
            self.scheduler_address, self._gateway_connection_args(), "dash_work"
        )
        if not isinstance(reply, dict):
            raise RuntimeError(f"unexpected dash_work reply: {type(reply).__name__}")
        return reply

    def client_credentials(self, username: str) -> Credentials:
        """A fresh short-lived client certificate for a user's kernel."""
        assert self.ca is not None, "the cluster is not started"
        return self.ca.issue("client", username)

    def _gateway_connection_args(self) -> dict[str, Any]:
        # The gateway's own client certificate, reissued well before it expires.
        now = time.time()
        if self._gateway_client is None or self._gateway_client[1] < now:
            assert self.ca is not None
            creds = self.ca.issue("client", "dash-gateway", valid_for=GATEWAY_CLIENT_LIFETIME)
            args = creds.security().get_connection_args("client")
            self._gateway_client = (args, now + GATEWAY_CLIENT_LIFETIME.total_seconds() / 2)
        return self._gateway_client[0]

    # ----- files -----------------------------------------------------------------------

    def _set_address(self, address: str) -> None:
        self.scheduler_address = address
        if self._address_known is not None:
            self._address_known.set()

    def _make_run_dir(self) -> Path:
        # Per-process directory for the children's key files; earlier gateways that were
        # killed leave theirs behind, so remove those whose process is gone.
        run_root = self.data_dir / "run"
        run_root.mkdir(parents=True, exist_ok=True)
        os.chmod(run_root, 0o700)
        for entry in run_root.iterdir():
            if entry.name.isdigit() and (
                int(entry.name) == os.getpid() or not psutil.pid_exists(int(entry.name))
            ):
                shutil.rmtree(entry, ignore_errors=True)
        run_dir = run_root / str(os.getpid())
        run_dir.mkdir(mode=0o700)
        return run_dir

    def _remove_run_dir(self) -> None:
        if self._run_dir is not None:
            shutil.rmtree(self._run_dir, ignore_errors=True)
            self._run_dir = None
