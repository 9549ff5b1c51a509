"""``magic_roundtrip``: a trivial ``%%dash`` cell vs ``client.submit(f).result()`` in one kernel."""

from __future__ import annotations

import time
from typing import Any

from .harness import Benchmark, Context, Result, interleave, median, percentile, tests_module

SETUP = """\
%load_ext dash_kernel
import dash_kernel as dk
client = dk.connect().client
def one():
    return 1
"""
DASH_CELL = "%%dash\nx = 1"
DASK_CELL = "x = client.submit(one, pure=False).result()"
WARMUP = 3


def _execute_ms(kernel: Any, code: str) -> float:
    """Milliseconds from sending ``code`` until the kernel is idle again, as a client sees it."""
    start = time.perf_counter()
    execution = kernel.execute(code, timeout=120)
    elapsed = time.perf_counter() - start
    if execution.status != "ok":
        raise RuntimeError(f"cell {code!r} failed:\n{execution.traceback_text()}")
    return elapsed * 1000


def run(ctx: Context) -> Result:
    gateway = ctx.gateway()
    kernel = tests_module("kernels").KernelDriver(env=gateway.env, cwd=str(ctx.directory("kernel")))
    try:
        _execute_ms(kernel, SETUP)
        dash, dask = interleave(
            lambda: _execute_ms(kernel, DASH_CELL),
            lambda: _execute_ms(kernel, DASK_CELL),
            ctx.sizes.roundtrip_reps,
            warmup=WARMUP,
        )
    finally:
        kernel.shutdown()
    return Result(
        dash=median(dash),
        baseline=median(dask),
        n=len(dash),
        extra={"dash_p95": percentile(dash, 95), "baseline_p95": percentile(dask, 95)},
    )


MAGIC_ROUNDTRIP = Benchmark(
    id="magic_roundtrip",
    what="p50 of a trivial %%dash cell (x = 1) vs a cell doing client.submit(f).result() on the "
    "same cluster, in one IPython kernel, execute_request to idle",
    unit="ms",
    baseline_name="raw Dask submit().result()",
    run=run,
)
