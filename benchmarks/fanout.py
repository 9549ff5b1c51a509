"""``fanout`` and ``fanout_ipyparallel``: ``dk.map`` over no-op items vs raw Dask and ipyparallel."""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable, Iterator
from typing import Any

import dash_kernel as dk

from .harness import REPO, Benchmark, Context, Result, environment, interleave, median
from .tasks import noop

US = 1e6
WARMUP_ITEMS = 100


def _check(results: list[Any], items: list[int]) -> None:
    if list(results) != items:
        raise RuntimeError("a fan-out returned wrong results")


def _dash_us_per_item(items: list[int]) -> float:
    start = time.perf_counter()
    results = dk.map(noop, items, progress=False)
    elapsed = time.perf_counter() - start
    _check(results, items)
    return elapsed / len(items) * US


def _warm_up(items: list[int], baseline: Callable[[list[int]], Any]) -> None:
    # A short warm-up (connections, code paths): a full-size one would double the row's time.
    few = items[:WARMUP_ITEMS]
    dk.map(noop, few, progress=False)
    baseline(few)


def run_dask(ctx: Context) -> Result:
    client = ctx.connection().client
    items = list(range(ctx.sizes.fanout_items))

    def dask_us_per_item() -> float:
        start = time.perf_counter()
        results = client.gather(client.map(noop, items, pure=False))
        elapsed = time.perf_counter() - start
        _check(results, items)
        return elapsed / len(items) * US

    _warm_up(items, lambda few: client.gather(client.map(noop, few, pure=False)))
    dash, dask = interleave(
        lambda: _dash_us_per_item(items), dask_us_per_item, ctx.sizes.fanout_reps, warmup=0
    )
    return Result(median(dash), median(dask), len(dash), {"items": len(items)})


@contextlib.contextmanager
def ipp_view(ctx: Context) -> Iterator[Any]:
    """A load-balanced view on a fresh 2-engine ipyparallel cluster, stopped afterwards."""
    import ipyparallel as ipp

    # Engines import the no-op by reference from this checkout, ipyparallel's own way.
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    cluster = ipp.Cluster(n=2, profile_dir=str(ctx.directory("ipython")), log_level=logging.WARNING)
    client = None
    try:
        with environment(PYTHONPATH=path):
            client = cluster.start_and_connect_sync()
        yield client.load_balanced_view()
    finally:
        if client is not None:
            client.close()
        cluster.stop_cluster_sync()


def run_ipyparallel(ctx: Context) -> Result:
    ctx.connection()
    items = list(range(ctx.sizes.fanout_items))
    started = time.perf_counter()
    with ipp_view(ctx) as view:
        start_seconds = time.perf_counter() - started

        def ipp_us_per_item() -> float:
            start = time.perf_counter()
            results = view.map_sync(noop, items)
            elapsed = time.perf_counter() - start
            _check(results, items)
            return elapsed / len(items) * US

        _warm_up(items, lambda few: view.map_sync(noop, few))
        dash, ipp_values = interleave(
            lambda: _dash_us_per_item(items), ipp_us_per_item, ctx.sizes.ipp_reps, warmup=0
        )
    return Result(
        median(dash),
        median(ipp_values),
        len(dash),
        {"items": len(items), "ipyparallel_start_s": start_seconds},
    )


FANOUT = Benchmark(
    id="fanout",
    what="dk.map(progress=False) over N no-op items vs client.map + client.gather on the same "
    "cluster, time per item",
    unit="us/item",
    baseline_name="raw Dask client.map + gather",
    run=run_dask,
)

FANOUT_IPYPARALLEL = Benchmark(
    id="fanout_ipyparallel",
    what="dk.map(progress=False) over N no-op items vs ipyparallel load_balanced_view().map_sync "
    "on 2 engines, time per item",
    unit="us/item",
    baseline_name="ipyparallel load-balanced map_sync",
    run=run_ipyparallel,
)
