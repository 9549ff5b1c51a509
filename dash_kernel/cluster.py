"""``dk.connect()``: join the gateway's cluster, or start an embedded one for this process."""

from __future__ import annotations

import atexit
import contextlib
import datetime
import json
import logging
import os
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
import warnings
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import psutil
from distributed import Client, LocalCluster
from distributed.security import Security
from distributed.versions import VersionMismatchWarning
from distributed.worker_state_machine import PROCESSING

from .errors import GatewayError, NoWorkersError
from .output import OutputRouter
from .plugin import DashWorkerPlugin, WorkerDeathPlugin
from .resources import (
    SESSION_POOL,
    ResourceSpec,
    check_satisfiable,
    describe_pool_wait,
    describe_wait,
    worker_resources,
)

__all__ = [
    "Connection",
    "connect",
    "current_connection",
    "disconnect",
    "gateway_request",
    "join_handed_down_cluster",
]

log = logging.getLogger(__name__)

ENV_URL, ENV_TOKEN, ENV_LOCAL_WORKERS = "DASH_GATEWAY_URL", "DASH_TOKEN", "DASH_LOCAL_WORKERS"
# How a remote session's kernel joins its notebook's cluster (set by the DASH kernel).
ENV_SCHEDULER, ENV_TLS_CA, ENV_TLS_CERT, ENV_TLS_KEY = (
    "DASH_SCHEDULER_ADDRESS",
    "DASH_TLS_CA",
    "DASH_TLS_CERT",
    "DASH_TLS_KEY",
)
# Handed to tasks and sessions (as in dash_kernel.storage.api).
ENV_STORAGE_URL, ENV_STORAGE_TOKEN = "DASH_STORAGE_URL", "DASH_STORAGE_TOKEN"
# A storage token is renewed when it has less than this many seconds left.
STORAGE_TOKEN_MARGIN = 3600.0
_WORKER_INFO_TTL = 2.0
# Work that has not started after this many seconds is checked for waiting in a queue.
QUEUE_NOTICE_AFTER = 3.0
QUEUE_PROBE_KEYS = 50


