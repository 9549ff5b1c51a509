"""Per-user Dask clusters: each user's own CA and scheduler, started on need, stopped when idle, adopted."""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import datetime
import hashlib
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil
from distributed.core import CommClosedError
from traitlets import Bool, Float, Unicode
from traitlets.config import LoggingConfigurable

from dash_gateway.cluster import TERMINATE_GRACE, ChildProcess, child_environment
from dash_gateway.policy import write_policy
from dash_gateway.scheduler_plugin import GATEWAY_PEER
from dash_gateway.scheduler_rpc import call_scheduler
from dash_gateway.tls import CertificateAuthority, Credentials
from dash_kernel.files import write_atomic

log = logging.getLogger(__name__)

CLUSTERS_DIR = "clusters"
RECORD_FILE = "cluster.json"
CONTROL_LIFETIME = datetime.timedelta(days=30)
# The only variables a user's scheduler inherits: it runs user code (it unpickles graphs).
ENV_ALLOWED = ("PATH", "LANG", "LANGUAGE", "TZ", "PYTHONPATH", "VIRTUAL_ENV")
ENV_ALLOWED_PREFIXES = ("LC_",)
_RPC_ERRORS = (OSError, CommClosedError, asyncio.TimeoutError, RuntimeError)


def cluster_id(username: str) -> str:
    """A directory-safe id for ``username``'s cluster: a readable slug plus a hash of the name,
    so that no name (``../x``, ``a/b``, unicode) escapes its directory or collides with another."""
    slug = re.sub(r"[^a-z0-9]+", "-", username.lower()).strip("-")[:24].strip("-") or "user"
    return f"{slug}-{hashlib.sha256(username.encode()).hexdigest()[:16]}"


def scheduler_environment(run_dir: Path) -> dict[str, str]:
    """An allow-listed environment whose home and temporary directory are the cluster's own."""
    env = {
        k: v
        for k, v in child_environment().items()
        if k in ENV_ALLOWED or k.startswith(ENV_ALLOWED_PREFIXES)
    }
    env.update(HOME=str(run_dir), TMPDIR=str(run_dir / "tmp"), PYTHONUNBUFFERED="1")
    return env


class ClusterTLS:
    """One user cluster's certificate authority, separate from the gateway's and every other
    cluster's, so its scheduler's trust store holds nothing another cluster can sign for."""

    def __init__(self, directory: Path, cid: str, lease_lifetime: datetime.timedelta):
        self.cluster_id = cid
        self.ca = CertificateAuthority(directory, name=f"DASH cluster {cid}")
        self.lease_lifetime = lease_lifetime
        self._control: tuple[dict[str, Any], float] | None = None

    def scheduler(self, hosts: list[str]) -> Credentials:
        """The scheduler's certificate (issued afresh at each start)."""
        return self.ca.issue("scheduler", f"dash-scheduler-{self.cluster_id}", hosts=hosts)

    def client(self, username: str) -> Credentials:
        """A short-lived client certificate for the cluster's user."""
        return self.ca.issue("client", username)

    def lease_worker(self, machine: str, hosts: list[str] | None = None) -> Credentials:
        """A short-lived worker certificate for ``machine``, valid in this cluster only."""
        return self.ca.issue("worker", machine, valid_for=self.lease_lifetime, hosts=hosts or ())

    def control(self) -> dict[str, Any]:
        """Connection args of the gateway's own identity for this cluster, reissued at half life."""
        now = time.time()
        if self._control is None or self._control[1] < now:
            creds = self.ca.issue("client", GATEWAY_PEER[1], valid_for=CONTROL_LIFETIME)
            args = creds.security().get_connection_args("client")
            self._control = (args, now + CONTROL_LIFETIME.total_seconds() / 2)
        return self._control[0]


@dataclass
class ClusterRecord:
    """What a restarted gateway needs to find a running cluster again."""

    user: str
    cluster_id: str
    pid: int
    create_time: float
    address: str
    run_dir: str


@dataclass
class UserCluster:
    """A running cluster: its record, identity, and the process if this gateway started it."""

    record: ClusterRecord
    tls: ClusterTLS
    process: ChildProcess | None = None
    idle_since: float | None = field(default_factory=time.monotonic)

    def exited(self) -> bool:
        if self.process is not None:
            return self.process.exited() is not None
        return not _same_process(self.record)


