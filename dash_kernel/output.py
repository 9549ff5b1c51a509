"""On the caller: publish remote output events into the cell that submitted the work.

Events arrive on the Dask client's event-loop thread. In an ipykernel, output written
from another thread must carry the submitting cell's parent header, so each submission
records where it came from (:meth:`Destination.capture`) and writes under that parent.
"""

from __future__ import annotations

import logging
import sys
import threading
from collections.abc import Iterable
from typing import Any

from .capture import current_sink

__all__ = ["Destination", "OutputRouter"]

log = logging.getLogger(__name__)


def _ipython_shell() -> Any:
    if "IPython" not in sys.modules:
        return None
    from IPython import get_ipython

    return get_ipython()


class Destination:
    """Where one submission's output goes: the streams and display publisher that were
    current when it was submitted, with their parent headers."""

    def __init__(self) -> None:
        # Work submitted from inside a DASH task (nested fan-out) reports to that task's
        # own caller.
        self.sink = current_sink()
        self.stdout = sys.stdout
        self.stderr = sys.stderr
        shell = _ipython_shell()
        self.display_pub = getattr(shell, "display_pub", None)
        self.parent = getattr(self.stdout, "parent_header", None)

    @classmethod
    def capture(cls) -> Destination:
        return cls()

    def _under_parent(self, target: Any, write: Any) -> None:
        setter = getattr(target, "set_thread_parent", None)
        if setter is None or not self.parent:
            write()
            return
        token = setter(self.parent)
        try:
            write()
        finally:
            target.reset_thread_parent(token)

    def stream(self, name: str, text: str) -> None:
        if self.sink is not None:
            self.sink.stream(name, text)
            self.sink.flush(name)
            return
        stream = self.stderr if name == "stderr" else self.stdout
        self._under_parent(stream, lambda: stream.write(text))
        if not hasattr(stream, "set_thread_parent"):
            stream.flush()

    def display(self, event: dict[str, Any]) -> None:
        if self.sink is not None:
            self.sink.emit({k: v for k, v in event.items() if k != "key"})
            return
        data, metadata = event.get("data", {}), event.get("metadata", {})
        if self.display_pub is None:
            text = data.get("text/plain")
            if text is not None:
                self.stream("stdout", text + "\n")
            return
        kwargs = {"metadata": metadata, "transient": event.get("transient") or None}
        if event.get("update"):
            kwargs["update"] = True
        self._under_parent(self.display_pub, lambda: self.display_pub.publish(data, **kwargs))

    def clear(self, wait: bool) -> None:
        if self.sink is not None:
            self.sink.emit({"kind": "clear", "wait": wait})
        elif self.display_pub is not None:
            self._under_parent(self.display_pub, lambda: self.display_pub.clear_output(wait))


class OutputRouter:
    """Subscribed to one client's topic; sends each event to its submission's destination."""

    def __init__(self) -> None:
        self._destinations: dict[str, Destination] = {}
        self._lock = threading.Lock()

    def register(self, keys: Iterable[str], destination: Destination | None = None) -> None:
        destination = destination or Destination.capture()
        with self._lock:
            for key in keys:
                self._destinations[str(key)] = destination

    def forget(self, keys: Iterable[str]) -> None:
        with self._lock:
            for key in keys:
                self._destinations.pop(str(key), None)

    def handle(self, event: tuple[float, dict[str, Any]]) -> None:
        _, message = event
        with self._lock:
            destination = self._destinations.get(message.get("key", ""))
        if destination is None:
            return
        try:
            kind = message.get("kind")
            if kind == "stream":
                destination.stream(message["name"], message["text"])
            elif kind == "display":
                destination.display(message)
            elif kind == "clear":
                destination.clear(message.get("wait", False))
        except Exception:
            log.exception("could not show remote output for %s", message.get("key"))