def gateway_request(
    url: str,
    token: str | None,
    path: str,
    timeout: float = 30,
    *,
    method: str = "GET",
    body: Any = None,
) -> Any:
    """Call a gateway API path and return its JSON, with errors that say what went wrong."""
    full = url.rstrip("/") + "/" + path.lstrip("/")
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(
        full,
        data=data,
        method=method,
        headers={"Accept": "application/json", "Content-Type": "application/json"},
    )
    if token:
        request.add_header("Authorization", f"token {token}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.load(response)
    except urllib.error.HTTPError as exc:
        if exc.code in (401, 403):
            hint = "check DASH_TOKEN" if token else "set DASH_TOKEN to your API token"
            raise GatewayError(
                f"the DASH gateway at {url} refused the token (HTTP {exc.code}): {hint}"
            ) from None
        raise GatewayError(
            f"the DASH gateway at {url} answered HTTP {exc.code} for {path}"
        ) from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise GatewayError(f"cannot reach the DASH gateway at {url}: {reason}") from None


class Connection:
    """A Dask client on a DASH cluster, with the output router its remote work reports to.

    ``gateway_url`` is None for an embedded cluster (``cluster`` is then this process's own
    ``LocalCluster``).
    """

    def __init__(
        self,
        client: Client,
        *,
        security: Security | None = None,
        cluster: LocalCluster | None = None,
        gateway_url: str | None = None,
        token: str | None = None,
        worker_wait: float = 30.0,
        owns_client: bool = True,
    ):
        self.client = client
        self._token = token
        self._storage: tuple[str, str, float] | None = None
        self.security = security
        self.owns_client = owns_client
        self.cluster = cluster
        self.gateway_url = gateway_url
        self.worker_wait = worker_wait
        self.topic = f"dash-output-{uuid.uuid4().hex}"
        self.router = OutputRouter()
        self._workers: list[tuple[str, dict[str, float]]] = []
        self._workers_at = 0.0
        self._plugin_answers = True
        # A per-user cluster leases workers from the gateway's pool when work asks for them:
        # what could run is the pool's to say (its scheduler knows), not the workers now.
        self._pool: list[dict[str, Any]] | None = None
        self._pool_at = 0.0
        client.register_plugin(DashWorkerPlugin(), name=DashWorkerPlugin.name)
        client.subscribe_topic(self.topic, self.router.handle)

    @property
    def mode(self) -> str:
        """``gateway``, ``embedded`` (this process's own cluster), or ``cluster`` (joined
        with credentials handed down, as in a remote session or a task)."""
        if self.gateway_url:
            return "gateway"
        return "embedded" if self.cluster is not None else "cluster"

    @property
    def scheduler_address(self) -> str:
        return self.client.scheduler.address

    def client_environment(self) -> dict[str, str]:
        """Environment variables with which another process (a remote session's kernel)
        joins this cluster as the same kind of client: the scheduler and TLS credentials,
        and access to this user's storage."""
        env: dict[str, str] = {}
        if self.security is not None:
            env.update(
                {
                    ENV_SCHEDULER: self.scheduler_address,
                    ENV_TLS_CA: self.security.tls_ca_file,
                    ENV_TLS_CERT: self.security.tls_client_cert,
                    ENV_TLS_KEY: self.security.tls_client_key,
                }
            )
        access = self.storage_access()
        if access is not None:
            env[ENV_STORAGE_URL], env[ENV_STORAGE_TOKEN] = access
        return env

    def storage_access(self) -> tuple[str, str] | None:
        """``(gateway URL, storage token)`` with which tasks and sessions reach this user's
        stored objects (and only those); None without a gateway, where workers share this
        machine's disk."""
        if self.gateway_url:
            if self._storage is None or self._storage[2] < time.time() + STORAGE_TOKEN_MARGIN:
                reply = gateway_request(
                    self.gateway_url, self._token, "dash/api/storage/token", method="POST", body={}
                )
                expires = datetime.datetime.fromisoformat(reply["expires"].replace("Z", "+00:00"))
                self._storage = (reply["url"], reply["token"], expires.timestamp())
            return self._storage[0], self._storage[1]
        from .storage.api import current_access

        # Inside a task, its caller's access; in a remote session, the session's.
        handed_down = current_access()
        if handed_down is not None:
            return handed_down
        url, token = os.environ.get(ENV_STORAGE_URL), os.environ.get(ENV_STORAGE_TOKEN)
        return (url, token) if url and token else None

    def workers(self, *, fresh: bool = False) -> list[tuple[str, dict[str, float]]]:
        """``(name, declared resources)`` of each connected worker (cached for 2 s)."""
        if fresh or time.monotonic() - self._workers_at > _WORKER_INFO_TTL:
            info = self.client.scheduler_info(n_workers=-1)["workers"]
            self._workers = [
                (str(w.get("name", address)), dict(w.get("resources") or {}))
                for address, w in info.items()
            ]
            self._workers_at = time.monotonic()
        return self._workers

    def pool_rows(self, *, fresh: bool = False) -> list[dict[str, Any]] | None:
        """The slots of the gateway's pool this cluster leases its workers from, each with
        ``name``, ``resources`` and ``leased`` (None, ``"you"`` or ``"other"``), cached for
        2 s; None when it leases none (a shared or embedded cluster)."""
        if self.mode == "embedded" or not self._plugin_answers or self._pool_at < 0:
            return None
        if fresh or time.monotonic() - self._pool_at > _WORKER_INFO_TTL:
            try:
                rows = self.client.sync(self.client.scheduler.dash_pool)
            except Exception:
                log.debug("the scheduler does not say what pool it leases from", exc_info=True)
                rows = None
            self._pool = list(rows) if isinstance(rows, (list, tuple)) else None
            # A cluster that leases from no pool never starts to: do not ask it again.
            self._pool_at = time.monotonic() if self._pool is not None else -1.0
        return self._pool

    def pool(self, *, fresh: bool = False) -> list[tuple[str, dict[str, float]]] | None:
        """``(slot, resources)`` of each slot of the pool that work may ask for (not the
        session workers); None as for :meth:`pool_rows`."""
        rows = self.pool_rows(fresh=fresh)
        if rows is None:
            return None
        return [
            (str(row.get("name")), dict(row.get("resources") or {}))
            for row in rows
            if SESSION_POOL not in (row.get("resources") or {})
        ]

    def ensure_satisfiable(self, spec: ResourceSpec) -> None:
        """Fail now, with what the cluster (or the pool it leases from) has, if no worker
        could ever run ``spec``.

        With no worker connected at all (and no pool), wait up to ``worker_wait`` seconds
        for one first.
        """
        slots = self.pool()
        if slots is not None:
            if not slots:
                raise NoWorkersError(
                    "the gateway's pool has no capacity: no machine offers workers (start the "
                    "gateway with --local-workers, or have a machine join)"
                )
            try:
                check_satisfiable(spec, slots, pool=True)
            except Exception:
                # a machine that has just joined may be the one that fits
                check_satisfiable(spec, self.pool(fresh=True) or [], pool=True)
            return
        if not self.workers():
            try:
                self.client.wait_for_workers(1, timeout=self.worker_wait)
            except TimeoutError:
                raise NoWorkersError(
                    f"no worker joined the cluster at {self.scheduler_address} within "
                    f"{self.worker_wait:g}s; start workers (or the gateway's local workers)"
                ) from None
            self.workers(fresh=True)
        try:
            check_satisfiable(spec, self.workers())
        except Exception:
            # a worker that has just joined may be the one that fits
            check_satisfiable(spec, self.workers(fresh=True))

    def waiting_reason(self, spec: ResourceSpec, keys: Iterable[str]) -> str | None:
        """Why the tasks ``keys``, which need ``spec``, are queued (every worker that fits
        is busy or paused); None if one of them runs, a worker is free, or the cluster
        cannot tell."""
        keys = list(keys)[:QUEUE_PROBE_KEYS]
        try:
            views = self.client.run(_worker_view, keys)
            slots = self.pool_rows()
            if slots is not None:
                reason = describe_pool_wait(spec, slots)
                if _running(views):
                    return None
                if reason != "":
                    return reason
            rows = self._scheduler_rows() or [view["row"] for view in views.values()]
            return _describe_queue(spec, rows, views)
        except Exception:
            # A notice is a courtesy: never let it break the work it is about.
            log.debug("could not tell why %s waits", keys[:1], exc_info=True)
            return None

    def _scheduler_rows(self) -> list[dict[str, Any]] | None:
        """The rows of DASH's scheduler plugin (``dash_workers``), None on a scheduler
        without it: this process's embedded cluster, or a plain Dask scheduler."""
        if self.mode == "embedded" or not self._plugin_answers:
            return None
        rows = self.client.sync(self.client.scheduler.dash_workers)
        if not isinstance(rows, list):
            # A scheduler answers None for a handler it lacks (and logs it): ask once.
            self._plugin_answers = False
            return None
        return rows

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.client.unsubscribe_topic(self.topic)
        if self.owns_client:
            self.client.close()
        if self.cluster is not None:
            self.cluster.close()

    def __repr__(self) -> str:
        where = self.gateway_url or f"{self.mode} cluster"
        return f"<dash_kernel.Connection {where} scheduler={self.scheduler_address}>"


_connection: Connection | None = None
_connect_lock = threading.Lock()
_version_noted = False


@contextlib.contextmanager
def _version_note() -> Iterator[None]:
    """Turn the table Dask warns with when this process's packages differ from the
    cluster's into one line on stderr, once per process; other warnings pass."""
    global _version_noted
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", VersionMismatchWarning)
        yield
    for warning in caught:
        if not issubclass(warning.category, VersionMismatchWarning):
            warnings.showwarning(
                warning.message, warning.category, warning.filename, warning.lineno
            )
        elif not _version_noted:
            _version_noted = True
            print(_mismatch_line(str(warning.message)), file=sys.stderr, flush=True)


def _mismatch_line(table: str) -> str:
    """``Mismatched versions found`` and Dask's table of them, as one line."""
    cells = [
        [cell.strip() for cell in line.strip().strip("|").split("|")]
        for line in table.splitlines()
        if line.startswith("|")
    ]
    differ = [
        f"{package} {here} (scheduler {scheduler}, workers {workers})"
        for package, here, scheduler, workers in (row for row in cells[1:] if len(row) == 4)
    ]
    return (
        f"DASH: package versions differ between this process and its cluster: "
        f"{'; '.join(differ) or 'see client.get_versions(check=True)'}. "
        "Usually harmless; if work fails to load on a worker, install the same versions."
    )


_connect_lock = threading.Lock()


def _security_from_gateway(tls: Mapping[str, str]) -> Security:
    return Security(
        tls_ca_file=tls["ca"],
        tls_client_cert=tls["cert"],
        tls_client_key=tls["key"],
        require_encryption=True,
    )


def _connect_gateway(url: str, token: str | None, timeout: float, worker_wait: float) -> Connection:
    info = gateway_request(url, token, "dash/api/cluster", timeout=timeout)
    security = _security_from_gateway(info["tls"])
    with _version_note():
        client = Client(info["scheduler"], security=security, timeout=timeout)
    return Connection(
        client,
        security=security,
        gateway_url=url,
        token=token,
        worker_wait=worker_wait,
    )


def _connect_scheduler(timeout: float, worker_wait: float) -> Connection:
    security = _security_from_gateway(
        {
            "ca": os.environ[ENV_TLS_CA],
            "cert": os.environ[ENV_TLS_CERT],
            "key": os.environ[ENV_TLS_KEY],
        }
    )
    with _version_note():
        client = Client(os.environ[ENV_SCHEDULER], security=security, timeout=timeout)
    return Connection(client, security=security, worker_wait=worker_wait)


def _connect_embedded(n_workers: int | None) -> Connection:
    if n_workers is None:
        n_workers = int(os.environ.get(ENV_LOCAL_WORKERS) or min(os.cpu_count() or 1, 4))
    memory_limit = psutil.virtual_memory().total // max(n_workers, 1)
    security = Security.temporary()
    cluster = LocalCluster(
        n_workers=n_workers,
        threads_per_worker=1,
        processes=True,
        memory_limit=memory_limit,
        resources=worker_resources(1, memory_limit),
        protocol="tls://",
        security=security,
        host="127.0.0.1",
        dashboard_address="127.0.0.1:0",
        scheduler_kwargs={"dashboard": False, "plugins": [WorkerDeathPlugin()]},
        silence_logs=logging.CRITICAL,
        # the session host is dash_worker's, named here, not imported
        preload=[
            "dash_kernel.plugin",
            "dash_worker.session_host",
        ],  # remote errors reach the user through dk itself
    )
    with _version_note():
        client = Client(cluster)
    log.info("started an embedded DASH cluster with %d workers", n_workers)
    return Connection(client, security=security, cluster=cluster)


def _inside_worker_client() -> Client | None:
    try:
        from distributed import get_client, get_worker

        get_worker()
    except ValueError:
        return None
    return get_client()


def _task_states(keys: list[str], dask_worker: Any = None) -> dict[str, str]:
    """On a worker: the state of those of ``keys`` it holds (run by ``Client.run``)."""
    tasks = dask_worker.state.tasks
    return {key: tasks[key].state for key in keys if key in tasks}


def _worker_view(keys: list[str], dask_worker: Any = None) -> dict[str, Any]:
    """On a worker (run by ``Client.run``): the states of those of ``keys`` it holds, and
    a row like the scheduler plugin's ``dash_workers`` one, counted as the scheduler
    counts (every task assigned here holds its resources, running or not)."""
    state = dask_worker.state
    assigned = [ts for ts in state.tasks.values() if ts.state in PROCESSING]
    used = dict.fromkeys(state.total_resources, 0.0)
    for ts in assigned:
        for name, amount in (ts.resource_restrictions or {}).items():
            used[name] = used.get(name, 0.0) + amount
    row = {
        "name": str(dask_worker.name),
        "address": dask_worker.address,
        "status": dask_worker.status.name,
        "nthreads": state.nthreads,
        "processing": len(assigned),
        "resources": dict(state.total_resources),
        "used_resources": used,
    }
    return {"row": row, "states": _task_states(keys, dask_worker)}


def _running(views: Mapping[str, dict[str, Any]]) -> bool:
    return any(
        state in ("executing", "long-running")
        for view in views.values()
        for state in view["states"].values()
    )


def _describe_queue(
    spec: ResourceSpec, rows: list[dict[str, Any]], views: Mapping[str, dict[str, Any]]
) -> str | None:
    if _running(views):
        return None
    names = {row["address"]: row["name"] for row in rows}
    waiting_on: dict[str, int] = {}
    for address, view in views.items():
        by_key = view["states"]
        waiting_on[names.get(address, address)] = len(by_key)
    return describe_wait(spec, rows, waiting_on)


def connect(
    url: str | None = None,
    token: str | None = None,
    *,
    local_workers: int | None = None,
    timeout: float = 30,
    worker_wait: float = 30,
) -> Connection:
    """Return this process's DASH connection, making it on first use.

    The gateway comes from ``url``/``token`` or ``DASH_GATEWAY_URL``/``DASH_TOKEN`` (set
    for kernels the gateway starts). With no gateway, an embedded cluster of
    ``local_workers`` processes (default ``DASH_LOCAL_WORKERS`` or up to 4) starts for this
    process and stops when it exits. Inside a DASH task (nested fan-out), the worker's own
    cluster is used, and in a remote session's kernel its notebook's (``DASH_SCHEDULER_ADDRESS``
    and ``DASH_TLS_*``), unless ``url`` says otherwise. Work submitted while no worker is
    connected waits up to ``worker_wait`` seconds for one, then fails with
    :class:`~dash_kernel.errors.NoWorkersError`.

    >>> import dash_kernel as dk
    >>> dk.connect()                                   # doctest: +SKIP
    <dash_kernel.Connection http://127.0.0.1:8888/ scheduler=tls://127.0.0.1:40401>
    """
    global _connection
    with _connect_lock:
        if _connection is not None and _connection.client.status in ("running", "connecting"):
            if url is None or url == _connection.gateway_url:
                return _connection
            _connection.close()
        explicit = url is not None
        worker_client = None if explicit else _inside_worker_client()
        url = url or os.environ.get(ENV_URL) or None
        token = token if token is not None else os.environ.get(ENV_TOKEN)
        if worker_client is not None:
            _connection = Connection(worker_client, owns_client=False)
        elif not explicit and os.environ.get(ENV_SCHEDULER):
            _connection = _connect_scheduler(timeout, worker_wait)
        elif url:
            _connection = _connect_gateway(url, token, timeout, worker_wait)
        else:
            _connection = _connect_embedded(local_workers)
        return _connection


def join_handed_down_cluster() -> None:
    """In a remote session's kernel (``DASH_SCHEDULER_ADDRESS`` set): connect now, so
    that Dask collections computed in its first cell already run on the pool (the
    connection's client is Dask's default). Elsewhere, nothing: ``dk`` connects on use."""
    if not os.environ.get(ENV_SCHEDULER):
        return
    try:
        connect()
    except Exception:
        log.warning(
            "could not join the notebook's cluster; dk connects on first use", exc_info=True
        )


def current_connection() -> Connection | None:
    """This process's DASH connection if it has made one (never starts one)."""
    return _connection


def disconnect() -> None:
    """Close this process's connection (and its embedded cluster, if it started one)."""
    global _connection
    with _connect_lock:
        if _connection is not None:
            _connection.close()
            _connection = None


atexit.register(disconnect)