@dataclass(frozen=True)
class ClusterAccess:
    """What a user gets for their cluster: its address and their client credentials."""

    cluster_id: str
    address: str
    credentials: Credentials


class UserClusters(LoggingConfigurable):
    """Starts, watches, idles out and adopts one Dask scheduler per user."""

    data_dir = Unicode(help="the gateway's data directory (per-cluster CAs and records)").tag(
        config=True
    )
    run_root = Unicode(
        "",
        help="where each cluster's working directory is made (default: a private directory "
        "in the system's temporary directory); never inside the data directory",
    ).tag(config=True)
    scheduler_host = Unicode("127.0.0.1", help="interface users' schedulers listen on").tag(
        config=True
    )
    idle_timeout = Float(600.0, help="stop a cluster after this many seconds with no clients "
                         "and no tasks").tag(config=True)  # fmt: skip
    keep_running = Bool(
        False, help="leave users' clusters running when the gateway exits, for the next to adopt"
    ).tag(config=True)
    start_timeout = Float(60.0, help="seconds a scheduler has to report its address").tag(
        config=True
    )
    poll_interval = Float(5.0, help="seconds between idle checks").tag(config=True)
    lease_certificate_lifetime = Float(
        86400.0, help="seconds a lease worker's certificate is valid"
    ).tag(config=True)

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        self._clusters: dict[str, UserCluster] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._watch: asyncio.Task[None] | None = None

    # ----- lifecycle -------------------------------------------------------------------

    async def start(self) -> None:
        """Adopt the clusters a previous gateway left running, forget dead ones, start watching."""
        for path in sorted(self._clusters_dir().glob(f"*/{RECORD_FILE}")):
            await self._adopt_or_forget(path)
        if not self.keep_running:
            atexit.register(self._stop_now)
        self._watch = asyncio.create_task(self._watch_idle(), name="dash-user-clusters")

    async def close(self) -> None:
        """Stop watching; stop every cluster unless ``keep_running``."""
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch
            self._watch = None
        if not self.keep_running:
            for user in list(self._clusters):
                await self.stop_cluster(user)
            atexit.unregister(self._stop_now)
        self._clusters.clear()

    async def ensure(self, username: str) -> ClusterAccess:
        """``username``'s running cluster (started if need be) and fresh client credentials."""
        async with self._lock(username):
            cluster = self._clusters.get(username)
            if cluster is not None and cluster.exited():
                self._forget(cluster)
                cluster = None
            if cluster is None:
                cluster = await self._start_cluster(username)
                self._clusters[username] = cluster
            # Handing out credentials restarts the idle clock, so the client has time to connect.
            cluster.idle_since = time.monotonic()
            return ClusterAccess(
                cluster.record.cluster_id, cluster.record.address, cluster.tls.client(username)
            )

    async def stop_cluster(self, username: str) -> None:
        """Stop ``username``'s scheduler, if running, and forget it."""
        async with self._lock(username):
            cluster = self._clusters.get(username)
            if cluster is None:
                return
            if cluster.process is not None:
                await cluster.process.terminate()
            else:
                await asyncio.to_thread(_stop_pid, cluster.record)
            self._forget(cluster)
            log.info("Stopped %s's cluster %s", username, cluster.record.cluster_id)

    # ----- queries ---------------------------------------------------------------------

    def running(self) -> dict[str, ClusterRecord]:
        """The record of every cluster this gateway knows, by user."""
        return {user: c.record for user, c in self._clusters.items()}

    def identity(self, username: str) -> ClusterTLS:
        """``username``'s cluster identity (created on first use), to issue lease certificates."""
        cid = cluster_id(username)
        cluster = self._clusters.get(username)
        if cluster is not None:
            return cluster.tls
        directory = self._clusters_dir() / cid
        _private_dir(directory)
        lifetime = datetime.timedelta(seconds=self.lease_certificate_lifetime)
        return ClusterTLS(directory / "tls", cid, lifetime)

    async def activity(self, username: str) -> dict[str, int]:
        """The scheduler's own count of clients and tasks, asked with the control identity."""
        cluster = self._clusters[username]
        reply = await call_scheduler(cluster.record.address, cluster.tls.control(), "dash_activity")
        if not isinstance(reply, dict):
            raise RuntimeError(f"unexpected dash_activity reply: {type(reply).__name__}")
        return {"clients": int(reply.get("clients", 0)), "tasks": int(reply.get("tasks", 0))}

    # ----- starting --------------------------------------------------------------------

    async def _start_cluster(self, username: str) -> UserCluster:
        tls = self.identity(username)
        cid = tls.cluster_id
        run_dir = self._fresh_run_dir(cid)
        ca, cert, key = tls.scheduler([self.scheduler_host]).write(run_dir, "scheduler")
        address_file = run_dir / "scheduler.json"
        policy_file = run_dir / "cluster-policy.json"
        write_policy(policy_file, {}, [])
        # A cluster left running must end by itself if no gateway comes back to adopt it.
        backstop = self.idle_timeout + self.poll_interval if self.keep_running else 0
        argv = [
            sys.executable, "-m", "dash_gateway.scheduler_process",
            "--host", self.scheduler_host, "--port", "0",
            "--tls-ca", ca, "--tls-cert", cert, "--tls-key", key,
            "--address-file", str(address_file),
            "--policy-file", str(policy_file),
            "--parent-pid", "0" if self.keep_running else str(os.getpid()),
            "--idle-timeout", str(backstop),
        ]  # fmt: skip
        process = ChildProcess(f"{username}'s scheduler")
        log_file = str(run_dir / "scheduler.log") if self.keep_running else None
        process.spawn(argv, scheduler_environment(run_dir), cwd=str(run_dir), log_file=log_file)
        address = await self._read_address(process, address_file)
        if not address:
            await process.terminate()
            shutil.rmtree(run_dir, ignore_errors=True)
            raise RuntimeError(f"{username}'s Dask scheduler did not start; see the gateway log")
        assert process.pid is not None
        record = ClusterRecord(
            user=username,
            cluster_id=cid,
            pid=process.pid,
            create_time=psutil.Process(process.pid).create_time(),
            address=address,
            run_dir=str(run_dir),
        )
        write_atomic(self._record_path(cid), json.dumps(asdict(record)))
        log.info("Started %s's cluster %s at %s (pid %d)", username, cid, address, record.pid)
        return UserCluster(record=record, tls=tls, process=process)

    async def _read_address(self, process: ChildProcess, address_file: Path) -> str:
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if address_file.exists():
                return str(json.loads(address_file.read_text())["address"])
            if process.exited() is not None:
                return ""
            await asyncio.sleep(0.05)
        return ""

    # ----- adoption --------------------------------------------------------------------

    async def _adopt_or_forget(self, path: Path) -> None:
        try:
            record = ClusterRecord(**json.loads(path.read_text()))
        except (OSError, ValueError, TypeError):
            log.warning("Ignoring the unreadable cluster record %s", path)
            path.unlink(missing_ok=True)
            return
        if record.cluster_id != cluster_id(record.user) or path.parent.name != record.cluster_id:
            log.warning("Ignoring the cluster record %s: it does not match its user", path)
            path.unlink(missing_ok=True)
            return
        cluster = UserCluster(record=record, tls=self.identity(record.user))
        if _same_process(record) and await self._answers(cluster):
            self._clusters[record.user] = cluster
            log.info(
                "Adopted %s's cluster %s at %s", record.user, record.cluster_id, record.address
            )
            return
        log.info("Forgetting %s's cluster %s: it is gone", record.user, record.cluster_id)
        await asyncio.to_thread(_stop_pid, record)
        self._forget(cluster)

    async def _answers(self, cluster: UserCluster) -> bool:
        try:
            await call_scheduler(cluster.record.address, cluster.tls.control(), "dash_activity")
        except _RPC_ERRORS:
            return False
        return True

    # ----- idle watch ------------------------------------------------------------------

    async def _watch_idle(self) -> None:
        while True:
            await asyncio.sleep(self.poll_interval)
            for user in list(self._clusters):
                with contextlib.suppress(Exception):
                    await self._check_idle(user)

    async def _check_idle(self, user: str) -> None:
        cluster = self._clusters.get(user)
        if cluster is None:
            return
        if cluster.exited():
            log.warning("%s's scheduler exited by itself; forgetting it", user)
            self._forget(cluster)
            return
        try:
            busy = any((await self.activity(user)).values())
        except _RPC_ERRORS as exc:
            log.debug("%s's scheduler did not answer: %r", user, exc)
            return
        now = time.monotonic()
        if busy or cluster.idle_since is None:
            cluster.idle_since = None if busy else now
        elif now - cluster.idle_since >= self.idle_timeout:
            log.info("%s's cluster has been idle for %.0fs; stopping it", user, self.idle_timeout)
            await self.stop_cluster(user)

    # ----- files -----------------------------------------------------------------------

    def _forget(self, cluster: UserCluster) -> None:
        if self._clusters.get(cluster.record.user) is cluster:
            del self._clusters[cluster.record.user]
        self._record_path(cluster.record.cluster_id).unlink(missing_ok=True)
        run_dir = Path(cluster.record.run_dir)
        # Only ever delete a directory this manager made.
        if run_dir.parent == self._run_root():
            shutil.rmtree(run_dir, ignore_errors=True)

    def _stop_now(self) -> None:
        # Last resort at interpreter exit, when the event loop is gone.
        for cluster in list(self._clusters.values()):
            if cluster.process is not None:
                cluster.process.terminate_now()
            else:
                _stop_pid(cluster.record)
            self._forget(cluster)

    def _lock(self, username: str) -> asyncio.Lock:
        return self._locks.setdefault(username, asyncio.Lock())

    def _clusters_dir(self) -> Path:
        if not self.data_dir:
            raise ValueError("UserClusters.data_dir is not set")
        path = Path(self.data_dir) / CLUSTERS_DIR
        _private_dir(path)
        return path

    def _record_path(self, cid: str) -> Path:
        return self._clusters_dir() / cid / RECORD_FILE

    def _run_root(self) -> Path:
        if self.run_root:
            root = Path(self.run_root)
        else:
            # One root per data directory, so two gateways' clusters of one user never meet.
            tag = hashlib.sha256(str(Path(self.data_dir).resolve()).encode()).hexdigest()[:12]
            root = Path(tempfile.gettempdir()) / f"dash-clusters-{os.getuid()}" / tag
        data_dir = Path(self.data_dir).resolve()
        if root.resolve() == data_dir or data_dir in root.resolve().parents:
            raise ValueError(f"run_root {root} must not be inside the data directory")
        return root

    def lease_root(self) -> Path:
        """Where lease workers' working directories are made, beside the clusters' own (a
        cluster id always ends in a hash, so none is called ``leases``)."""
        root = self._run_root()
        if not self.run_root:
            _private_dir(root.parent)
        _private_dir(root / "leases")
        return root / "leases"

    def _fresh_run_dir(self, cid: str) -> Path:
        root = self._run_root()
        if not self.run_root:
            _private_dir(root.parent)
        _private_dir(root)
        run_dir = root / cid
        shutil.rmtree(run_dir, ignore_errors=True)
        _private_dir(run_dir)
        _private_dir(run_dir / "tmp")
        return run_dir


