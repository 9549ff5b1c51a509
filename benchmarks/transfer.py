"""``transfer``: a NumPy array to a worker and back, ``dk.remote`` vs raw scatter/submit/gather."""

from __future__ import annotations

import contextlib
import gc
import os
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil

import dash_kernel as dk

from .harness import Benchmark, Context, MiB, Result, interleave, median
from .tasks import identity

# The caller holds the array, the copy that comes back and a serialized copy in flight; the
# worker what it received and what it returns; on DASH's path (the array rides in the task
# graph) the scheduler holds it too.
COPIES_NEEDED = 8


def _vm_hwm(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise OSError("no VmHWM")


@contextlib.contextmanager
def peak_rss(pids: list[int]) -> Iterator[dict[int, int]]:
    """Yield a dict that holds, on exit, the peak RSS (bytes) of each process during the block.

    Linux resets a process's high-water mark on request, so the peak is exact; where it
    cannot, RSS is sampled every 2 ms.
    """
    out: dict[int, int] = {}
    try:
        for pid in pids:
            Path(f"/proc/{pid}/clear_refs").write_text("5")
        exact = True
    except OSError:
        exact = False
    if exact:
        yield out
        out.update({pid: _vm_hwm(pid) for pid in pids})
        return
    procs = [psutil.Process(pid) for pid in pids]
    peak = {proc.pid: proc.memory_info().rss for proc in procs}
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.002):
            for proc in procs:
                with contextlib.suppress(psutil.Error):
                    peak[proc.pid] = max(peak[proc.pid], proc.memory_info().rss)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        yield out
    finally:
        stop.set()
        sampler.join()
        out.update(peak)


def _scheduler_pid(ctx: Context) -> int | None:
    for proc in ctx.gateway().descendants():
        with contextlib.suppress(psutil.Error):
            if "dash_gateway.scheduler_process" in " ".join(proc.cmdline()):
                return proc.pid
    return None


def _size(requested: int) -> tuple[int, str | None]:
    """The array size to use: ``requested`` unless the machine lacks the memory for it."""
    size = requested
    while size > MiB and size * COPIES_NEEDED > psutil.virtual_memory().available:
        size //= 2
    if size == requested:
        return size, None
    return size, f"reduced from {requested // MiB} MiB to {size // MiB} MiB to fit in memory"


def _measure(
    call: Callable[[], Any], array: Any, pids: list[int], peaks: dict[int, list[int]]
) -> float:
    gc.collect()
    with peak_rss(pids) as peak:
        start = time.perf_counter()
        back = call()
        elapsed = time.perf_counter() - start
    for pid, value in peak.items():
        peaks.setdefault(pid, []).append(value)
    if back.shape != array.shape or not (back[:: 1 << 16] == array[:: 1 << 16]).all():
        raise RuntimeError("the array came back changed")
    return elapsed


def run(ctx: Context) -> Result:
    import numpy as np

    client = ctx.connection().client
    size, note = _size(ctx.sizes.transfer_bytes)
    array = np.random.default_rng(0).integers(0, 256, size=size, dtype=np.uint8)
    echo = dk.remote(identity)
    me, scheduler = os.getpid(), _scheduler_pid(ctx)
    pids = [me] if scheduler is None else [me, scheduler]
    dash_peaks: dict[int, list[int]] = {}
    dask_peaks: dict[int, list[int]] = {}
    caught: list[str] = []

    def dash_call() -> Any:
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            back = echo(array)
        caught.extend(str(w.message).splitlines()[0] for w in seen)
        return back

    def dask_call() -> Any:
        future = client.scatter(array)
        return client.submit(identity, future, pure=False).result()

    before = psutil.Process().memory_info().rss
    dash, dask = interleave(
        lambda: _measure(dash_call, array, pids, dash_peaks),
        lambda: _measure(dask_call, array, pids, dask_peaks),
        ctx.sizes.transfer_reps,
    )
    extra: dict[str, Any] = {
        "bytes": size,
        "rss_before_mib": before / MiB,
        "dash_peak_rss_mib": max(dash_peaks[me]) / MiB,
        "baseline_peak_rss_mib": max(dask_peaks[me]) / MiB,
    }
    if scheduler is not None:
        extra["dash_scheduler_peak_rss_mib"] = max(dash_peaks[scheduler]) / MiB
        extra["baseline_scheduler_peak_rss_mib"] = max(dask_peaks[scheduler]) / MiB
    if caught:
        extra["dash_warnings"] = sorted(set(caught))
    if note:
        extra["note"] = note
    return Result(median(dash), median(dask), len(dash), extra)


TRANSFER = Benchmark(
    id="transfer",
    what="a random uint8 NumPy array to a worker and back: dk.remote(identity)(arr) vs "
    "client.scatter + submit(identity) + result; peak RSS of the calling process (and of "
    "the scheduler) for each",
    unit="s",
    baseline_name="raw Dask scatter + submit + gather",
    run=run,
)
