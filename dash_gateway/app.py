"""The ``dash-gateway`` command: a Jupyter Server extension serving JupyterLab and the DASH API."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from pathlib import Path
from typing import Any

from dask.utils import parse_bytes
from distributed.system import MEMORY_LIMIT
from jupyter_core.paths import jupyter_data_dir
from jupyter_server.extension.application import ExtensionApp
from jupyter_server.serverapp import ServerApp
from traitlets import Bool, Enum, Float, Int, Unicode, Union, default, validate

from dash_gateway.auth import DashIdentityProvider
from dash_gateway.cluster import ClusterSupervisor
from dash_gateway.datadir import DataDirInUse, DataDirLock
from dash_gateway.events import EventsHandler, OverviewHandler
from dash_gateway.handlers import ClusterHandler, OpenAPIHandler, PoolHandler, StatusHandler
from dash_gateway.leases import Broker, LocalLeaseBackend
from dash_gateway.machines import (
    AgentCertificateHandler,
    AgentDrainHandler,
    AgentHandler,
    AgentHeartbeatHandler,
    EnrolHandler,
    InvitesHandler,
    WorkerActionHandler,
    WorkerHandler,
    WorkerOptions,
    WorkersHandler,
)
from dash_gateway.overview import OverviewService
from dash_gateway.pages import page_handlers
from dash_gateway.registry import MAX_INVITE_LIFETIME, Registry
from dash_gateway.storage import StorageService, storage_handlers
from dash_gateway.tenancy import PerUserClusters
from dash_gateway.user_clusters import UserClusters
from dash_kernel._version import __version__

_WILDCARD_HOSTS = ("", "0.0.0.0", "*", "localhost")


def gateway_url(serverapp: ServerApp) -> str:
    """The URL a kernel on this machine uses to reach the server, base_url included."""
    if serverapp.certfile:
        # With TLS the certificate names the host: use the server's own idea of its URL.
        return serverapp.connection_url
    ip = serverapp.ip
    if ip in _WILDCARD_HOSTS:
        host = "127.0.0.1"
    elif ip == "::":
        host = "[::1]"
    else:
        host = f"[{ip}]" if ":" in ip else ip
    return f"http://{host}:{serverapp.port}{serverapp.base_url}"


def encrypt_kernel_transport(serverapp: ServerApp) -> None:
    """Unless the operator chose otherwise, kernels started here talk to the server over
    CurveZMQ (DASH's kernelspec declares it, as ipykernel's does): their ports are open on
    loopback to every process of the machine, user code included."""
    import zmq
    from jupyter_client.manager import KernelManager

    chosen = serverapp.config.get("KernelManager", {})
    if "transport_encryption" in chosen or not hasattr(KernelManager, "transport_encryption"):
        return
    if zmq.has("curve"):
        serverapp.config.KernelManager.transport_encryption = "auto"
        serverapp.kernel_manager.update_config(serverapp.config)


def configure_lab(serverapp: ServerApp) -> None:
    """Unless configured otherwise, keep JupyterLab from fetching Jupyter's news feed from
    the internet (a gateway may have no internet access).

    Called while extensions load: every Lab-like app is linked by then, and each reads its
    settings when it loads, after us (extensions load in name order). DASH's own Lab
    extension needs nothing here: every install, editable ones included, puts it in
    ``share/jupyter/labextensions``.
    """
    try:
        from jupyterlab_server import LabServerApp
    except ImportError:
        return
    for apps in serverapp.extension_manager.extension_apps.values():
        for app in apps:
            if not isinstance(app, LabServerApp):
                continue
            if "news_url" not in app.config.get("LabApp", {}) and hasattr(app, "news_url"):
                app.news_url = None


class DashGateway(ExtensionApp):
    """JupyterLab plus the DASH API, with a supervised mutual-TLS Dask cluster."""

    name = "dash_gateway"
    description = (
        "DASH gateway: JupyterLab, the DASH API and a supervised Dask cluster "
        "(TLS scheduler subprocess and local workers)."
    )
    version = __version__
    load_other_extensions = True

    # The server's token is the operator; accounts (`dash-gateway users add`) get the DASH API only.
    serverapp_config = {
        "identity_provider_class": "dash_gateway.auth.DashIdentityProvider",
        "authorizer_class": "dash_gateway.auth.DashAuthorizer",
    }

    subcommands = {
        "users": (
            "dash_gateway.commands.UsersApp",
            "Manage user accounts and their API tokens: users add|list|remove.",
        ),
        "invite": (
            "dash_gateway.commands.InviteApp",
            "Create a one-time invite to contribute a machine (prints the dash-worker command).",
        ),
    }

    default_url = Unicode("/lab", help="The page the server opens first.").tag(config=True)

    aliases = {
        "local-workers": "DashGateway.local_workers",
        "data-dir": "DashGateway.data_dir",
        "scheduler-address": "DashGateway.scheduler_address",
        "scheduler-host": "DashGateway.scheduler_host",
        "scheduler-port": "DashGateway.scheduler_port",
        "worker-threads": "DashGateway.worker_threads",
        "worker-memory-limit": "DashGateway.worker_memory_limit",
        "approve-workers": "DashGateway.approve_workers",
        "public-url": "DashGateway.public_url",
        "storage-url": "DashGateway.storage_url",
        "tenancy": "DashGateway.tenancy",
    }

    tenancy = Enum(
        ["shared", "per-user"],
        default_value="shared",
        help="'per-user': every account gets a Dask cluster of its own (a scheduler started "
        "on first need, stopped when idle, whose TLS identity admits only that account's "
        "clients and the workers leased to it), on workers leased from the pool (the "
        "local_workers slots of this host). 'shared': one scheduler for every account, as "
        "with --scheduler-address (single-tenant: every account can reach every other's "
        "work). Contributed machines join the shared cluster only, for now.",
    ).tag(config=True)

    cluster_idle_timeout = Float(
        600.0,
        help="Seconds a user's cluster (tenancy='per-user') may have no client and no work "
        "before its scheduler is stopped; the next dk.connect() or session starts it again.",
    ).tag(config=True)

    lease_idle_timeout = Float(
        60.0,
        help="Seconds a leased worker (tenancy='per-user') may hold no task and no result "
        "before it goes back to the pool.",
    ).tag(config=True)

    max_leases_per_user = Int(
        0,
        help="The most workers one user's cluster may lease from the pool at once "
        "(tenancy='per-user'; 0: no limit). Work beyond it waits, first come first served.",
    ).tag(config=True)

    local_sessions = Int(
        help="Remote sessions this host runs at once for users' clusters (tenancy='per-user'), "
        "each in a worker of its own that holds none of the local workers' cores, so that a "
        "notebook's session never takes the thread its own dk.map needs. Default: 4 per "
        "local worker."
    ).tag(config=True)

    @default("local_sessions")
    def _default_local_sessions(self) -> int:
        return 4 * self.local_workers

    keep_clusters_running = Bool(
        False,
        help="Leave users' schedulers and leased workers running when the gateway exits, for "
        "the next gateway on this data directory to adopt, so that a restart loses no session "
        "and no running work (tenancy='per-user'); each stops by itself after "
        "cluster_idle_timeout if none comes.",
    ).tag(config=True)

    local_workers = Int(
        help="Dask workers to start on this machine (0: none). Defaults to one per CPU core, "
        "or 0 when --scheduler-address points at an existing cluster."
    ).tag(config=True)

    @default("local_workers")
    def _default_local_workers(self) -> int:
        from dask.system import CPU_COUNT

        return 0 if self.scheduler_address else max(CPU_COUNT, 1)

    @validate("local_workers")
    def _validate_local_workers(self, proposal: dict[str, Any]) -> int:
        if proposal["value"] < 0:
            raise ValueError("local_workers must be 0 or more")
        return proposal["value"]

    data_dir = Unicode(
        help="Where DASH keeps its state: the certificate authority (tls/), run files, registry."
    ).tag(config=True)

    @default("data_dir")
    def _default_data_dir(self) -> str:
        return os.path.join(jupyter_data_dir(), "dash")

    scheduler_address = Unicode(
        "",
        help="Address (tls://host:port) of an existing Dask scheduler to use instead of "
        "starting one. That cluster must trust the gateway's CA (data_dir/tls/ca.pem): its "
        "scheduler and workers need certificates issued by that CA, as the gateway and its "
        "kernels connect with mutual TLS.",
    ).tag(config=True)

    scheduler_host = Unicode(
        "127.0.0.1", help="Interface the gateway's own scheduler listens on."
    ).tag(config=True)

    scheduler_port = Int(0, help="Port of the gateway's own scheduler (0: a free port).").tag(
        config=True
    )

    worker_threads = Int(1, help="Threads per local worker.").tag(config=True)

    worker_memory_limit = Union(
        [Int(), Unicode()],
        default_value="auto",
        help="Memory limit per local worker: bytes, a size such as '4GB', or 'auto' "
        "(this machine's memory divided by the number of local workers).",
    ).tag(config=True)

    cluster_start_timeout = Float(
        60.0, help="Seconds to wait for the scheduler and local workers before warning."
    ).tag(config=True)

    approve_workers = Enum(
        ["auto", "manual"],
        default_value="auto",
        help="Whether a newly enrolled machine may join at once ('auto') or waits as "
        "'pending' until the operator approves it (POST /dash/api/workers/<name>/approve).",
    ).tag(config=True)

    public_url = Unicode(
        "",
        help="The URL contributed machines reach this gateway at (e.g. "
        "https://gpu.example.org/), written into invites' join commands. Default: the URL "
        "the invite was requested on.",
    ).tag(config=True)

    @validate("public_url")
    def _validate_public_url(self, proposal: dict[str, Any]) -> str:
        url = proposal["value"].strip()
        if url and not url.startswith(("http://", "https://")):
            raise ValueError(f"public_url must start with http:// or https://, not {url!r}")
        return url if not url or url.endswith("/") else url + "/"

    storage_url = Unicode(
        "",
        help="Where DASH keeps stored objects (dk.save, datasets): a directory (path or "
        "file:// URL) or an S3 prefix, s3://bucket/prefix, reached with boto3's standard "
        "credentials and endpoint settings (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, profiles). "
        "Default: the storage/ directory in data_dir. Users reach only their own objects, "
        "through the gateway or short-lived presigned URLs; S3 credentials stay here.",
    ).tag(config=True)

    @validate("storage_url")
    def _validate_storage_url(self, proposal: dict[str, Any]) -> str:
        url = proposal["value"].strip()
        scheme = url.partition("://")[0] if "://" in url else ""
        if scheme not in ("", "file", "s3"):
            raise ValueError(
                f"storage_url must be a directory, a file:// URL or s3://bucket/prefix, "
                f"not a {scheme}:// URL"
            )
        if scheme == "s3" and not url[len("s3://") :].split("/")[0]:
            raise ValueError("storage_url s3://bucket/prefix needs a bucket")
        return url

    storage_gc_interval = Float(
        6 * 3600.0,
        help="Seconds between collections of stored chunks that no object version refers "
        "to any more (left by dk.rm, pruned checkpoints and overwritten data); 0: never "
        "(POST /dash/api/storage/gc still collects on demand).",
    ).tag(config=True)

    storage_gc_grace = Float(
        3600.0,
        help="Unreferenced chunks younger than this many seconds are kept: a save uploads "
        "its chunks before it records the version that names them.",
    ).tag(config=True)

    checkpoint_retention = Float(
        30 * 86400.0,
        help="Seconds a session checkpoint (sessions/<notebook>-<kernel id>, made after "
        "each cell of a DASH kernel) is kept after its last save; older ones are deleted at "
        "start and every hour. Other stored objects never expire. 0: keep them forever.",
    ).tag(config=True)

    worker_heartbeat_interval = Float(
        2.0, help="Seconds between the heartbeats of a contributed machine's agent."
    ).tag(config=True)

    worker_heartbeat_timeout = Float(
        15.0,
        help="Seconds without a heartbeat after which a contributed machine is shown offline.",
    ).tag(config=True)

    worker_certificate_lifetime = Float(
        7 * 86400.0,
        help="Seconds a contributed machine's worker certificate is valid (its agent renews it).",
    ).tag(config=True)

    invite_lifetime = Float(
        86400.0, help="Seconds an invite stays valid unless its creator asks otherwise."
    ).tag(config=True)

    @validate(
        "worker_heartbeat_interval",
        "worker_heartbeat_timeout",
        "worker_certificate_lifetime",
        "invite_lifetime",
    )
    def _validate_positive(self, proposal: dict[str, Any]) -> float:
        name, value = proposal["trait"].name, proposal["value"]
        if value <= 0:
            raise ValueError(f"{name} must be more than 0 seconds")
        if name == "invite_lifetime" and value > MAX_INVITE_LIFETIME:
            raise ValueError(f"invite_lifetime must be at most {MAX_INVITE_LIFETIME} s (30 days)")
        return value

    def worker_options(self) -> WorkerOptions:
        return WorkerOptions(
            approve_workers=self.approve_workers,
            public_url=self.public_url,
            heartbeat_interval=self.worker_heartbeat_interval,
            heartbeat_timeout=max(self.worker_heartbeat_timeout, self.worker_heartbeat_interval),
            certificate_lifetime=self.worker_certificate_lifetime,
            invite_lifetime=self.invite_lifetime,
        )

    def memory_limit_bytes(self) -> int:
        """``worker_memory_limit`` resolved to bytes."""
        value = self.worker_memory_limit
        if isinstance(value, str):
            if value.strip().lower() == "auto":
                return int(MEMORY_LIMIT // max(self.local_workers, 1))
            return parse_bytes(value)
        return int(value)

    def initialize_settings(self) -> None:
        self._route_module_logs()
        if self.tenancy == "per-user" and self.scheduler_address:
            self.log.critical(
                "tenancy='per-user' starts each user's scheduler itself; it cannot be combined "
                "with --scheduler-address (an existing cluster is the single-tenant mode)"
            )
            self.exit(1)
        # Before anything reads or writes the registry, the CA or storage.
        self._lock_data_dir()
        self.cluster = (
            self._per_user_clusters()
            if self.tenancy == "per-user"
            else ClusterSupervisor(
                data_dir=self.data_dir,
                scheduler_address=self.scheduler_address,
                scheduler_host=self.scheduler_host,
                scheduler_port=self.scheduler_port,
                local_workers=self.local_workers,
                worker_threads=self.worker_threads,
                worker_memory_limit=self.memory_limit_bytes(),
                start_timeout=self.cluster_start_timeout,
            )
        )
        self.registry = Registry(self.data_dir)
        # The scheduler enforces the policy file: make it match the registry from the start.
        self.registry.write_policy()
        self.storage = StorageService(
            self.storage_url,
            self.data_dir,
            registry=self.registry,
            public_url=self.public_url,
            checkpoint_retention=self.checkpoint_retention,
        )
        provider = self.serverapp.identity_provider if self.serverapp else None
        if isinstance(provider, DashIdentityProvider):
            provider.registry = self.registry
        if self.serverapp is not None:
            configure_lab(self.serverapp)
            encrypt_kernel_transport(self.serverapp)

    def _per_user_clusters(self) -> PerUserClusters:
        clusters = UserClusters(
            parent=self,
            data_dir=self.data_dir,
            scheduler_host=self.scheduler_host,
            idle_timeout=self.cluster_idle_timeout,
            keep_running=self.keep_clusters_running,
            start_timeout=self.cluster_start_timeout,
        )
        broker = Broker(clusters, parent=self, lease_idle_timeout=self.lease_idle_timeout)
        broker.policy.max_leases_per_user = self.max_leases_per_user
        broker.backends = [
            LocalLeaseBackend(
                clusters.lease_root(),
                records=Path(self.data_dir) / "clusters" / "leases",
                keep_running=self.keep_clusters_running,
                death_timeout=self.cluster_idle_timeout,
                parent=self,
                workers=self.local_workers,
                threads=self.worker_threads,
                memory_limit=self.memory_limit_bytes(),
                sessions=self.local_sessions,
            )
        ]
        return PerUserClusters(self.data_dir, clusters, broker)

    def _lock_data_dir(self) -> None:
        self.data_dir_lock = DataDirLock(self.data_dir)
        try:
            self.data_dir_lock.acquire(gateway_url(self.serverapp) if self.serverapp else "")
        except DataDirInUse as exc:
            self.log.critical("%s", exc)
            self.exit(1)

    def initialize_handlers(self) -> None:
        cluster = {"cluster": self.cluster}
        machines = {**cluster, "registry": self.registry, "worker_options": self.worker_options()}
        self.overview = OverviewService(
            self.cluster, self.registry, self.worker_options(), self.storage
        )
        name = r"(?P<name>[^/]+)"
        self.handlers.extend(
            [
                (r"/dash/api/openapi.json", OpenAPIHandler),
                (r"/dash/api/status", StatusHandler, {**cluster, "storage": self.storage}),
                (r"/dash/api/cluster", ClusterHandler, cluster),
                (r"/dash/api/pool", PoolHandler, cluster),
                (r"/dash/api/invites", InvitesHandler, machines),
                (r"/dash/api/workers", WorkersHandler, machines),
                (rf"/dash/api/workers/{name}", WorkerHandler, machines),
                (
                    rf"/dash/api/workers/{name}/(?P<action>pause|resume|drain|approve)",
                    WorkerActionHandler,
                    machines,
                ),
                # Machines authenticate with their invite or machine token, not a login.
                (r"/dash/api/enrol", EnrolHandler, machines),
                (r"/dash/api/agent", AgentHandler, machines),
                (r"/dash/api/agent/heartbeat", AgentHeartbeatHandler, machines),
                (r"/dash/api/agent/certificate", AgentCertificateHandler, machines),
                (r"/dash/api/agent/drain", AgentDrainHandler, machines),
                # Jupyter login or a storage token (tasks and workers acting for a user).
                *storage_handlers(self.storage, self.storage_gc_grace),
                (r"/dash/api/overview", OverviewHandler, {**cluster, "overview": self.overview}),
                (r"/dash/api/events", EventsHandler, {"overview": self.overview}),
                # The dashboard and contribute pages (Jupyter login; else the login page).
                *page_handlers(),
            ]
        )

    def _jupyter_server_config(self) -> dict[str, Any]:
        # Our identity provider and authorizer are defaults: an operator's own choice in
        # jupyter_server_config.py or on the command line wins.
        config = super()._jupyter_server_config()
        chosen = self.serverapp.config.get("ServerApp", {}) if self.serverapp else {}
        for key in self.serverapp_config:
            if key in chosen:
                config["ServerApp"].pop(key, None)
        return config

    def _route_module_logs(self) -> None:
        # Module loggers (dash_gateway.cluster, ...) write through the server's own log
        # handlers, so they share its format, level and destination.
        logger: logging.Logger | None = self.log  # type: ignore[assignment]
        while logger is not None and not logger.handlers:
            logger = logger.parent if logger.propagate else None
        if logger is None:
            return
        package_log = logging.getLogger("dash_gateway")
        package_log.handlers = list(logger.handlers)
        package_log.setLevel(self.log.getEffectiveLevel())
        package_log.propagate = False

    async def _start_jupyter_server_extension(self, serverapp: ServerApp) -> None:
        # Kernels started by this server find the gateway through these.
        os.environ["DASH_GATEWAY_URL"] = gateway_url(serverapp)
        os.environ["DASH_TOKEN"] = serverapp.identity_provider.token or ""
        self._install_sigint_stop(serverapp)
        # `dash-gateway invite` (run separately) puts this URL in the join command.
        self.registry.set_meta("gateway_url", self.public_url or gateway_url(serverapp))
        self.log.info(
            "DASH %s: gateway %s, data in %s, storage %s",
            __version__,
            os.environ["DASH_GATEWAY_URL"],
            self.data_dir,
            self.storage.description["location"] if hasattr(self, "storage") else "(none)",
        )
        if isinstance(self.cluster, PerUserClusters):
            await self.cluster.start()
        else:
            self.cluster.start()
        self.storage.start()
        if self.storage_gc_interval > 0:
            self._storage_gc = asyncio.create_task(self._collect_garbage_periodically())

    async def _collect_garbage_periodically(self) -> None:
        while True:
            await asyncio.sleep(self.storage_gc_interval)
            try:
                report = await self.storage.collect_garbage(self.storage_gc_grace)
            except Exception:
                self.log.exception("Collecting unused storage chunks failed; trying again later")
                continue
            freed = sum(r["bytes_freed"] for r in report.values())
            deleted = sum(r["deleted"] for r in report.values())
            if deleted:
                self.log.info("Storage: deleted %d unused chunks (%d bytes)", deleted, freed)

    def _install_sigint_stop(self, serverapp: ServerApp) -> None:
        # Without a terminal, the server leaves SIGINT as KeyboardInterrupt, which stops the
        # event loop without running extension shutdown hooks; route it to a clean stop.
        if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            signal.signal(signal.SIGINT, serverapp._signal_stop)

    async def stop_extension(self) -> None:
        collector = getattr(self, "_storage_gc", None)
        if collector is not None:
            collector.cancel()
        overview = getattr(self, "overview", None)
        if overview is not None:
            # Event streams end with a close frame (1001, going away), not a dropped socket.
            await overview.close()
        cluster = getattr(self, "cluster", None)
        if cluster is not None:
            await cluster.stop()
        storage = getattr(self, "storage", None)
        if storage is not None:
            storage.close()
        lock = getattr(self, "data_dir_lock", None)
        if lock is not None:
            lock.release()


main = launch_new_instance = DashGateway.launch_instance