def _private_dir(path: Path) -> None:
    """Make ``path`` (and parents) and insist it is a real directory of ours, mode 0700: the
    default root lies in a shared /tmp where another user could have made it first."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    info = path.lstat()
    if not path.is_dir() or path.is_symlink() or info.st_uid != os.getuid():
        raise PermissionError(f"{path} is not a directory owned by this user")
    os.chmod(path, 0o700)


def same_process(pid: int, create_time: float) -> bool:
    """Is ``pid`` still the process started at ``create_time`` (not a reused pid, not a zombie)?"""
    try:
        proc = psutil.Process(pid)
        return abs(proc.create_time() - create_time) < 0.5 and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def stop_process(pid: int, create_time: float, grace: float = TERMINATE_GRACE) -> None:
    """Stop a process this gateway did not start: SIGTERM, then SIGKILL after ``grace``."""
    if not same_process(pid, create_time):
        return
    with contextlib.suppress(psutil.Error):
        proc = psutil.Process(pid)
        proc.terminate()
        _, alive = psutil.wait_procs([proc], timeout=grace)
        for p in alive:
            p.kill()


def _same_process(record: ClusterRecord) -> bool:
    return same_process(record.pid, record.create_time)


def _stop_pid(record: ClusterRecord, grace: float = TERMINATE_GRACE) -> None:
    stop_process(record.pid, record.create_time, grace)
