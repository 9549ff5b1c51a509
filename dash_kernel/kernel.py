"""The "DASH distributed" kernel: every cell runs in a remote session on a worker.

An ``IPythonKernel`` whose execute, complete, inspect, is_complete and history requests
go to a real IPython kernel on a worker (see :mod:`dash_kernel.sessions`). What that
kernel publishes is re-published here under the original request, as it arrives.
``%%local`` cells and ``%dash`` commands run in this process.
"""

from __future__ import annotations

import ast
import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from dask.utils import format_bytes
from ipykernel.ipkernel import IPythonKernel
from ipykernel.kernelapp import IPKernelApp
from traitlets import Float

from ._version import __version__
from .checkpoints import checkpoint_name, list_checkpoints
from .cluster import Connection, connect, disconnect
from .errors import DashError
from .magics import DashMagics
from .resources import ResourceSpec, ResourceUnavailable, check_satisfiable, describe_wait
from .serialize import SerializationError
from .sessions import RemoteSession, SessionLost, decode_message
from .transfer import publish_names, receive_names

__all__ = ["DashKernel", "main"]

LOCAL_CELL = "%%local"
# iopub messages about the remote kernel itself, not the cell: this kernel sends its own.
_NOT_RELAYED = {"status", "execute_input"}
_WAIT = 1.0
_PARENTS_KEPT = 1000
# After a remote reply, how long to wait for the remote's own ``status: idle`` (which
# follows all of the request's output) before answering anyway.
_IDLE_GRACE = 5.0
# ``DASH_CHECKPOINT=off`` starts the kernel with checkpoints off (``%dash checkpoint on``).
ENV_CHECKPOINT = "DASH_CHECKPOINT"
# Set by Jupyter Server for the kernels of its sessions: the notebook's path.
ENV_NOTEBOOK = "JPY_SESSION_NAME"
# A restore notice names at most this many variables.
_NAMES_SHOWN = 20
# A drain's move gives up, and the session stays, if its new session has not started in
# this long (a free machine that fits was seen, so it should be quick) ...
MOVE_START_TIMEOUT = 60.0
# ... or if the whole move (checkpoint, start, restore) takes longer than this.
MOVE_TIMEOUT = 300.0
# Asking the scheduler where a session could go.
ASK_TIMEOUT = 10.0


class RemoteTimeout(DashError):
    """The remote session did not answer a request in time."""


@dataclass
class _Pending:
    """A request relayed to the remote kernel: its reply, and whether the remote kernel
    has started on it (published anything for it) and finished (published idle)."""

    reply: asyncio.Future[dict[str, Any]]
    idle: asyncio.Event = field(default_factory=asyncio.Event)
    started: bool = False


def is_local(code: str) -> bool:
    """Cells that run here: ``%%local`` cells and ``%dash`` commands."""
    stripped = code.lstrip()
    return stripped.startswith((LOCAL_CELL, "%dash ")) or stripped == "%dash"


