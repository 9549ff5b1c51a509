"""``cell_roundtrip`` and ``startup``: the DASH distributed kernel against ipyparallel and ipykernel."""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .harness import (
    REPO,
    Benchmark,
    Context,
    Result,
    environment,
    interleave,
    median,
    percentile,
    tests_module,
)
from .magic import _execute_ms

TRIVIAL = "x = 1"
PX_SETUP = """\
import ipyparallel as ipp
cluster = ipp.Cluster(n=1, log_level=40)
rc = cluster.start_and_connect_sync()
rc.wait_for_engines(1, timeout=120)
rc.activate()
"""
PX_CELL = "%%px\nx = 1"
PX_STOP = "cluster.stop_cluster_sync()"
WARMUP = 3


@contextmanager
def dash_kernelspec(ctx: Context) -> Iterator[None]:
    """The repository's "DASH distributed" kernelspec, findable as ``dash``."""
    root = ctx.directory("jupyter-path")
    target = Path(root) / "kernels" / "dash"
    if not target.exists():
        shutil.copytree(REPO / "kernelspecs" / "dash", target)
    with environment(JUPYTER_PATH=str(root)):
        yield


def _kernel(ctx: Context, name: str, env: dict[str, str]) -> Any:
    return tests_module("kernels").KernelDriver(
        kernel_name=name, env=env, cwd=str(ctx.directory("kernel"))
    )


def run_cell_roundtrip(ctx: Context) -> Result:
    gateway = ctx.gateway()
    with dash_kernelspec(ctx):
        dash_kernel = _kernel(ctx, "dash", gateway.env)
        plain = _kernel(ctx, "python3", dict(os.environ, PYTHONPATH=str(REPO)))
        try:
            _execute_ms(dash_kernel, "import os")  # opens the remote session
            _execute_ms(plain, PX_SETUP)
            dash, px = interleave(
                lambda: _execute_ms(dash_kernel, TRIVIAL),
                lambda: _execute_ms(plain, PX_CELL),
                ctx.sizes.roundtrip_reps,
                warmup=WARMUP,
            )
            local = [_execute_ms(plain, TRIVIAL) for _ in range(ctx.sizes.roundtrip_reps)]
            _execute_ms(plain, PX_STOP)
        finally:
            dash_kernel.shutdown()
            plain.shutdown()
    return Result(
        dash=median(dash),
        baseline=median(px),
        n=len(dash),
        extra={
            "dash_p95": percentile(dash, 95),
            "baseline_p95": percentile(px, 95),
            "local_ipykernel_p50": median(local),
            "ratio_vs_local_ipykernel": median(dash) / median(local),
        },
    )


def _start_to_first_result(ctx: Context, name: str, env: dict[str, str]) -> float:
    start = time.perf_counter()
    kernel = _kernel(ctx, name, env)
    try:
        run = kernel.execute("1 + 1", timeout=180)
        if run.status != "ok":
            raise RuntimeError(f"first cell failed in {name}:\n{run.traceback_text()}")
        return time.perf_counter() - start
    finally:
        kernel.shutdown()


def run_startup(ctx: Context) -> Result:
    gateway = ctx.gateway()
    with dash_kernelspec(ctx):
        dash, plain = interleave(
            lambda: _start_to_first_result(ctx, "dash", gateway.env),
            lambda: _start_to_first_result(ctx, "python3", dict(os.environ)),
            ctx.sizes.startup_reps,
            warmup=0,
        )
    return Result(dash=median(dash), baseline=median(plain), n=len(dash))


CELL_ROUNDTRIP = Benchmark(
    id="cell_roundtrip",
    what="p50 of a trivial cell (x = 1) in the DASH kernel (remote session on a worker) vs "
    "ipyparallel's %%px on one engine, execute_request to idle; a local ipykernel's p50 is in "
    "the row too",
    unit="ms",
    baseline_name="ipyparallel %%px, one engine",
    run=run_cell_roundtrip,
)

STARTUP = Benchmark(
    id="startup",
    what="kernel start to the first cell's result: DASH kernel (which opens a remote session) "
    "vs a local ipykernel",
    unit="s",
    baseline_name="local ipykernel",
    run=run_startup,
)
