"""``%%dash`` and ``%dash``: IPython magics that send a cell, or ask about the cluster.

Load them in any IPython kernel::

    In [1]: %load_ext dash_kernel
    In [2]: data = list(range(10))
    In [3]: %%dash --gpu 1
       ...: import socket
       ...: total = sum(data)            # `data` is sent, `total` comes back
       ...: print("ran on", socket.gethostname())
    ran on gpu-box
    In [4]: total
    Out[4]: 45
    In [5]: %dash workers
"""

from __future__ import annotations

import sys
from typing import Any

from IPython.core.magic import Magics, cell_magic, line_magic, magics_class
from IPython.core.magic_arguments import argument, magic_arguments, parse_argstring

from .cellcode import analyze_cell
from .cluster import connect
from .errors import DashError
from .remote import remote_exception, submit_tasks, wait_for
from .resources import ResourceSpec
from .serialize import dumps_names, loads_names
from .status import cluster_status
from .tasks import run_cell
from .tracebacks import attach_renderer

__all__ = ["DashMagics", "load_ipython_extension"]

# IPython's own names in a user namespace, never worth sending to a worker.
_SHELL_NAMES = frozenset({"In", "Out", "get_ipython", "exit", "quit", "open"})


def resource_arguments(func: Any) -> Any:
    """The resource options, declared once for every magic that places work."""
    for decorator in reversed(
        [
            argument(
                "--gpu",
                default=None,
                metavar="N|MODEL",
                help="GPUs (a count) or a GPU model, e.g. A100",
            ),
            argument("--cpu", default=None, metavar="N", help="CPU cores"),
            argument("--memory", default=None, metavar="SIZE", help="memory, e.g. 16GB"),
            argument("--vram", default=None, metavar="SIZE", help="GPU memory, e.g. 24GB"),
        ]
    ):
        func = decorator(func)
    return func


def _names(text: str | None) -> list[str] | None:
    if text is None:
        return None
    return [name.strip() for name in text.split(",") if name.strip()]


class _RemoteResult:
    """Shows a remote cell's last value as this cell's result, from its remote repr."""

    def __init__(self, bundle: tuple[dict[str, Any], dict[str, Any]]):
        self.data, self.metadata = bundle

    def _repr_mimebundle_(self, include=None, exclude=None):
        return self.data, self.metadata

    def __repr__(self) -> str:
        return str(self.data.get("text/plain", "<remote result>"))


@magics_class
class DashMagics(Magics):
    """The DASH magics; see the module docstring for a session."""

    @magic_arguments()
    @resource_arguments
    @argument(
        "--in",
        dest="inputs",
        default=None,
        metavar="a,b",
        help="names to send (default: the free names the cell reads)",
    )
    @argument(
        "--out",
        dest="outputs",
        default=None,
        metavar="c,d",
        help="names to bring back (default: the names the cell assigns)",
    )
    @cell_magic
    def dash(self, line: str, cell: str) -> _RemoteResult | None:
        """Run this cell on a DASH worker.

        The free names the cell reads are sent from your namespace; the names it assigns
        come back. Output streams live; Ctrl-C stops the remote cell.
        """
        args = parse_argstring(self.dash, line)
        try:
            spec = ResourceSpec.parse(
                gpu=args.gpu, cpu=args.cpu, memory=args.memory, vram=args.vram
            )
            names = analyze_cell(cell)
            user_ns = self.shell.user_ns
            reads = _names(args.inputs)
            if reads is None:
                reads = [n for n in names.reads if n in user_ns and n not in _SHELL_NAMES]
            else:
                missing = [n for n in reads if n not in user_ns]
                if missing:
                    raise DashError(f"--in names variables that do not exist: {', '.join(missing)}")
            writes = tuple(_names(args.outputs) or names.writes)
            inputs, _ = dumps_names(user_ns, reads)
            filename = self.shell.compile.cache(cell, self._cell_number())
            conn = connect()
            [future] = submit_tasks(
                conn,
                run_cell,
                [[cell], [filename], [inputs], [writes]],
                spec=spec,
                name="dash-cell",
                display=True,
            )
        except DashError as exc:
            raise exc.with_traceback(None) from None
        # Ctrl-C: wait_for stops the remote cell and raises a one-line KeyboardInterrupt.
        wait_for(conn, [future], fail_fast=False, spec=spec)
        if future.status == "error":
            exc = remote_exception(future)
            # Shown with the remote frames only: the local ones are this magic's.
            raise attach_renderer(exc, tb=exc.__traceback__)
        return self._bring_back(future.result())

    def _cell_number(self) -> int:
        """The number of the cell running now, for tracebacks ("Cell In[3]").

        IPython stores a cell in its history before running it; ``execution_count`` is
        not a stable answer (IPython 9 increments it before the cell runs, 8 after).
        """
        history = getattr(self.shell.history_manager, "input_hist_raw", None)
        return len(history) - 1 if history else self.shell.execution_count

    def _bring_back(self, result: dict[str, Any]) -> _RemoteResult | None:
        values, failures = loads_names(result["outputs"])
        self.shell.user_ns.update(values)
        failures.update(result["unpicklable"])
        if failures:
            listed = "; ".join(f"{name} ({why})" for name, why in failures.items())
            print(f"Not brought back (kept only on the worker): {listed}", file=sys.stderr)
        return _RemoteResult(result["result"]) if result["result"] else None

    @line_magic("dash")
    def dash_line(self, line: str) -> Any:
        """``%dash status``: the connection and the cluster. ``%dash workers``: the workers."""
        command = line.split()[0] if line.split() else "status"
        if command not in ("status", "workers"):
            raise DashError(
                f"unknown %dash command {command!r}; try %dash status or %dash workers "
                "(and, in the DASH kernel, push, pull, use, checkpoint or restore)"
            )
        status = cluster_status(connect())
        # In the DASH kernel, say where this notebook's remote session runs.
        kernel = getattr(self.shell, "kernel", None)
        remote = getattr(kernel, "remote", None)
        if remote is not None and remote.lost_reason() is None:
            status.session = remote.describe()
        if hasattr(kernel, "checkpoint_status"):
            status.checkpoint = kernel.checkpoint_status()
        return status if command == "status" else status.workers_table()


def load_ipython_extension(ipython: Any) -> None:
    """``%load_ext dash_kernel``"""
    ipython.register_magics(DashMagics)
