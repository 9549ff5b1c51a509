"""Remote sessions: the protocol between a DASH kernel and the session host on a worker.

Both directions are Dask events, so they pass through the scheduler over mutual TLS and
the user's machine needs no route to the worker. Each session has two private topics:

``dash-session-<id>-in`` (kernel to host)
    ``{"op": "message", "channel": "shell"|"stdin"|"control", "message": ...}``,
    ``{"op": "interrupt"}``, ``{"op": "shutdown"}``
``dash-session-<id>-out`` (host to kernel)
    ``{"op": "ready", "worker_name", "address", "resources", "pid", "gpus"}``,
    ``{"op": "message", "channel": "iopub"|"shell"|"stdin"|"control", "message": ...}``,
    ``{"op": "heartbeat"}``, ``{"op": "died", "reason"}``, ``{"op": "closed"}``, and from
    the scheduler ``{"op": "draining", "worker", "machine"}`` (the session should move)

A message is a Jupyter message as JSON text plus its binary buffers.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import dask
from distributed import Future, get_worker
from jupyter_client.jsonutil import json_default

from .cluster import QUEUE_NOTICE_AFTER, Connection
from .errors import DashError
from .resources import SESSION_POOL, ResourceSpec, format_resources
from .tasks import Tracked

__all__ = ["PLUGIN_NAME", "RemoteSession", "SessionEvents", "SessionLost", "host_session"]

PLUGIN_NAME = "dash-session-host"
# The Dask annotation on a session's task that names its notebook (read by the gateway).
NOTEBOOK_ANNOTATION = "dash_notebook"
HEARTBEAT_TIMEOUT = 10.0
START_TIMEOUT = 120.0


class SessionLost(DashError):
    """The remote session ended underneath a cell: its process or its worker died."""


def encode_message(message: dict[str, Any]) -> dict[str, Any]:
    """A Jupyter message as msgpack-able data (dates become ISO text)."""
    body = {k: message.get(k, {}) for k in ("header", "parent_header", "metadata", "content")}
    buffers = [bytes(b) for b in message.get("buffers") or []]
    return {"json": json.dumps(body, default=json_default), "buffers": buffers}


def decode_message(data: dict[str, Any]) -> dict[str, Any]:
    message = json.loads(data["json"])
    message["buffers"] = list(data.get("buffers") or [])
    message["msg_type"] = message["header"].get("msg_type")
    message["msg_id"] = message["header"].get("msg_id")
    return message


class SessionEvents:
    """Sends ``{"op": ..., **fields}`` events on one topic with a ``log_event`` callable
    (a worker's on the host side, a client's on the kernel side)."""

    def __init__(self, log_event: Callable[[str, Any], None], topic: str):
        self.log_event = log_event
        self.topic = topic

    def emit(self, op: str, **fields: Any) -> None:
        self.log_event(self.topic, {"op": op, **fields})


def host_session(
    session_id: str,
    to_host: str,
    to_kernel: str,
    env: dict[str, str],
    memory_limit: int | None = None,
) -> str:
    """The Dask task that holds a session's resources for its whole life (runs on a worker)."""
    worker = get_worker()
    host = worker.plugins.get(PLUGIN_NAME)
    if host is None:
        raise DashError(
            f"worker {worker.name} has no DASH session host; start workers with "
            "dash-worker (or preload dash_worker.session_host)"
        )
    # Tracked, so that if the notebook's client vanishes (its kernel killed), Dask's
    # cancellation stops the relay and the remote kernel with it.
    with Tracked():
        return host.run(session_id, to_host, to_kernel, env, memory_limit)


