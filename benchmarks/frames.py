"""``frames``: render-like CPU frames through ``dk.map`` on 2 workers vs the ideal serial time / 2."""

from __future__ import annotations

import time

import dash_kernel as dk

from .harness import LOCAL_WORKERS, Benchmark, Context, Result, interleave, median, timed
from .tasks import spin

CALIBRATION_ITERATIONS = 200_000
SERIAL_SAMPLES = 5


def calibrate(frame_seconds: float) -> int:
    """Busy-loop iterations for one frame of about ``frame_seconds`` here."""
    # The fastest of a few runs is the one least disturbed by anything else on the machine.
    per_iteration = min(timed(lambda: spin(CALIBRATION_ITERATIONS)) for _ in range(5))
    iterations = max(1, round(frame_seconds / per_iteration * CALIBRATION_ITERATIONS))
    # A frame-long loop runs faster per iteration than the short one; correct for it once.
    frame = min(timed(lambda: spin(iterations)) for _ in range(3))
    return max(1, round(iterations * frame_seconds / frame))


def serial_frame_seconds(iterations: int) -> float:
    """The median time one frame takes run serially in this process, right now."""
    return median([timed(lambda: spin(iterations)) for _ in range(SERIAL_SAMPLES)])


def run(ctx: Context) -> Result:
    client = ctx.connection().client
    iterations = calibrate(ctx.sizes.frame_seconds)
    frames = [iterations] * ctx.sizes.frames
    serial: list[float] = []

    def ideal() -> None:
        # Sampled before every run: on a shared VM the CPU's speed drifts by tens of
        # percent within a minute, and a single calibration would misstate the ideal.
        serial.append(serial_frame_seconds(iterations))

    def dash_makespan() -> float:
        ideal()
        start = time.perf_counter()
        dk.map(spin, frames, progress=False)
        return time.perf_counter() - start

    def dask_makespan() -> float:
        ideal()
        start = time.perf_counter()
        client.gather(client.map(spin, frames, pure=False))
        return time.perf_counter() - start

    # Warm up with a few frames, not a whole run: the workers' code paths, not the work.
    dk.map(spin, frames[:4], progress=False)
    client.gather(client.map(spin, frames[:4], pure=False))
    dash, dask = interleave(dash_makespan, dask_makespan, ctx.sizes.frames_reps, warmup=0)
    frame_seconds = median(serial)
    ideal_makespan = frame_seconds * len(frames) / LOCAL_WORKERS
    return Result(
        dash=median(dash),
        baseline=ideal_makespan,
        n=len(dash),
        extra={
            "frames": len(frames),
            "frame_seconds": frame_seconds,
            "frame_seconds_min": min(serial),
            "frame_seconds_max": max(serial),
            "dask_makespan": median(dask),
            "dask_ratio": median(dask) / ideal_makespan,
        },
    )


FRAMES = Benchmark(
    id="frames",
    what="makespan of N frames of ~50 ms busy-loop CPU work via dk.map on 2 workers vs the "
    "ideal: N x the serial frame time (measured here before each run) / 2; dask_makespan "
    "is raw client.map on the same cluster",
    unit="s",
    baseline_name="ideal: serial time / 2 workers",
    run=run,
)
