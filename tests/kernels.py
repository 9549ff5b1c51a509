"""Drive real Jupyter kernels through jupyter_client, recording every iopub message."""

from __future__ import annotations

import contextlib
import os
import queue
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from jupyter_client.manager import KernelManager


@dataclass
class Execution:
    """What one ``execute_request`` produced, in arrival order, with arrival times."""

    reply: dict[str, Any]
    messages: list[dict[str, Any]] = field(default_factory=list)
    arrivals: list[float] = field(default_factory=list)
    input_prompts: list[str] = field(default_factory=list)

    @property
    def status(self) -> str:
        return self.reply["content"]["status"]

    def of_type(self, *types: str) -> list[dict[str, Any]]:
        return [m for m in self.messages if m["msg_type"] in types]

    def stream(self, name: str = "stdout") -> str:
        return "".join(
            m["content"]["text"] for m in self.of_type("stream") if m["content"]["name"] == name
        )

    @property
    def error(self) -> dict[str, Any] | None:
        errors = self.of_type("error")
        return errors[0]["content"] if errors else None

    def traceback_text(self) -> str:
        import re

        error = self.error or {}
        return re.sub(r"\x1b\[[0-9;]*m", "", "\n".join(error.get("traceback", [])))

    def displays(self) -> list[dict[str, Any]]:
        return [
            m["content"]
            for m in self.of_type("display_data", "execute_result", "update_display_data")
        ]


class KernelDriver:
    """A real kernel process: start it, run cells, interrupt it, shut it down."""

    def __init__(
        self,
        kernel_name: str = "python3",
        env: dict[str, str] | None = None,
        cwd: str | None = None,
        extra_arguments: list[str] | None = None,
    ):
        self.manager = KernelManager(kernel_name=kernel_name)
        self.manager.start_kernel(
            env=dict(os.environ) if env is None else env,
            cwd=cwd,
            extra_arguments=extra_arguments or [],
        )
        self.client = self.manager.client()
        self.client.start_channels()
        self.client.wait_for_ready(timeout=60)
        # iopub messages of an earlier request that arrived while a later one ran (output
        # after its cell's idle): none should ever be here.
        self.strays: list[dict[str, Any]] = []

    def execute(
        self, code: str, timeout: float = 60, *, on_message=None, stdin: str | None = None
    ) -> Execution:
        """Run ``code``; collect its iopub messages until the kernel is idle again.

        ``stdin`` answers the cell's ``input()`` requests, as a user typing it would.
        """
        msg_id = self.client.execute(code)
        result = Execution(reply={})
        deadline = time.monotonic() + timeout
        idle = False
        while not idle:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"cell did not finish in {timeout}s: {code[:80]!r}")
            if stdin is not None and self.client.stdin_channel.msg_ready():
                request = self.client.get_stdin_msg(timeout=1)
                result.input_prompts.append(request["content"]["prompt"])
                self.client.input(stdin)
            try:
                msg = self.client.get_iopub_msg(
                    timeout=min(remaining, 0.2 if stdin is not None else 1)
                )
            except queue.Empty:
                continue
            if msg["parent_header"].get("msg_id") != msg_id:
                if msg["msg_type"] != "status" and msg["parent_header"]:
                    self.strays.append(msg)
                continue
            if msg["msg_type"] == "status":
                idle = msg["content"]["execution_state"] == "idle"
                continue
            result.messages.append(msg)
            result.arrivals.append(time.monotonic())
            if on_message is not None:
                on_message(msg)
        while True:
            reply = self.client.get_shell_msg(timeout=max(deadline - time.monotonic(), 5))
            if reply["parent_header"].get("msg_id") == msg_id:
                result.reply = reply
                return result

    def interrupt(self) -> None:
        self.manager.interrupt_kernel()

    def shutdown(self) -> None:
        self.client.stop_channels()
        self.manager.shutdown_kernel(now=False)

    def __enter__(self) -> KernelDriver:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()


@contextlib.contextmanager
def dash_ipython_kernel(
    env: dict[str, str], cwd: str, setup: str = "%load_ext dash_kernel", timeout: float = 60
) -> Iterator[KernelDriver]:
    """A plain IPython kernel with ``setup`` (DASH's extension, by default) run in it,
    shut down afterwards."""
    with KernelDriver(env=env, cwd=cwd) as kernel:
        done = kernel.execute(setup, timeout=timeout)
        assert done.status == "ok", done.traceback_text()
        yield kernel


def without_dash_env(environ: dict[str, str] | None = None) -> dict[str, str]:
    """``environ`` (this process's by default) without any ``DASH_*`` variable: a kernel
    that knows no gateway."""
    return {k: v for k, v in (environ or os.environ).items() if not k.startswith("DASH_")}