class DashKernel(IPythonKernel):
    """Relays cells to a remote session; see the module docstring."""

    implementation = "dash_kernel"
    implementation_version = __version__
    banner = f"DASH distributed {__version__}: cells run on a DASH worker (%%local runs here)."

    request_timeout = Float(
        15.0,
        config=True,
        help="Seconds to wait for the remote session's answer to a complete, inspect, "
        "is_complete, history or comm_info request before answering without it.",
    )

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        self.session_spec = ResourceSpec()
        self.remote: RemoteSession | None = None
        self._announced: str | None = None
        self._current_count = 0
        self._remote_next_count: int | None = None
        # remote request msg_id -> the local message it was made for (whose cell its
        # output belongs to), and -> the future its reply resolves
        self._parents: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self._replies: dict[str, _Pending] = {}
        self._pump: asyncio.Task[None] | None = None
        self.notebook = os.environ.get(ENV_NOTEBOOK) or None
        self.checkpoint_name = checkpoint_name(self.notebook, uuid.uuid4().hex[:8])
        self.checkpointing = os.environ.get(ENV_CHECKPOINT, "on").lower() not in ("off", "0")
        # The last checkpoint that succeeded (with the cell it followed), and why the
        # last one failed, if it did and the user has not been told yet.
        self.last_checkpoint: dict[str, Any] | None = None
        self._checkpoint_problem: str | None = None
        self._checkpoint_task: asyncio.Task[Any] | None = None
        # Set when the session's machine is draining: (that session, why); the session
        # moves before the next cell.
        self._leave: tuple[RemoteSession, str] | None = None
        # This kernel says itself what a lost scheduler means for the notebook; Dask's
        # reconnect errors would land, raw, in whatever cell runs next.
        logging.getLogger("distributed.client").setLevel(logging.CRITICAL)
        self.shell.register_magics(DashMagics)
        for msg_type in ("comm_open", "comm_msg", "comm_close"):
            self.shell_handlers[msg_type] = self._relay_comm

    # -- the session ---------------------------------------------------------------------

    async def _ensure_session(self) -> RemoteSession:
        if self.remote is not None and self.remote.lost_reason() is None:
            return self.remote
        previous = self.remote
        if previous is not None:
            previous.close()
        # Dask's client loses its scheduler when the gateway restarts, never for a worker.
        scheduler_gone = previous is not None and previous.conn.client.status != "running"
        conn = await self._off_loop(connect)
        if previous is not None and conn.client.status != "running":
            # The scheduler went away (a gateway restart gives it a new address): ask the
            # gateway where it is now rather than wait for the old address to come back.
            await self._off_loop(disconnect)
            conn = await self._off_loop(connect)
        remote = RemoteSession(
            conn, self.session_spec, asyncio.get_running_loop(), notebook=self.notebook
        )
        try:
            await remote.start(on_queued=lambda why: self._say(f"DASH: the session is {why}.\n"))
        except BaseException:
            # Not kept as the session: with no pump, a cell sent to it would wait forever.
            remote.close()
            raise
        self.remote = remote
        self._remote_next_count = 1
        # referenced, so the running task is not garbage-collected
        self._pump = asyncio.create_task(self._pump_events(self.remote))
        where = self.remote.describe()
        if previous is not None:
            why = previous.lost_reason()
            if scheduler_gone or conn is not previous.conn:
                why = _scheduler_gone(conn)
            self._say(
                f"DASH: a new session started on {where}; the previous one was lost "
                f"({why}). {await self._recover()}\n",
                "stderr",
            )
        elif self._announced != where:
            self._say(f"DASH: this notebook runs on {where}.\n")
        self._announced = where
        return self.remote

    async def _recover(self) -> str:
        """Restore a lost session's last checkpoint into the new one; says what it did."""
        if not self.checkpointing:
            text = "Checkpoints are off (%dash checkpoint on), so its variables are gone"
            if self.last_checkpoint is None:
                return text + "."
            # An older state, restored unasked, would pass for the current one.
            cell = self.last_checkpoint.get("cell")
            return (
                f"{text}; the last checkpoint (after cell [{cell}]) is still there: "
                f"%dash restore {self.checkpoint_name}"
            )
        if self.last_checkpoint is None:
            return "It had no checkpoint yet, so its variables are gone."
        try:
            restored = await self._restore(self.checkpoint_name)
        except (DashError, SessionLost) as exc:
            return (
                f"Its checkpoint could not be restored ({exc}); %dash restore "
                f"{self.checkpoint_name} tries again."
            )
        cell = self.last_checkpoint.get("cell")
        after = f" as they were after cell [{cell}]" if cell else ""
        if not (restored["restored"] or restored["failed"] or restored["unsaved"]):
            return f"It had no variables to restore{after}."
        return f"Restored its variables{after}: {_restore_summary(restored)}"

    async def _restore(self, name: str, version: int | None = None) -> dict[str, Any]:
        remote = await self._ensure_session()
        access = await self._off_loop(remote.conn.storage_access)
        return await self._in_remote(
            "dash_kernel.checkpoints",
            f"remote_restore({name!r}, {access!r}, {version!r})",
            remote=remote,
        )

    async def _take_checkpoint(self, remote: RemoteSession, cell: int | None) -> dict[str, Any]:
        """Checkpoint ``remote``'s variables (not another session's: if it is lost by now,
        SessionLost); remembers the result, or the failure for the next cell to report."""
        try:
            access = await self._off_loop(remote.conn.storage_access)
            metadata = {"cell": cell, "notebook": self.notebook}
            taken = await self._in_remote(
                "dash_kernel.checkpoints",
                f"remote_take({self.checkpoint_name!r}, {access!r}, **{metadata!r})",
                remote=remote,
                forward_interrupt=False,
            )
        except (DashError, SessionLost) as exc:
            self._checkpoint_problem = f"the checkpoint after cell [{cell}] failed: {exc}"
            raise
        self.last_checkpoint = {**taken, "cell": cell}
        self._checkpoint_problem = None
        return taken

    def _checkpoint_after(self, cell: int) -> None:
        """Checkpoint in the background once a cell's reply is sent: the front end sees
        the cell finish, and the next cell queues behind the checkpoint in the session."""
        remote = self.remote
        if not self.checkpointing or remote is None or remote.lost_reason() is not None:
            return

        async def run() -> None:
            with contextlib.suppress(DashError, SessionLost):
                await self._take_checkpoint(remote, cell)

        # referenced, so the running task is not garbage-collected
        self._checkpoint_task = asyncio.create_task(run())

    def _report_checkpoint_problem(self) -> None:
        if self._checkpoint_problem:
            saved = self.last_checkpoint.get("cell") if self.last_checkpoint else None
            kept = f"the last one kept is from cell [{saved}]" if saved else "none is kept"
            self._say(f"DASH: {self._checkpoint_problem} ({kept}).\n", "stderr")
            self._checkpoint_problem = None

    def _send_remote(
        self, remote: RemoteSession, channel: str, msg_type: str, content: dict[str, Any]
    ) -> str:
        """Send a message to the remote kernel on behalf of the current local request."""
        message = self.session.msg(msg_type, content)
        msg_id = message["header"]["msg_id"]
        self._parents[msg_id] = self.get_parent("shell")
        while len(self._parents) > _PARENTS_KEPT:
            self._parents.popitem(last=False)
        remote.send(channel, message)
        return msg_id

    async def _request(
        self,
        channel: str,
        msg_type: str,
        content: dict[str, Any],
        *,
        remote: RemoteSession | None = None,
        forward_interrupt: bool = True,
        timeout: float | None = None,
        pending: _Pending | None = None,
    ) -> dict[str, Any]:
        """Send a request to the remote kernel (the session's, started if need be, or
        ``remote`` only) and return its reply's content once all it published for the
        request is relayed (by the pump). A SIGINT meanwhile interrupts it, if
        ``forward_interrupt``; no reply within ``timeout`` seconds raises RemoteTimeout."""
        if remote is None:
            remote = await self._ensure_session()
        elif remote.lost_reason() is not None:
            raise SessionLost(remote.lost_reason())
        pending = pending or _Pending(asyncio.get_running_loop().create_future())
        msg_id = self._send_remote(remote, channel, msg_type, content)
        self._replies[msg_id] = pending
        previous_handler = self._forward_sigint(remote) if forward_interrupt else None
        try:
            reply = await asyncio.wait_for(pending.reply, timeout)
            # The reply travels apart from the output (shell, not iopub): the remote's
            # idle comes after the last output, so once it is here, so is all the output.
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(pending.idle.wait(), _IDLE_GRACE)
            return reply["content"]
        except asyncio.TimeoutError:
            raise RemoteTimeout(
                f"the remote session did not answer {msg_type} within {timeout:g}s"
            ) from None
        finally:
            self._replies.pop(msg_id, None)
            if previous_handler is not None:
                signal.signal(signal.SIGINT, previous_handler)

    async def _pump_events(self, remote: RemoteSession) -> None:
        """Dispatch everything the session host sends, for the session's whole life."""
        while True:
            event = await remote.next_event(_WAIT)
            if event is None:
                reason = remote.lost_reason()
                if reason:
                    return self._fail_waiting(reason)
                continue
            if event["op"] in ("died", "closed"):
                return self._fail_waiting(event.get("reason", "the session closed"))
            if event["op"] == "draining":
                self._leave = (remote, f"machine {event.get('machine')} is draining")
            elif event["op"] == "message":
                try:
                    self._dispatch(remote, event["channel"], decode_message(event["message"]))
                except Exception:
                    # one bad message must not stop the relay: every later reply would hang
                    self.log.exception("could not relay a message from the remote session")

    def _dispatch(self, remote: RemoteSession, channel: str, message: dict[str, Any]) -> None:
        request_id = message["parent_header"].get("msg_id")
        pending = self._replies.get(request_id)
        if channel == "iopub":
            if pending is not None:
                pending.started = True
                if message["msg_type"] == "status" and (
                    message["content"].get("execution_state") == "idle"
                ):
                    pending.idle.set()
            parent = self._parents.get(request_id)
            if parent is not None:
                self._republish(message, parent)
        elif channel == "stdin":
            parent = self._parents.get(request_id)
            asyncio.create_task(self._relay_input(remote, message, parent))
        elif pending is not None and not pending.reply.done():
            pending.reply.set_result(message)

    def _fail_waiting(self, reason: str) -> None:
        for pending in self._replies.values():
            pending.idle.set()
            if not pending.reply.done():
                pending.reply.set_exception(SessionLost(reason))

    async def _relay_comm(self, stream: Any, ident: Any, parent: dict[str, Any]) -> None:
        """Widget messages from the front end go to the remote kernel, where the widgets
        live; they have no reply, and what they cause comes back through the pump."""
        if self.remote is None or self.remote.lost_reason():
            return
        self._send_remote(self.remote, "shell", parent["header"]["msg_type"], parent["content"])

    async def comm_info_request(self, stream: Any, ident: Any, parent: dict[str, Any]) -> None:
        if self.remote is None:
            return await super().comm_info_request(stream, ident, parent)
        content = await self._ask_remote(
            "comm_info_request", parent["content"], {"status": "ok", "comms": {}}
        )
        self.session.send(stream, "comm_info_reply", content, parent, ident)

    def _forward_sigint(self, remote: RemoteSession) -> Any:
        """While a request runs, a SIGINT (the notebook's interrupt) goes to the remote
        kernel instead of raising here."""
        if sys.platform == "win32":
            return None

        def handler(*_: Any) -> None:
            remote.interrupt()

        try:
            return signal.signal(signal.SIGINT, handler)
        except ValueError:  # not the main thread
            return None

    def _republish(self, message: dict[str, Any], parent: dict[str, Any]) -> None:
        msg_type = message["msg_type"]
        if msg_type in _NOT_RELAYED:
            return
        content = message["content"]
        if msg_type == "execute_result":
            content = {**content, "execution_count": self._current_count}
        self.session.send(
            self.iopub_socket,
            msg_type,
            content,
            parent=parent,
            metadata=message.get("metadata"),
            buffers=message.get("buffers") or None,
            ident=self._topic(msg_type),
        )

    async def _relay_input(
        self, remote: RemoteSession, request: dict[str, Any], parent: dict[str, Any] | None
    ) -> None:
        content = request["content"]
        value = await self._off_loop(
            lambda: self._input_request(
                content.get("prompt", ""),
                self._parent_ident["shell"],
                parent or self.get_parent("shell"),
                password=content.get("password", False),
            )
        )
        reply = self.session.msg("input_reply", {"value": value}, parent=request)
        remote.send("stdin", reply)

    # -- Jupyter handlers ----------------------------------------------------------------

    @property
    def kernel_info(self) -> dict[str, Any]:
        # ipykernel would offer its debugger and subshells, but they are this relay
        # process's, where no cell runs: a breakpoint could never be hit.
        info = {**super().kernel_info, "supported_features": []}
        placement = self.placement()
        if placement is not None:
            # Front ends ask on every connection: a reloaded page learns where it runs.
            info["dash"] = placement
        return info

    async def do_debug_request(self, msg: dict[str, Any]) -> dict[str, Any]:
        """A DAP error response: there is no debugger (see :attr:`kernel_info`)."""
        return {
            "type": "response",
            "request_seq": msg.get("seq"),
            "success": False,
            "command": msg.get("command"),
            "message": "the DASH kernel has no debugger: cells run in a remote session",
        }

    async def create_subshell_request(
        self, socket: Any, ident: Any, parent: dict[str, Any]
    ) -> None:
        content = {
            "status": "error",
            "ename": "NotImplementedError",
            "evalue": "the DASH kernel has no subshells: cells run in one remote session",
            "traceback": [],
        }
        self.session.send(socket, "create_subshell_reply", content, parent, ident)

    async def do_execute(
        self,
        code: str,
        silent: bool,
        store_history: bool = True,
        user_expressions: dict[str, Any] | None = None,
        allow_stdin: bool = False,
        *,
        cell_meta: dict[str, Any] | None = None,
        cell_id: str | None = None,
    ) -> dict[str, Any]:
        command = _session_command(code)
        if command is not None:
            return await self._run_session_command(*command, store_history and not silent)
        if is_local(code):
            if code.lstrip().startswith(LOCAL_CELL):
                code = code.lstrip()[len(LOCAL_CELL) :].lstrip("\n")
            return await super().do_execute(
                code,
                silent,
                store_history,
                user_expressions,
                allow_stdin,
                cell_meta=cell_meta,
                cell_id=cell_id,
            )
        self._current_count = self.shell.execution_count
        if store_history and not silent:
            self.shell.execution_count += 1
        self._report_checkpoint_problem()
        await self._leave_if_asked()
        try:
            reply = await self._run_remote_cell(
                {
                    "code": code,
                    "silent": silent,
                    "store_history": store_history,
                    "user_expressions": user_expressions or {},
                    "allow_stdin": allow_stdin,
                    "stop_on_error": True,
                },
            )
        except SessionLost as exc:
            return self._error_reply(
                exc, "this cell's session ended; the next cell starts a new one"
            )
        except Exception as exc:
            return self._error_reply(exc, "the cell did not reach a remote session")
        if store_history and not silent:
            self._remote_next_count = self._current_count + 1
            self._checkpoint_after(self._current_count)
        return {**reply, "execution_count": self._current_count}

    async def _run_remote_cell(self, content: dict[str, Any]) -> dict[str, Any]:
        """Run a cell in the session; if the session turns out lost before its kernel
        started on the cell (its worker died while the notebook was idle), nothing of the
        cell ran, so it runs again in a new session (which says so, and restores)."""
        pending = _Pending(asyncio.get_running_loop().create_future())
        try:
            return await self._send_cell(content, pending)
        except SessionLost:
            if pending.started:
                raise
        return await self._send_cell(content, _Pending(asyncio.get_running_loop().create_future()))

    async def _send_cell(self, content: dict[str, Any], pending: _Pending) -> dict[str, Any]:
        if content["store_history"] and not content["silent"]:
            await self._align_remote_count()
        return await self._request("shell", "execute_request", content, pending=pending)

    def finish_metadata(
        self, parent: dict[str, Any], metadata: dict[str, Any], reply_content: dict[str, Any]
    ) -> dict[str, Any]:
        """Every execute_reply says where the session runs (``metadata["dash"]``), so a
        front end (DASH's JupyterLab status bar) can show it."""
        metadata = super().finish_metadata(parent, metadata, reply_content)
        placement = self.placement()
        if placement is not None:
            metadata["dash"] = placement
        return metadata

    def placement(self) -> dict[str, Any] | None:
        """Where the live session runs (None without one), as front ends are told it."""
        remote = self.remote
        if remote is None or not remote.info or remote.lost_reason() is not None:
            return None
        return {
            "session": remote.id,
            "worker": remote.info.get("worker_name"),
            "where": remote.describe(),
            "gpus": remote.info.get("gpus", ""),
        }

    async def _align_remote_count(self) -> None:
        """Keep the remote kernel's cell numbers equal to this notebook's, so its
        tracebacks say "Cell In[7]" for cell 7 even after %%local cells."""
        await self._ensure_session()
        if self._remote_next_count != self._current_count:
            code = f"get_ipython().execution_count = {self._current_count}"
            await self._request(
                "shell", "execute_request", {"code": code, "silent": True, "store_history": False}
            )
            self._remote_next_count = self._current_count

    # -- %dash push / pull / use ---------------------------------------------------------

    async def _run_session_command(
        self, command: str, argument: str, counted: bool
    ) -> dict[str, Any]:
        self._current_count = self.shell.execution_count
        if counted:
            self.shell.execution_count += 1
        handler = {
            "push": self._push,
            "pull": self._pull,
            "use": self._use,
            "checkpoint": self._checkpoint_command,
            "restore": self._restore_command,
        }[command]
        try:
            text = await handler(argument)
        except (DashError, SessionLost) as exc:
            return self._error_reply(exc, f"%dash {command} did nothing")
        self._say(text)
        return {
            "status": "ok",
            "execution_count": self._current_count,
            "payload": [],
            "user_expressions": {},
        }

    def _say(self, text: str, name: str = "stdout") -> None:
        self.session.send(
            self.iopub_socket,
            "stream",
            {"name": name, "text": text},
            parent=self.get_parent("shell"),
            ident=self._topic("stream"),
        )

    async def _in_remote(
        self,
        module: str,
        call: str,
        *,
        remote: RemoteSession | None = None,
        forward_interrupt: bool = True,
    ) -> dict[str, Any]:
        """Evaluate ``module.call`` (a function returning JSON) in the remote kernel,
        without binding a name in the notebook's namespace; its JSON result."""
        expression = f"__import__('importlib').import_module({module!r}).{call}"
        reply = await self._request(
            "shell",
            "execute_request",
            {
                "code": "",
                "silent": True,
                "store_history": False,
                "user_expressions": {"result": expression},
                "allow_stdin": False,
            },
            remote=remote,
            forward_interrupt=forward_interrupt,
        )
        result = reply.get("user_expressions", {}).get("result", {})
        if reply.get("status") != "ok" or result.get("status") != "ok":
            failure = result if result.get("ename") else reply
            raise DashError(
                f"the remote session failed: {failure.get('ename')}: {failure.get('evalue')}"
            )
        return json.loads(ast.literal_eval(result["data"]["text/plain"]))

    async def _off_loop(self, function: Any, *args: Any) -> Any:
        """Run a blocking call (Dask's sync API, a stdin wait) off the kernel's event loop."""
        return await asyncio.get_running_loop().run_in_executor(None, function, *args)

    @contextlib.asynccontextmanager
    async def _transfer(self, conn: Connection) -> AsyncIterator[str]:
        """A one-time dataset name for moving variables, unpublished afterwards whatever
        happened (unpublishing a name never published is harmless)."""
        key = f"dash-transfer-{uuid.uuid4().hex}"
        try:
            yield key
        finally:
            await self._off_loop(conn.client.unpublish_dataset, key)

    async def _push(self, argument: str) -> str:
        names = argument.split()
        if not names:
            raise DashError("name the variables to send: %dash push x y")
        missing = [n for n in names if n not in self.shell.user_ns]
        if missing:
            raise DashError(f"no local variable named {', '.join(missing)}")
        remote = await self._ensure_session()
        async with self._transfer(remote.conn) as key:
            sent = await self._off_loop(publish_names, remote.conn, self.shell.user_ns, names, key)
            if sent["unpicklable"]:
                raise SerializationError("send", sent["unpicklable"])
            result = await self._in_remote("dash_kernel.transfer", f"remote_receive({key!r})")
        return f"Sent to the session: {', '.join(result['received'])}\n" + _not_moved(
            result["failed"], {}, []
        )

    async def _pull(self, argument: str) -> str:
        names = argument.split()
        if not names:
            raise DashError("name the variables to fetch: %dash pull x y")
        remote = await self._ensure_session()
        async with self._transfer(remote.conn) as key:
            sent = await self._in_remote(
                "dash_kernel.transfer", f"remote_publish({key!r}, {names!r})"
            )
            got = await self._off_loop(receive_names, remote.conn, self.shell.user_ns, key)
        fetched = ", ".join(got["received"]) or "nothing"
        return f"Fetched from the session: {fetched}\n" + _not_moved(
            got["failed"], sent["unpicklable"], sent["missing"]
        )

    async def _use(self, argument: str) -> str:
        spec = ResourceSpec.from_string(argument)
        conn = await self._off_loop(connect)
        await self._off_loop(conn.ensure_satisfiable, spec)
        if self.remote is None or self.remote.lost_reason():
            self.session_spec = spec
            await self._ensure_session()
            return f"The session now runs on {self.remote.describe()}.\n"
        return await self._move(spec)

    async def _move(self, spec: ResourceSpec, *, start_first: bool = False) -> str:
        """Checkpoint the session, end it, start one for ``spec`` and restore it there.

        With ``start_first`` the new session starts, and gets the variables, before the
        old one ends: if anything fails, the old one stays, whole (a drain's move)."""
        # Checkpoint first: if that fails, the session stays where it is, whole.
        try:
            await self._take_checkpoint(self.remote, self.last_checkpoint_cell())
        except (DashError, SessionLost) as exc:
            self._checkpoint_problem = None
            raise DashError(
                f"could not checkpoint the session, so it stays on {self.remote.describe()}: {exc}"
            ) from None
        if start_first:
            return await self._move_beside(spec)
        old, self.remote = self.remote, None
        await old.shutdown()
        self.session_spec = spec
        await self._ensure_session()
        where = self.remote.describe()
        try:
            restored = await self._restore(self.checkpoint_name)
        except (DashError, SessionLost) as exc:
            return (
                f"The session moved to {where}, but its variables could not be restored "
                f"({exc}); %dash restore {self.checkpoint_name} tries again.\n"
            )
        return f"The session moved to {where}. Carried over: {_restore_summary(restored)}\n"

    async def _move_beside(self, spec: ResourceSpec) -> str:
        """Start a session for ``spec`` next to the current one, restore the checkpoint
        there, then end the old one; on any failure (or cancellation) the old one stays."""
        old, old_pump, old_count = self.remote, self._pump, self._remote_next_count
        conn = await self._off_loop(connect)
        new = RemoteSession(conn, spec, asyncio.get_running_loop(), notebook=self.notebook)
        try:
            await new.start(timeout=MOVE_START_TIMEOUT)
            self.remote, self._pump = new, asyncio.create_task(self._pump_events(new))
            self._remote_next_count = 1
            restored = await self._restore(self.checkpoint_name)
        except BaseException as exc:
            if self.remote is new:
                self._pump.cancel()
            new.close()
            self.remote, self._pump, self._remote_next_count = old, old_pump, old_count
            if isinstance(exc, (DashError, SessionLost)):
                raise DashError(f"{exc}; it stays on {old.describe()}") from None
            raise
        # The old session's pump would fail the new session's requests when it closes.
        if old_pump is not None:
            old_pump.cancel()
        await old.shutdown()
        self.session_spec = spec
        self._announced = where = new.describe()
        return f"The session moved to {where}. Carried over: {_restore_summary(restored)}\n"

    # The session that was told it stays on its draining machine (told once).
    _told_to_stay: RemoteSession | None = None

    async def _leave_if_asked(self) -> None:
        """Before a cell: if the session's machine is draining, move the session (and its
        variables) to a machine that can hold it, so the drain can end. With nowhere to
        go it stays, and the drain waits for it: the next cells try again."""
        if self._leave is None:
            return
        remote, why = self._leave
        if remote is not self.remote:
            self._leave = None
            return
        lost = remote.lost_reason()
        if lost is not None:
            self._leave = None
            rows = await self._pool_workers(remote.conn)
            after = _after_loss(remote.spec, rows)
            self._say(f"DASH: {why}, and the session on it was lost ({lost}). {after}\n", "stderr")
            return
        stuck = _nowhere_to_go(remote.spec, await self._pool_workers(remote.conn), remote.info)
        if stuck is not None:
            if self._told_to_stay is not remote:
                self._told_to_stay = remote
                self._say(f"DASH: {why}; {stuck}.\n", "stderr")
            return
        try:
            moved = await self._until_interrupted(
                self._move(self.session_spec, start_first=True), MOVE_TIMEOUT
            )
        except (DashError, SessionLost) as exc:
            self._say(f"DASH: {why}, but the session could not move now ({exc}).\n", "stderr")
            return
        self._leave = None
        self._say(f"DASH: {why}. {moved}", "stderr")

    async def _pool_workers(self, conn: Connection) -> list[dict[str, Any]] | None:
        """The scheduler's ``dash_workers`` rows, or None if it cannot say in time."""

        def ask() -> list[dict[str, Any]]:
            return conn.client.sync(conn.client.scheduler.dash_workers)

        try:
            return await asyncio.wait_for(self._off_loop(ask), ASK_TIMEOUT)
        except Exception as exc:
            self.log.warning("could not ask the scheduler where a session could go: %r", exc)
            return None

    async def _until_interrupted(self, work: Any, timeout: float) -> Any:
        """Await ``work``; an interrupt (SIGINT) or ``timeout`` cancels it (DashError)."""
        loop = asyncio.get_running_loop()
        task = asyncio.ensure_future(work)
        interrupted = loop.create_future()

        def handler(*_: Any) -> None:
            loop.call_soon_threadsafe(lambda: interrupted.done() or interrupted.set_result(True))

        try:
            previous = signal.signal(signal.SIGINT, handler)
        except ValueError:  # not the main thread
            previous = None
        try:
            await asyncio.wait(
                {task, interrupted}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            if previous is not None:
                signal.signal(signal.SIGINT, previous)
        if task.done():
            return task.result()
        task.cancel()
        with contextlib.suppress(BaseException):
            await task
        raise DashError("interrupted" if interrupted.done() else f"it took more than {timeout:g}s")

    def checkpoint_status(self) -> str:
        """For ``%dash status``: what a lost session would get back."""
        if not self.checkpointing:
            return "off (%dash checkpoint on)"
        taken = self.last_checkpoint
        if taken is None:
            return f"none yet ({self.checkpoint_name})"
        cell = f"after cell [{taken['cell']}]: " if taken.get("cell") else ""
        unsaved = f", {len(taken['unsaved'])} not picklable" if taken.get("unsaved") else ""
        return (
            f"{cell}{len(taken['saved'])} variables{unsaved}, {format_bytes(taken['size'])} "
            f"in {taken['name']}"
        )

    def last_checkpoint_cell(self) -> int | None:
        """The number of the last cell that ran in the session, if any has."""
        return self._current_count - 1 if self._current_count > 1 else None

    async def _checkpoint_command(self, argument: str) -> str:
        choice = argument.strip().lower()
        if choice == "off":
            self.checkpointing = False
            return (
                "Checkpoints are off: if this session is lost, its variables are lost with "
                "it (%dash checkpoint on turns them back on).\n"
            )
        if choice not in ("", "on"):
            raise DashError(f"unknown %dash checkpoint option {argument.strip()!r}; use on or off")
        if choice == "on":
            self.checkpointing = True
        remote = await self._ensure_session()
        taken = await self._take_checkpoint(remote, self.last_checkpoint_cell())
        return _checkpoint_summary(taken)

    async def _restore_command(self, argument: str) -> str:
        words = argument.split()
        if not words:
            return _checkpoints_table(await self._off_loop(list_checkpoints), self.checkpoint_name)
        if len(words) > 2 or (len(words) == 2 and not words[1].isdigit()):
            raise DashError("usage: %dash restore [NAME [VERSION]]")
        version = int(words[1]) if len(words) == 2 else None
        restored = await self._restore(words[0], version)
        return f"Restored from {words[0]} version {restored['version']}: " + (
            _restore_summary(restored) + "\n"
        )

    def _error_reply(self, exc: BaseException, hint: str) -> dict[str, Any]:
        name = type(exc).__name__
        content = {
            "status": "error",
            "ename": name,
            "evalue": str(exc),
            "traceback": [f"\x1b[0;31m{name}\x1b[0m: {exc}", f"({hint})"],
        }
        self.session.send(
            self.iopub_socket,
            "error",
            content,
            parent=self.get_parent("shell"),
            ident=self._topic("error"),
        )
        return {**content, "execution_count": self._current_count}

    async def do_complete(self, code: str, cursor_pos: int) -> dict[str, Any]:
        return await self._relay_or_local(
            "complete_request",
            {"code": code, "cursor_pos": cursor_pos},
            lambda: super(DashKernel, self).do_complete(code, cursor_pos),
            code,
            {
                "status": "ok",
                "matches": [],
                "cursor_start": cursor_pos,
                "cursor_end": cursor_pos,
                "metadata": {},
            },
        )

    async def do_inspect(
        self, code: str, cursor_pos: int, detail_level: int = 0, omit_sections=()
    ) -> dict[str, Any]:
        return await self._relay_or_local(
            "inspect_request",
            {"code": code, "cursor_pos": cursor_pos, "detail_level": detail_level},
            lambda: super(DashKernel, self).do_inspect(
                code, cursor_pos, detail_level, omit_sections
            ),
            code,
            {"status": "ok", "found": False, "data": {}, "metadata": {}},
        )

    async def do_is_complete(self, code: str) -> dict[str, Any]:
        return await self._relay_or_local(
            "is_complete_request",
            {"code": code},
            lambda: super(DashKernel, self).do_is_complete(code),
            code,
            {"status": "unknown"},
        )

    async def do_history(
        self,
        hist_access_type,
        output,
        raw,
        session=None,
        start=None,
        stop=None,
        n=None,
        pattern=None,
        unique=False,
    ) -> dict[str, Any]:
        content = {
            "hist_access_type": hist_access_type,
            "output": output,
            "raw": raw,
            "session": session,
            "start": start,
            "stop": stop,
            "n": n,
            "pattern": pattern,
            "unique": unique,
        }
        return await self._ask_remote("history_request", content, {"status": "ok", "history": []})

    async def _relay_or_local(
        self,
        msg_type: str,
        content: dict[str, Any],
        local: Any,
        code: str,
        unanswered: dict[str, Any],
    ) -> dict[str, Any]:
        if is_local(code) or self.remote is None:
            # before the first cell there is no session, and completing should not start one
            result = local()
            return await result if asyncio.iscoroutine(result) else result
        return await self._ask_remote(msg_type, content, unanswered)

    async def _ask_remote(
        self, msg_type: str, content: dict[str, Any], unanswered: dict[str, Any]
    ) -> dict[str, Any]:
        """A quick question for the session's kernel (completion, inspection...): its
        answer, or ``unanswered`` if there is no live session or it does not answer within
        ``request_timeout`` (a front end asks on every keystroke or Enter, and waits)."""
        remote = self.remote
        if remote is None:
            return unanswered
        try:
            return await self._request(
                "shell", msg_type, content, remote=remote, timeout=self.request_timeout
            )
        except (DashError, SessionLost) as exc:
            self.log.warning("could not relay %s: %s", msg_type, exc)
            return unanswered

    async def do_shutdown(self, restart: bool) -> dict[str, Any]:
        if self.remote is not None:
            await self.remote.shutdown()
            self.remote = None
        result = super().do_shutdown(restart)
        return await result if asyncio.iscoroutine(result) else result


_SESSION_COMMANDS = ("push", "pull", "use", "checkpoint", "restore")


def _session_command(code: str) -> tuple[str, str] | None:
    """``("push", "x y")`` for a ``%dash push x y`` cell (also pull, use, checkpoint and
    restore), else None."""
    parts = code.strip().split(maxsplit=2)
    if len(parts) >= 2 and parts[0] == "%dash" and parts[1] in _SESSION_COMMANDS:
        return parts[1], parts[2] if len(parts) == 3 else ""
    return None


def _scheduler_gone(conn: Connection) -> str:
    if conn.gateway_url:
        return "the DASH gateway restarted, and its cluster with it"
    return "the cluster's scheduler went away"


def _not_moved(failed: dict[str, str], unpicklable: dict[str, str], missing: list[str]) -> str:
    lines = [f"Not moved: {name} ({why})\n" for name, why in {**unpicklable, **failed}.items()]
    lines += [f"Not moved: {name} (no such variable in the session)\n" for name in missing]
    return "".join(lines)


def _names(names: list[str]) -> str:
    if not names:
        return "nothing"
    shown = ", ".join(names[:_NAMES_SHOWN])
    more = len(names) - _NAMES_SHOWN
    return f"{shown} and {more} more" if more > 0 else shown


def _restore_summary(restored: dict[str, Any]) -> str:
    """ "a, b (0.2 s). Not restored: lock (not picklable: ...)" for a restore's result."""
    size = format_bytes(restored.get("size", 0))
    text = f"{_names(restored['restored'])} ({size}, {restored['seconds']:g} s)."
    missed = [f"{n} ({why})" for n, why in restored.get("failed", {}).items()]
    missed += [
        f"{n} (could not be pickled: {why})" for n, why in restored.get("unsaved", {}).items()
    ]
    if missed:
        text += " Not restored: " + "; ".join(missed) + "."
    return text


def _checkpoint_summary(taken: dict[str, Any]) -> str:
    stored = (
        "unchanged since the last checkpoint"
        if taken["version"] is None
        else f"version {taken['version']}, {format_bytes(taken['uploaded_bytes'])} uploaded"
    )
    text = (
        f"Checkpointed {_names(taken['saved'])} as {taken['name']} ({format_bytes(taken['size'])}, "
        f"{stored}, {taken['seconds']:g} s).\n"
    )
    for name, why in taken.get("unsaved", {}).items():
        text += f"Not saved: {name} ({why})\n"
    return text


def _checkpoints_table(found: list[dict[str, Any]], current: str) -> str:
    if not found:
        return "No session checkpoints are stored.\n"
    lines = ["Session checkpoints (%dash restore NAME puts one into this session):"]
    for entry in found:
        metadata = entry.get("metadata") or {}
        cell = f"after cell [{metadata['cell']}]" if metadata.get("cell") else ""
        notebook = metadata.get("notebook") or ""
        mark = " (this kernel)" if entry["name"] == current else ""
        count = len(entry.get("variables") or [])
        lines.append(
            f"  {entry['name']}{mark}: {count} variables, {format_bytes(entry.get('size', 0))}, "
            f"{entry.get('created', '')[:19]} {cell} {notebook}".rstrip()
        )
    return "\n".join(lines) + "\n"


def _other_machines(rows: list[dict[str, Any]], info: dict[str, Any]) -> list[dict[str, Any]]:
    """The running workers of ``rows`` not on the machine of the session ``info`` describes."""
    worker = info.get("worker_name")
    machine = next((r.get("machine") for r in rows if r.get("name") == worker), None)
    return [
        r
        for r in rows
        if r.get("status") == "running"
        and r.get("name") != worker
        and (machine is None or r.get("machine") != machine)
    ]


def _can_hold(spec: ResourceSpec, rows: list[dict[str, Any]]) -> bool:
    if not rows:
        return False
    try:
        check_satisfiable(spec, [(str(r.get("name")), r.get("resources") or {}) for r in rows])
    except ResourceUnavailable:
        return False
    return True


def _nowhere_to_go(
    spec: ResourceSpec, rows: list[dict[str, Any]] | None, info: dict[str, Any]
) -> str | None:
    """Why a session for ``spec`` cannot leave its machine now, or None if it can (or the
    scheduler cannot tell: then a move is tried, and the session stays if it fails)."""
    if rows is None:
        return None
    others = _other_machines(rows, info)
    if not _can_hold(spec, others):
        return (
            "your session stays until a machine that fits joins (no other machine can hold "
            f"a session that asks for {spec})"
        )
    busy = describe_wait(spec, others)
    if busy:
        return (
            "your session stays until a machine that can hold it is free "
            f"({busy.removeprefix('queued: ')})"
        )
    return None


def _after_loss(spec: ResourceSpec, rows: list[dict[str, Any]] | None) -> str:
    """What happens next to a notebook whose session was lost with its draining machine."""
    running = [r for r in rows or [] if r.get("status") == "running"]
    if rows is not None and not _can_hold(spec, running):
        return (
            f"No machine that fits a session asking for {spec} is connected: a cell starts "
            "one, with the last checkpoint, once such a machine joins."
        )
    return "The next cell starts a new session elsewhere, with the last checkpoint."


class DashKernelApp(IPKernelApp):
    name = "dash-kernel"
    kernel_class = DashKernel  # type: ignore[assignment]


def main() -> None:
    """``python -m dash_kernel -f CONNECTION_FILE``, as the kernelspec runs it."""
    DashKernelApp.launch_instance()
