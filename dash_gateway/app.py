"""The ``dash-gateway`` command: a Jupyter Server extension serving JupyterLab and the DASH API."""

from __future__ import annotations

import logging
import os
import signal
from typing import Any

from dask.utils import parse_bytes
from distributed.system import MEMORY_LIMIT
from jupyter_core.paths import jupyter_data_dir
from jupyter_server.extension.application import ExtensionApp
from jupyter_server.serverapp import ServerApp
from traitlets import Float, Int, Unicode, Union, default, validate

from dash_gateway.cluster import ClusterSupervisor
from dash_gateway.handlers import ClusterHandler, StatusHandler
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


class DashGateway(ExtensionApp):
    """JupyterLab plus the DASH API, with a supervised mutual-TLS Dask cluster."""

    name = "dash_gateway"
    description = (
        "DASH gateway: JupyterLab, the DASH API and a supervised Dask cluster "
        "(TLS scheduler subprocess and local workers)."
    )
    version = __version__
    load_other_extensions = True

    default_url = Unicode("/lab", help="The page the server opens first.").tag(config=True)

    aliases = {
        "local-workers": "DashGateway.local_workers",
        "data-dir": "DashGateway.data_dir",
        "scheduler-address": "DashGateway.scheduler_address",
        "scheduler-host": "DashGateway.scheduler_host",
        "scheduler-port": "DashGateway.scheduler_port",
        "worker-threads": "DashGateway.worker_threads",
        "worker-memory-limit": "DashGateway.worker_memory_limit",
    }

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
        self.cluster = ClusterSupervisor(
            data_dir=self.data_dir,
            scheduler_address=self.scheduler_address,
            scheduler_host=self.scheduler_host,
            scheduler_port=self.scheduler_port,
            local_workers=self.local_workers,
            worker_threads=self.worker_threads,
            worker_memory_limit=self.memory_limit_bytes(),
            start_timeout=self.cluster_start_timeout,
        )

    def initialize_handlers(self) -> None:
        kwargs = {"cluster": self.cluster}
        self.handlers.extend(
            [
                (r"/dash/api/status", StatusHandler, kwargs),
                (r"/dash/api/cluster", ClusterHandler, kwargs),
            ]
        )

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
        self.log.info(
            "DASH %s: gateway %s, data in %s",
            __version__,
            os.environ["DASH_GATEWAY_URL"],
            self.data_dir,
        )
        self.cluster.start()

    def _install_sigint_stop(self, serverapp: ServerApp) -> None:
        # Without a terminal, the server leaves SIGINT as KeyboardInterrupt, which stops the
        # event loop without running extension shutdown hooks; route it to a clean stop.
        if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            signal.signal(signal.SIGINT, serverapp._signal_stop)

    async def stop_extension(self) -> None:
        cluster = getattr(self, "cluster", None)
        if cluster is not None:
            await cluster.stop()


main = launch_new_instance = DashGateway.launch_instance
