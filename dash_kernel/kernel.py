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
import signal
import sys
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator
from typing import Any

from ipykernel.ipkernel import IPythonKernel
from ipykernel.kernelapp import IPKernelApp

from ._version import __version__
from .cluster import Connection, connect
from .errors import DashError
from .magics import DashMagics
from .resources import ResourceSpec
from .serialize import SerializationError
from .sessions import RemoteSession, SessionLost, decode_message
from .transfer import publish_names, receive_names

__all__ = ["DashKernel", "main"]

LOCAL_CELL = "%%local"
# iopub messages about the remote kernel itself, not the cell: this kernel sends its own.
_NOT_RELAYED = {"status", "execute_input"}
_WAIT = 1.0
_PARENTS_KEPT = 1000


def is_local(code: str) -> bool:
    """Cells that run here: ``%%local`` cells and ``%dash`` commands."""
    stripped = code.lstrip()
    return stripped.startswith((LOCAL_CELL, "%dash ")) or stripped == "%dash"


class DashKernel(IPythonKernel):
    """Relays cells to a remote session; see the module docstring."""

    implementation = "dash_kernel"
    implementation_version = __version__
    banner = f"DASH distributed {__version__}: cells run on a DASH worker (%%local runs here)."

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
        self._replies: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self._pump: asyncio.Task[None] | None = None
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
        conn = await self._off_loop(connect)
        self.remote = RemoteSession(conn, self.session_spec, asyncio.get_running_loop())
        await self.remote.start(
            on_queued=lambda why: self._say(f"DASH: the session is {why}.\n", "stderr")
        )
        self._remote_next_count = 1
        # referenced, so the running task is not garbage-collected
        self._pump = asyncio.create_task(self._pump_events(self.remote))
        where = self.remote.describe()
        if previous is not None:
            self._say(
                f"DASH: a new session started on {where}; the previous one was lost "
                f"({previous.lost_reason()}), so its variables are gone.\n",
                "stderr",
            )
        elif self._announced != where:
            self._say(f"DASH: this notebook runs on {where}.\n", "stderr")
        self._announced = where
        return self.remote

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
        self, channel: str, msg_type: str, content: dict[str, Any]
    ) -> dict[str, Any]:
        """Send a request to the remote kernel and return its reply's content; what it
        publishes meanwhile is relayed by the pump. A SIGINT meanwhile interrupts it."""
        remote = await self._ensure_session()
        reply = asyncio.get_running_loop().create_future()
        msg_id = self._send_remote(remote, channel, msg_type, content)
        self._replies[msg_id] = reply
        previous_handler = self._forward_sigint(remote)
        try:
            return (await reply)["content"]
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
            if event["op"] != "message":
                continue
            message = decode_message(event["message"])
            request_id = message["parent_header"].get("msg_id")
            if event["channel"] == "iopub":
                parent = self._parents.get(request_id)
                if parent is not None:
                    self._republish(message, parent)
            elif event["channel"] == "stdin":
                parent = self._parents.get(request_id)
                asyncio.create_task(self._relay_input(remote, message, parent))
            else:
                reply = self._replies.get(request_id)
                if reply is not None and not reply.done():
                    reply.set_result(message)

    def _fail_waiting(self, reason: str) -> None:
        for reply in self._replies.values():
            if not reply.done():
                reply.set_exception(SessionLost(reason))

    async def _relay_comm(self, stream: Any, ident: Any, parent: dict[str, Any]) -> None:
        """Widget messages from the front end go to the remote kernel, where the widgets
        live; they have no reply, and what they cause comes back through the pump."""
        if self.remote is None or self.remote.lost_reason():
            return
        self._send_remote(self.remote, "shell", parent["header"]["msg_type"], parent["content"])

    async def comm_info_request(self, stream: Any, ident: Any, parent: dict[str, Any]) -> None:
        if self.remote is None:
            return await super().comm_info_request(stream, ident, parent)
        content = await self._request("shell", "comm_info_request", parent["content"])
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
        try:
            if store_history and not silent:
                await self._align_remote_count()
            reply = await self._request(
                "shell",
                "execute_request",
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
        return {**reply, "execution_count": self._current_count}

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
        handler = {"push": self._push, "pull": self._pull, "use": self._use}[command]
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

    async def _in_remote(self, expression: str) -> dict[str, Any]:
        """Evaluate a ``dash_kernel.transfer`` call in the remote kernel; its JSON result."""
        reply = await self._request(
            "shell",
            "execute_request",
            {
                "code": "import dash_kernel.transfer",
                "silent": True,
                "store_history": False,
                "user_expressions": {"result": expression},
                "allow_stdin": False,
            },
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
            result = await self._in_remote(f"dash_kernel.transfer.remote_receive({key!r})")
        return f"Sent to the session: {', '.join(result['received'])}\n" + _not_moved(
            result["failed"], {}, []
        )

    async def _pull(self, argument: str) -> str:
        names = argument.split()
        if not names:
            raise DashError("name the variables to fetch: %dash pull x y")
        remote = await self._ensure_session()
        async with self._transfer(remote.conn) as key:
            sent = await self._in_remote(f"dash_kernel.transfer.remote_publish({key!r}, {names!r})")
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
        async with self._transfer(conn) as key:
            sent = await self._in_remote(f"dash_kernel.transfer.remote_publish({key!r}, None)")
            old, self.remote = self.remote, None
            await old.shutdown()
            self.session_spec = spec
            await self._ensure_session()
            got = await self._in_remote(f"dash_kernel.transfer.remote_receive({key!r})")
        carried = ", ".join(got["received"]) or "nothing"
        return (
            f"The session moved to {self.remote.describe()}. Carried over: {carried}\n"
            + _not_moved(got["failed"], sent["unpicklable"], [])
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
        )

    async def do_is_complete(self, code: str) -> dict[str, Any]:
        return await self._relay_or_local(
            "is_complete_request",
            {"code": code},
            lambda: super(DashKernel, self).do_is_complete(code),
            code,
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
        if self.remote is None:
            return {"status": "ok", "history": []}
        return await self._request("shell", "history_request", content)

    async def _relay_or_local(
        self, msg_type: str, content: dict[str, Any], local: Any, code: str
    ) -> dict[str, Any]:
        if is_local(code) or self.remote is None:
            # before the first cell there is no session, and completing should not start one
            result = local()
            return await result if asyncio.iscoroutine(result) else result
        try:
            return await self._request("shell", msg_type, content)
        except Exception as exc:
            self.log.warning("could not relay %s: %s", msg_type, exc)
            result = local()
            return await result if asyncio.iscoroutine(result) else result

    async def do_shutdown(self, restart: bool) -> dict[str, Any]:
        if self.remote is not None:
            await self.remote.shutdown()
            self.remote = None
        result = super().do_shutdown(restart)
        return await result if asyncio.iscoroutine(result) else result


def _session_command(code: str) -> tuple[str, str] | None:
    """``("push", "x y")`` for a ``%dash push x y`` cell (also pull and use), else None."""
    parts = code.strip().split(maxsplit=2)
    if len(parts) >= 2 and parts[0] == "%dash" and parts[1] in ("push", "pull", "use"):
        return parts[1], parts[2] if len(parts) == 3 else ""
    return None


def _not_moved(failed: dict[str, str], unpicklable: dict[str, str], missing: list[str]) -> str:
    lines = [f"Not moved: {name} ({why})\n" for name, why in {**unpicklable, **failed}.items()]
    lines += [f"Not moved: {name} (no such variable in the session)\n" for name in missing]
    return "".join(lines)


class DashKernelApp(IPKernelApp):
    name = "dash-kernel"
    kernel_class = DashKernel  # type: ignore[assignment]


def main() -> None:
    """``python -m dash_kernel -f CONNECTION_FILE``, as the kernelspec runs it."""
    DashKernelApp.launch_instance()
