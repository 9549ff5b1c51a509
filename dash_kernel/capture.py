"""On a worker: route a task's stdout, stderr and rich displays back to the caller, live.

Dask runs tasks in threads of one process, so ``sys.stdout`` is replaced once by a proxy
that writes to the *current thread's* sink when a DASH task is running there, and to the
real stream otherwise. A sink turns writes into events on the caller's topic with
``Worker.log_event``; the caller's :class:`dash_kernel.output.OutputRouter` publishes them
into the cell that submitted the work.

Event shapes (msgpack-able dicts, each with the task ``key``)::

    {"kind": "stream", "name": "stdout" | "stderr", "text": str}
    {"kind": "display", "data": dict, "metadata": dict, "transient": dict, "update": bool}
    {"kind": "clear", "wait": bool}
"""

from __future__ import annotations

import base64
import contextlib
import io
import sys
import threading
from collections.abc import Iterator
from typing import Any

from distributed import get_worker

__all__ = ["current_sink", "format_display", "task_output"]

_thread = threading.local()
_install_lock = threading.Lock()
_FLUSH_AT = 8192


class _Sink:
    """Buffers one task's output and sends it as events on the caller's topic."""

    def __init__(self, topic: str, key: str):
        self.topic = topic
        self.key = key
        self._worker = get_worker()
        self._buffers = {"stdout": io.StringIO(), "stderr": io.StringIO()}

    def emit(self, event: dict[str, Any]) -> None:
        event["key"] = self.key
        self._worker.log_event(self.topic, event)

    def stream(self, name: str, text: str) -> None:
        buffer = self._buffers[name]
        buffer.write(text)
        if "\n" in text or "\r" in text or buffer.tell() > _FLUSH_AT:
            self.flush(name)

    def flush(self, name: str | None = None) -> None:
        for stream_name in (name,) if name else ("stdout", "stderr"):
            buffer = self._buffers[stream_name]
            text = buffer.getvalue()
            if text:
                buffer.seek(0)
                buffer.truncate()
                self.emit({"kind": "stream", "name": stream_name, "text": text})


def current_sink() -> _Sink | None:
    """The sink of the DASH task running in this thread, if any."""
    return getattr(_thread, "sink", None)


class _RoutedStream(io.TextIOBase):
    """Stands in for ``sys.stdout``/``sys.stderr`` in a worker process."""

    def __init__(self, name: str, fallback: Any):
        self.name = name
        self.fallback = fallback

    def write(self, text: str) -> int:
        sink = current_sink()
        if sink is None:
            return self.fallback.write(text)
        sink.stream(self.name, text)
        return len(text)

    def flush(self) -> None:
        sink = current_sink()
        if sink is None:
            self.fallback.flush()
        else:
            sink.flush(self.name)

    def writable(self) -> bool:
        return True

    def isatty(self) -> bool:
        return False

    def fileno(self) -> int:
        return self.fallback.fileno()

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return getattr(self.fallback, "encoding", "utf-8")


def _install_streams() -> None:
    if isinstance(sys.stdout, _RoutedStream) and isinstance(sys.stderr, _RoutedStream):
        return  # every task after the first: no lock on this path
    with _install_lock:
        for name in ("stdout", "stderr"):
            current = getattr(sys, name)
            if not isinstance(current, _RoutedStream):
                setattr(sys, name, _RoutedStream(name, current))


_shell: Any = None


def _display_shell() -> Any:
    """An IPython shell whose display publisher routes by thread, so that ``display()``,
    rich reprs and ``clear_output()`` work in remote code as they do in a notebook."""
    global _shell
    with _install_lock:
        if _shell is None:
            from IPython.core.interactiveshell import InteractiveShell
            from traitlets.config import Config

            if InteractiveShell.initialized():
                shell = InteractiveShell.instance()
            else:
                config = Config()
                config.HistoryManager.enabled = False
                shell = InteractiveShell.instance(config=config)
            if not isinstance(shell.display_pub, _RoutedDisplayPublisher):
                shell.display_pub = _RoutedDisplayPublisher(shell.display_pub)
            _shell = shell
    return _shell


class _RoutedDisplayPublisher:
    """Wraps the shell's display publisher: a DASH task's displays become events."""

    def __init__(self, original: Any):
        self._original = original

    def __getattr__(self, name: str) -> Any:
        return getattr(self._original, name)

    def publish(self, data, metadata=None, source=None, *, transient=None, update=False, **kwargs):
        sink = current_sink()
        if sink is None:
            return self._original.publish(
                data, metadata, transient=transient, update=update, **kwargs
            )
        sink.flush()  # keep prints that came first ahead of the display
        sink.emit(
            {
                "kind": "display",
                "data": _jsonable(data),
                "metadata": _jsonable(metadata or {}),
                "transient": transient or {},
                "update": bool(update),
            }
        )

    def clear_output(self, wait: bool = False) -> None:
        sink = current_sink()
        if sink is None:
            return self._original.clear_output(wait)
        sink.flush()
        sink.emit({"kind": "clear", "wait": bool(wait)})


def _jsonable(bundle: dict[str, Any]) -> dict[str, Any]:
    return {
        key: base64.b64encode(value).decode() if isinstance(value, bytes) else value
        for key, value in bundle.items()
    }


def format_display(value: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """The mimebundle IPython would show for ``value`` (``text/plain`` at least)."""
    data, metadata = _display_shell().display_formatter.format(value)
    return _jsonable(data), _jsonable(metadata)


def publish_new_figures(before: set[int]) -> None:
    """Show and close matplotlib figures a cell made, as an inline backend would."""
    pyplot = sys.modules.get("matplotlib.pyplot")
    if pyplot is None:
        return
    sink = current_sink()
    for number in pyplot.get_fignums():
        if number in before:
            continue
        figure = pyplot.figure(number)
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png", bbox_inches="tight")
        width, height = figure.get_size_inches() * figure.dpi
        pyplot.close(figure)
        if sink is not None:
            sink.emit(
                {
                    "kind": "display",
                    "data": {
                        "image/png": base64.b64encode(buffer.getvalue()).decode(),
                        "text/plain": f"<Figure size {width:g}x{height:g} with "
                        f"{len(figure.axes)} Axes>",
                    },
                    "metadata": {},
                    "transient": {},
                    "update": False,
                }
            )


def open_figures() -> set[int]:
    pyplot = sys.modules.get("matplotlib.pyplot")
    return set(pyplot.get_fignums()) if pyplot is not None else set()


@contextlib.contextmanager
def task_output(topic: str, *, display: bool = False) -> Iterator[None]:
    """Inside this block, the calling thread's output goes to ``topic`` as events."""
    _install_streams()
    if display:
        _display_shell()
    worker = get_worker()
    sink = _Sink(topic, str(worker.get_current_task()))
    previous = current_sink()
    _thread.sink = sink
    try:
        yield
    finally:
        sink.flush()
        _thread.sink = previous