class RemoteSession:
    """The kernel's end of one remote session."""

    def __init__(
        self,
        conn: Connection,
        spec: ResourceSpec,
        loop: asyncio.AbstractEventLoop,
        *,
        notebook: str | None = None,
    ):
        self.conn = conn
        self.spec = spec
        # Shown where the session is listed (the dashboard, a drain's status) in place of its id.
        self.notebook = notebook
        self.loop = loop
        self.id = uuid.uuid4().hex
        self.to_host = f"dash-session-{self.id}-in"
        self.to_kernel = f"dash-session-{self.id}-out"
        self.events: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.info: dict[str, Any] = {}
        self.last_heard = time.monotonic()
        self.ended: str | None = None
        self._send = SessionEvents(conn.client.log_event, self.to_host)
        # Set from the Dask client's thread, so any event loop can wait for it (a
        # shutdown request is handled on the kernel's control thread, not the shell's).
        self._closed = threading.Event()
        self.future: Future | None = None

    def _on_event(self, event: tuple[float, dict[str, Any]]) -> None:
        if event[1].get("op") in ("died", "closed"):
            self._closed.set()
        self.loop.call_soon_threadsafe(self.events.put_nowait, event[1])

    def _resources(self) -> dict[str, float] | None:
        """What the session task holds: what its spec asks for; a CPU session asking for
        nothing more takes a session worker of its own where the pool offers them, so that
        it never holds a thread its notebook's fan-out needs."""
        resources = self.spec.to_dask()
        if resources:
            return resources
        rows = self.conn.pool_rows() or ()
        if any(SESSION_POOL in (row.get("resources") or {}) for row in rows):
            return {SESSION_POOL: 1}
        return None

    async def start(
        self, timeout: float = START_TIMEOUT, on_queued: Callable[[str], None] | None = None
    ) -> dict[str, Any]:
        """Submit the session task and wait for its kernel to be ready; if it is queued
        behind other work for a few seconds, tell ``on_queued`` why."""
        self.conn.ensure_satisfiable(self.spec)
        self.conn.client.subscribe_topic(self.to_kernel, self._on_event)
        annotations = {NOTEBOOK_ANNOTATION: self.notebook[:200]} if self.notebook else {}
        with dask.annotate(**annotations):
            self.future = self.conn.client.submit(
                host_session,
                self.id,
                self.to_host,
                self.to_kernel,
                self.conn.client_environment(),
                self.spec.memory,
                key=f"dash-session-{self.id}",
                resources=self._resources(),
                pure=False,
            )
        deadline = time.monotonic() + timeout
        notice_at = time.monotonic() + QUEUE_NOTICE_AFTER if on_queued else None
        while True:
            until = deadline if notice_at is None else min(deadline, notice_at)
            event = await self.next_event(timeout=max(until - time.monotonic(), 0.1))
            if event is None:
                if notice_at is not None and time.monotonic() >= notice_at:
                    notice_at = None
                    reason = await asyncio.get_running_loop().run_in_executor(
                        None, self.conn.waiting_reason, self.spec, [self.future.key]
                    )
                    if reason and on_queued is not None:
                        on_queued(reason)
                if self.future.status == "error":
                    raise SessionLost(f"the session could not start: {self.future.exception()}")
                if time.monotonic() > deadline:
                    self.close()
                    raise SessionLost(
                        f"no worker started the session within {timeout:g}s "
                        f"(it needs {self.spec}); is every matching worker busy?"
                    )
                continue
            if event["op"] == "ready":
                self.info = event
                return event
            if event["op"] == "died":
                raise SessionLost(f"the session's kernel died while starting: {event['reason']}")

    async def next_event(self, timeout: float) -> dict[str, Any] | None:
        """The next event from the host, or None after ``timeout`` seconds of silence."""
        try:
            event = await asyncio.wait_for(self.events.get(), timeout)
        except asyncio.TimeoutError:
            return None
        self.last_heard = time.monotonic()
        if event["op"] in ("died", "closed"):
            self.ended = event.get("reason", "the session closed")
        elif event["op"] == "ready" and self.info:
            # Dask re-ran the session task elsewhere: its worker died, and the kernel
            # that held the notebook's state with it. A fresh kernel is not the session.
            self.ended = (
                f"worker {self.info.get('worker_name')} died, and the session's kernel and "
                "its variables with it"
            )
            self._closed.set()
            return {"op": "died", "reason": self.ended}
        return event

    def silent_for(self) -> float:
        return time.monotonic() - self.last_heard

    def lost_reason(self) -> str | None:
        """Why the session is gone, if it is: its kernel died, or its worker went silent."""
        if self.ended:
            return self.ended
        if self.future is not None and self.future.status in ("error", "cancelled", "lost"):
            self.ended = self._task_end_reason()
            return self.ended
        if self.silent_for() > HEARTBEAT_TIMEOUT:
            if self.conn.client.status != "running":
                # the scheduler is gone, not the worker: Dask relays every event through it
                return (
                    "the DASH kernel lost touch with its cluster's scheduler "
                    "(is the DASH gateway restarting?)"
                )
            return f"no word from worker {self.info.get('worker_name', '?')} for {self.silent_for():.0f}s"
        return None

    def _task_end_reason(self) -> str:
        if self.future.status == "error":
            try:
                # already here: the scheduler sent it with the task's new state
                exc = self.future.exception(timeout=5)
            except Exception:
                exc = None
            if getattr(exc, "worker", None):
                # not the task's doing: whatever killed the worker killed the session
                return (
                    f"worker {exc.worker} died ({exc.how}), and the session's kernel and "
                    "its variables with it"
                )
            if exc is not None:
                return f"the session task failed: {exc}"
        return f"the session task ended ({self.future.status})"

    def send(self, channel: str, message: dict[str, Any]) -> None:
        self._send.emit("message", channel=channel, message=encode_message(message))

    def interrupt(self) -> None:
        self._send.emit("interrupt")

    async def shutdown(self, timeout: float = 10.0) -> None:
        """End the session and wait until the host confirms its kernel is gone (events
        are sent in the background, and this process may be about to exit)."""
        if self.future is None:
            return
        self._send.emit("shutdown")
        await asyncio.get_running_loop().run_in_executor(None, self._closed.wait, timeout)
        self.close()

    def close(self) -> None:
        """Ask the host to end the session, and make sure Dask does not restart it."""
        try:
            self._send.emit("shutdown")
            self.conn.client.unsubscribe_topic(self.to_kernel)
        except Exception:
            pass
        if self.future is not None:
            self.future.release()
        self.future = None

    def describe(self) -> str:
        """Where the session runs, e.g. "worker local-0 (CPU: 1 CPU, 0.93 GiB RAM; asked for
        any worker)"."""
        info = self.info
        resources = info.get("resources") or {}
        kind = f"GPU {info.get('gpus')}" if resources.get("GPU") else "CPU"
        return (
            f"worker {info.get('worker_name')} ({kind}: {format_resources(resources)}; "
            f"asked for {self.spec})"
        )
