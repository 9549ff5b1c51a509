"""Keeps the workers of one machine off each other's GPUs: per-GPU OS locks and worker pause.

A machine sharing N ≥ 2 GPUs of one model runs, beside one worker per GPU, a multi-GPU
worker that sees all N (:mod:`dash_worker.plan`). Both kinds see the same devices, so each
of their workers loads this plugin (preload, configured by ``DASH_GPU_LOCKS``) and:

- every task holds the OS lock (``flock``) of each of its worker's GPUs while it runs, taken
  in the task's own thread before the task starts, GPUs in one order (so no deadlock);
- the multi-GPU worker, from the moment one of its tasks waits for its GPUs until it ends,
  also holds their *reservations*;
- a one-GPU worker is paused (Dask's own worker pause, so the scheduler sends its work
  elsewhere) while another worker holds its GPU's reservation. A multi-GPU task so waits
  only for the work already running on its GPUs, never for work that arrives later.

The lock files live in the agent's own directory; an ``flock`` dies with its process, so a
crashed worker never leaves a GPU locked.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from distributed.core import Status
from distributed.diagnostics.plugin import WorkerPlugin
from distributed.threadpoolexecutor import ThreadPoolExecutor
from tornado.ioloop import PeriodicCallback

__all__ = ["LOCKS_ENV", "GpuGuard", "GpuLockingThreadPoolExecutor", "OsLock", "dask_setup"]

log = logging.getLogger(__name__)

LOCKS_ENV = "DASH_GPU_LOCKS"
# How often a waiting task retries a lock, and a one-GPU worker looks at its reservation.
# Waiting in short sleeps rather than in a blocking flock lets a cancelled task stop.
RETRY_EVERY = 0.05
CHECK_EVERY_MS = 100


class GpuLockClosed(RuntimeError):
    """The worker is closing while a task waits for its GPUs."""


def _open(path: Path) -> int:
    return os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)


class OsLock:
    """One lock file, held by at most one process at a time; the threads of the holding
    process share the hold (two ``vram=`` tasks on one GPU worker)."""

    def __init__(self, path: Path):
        self.path = path
        self._fd: int | None = None
        self._holders = 0
        self._mutex = threading.Lock()
        # One thread of this process at a time waits for the OS lock; the others queue here.
        self._gate = threading.Lock()

    def acquire(self, closed: Callable[[], bool] = lambda: False) -> None:
        """Wait until this process holds the lock (retrying, so a cancelled task can stop)."""
        with self._gate:
            with self._mutex:
                if self._holders:
                    self._holders += 1
                    return
            fd = _open(self.path)
            try:
                while not _try_flock(fd, fcntl.LOCK_EX):
                    if closed():
                        raise GpuLockClosed(f"the worker closed while waiting for {self.path}")
                    time.sleep(RETRY_EVERY)
            except BaseException:
                os.close(fd)
                raise
            with self._mutex:
                self._fd, self._holders = fd, 1

    def release(self) -> None:
        with self._mutex:
            self._holders -= 1
            if self._holders == 0 and self._fd is not None:
                os.close(self._fd)  # closing the file releases the flock
                self._fd = None

    def held_elsewhere(self) -> bool:
        """Does another process hold it? Never blocks."""
        if self._holders:
            return False
        fd = _open(self.path)
        try:
            return not _try_flock(fd, fcntl.LOCK_SH)
        finally:
            os.close(fd)


def _try_flock(fd: int, kind: int) -> bool:
    try:
        fcntl.flock(fd, kind | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


@contextlib.contextmanager
def _holding(locks: Iterable[OsLock], closed: Callable[[], bool]) -> Iterator[None]:
    with contextlib.ExitStack() as stack:
        for lock in locks:
            lock.acquire(closed)
            stack.callback(lock.release)
        yield


class GpuLockingThreadPoolExecutor(ThreadPoolExecutor):
    """Dask's task thread pool, each task running inside :meth:`GpuGuard.holding`.

    A subclass of Dask's own pool, so that the worker runs and closes it as its default one.
    """

    def __init__(self, guard: GpuGuard, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.guard = guard

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        return super().submit(self.guard.holding, fn, *args, **kwargs)


class GpuGuard(WorkerPlugin):
    """Takes this worker's GPU locks around each task, and pauses a one-GPU worker while
    its GPU is reserved by another worker (see the module docstring)."""

    name = "dash-gpu-locks"

    def __init__(self, directory: str | os.PathLike[str], gpus: Iterable[str], reserve: bool):
        self.directory = Path(directory)
        self.gpus = sorted(gpus)
        self.reserve = reserve
        self.locks = [OsLock(self.directory / f"{gpu}.lock") for gpu in self.gpus]
        self.reservations = [OsLock(self.directory / f"{gpu}.reserve") for gpu in self.gpus]
        self.worker: Any = None
        self._closed = False
        self._pausing = False
        self._saved_pause_fraction: Any = None
        self._check: PeriodicCallback | None = None

    def setup(self, worker: Any) -> None:
        self.worker = worker
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        old = worker.executors["default"]
        worker.executors["default"] = GpuLockingThreadPoolExecutor(
            self, old._max_workers, thread_name_prefix=old._thread_name_prefix
        )
        old.shutdown(wait=False)
        if not self.reserve:
            self._check = PeriodicCallback(self.check, CHECK_EVERY_MS)
            self._check.start()

    def teardown(self, worker: Any) -> None:
        self._closed = True
        if self._check is not None:
            self._check.stop()

    def holding(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        """Run ``fn`` holding this worker's GPUs (and their reservations, if it reserves)."""
        reservations = self.reservations if self.reserve else []
        with _holding([*reservations, *self.locks], self._is_closed):
            return fn(*args, **kwargs)

    def _is_closed(self) -> bool:
        return self._closed

    def check(self) -> None:
        """Pause while another worker reserves one of our GPUs; resume when none does."""
        pairs = zip(self.gpus, self.reservations, strict=True)
        reserved = [gpu for gpu, reservation in pairs if reservation.held_elsewhere()]
        if reserved and not self._pausing:
            self._pause(reserved)
        elif not reserved and self._pausing:
            self._resume()

    def _pause(self, gpus: list[str]) -> None:
        worker = self.worker
        if worker.status not in (Status.running, Status.paused):
            return
        log.info("pausing: GPU %s is reserved by another worker of this machine", ", ".join(gpus))
        self._pausing = True
        # Dask's memory monitor resumes a paused worker whose memory is low: keep it from
        # undoing this pause (it pauses again, if it must, once this one ends).
        memory = worker.memory_manager
        self._saved_pause_fraction = memory.memory_pause_fraction
        memory.memory_pause_fraction = False
        if worker.status == Status.running:
            worker.status = Status.paused

    def _resume(self) -> None:
        worker = self.worker
        self._pausing = False
        worker.memory_manager.memory_pause_fraction = self._saved_pause_fraction
        if worker.status == Status.paused:
            log.info("resuming: no other worker of this machine reserves its GPU")
            worker.status = Status.running


def lock_config(directory: str, gpus: Iterable[str], reserve: bool) -> str:
    """The value of ``DASH_GPU_LOCKS`` for a worker of these GPUs."""
    return json.dumps({"dir": directory, "gpus": list(gpus), "reserve": reserve})


def dask_setup(worker: Any) -> None:
    """Preload hook: guard this worker's GPUs if its agent asked for it."""
    text = os.environ.pop(LOCKS_ENV, None)
    if not text:
        return
    config = json.loads(text)
    plugin = GpuGuard(config["dir"], config["gpus"], bool(config["reserve"]))
    worker.plugins[plugin.name] = plugin
    plugin.setup(worker)
