"""The session host: runs a notebook's remote IPython kernel on this worker and relays it.

A DASH kernel opens a session by submitting :func:`dash_kernel.sessions.host_session` as a
Dask task with the session's resources. That task calls :meth:`SessionHost.run` and keeps
running (so Dask keeps the resources held) until the session ends. Meanwhile it relays
Jupyter messages between the kernel subprocess (ZMQ on loopback) and the DASH kernel (Dask
events through the scheduler, so the user's machine needs no route to this worker).

Loaded on every worker as a preload (``dask_setup``), by ``dash-worker`` and by the
embedded cluster.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import shutil
import signal
import socket
import tempfile
import time
from typing import Any

import psutil
import zmq
from dask.utils import format_bytes
from distributed import get_client, get_worker
from distributed.diagnostics.plugin import WorkerPlugin
from jupyter_client.manager import KernelManager

from dash_kernel.sessions import PLUGIN_NAME, SessionEvents, decode_message, encode_message

__all__ = ["SessionHost", "dask_setup"]

log = logging.getLogger(__name__)

HEARTBEAT_EVERY = 1.0
KERNEL_READY_TIMEOUT = 60.0
_CHANNELS = ("iopub", "shell", "stdin", "control")


class SessionHost(WorkerPlugin):
    """Starts and relays remote kernels; one :meth:`run` call per session."""

    name = PLUGIN_NAME
    idempotent = True

    def setup(self, worker: Any) -> None:
        self.worker = worker

    def run(
        self,
        session_id: str,
        to_host: str,
        to_kernel: str,
        env: dict[str, str],
        memory_limit: int | None = None,
    ) -> str:
        """Host one session until it is shut down or its kernel dies; returns why it ended.

        The kernel is stopped if it uses more than ``memory_limit`` bytes (default: the
        worker's own limit), as Dask's nanny does for workers.
        """
        limit = memory_limit or self.worker.memory_manager.memory_limit
        relay = _Relay(self.worker, session_id, to_host, to_kernel, env, limit)
        try:
            return relay.run()
        finally:
            relay.close()


class _Relay:
    def __init__(
        self,
        worker: Any,
        session_id: str,
        to_host: str,
        to_kernel: str,
        env: dict[str, str],
        memory_limit: int | None,
    ):
        self.worker = worker
        self.memory_limit = memory_limit
        self.kill_reason: str | None = None
        self.session_id = session_id
        self.to_host = to_host
        self.events = SessionEvents(worker.log_event, to_kernel)
        self.inbox: queue.Queue[dict[str, Any]] = queue.Queue()
        # The subscription handler wakes the relay loop through this socket pair.
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self.directory = tempfile.mkdtemp(prefix=f"dash-session-{session_id[:8]}-")
        self.manager = KernelManager(kernel_name="python3")
        self.kernel_env = {**os.environ, **env}
        self.client = None

    def _on_event(self, event: tuple[float, dict[str, Any]]) -> None:
        self.inbox.put(event[1])
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")

    def run(self) -> str:
        get_client().subscribe_topic(self.to_host, self._on_event)
        # %%dash and dk work in the session as in any kernel, on the notebook's cluster
        self.manager.start_kernel(
            cwd=self.directory, env=self.kernel_env, extra_arguments=["--ext=dash_kernel"]
        )
        self.client = self.manager.client()
        self.client.start_channels()
        self.client.wait_for_ready(timeout=KERNEL_READY_TIMEOUT)
        self.events.emit(
            "ready",
            worker_name=str(get_worker().name),
            address=self.worker.address,
            resources=dict(self.worker.state.total_resources),
            pid=self.manager.provisioner.pid,
            gpus=self.kernel_env.get("CUDA_VISIBLE_DEVICES", ""),
        )
        return self._relay_loop()

    def _relay_loop(self) -> str:
        poller = zmq.Poller()
        sockets = {}
        for name in _CHANNELS:
            sock = getattr(self.client, f"{name}_channel").socket
            poller.register(sock, zmq.POLLIN)
            sockets[sock] = name
        poller.register(self._wake_r.fileno(), zmq.POLLIN)
        last_beat = 0.0
        while True:
            for sock_or_fd, _ in poller.poll(timeout=int(HEARTBEAT_EVERY * 500)):
                if sock_or_fd in sockets:
                    self._forward_from_kernel(sockets[sock_or_fd])
            self._drain_wake()
            while True:
                try:
                    request = self.inbox.get_nowait()
                except queue.Empty:
                    break
                ended = self._handle(request)
                if ended:
                    return ended
            if not self.manager.is_alive():
                reason = self.kill_reason or _exit_reason(self.manager)
                self.events.emit("died", reason=reason)
                return f"kernel died: {reason}"
            if time.monotonic() - last_beat > HEARTBEAT_EVERY:
                self._enforce_memory_limit()
                self.events.emit("heartbeat")
                last_beat = time.monotonic()

    def _enforce_memory_limit(self) -> None:
        if not self.memory_limit:
            return
        try:
            kernel = psutil.Process(self.manager.provisioner.pid)
            used = sum(p.memory_info().rss for p in [kernel, *kernel.children(recursive=True)])
        except psutil.Error:
            return
        if used > self.memory_limit:
            self.kill_reason = (
                f"the kernel used {format_bytes(used)}, over the session's memory limit of "
                f"{format_bytes(self.memory_limit)}, and was stopped"
            )
            log.warning("session %s: %s", self.session_id, self.kill_reason)
            kernel.kill()

    def _drain_wake(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except (BlockingIOError, OSError):
            pass

    def _forward_from_kernel(self, channel: str) -> None:
        ch = getattr(self.client, f"{channel}_channel")
        while ch.msg_ready():
            message = ch.get_msg(timeout=0)
            self.events.emit("message", channel=channel, message=encode_message(message))

    def _handle(self, request: dict[str, Any]) -> str | None:
        op = request.get("op")
        if op == "message":
            channel = request["channel"]
            message = decode_message(request["message"])
            ch = getattr(self.client, f"{channel}_channel")
            self.client.session.send(ch.socket, message, buffers=message.get("buffers"))
        elif op == "interrupt":
            self.manager.interrupt_kernel()
        elif op == "shutdown":
            return "shut down by the notebook"
        return None

    def close(self) -> None:
        with contextlib.suppress(Exception):
            get_client().unsubscribe_topic(self.to_host)
        if self.client is not None:
            self.client.stop_channels()
        if self.manager.has_kernel:
            try:
                self.manager.shutdown_kernel(now=not self.manager.is_alive())
            except Exception:
                log.exception("could not shut down the kernel of session %s", self.session_id)
        self._wake_r.close()
        self._wake_w.close()
        shutil.rmtree(self.directory, ignore_errors=True)
        self.events.emit("closed")


def _exit_reason(manager: KernelManager) -> str:
    process = getattr(manager.provisioner, "process", None)
    code = process.poll() if process is not None else None
    if code is None:
        return "the kernel process exited"
    if code < 0:
        try:
            return f"the kernel process was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"the kernel process was killed by signal {-code}"
    return f"the kernel process exited with status {code}"


def dask_setup(worker: Any) -> None:
    """Preload hook: install the session host on this worker."""
    plugin = SessionHost()
    worker.plugins[plugin.name] = plugin
    plugin.setup(worker)
