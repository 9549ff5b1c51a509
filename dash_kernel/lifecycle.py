"""How DASH's long-running processes learn to stop: a signal, or their parent's death."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import threading

__all__ = ["StopTrigger", "arm_hard_exit"]

log = logging.getLogger(__name__)

PARENT_POLL_INTERVAL = 0.5


class StopTrigger:
    """An event set on SIGINT/SIGTERM, or when ``parent_pid`` stops being our parent.

    The parent watch is what keeps a scheduler or worker agent from outliving a gateway
    that was killed outright (``kill -9`` runs no shutdown code). ``parent_pid=0`` turns
    it off. Create it inside the running event loop; :meth:`close` stops the watch.
    """

    def __init__(self, parent_pid: int, what: str):
        self.event = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self.event.set)
        self._watch = (
            asyncio.create_task(self._watch_parent(parent_pid, what)) if parent_pid else None
        )

    async def _watch_parent(self, parent_pid: int, what: str) -> None:
        while not self.event.is_set():
            if os.getppid() != parent_pid:
                log.warning("parent process %d is gone; stopping the %s", parent_pid, what)
                self.event.set()
                return
            await asyncio.sleep(PARENT_POLL_INTERVAL)

    def is_set(self) -> bool:
        return self.event.is_set()

    async def wait(self) -> None:
        await self.event.wait()

    def close(self) -> None:
        if self._watch is not None:
            self._watch.cancel()


def arm_hard_exit(after: float) -> None:
    """Exit with status 1 in ``after`` seconds even if a clean shutdown hangs, so that
    a stopped process never lingers."""
    timer = threading.Timer(after, os._exit, args=(1,))
    timer.daemon = True
    timer.start()
