"""``transfer``: a NumPy array to a worker and back, ``dk.remote`` vs raw scatter/submit/gather."""

from __future__ import annotations

import contextlib
import gc
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

# The caller holds the array, the copy that comes back and a serialized copy in flight;
# the worker holds what it received and what it returns.
COPIES_NEEDED = 6
_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _rss() -> int:
    return psutil.Process().memory_info().rss


@contextlib.contextmanager
def peak_rss() -> Iterator[list[int]]:
    """Yield a list that holds, on exit, the peak RSS (bytes) of this process during the block.

    Linux resets the high-water mark on request, so the peak is exact; elsewhere it is sampled.
    """
    out: list[int] = []
    try:
        _CLEAR_REFS.write_text("5")
        exact = True
    except OSError:
        exact = False
    if exact:
        yield out
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                out.append(int(line.split()[1]) * 1024)
        return
    peak = [_rss()]
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.002):
            peak[0] = max(peak[0], _rss())

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        yield out
    finally:
        stop.set()
        sampler.join()
        out.append(max(peak[0], _rss()))


def _size(requested: int) -> tuple[int, str | None]:
    """The array size to use: ``requested`` unless the machine lacks the memory for it."""
    size = requested
    while size > MiB and size * COPIES_NEEDED > psutil.virtual_memory().available:
        size //= 2
    if size == requested:
        return size, None
    return size, f"reduced from {requested // MiB} MiB to {size // MiB} MiB to fit in memory"


def _measure(call: Callable[[], Any], array: Any, peaks: list[int]) -> float:
    gc.collect()
    with peak_rss() as peak:
        start = time.perf_counter()
        back = call()
        elapsed = time.perf_counter() - start
    peaks.append(peak[0])
    if back.shape != array.shape or not (back[:: 1 << 16] == array[:: 1 << 16]).all():
        raise RuntimeError("the array came back changed")
    return elapsed


def run(ctx: Context) -> Result:
    import numpy as np

    client = ctx.connection().client
    size, note = _size(ctx.sizes.transfer_bytes)
    array = np.random.default_rng(0).integers(0, 256, size=size, dtype=np.uint8)
    echo = dk.remote(identity)
    dash_peaks: list[int] = []
    dask_peaks: list[int] = []
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

    before = _rss()
    dash, dask = interleave(
        lambda: _measure(dash_call, array, dash_peaks),
        lambda: _measure(dask_call, array, dask_peaks),
        ctx.sizes.transfer_reps,
    )
    extra: dict[str, Any] = {
        "bytes": size,
        "rss_before_mib": before / MiB,
        "dash_peak_rss_mib": max(dash_peaks) / MiB,
        "baseline_peak_rss_mib": max(dask_peaks) / MiB,
    }
    if caught:
        extra["dash_warnings"] = sorted(set(caught))
    if note:
        extra["note"] = note
    return Result(median(dash), median(dask), len(dash), extra)


TRANSFER = Benchmark(
    id="transfer",
    what="a random uint8 NumPy array to a worker and back: dk.remote(identity)(arr) vs "
    "client.scatter + submit(identity) + result; peak RSS of the calling process for each",
    unit="s",
    baseline_name="raw Dask scatter + submit + gather",
    run=run,
)
