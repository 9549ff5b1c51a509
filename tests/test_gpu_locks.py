"""The per-GPU locks and the pause that keep a machine's workers off each other's GPUs,
with real processes and a real Dask scheduler and worker."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from distributed import Client, Scheduler, Worker
from distributed.core import Status

from dash_worker.gpu_locks import GpuGuard, GpuLockClosed, GpuLockingThreadPoolExecutor, OsLock

HOLD = """
import sys, time
from pathlib import Path
from dash_worker.gpu_locks import OsLock
lock = OsLock(Path(sys.argv[1]))
lock.acquire()
print("held", flush=True)
sys.stdin.read()
"""


def hold_in_another_process(path: Path) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None and proc.stdout.readline() == "held\n"
    return proc


def test_a_lock_is_one_process_at_a_time_and_shared_by_its_threads(tmp_path: Path) -> None:
    path = tmp_path / "gpu0.lock"
    mine = OsLock(path)
    mine.acquire()
    mine.acquire()  # a second thread of the same worker shares the hold
    mine.release()
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    time.sleep(1.0)
    assert proc.poll() is None and proc.stdout is not None
    mine.release()  # now the other process gets it
    assert proc.stdout.readline() == b"held\n"
    assert OsLock(path).held_elsewhere()
    proc.stdin.close()
    proc.wait(10)
    assert not OsLock(path).held_elsewhere()  # a lock dies with its process


def test_waiting_for_a_lock_ends_when_the_worker_closes(tmp_path: Path) -> None:
    proc = hold_in_another_process(tmp_path / "gpu0.lock")
    try:
        closed = threading.Event()
        threading.Timer(0.3, closed.set).start()
        with pytest.raises(GpuLockClosed):
            OsLock(tmp_path / "gpu0.lock").acquire(closed.is_set)
    finally:
        proc.communicate("")


def test_a_one_gpu_worker_pauses_while_its_gpu_is_reserved(tmp_path: Path) -> None:
    asyncio.run(_pause_and_resume(tmp_path))


async def _pause_and_resume(tmp_path: Path) -> None:
    # A memory limit, so Dask's memory monitor runs: it must not undo the pause.
    async with (
        Scheduler(dashboard_address=":0", port=0) as scheduler,
        Worker(scheduler.address, nthreads=1, memory_limit="4GB") as worker,
        Client(scheduler.address, asynchronous=True) as client,
    ):
        guard = GpuGuard(tmp_path, ["gpu-a"], reserve=False)
        worker.plugins[guard.name] = guard
        guard.setup(worker)
        assert isinstance(worker.executors["default"], GpuLockingThreadPoolExecutor)
        ws = scheduler.workers[worker.address]
        reservation = await asyncio.to_thread(hold_in_another_process, tmp_path / "gpu-a.reserve")
        try:
            await _until(lambda: ws.status == Status.paused)
            future = client.submit(time.time, pure=False)
            await asyncio.sleep(1.0)  # ten memory-monitor ticks
            assert ws.status == Status.paused and worker.status == Status.paused
            assert future.status == "pending"
            reservation.communicate("")
            await _until(lambda: ws.status == Status.running)
            assert (await future) > 0
            # A task runs holding the GPU's lock (as seen through another file), and
            # lets go of it after.
            lock = str(tmp_path / "gpu-a.lock")
            assert await client.submit(_locked, lock, pure=False)
            assert not _locked(lock)
        finally:
            if reservation.poll() is None:
                reservation.communicate("")
        assert worker.memory_manager.memory_pause_fraction == 0.8


def _locked(path: str) -> bool:
    return OsLock(Path(path)).held_elsewhere()


async def _until(condition, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.05)
