"""The "DASH distributed" kernel: every cell runs in a remote session on a worker.

An ``IPythonKernel`` whose execute, complete, inspect, is_complete and history requests
go to a real IPython kernel on a worker (see :mod:`dash_kernel.sessions`). What that
kernel publishes is re-published here under the original request, as it arrives.
``%%local`` cells and ``%dash`` commands run in this process.
"""

from __future__ import annotations

import asyncio
import signal
import sys
from typing import Any

from ipykernel.ipkernel import IPythonKernel
from ipykernel.kernelapp import IPKernelApp

from ._version import __version__
from .cluster import connect
from .magics import DashMagics
from .resources import ResourceSpec
from .sessions import RemoteSession, SessionLost, decode_message

__all__ = ["DashKernel", "main"]

LOCAL_CELL = "%%local"
# iopub messages about the remote kernel itself, not the cell: this kernel sends its own.
_NOT_RELAYED = {"status", "execute_input"}
_WAIT = 1.0


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
        self.shell.register_magics(DashMagics)

    # -- the session ---------------------------------------------------------------------

    async def _ensure_session(self) -> RemoteSession:
        if self.remote is not None and self.remote.lost_reason() is None:
            return self.remote
        previous = self.remote
        if previous is not None:
            previous.close()
        conn = await asyncio.get_running_loop().run_in_executor(None, connect)
        self.remote = RemoteSession(conn, self.session_spec, asyncio.get_running_loop())
        await self.remote.start()
        self._remote_next_count = 1
        where = self.remote.describe()
        if previous is not None:
            self._notice(
                f"DASH: a new session started on {where}; the previous one was lost "
                f"({previous.lost_reason()}), so its variables are gone.\n"
            )
        elif self._announced != where:
            self._notice(f"DASH: this notebook runs on {where}.\n")
        self._announced = where
        return self.remote

    def _notice(self, text: str) -> None:
        self.session.send(
            self.iopub_socket,
            "stream",
            {"name": "stderr", "text": text},
            parent=self.get_parent("shell"),
            ident=self._topic("stream"),
        )

    async def _request(
        self, channel: str, msg_type: str, content: dict[str, Any]
    ) -> dict[str, Any]:
        """Send a request to the remote kernel, relay what it publishes, return its reply."""
        remote = await self._ensure_session()
        request = self.session.msg(msg_type, content)
        parent = self.get_parent("shell")
        remote.send(channel, request)
        interrupted = asyncio.Event()
        previous_handler = self._forward_sigint(remote, interrupted)
        try:
            while True:
                event = await remote.next_event(_WAIT)
                if event is None:
                    reason = remote.lost_reason()
                    if reason:
                        raise SessionLost(reason)
                    continue
                if event["op"] in ("died", "closed"):
                    raise SessionLost(event.get("reason", "the session closed"))
                if event["op"] != "message":
                    continue
                message = decode_message(event["message"])
                if message["parent_header"].get("msg_id") != request["header"]["msg_id"]:
                    continue
                if event["channel"] == "iopub":
                    self._republish(message, parent)
                elif event["channel"] == "stdin":
                    await self._relay_input(remote, message)
                elif event["channel"] in ("shell", "control"):
                    return message["content"]
        finally:
            if previous_handler is not None:
                signal.signal(signal.SIGINT, previous_handler)

    def _forward_sigint(self, remote: RemoteSession, interrupted: asyncio.Event) -> Any:
        """While a request runs, a SIGINT (the notebook's interrupt) goes to the remote
        kernel instead of raising here."""
        if sys.platform == "win32":
            return None

        def handler(*_: Any) -> None:
            remote.interrupt()
            interrupted.set()

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

    async def _relay_input(self, remote: RemoteSession, request: dict[str, Any]) -> None:
        content = request["content"]
        loop = asyncio.get_running_loop()
        value = await loop.run_in_executor(
            None,
            lambda: self._input_request(
                content.get("prompt", ""),
                self._parent_ident["shell"],
                self.get_parent("shell"),
                password=content.get("password", False),
            ),
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


class DashKernelApp(IPKernelApp):
    name = "dash-kernel"
    kernel_class = DashKernel  # type: ignore[assignment]


def main() -> None:
    """``python -m dash_kernel -f CONNECTION_FILE``, as the kernelspec runs it."""
    DashKernelApp.launch_instance()
