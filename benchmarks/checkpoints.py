"""``restore``: putting a session's checkpoint back into a session vs loading that checkpoint directly.

A DASH kernel's session holds arrays (``transfer_bytes`` in all) and some small Python
values. Each repetition changes every array byte and takes a checkpoint (not timed), then
times, as the notebook sees it: ``%dash restore NAME`` (load every variable and put it
into the session's namespace) against a cell doing ``dk.load(NAME)`` (the same chunks,
loaded as one dict). The workers' chunk cache is off, so both read storage every time.
Once, at the end, the session's kernel is killed and the time until the next cell has run
in a new session with the variables restored is recorded too.
"""

from __future__ import annotations

import re
import time
from typing import Any

from .harness import Benchmark, Context, Result, environment, interleave, median, tests_module
from .kernel import dash_kernelspec
from .magic import _execute_ms

SETUP = """\
import numpy as np
import dash_kernel as dk
rng = np.random.default_rng(0)
weights = rng.integers(0, 256, size={big}, dtype=np.uint8)
embeddings = rng.integers(0, 256, size={small}, dtype=np.uint8)
vocabulary = {{f"token{{i}}": i for i in range(10_000)}}
history = [{{"epoch": i, "loss": 1 / (i + 1)}} for i in range(1_000)]
"""
CHANGE = "weights += 1\nembeddings += 1"
DIRECT = "loaded = dk.load({name!r})\nassert loaded['weights'].nbytes == weights.nbytes\ndel loaded"


def _seconds(kernel: Any, code: str) -> float:
    return _execute_ms(kernel, code) / 1000


def run(ctx: Context) -> Result:
    nbytes = ctx.sizes.transfer_bytes
    workdir = ctx.directory("restore")
    with environment(DASH_CACHE_SIZE="0"), dash_kernelspec(ctx):
        gateway = tests_module("conftest").launch_gateway(
            workdir / "gateway", local_workers=1, worker_memory_limit="8GB"
        )
        try:
            gateway.wait_for_workers(1)
            kernel = tests_module("kernels").KernelDriver(
                kernel_name="dash", env=gateway.env, cwd=str(workdir)
            )
            try:
                return _compare(kernel, nbytes, ctx.sizes.transfer_reps)
            finally:
                kernel.shutdown()
        finally:
            gateway.stop()


def _compare(kernel: Any, nbytes: int, reps: int) -> Result:
    _seconds(kernel, "%dash checkpoint off")  # only the checkpoints taken here
    _seconds(kernel, SETUP.format(big=nbytes * 3 // 4, small=nbytes - nbytes * 3 // 4))
    name = kernel.execute("%%local\nprint(get_ipython().kernel.checkpoint_name)").stream().strip()

    def change_and_checkpoint() -> None:
        _seconds(kernel, CHANGE)
        _seconds(kernel, "%dash checkpoint")

    def restore() -> float:
        change_and_checkpoint()
        return _seconds(kernel, f"%dash restore {name}")

    def direct() -> float:
        change_and_checkpoint()
        return _seconds(kernel, DIRECT.format(name=name))

    restored, loaded = interleave(restore, direct, reps, warmup=1)

    # A lost session: checkpoints on, the kernel killed, the next cell restored elsewhere.
    _seconds(kernel, "%dash checkpoint on")
    kernel.execute("import os\nos._exit(1)", timeout=120)
    start = time.perf_counter()
    after = kernel.execute("print(int(weights[0]), len(vocabulary))", timeout=600)
    recover = time.perf_counter() - start
    notice = after.stream("stderr")
    if after.status != "ok" or "Restored its variables" not in notice:
        raise RuntimeError(f"the lost session was not restored:\n{notice}{after.traceback_text()}")
    in_session = re.search(r", ([0-9.]+) s\)\.", notice)
    return Result(
        dash=median(restored),
        baseline=median(loaded),
        n=len(restored),
        extra={
            "bytes": nbytes,
            "recover_after_loss_s": recover,
            "restore_within_recovery_s": float(in_session.group(1)) if in_session else None,
        },
    )


RESTORE = Benchmark(
    id="restore",
    what="%dash restore of a session checkpoint (arrays plus small values) vs dk.load of the "
    "same checkpoint in a cell, worker chunk cache off",
    unit="s",
    baseline_name="dk.load",
    run=run,
)
