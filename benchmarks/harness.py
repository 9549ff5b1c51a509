"""The runner: one real gateway, interleaved DASH/baseline repetitions, medians, ratios, machine info."""

from __future__ import annotations

import contextlib
import datetime
import importlib
import os
import platform
import shutil
import statistics
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import psutil

REPO = Path(__file__).resolve().parent.parent
TESTS_DIR = REPO / "tests"
LOCAL_WORKERS = 2
# Room for the full run's 1 GiB transfer (the array, its copy back, and Dask's own
# copies) without spilling, which would measure the disk instead of the transfer.
WORKER_MEMORY_LIMIT = "8GB"

IDS = (
    "cell_roundtrip",
    "magic_roundtrip",
    "fanout",
    "fanout_ipyparallel",
    "frames",
    "transfer",
    "storage",
    "restore",
    "startup",
    "join",
    "gpu_slots",
    "lease",
)

MiB = 1 << 20


@dataclass(frozen=True)
class Sizes:
    """How much work and how many repetitions each comparison gets in one mode."""

    mode: str
    roundtrip_reps: int
    fanout_items: int
    fanout_reps: int
    ipp_reps: int
    frames: int
    frames_reps: int
    frame_seconds: float
    transfer_bytes: int
    transfer_reps: int
    startup_reps: int


# Full takes about 20 minutes on a 2-core VM, where a no-op Dask task costs ~4 ms.
FULL = Sizes("full", 200, 10_000, 3, 3, 1_200, 3, 0.05, 1024 * MiB, 5, 5)
QUICK = Sizes("quick", 20, 2_000, 3, 3, 120, 3, 0.05, 64 * MiB, 5, 3)
# For tests/test_benchmarks.py: the whole pipeline in well under a minute.
TINY = Sizes("tiny", 5, 100, 2, 1, 8, 1, 0.02, 4 * MiB, 2, 1)


@dataclass
class Result:
    """What a comparison measured: DASH's and the baseline's cost, and anything else worth keeping."""

    dash: float
    baseline: float
    n: int
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Benchmark:
    """One comparison: a runner, or the reason it cannot run yet (``missing``)."""

    id: str
    what: str
    unit: str
    baseline_name: str
    run: Callable[[Context], Result] | None = None
    missing: str | None = None


@dataclass
class Row:
    """One line of the report, as it goes into the JSON."""

    id: str
    what: str
    unit: str
    baseline_name: str
    dash: float | None = None
    baseline: float | None = None
    n: int | None = None
    missing: bool = False
    failed: bool = False
    reason: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ratio(self) -> float | None:
        if self.dash is None or not self.baseline:
            return None
        return self.dash / self.baseline

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": self.id,
            "what": self.what,
            "dash": _round(self.dash),
            "baseline": _round(self.baseline),
            "baseline_name": self.baseline_name,
            "unit": self.unit,
            "ratio": _round(self.ratio),
            "n": self.n,
        }
        if self.missing:
            out["missing"] = True
        if self.failed:
            out["failed"] = True
        if self.reason:
            out["reason"] = self.reason
        out.update({key: _round(value) for key, value in self.extra.items()})
        return out


def _round(value: Any) -> Any:
    return float(f"{value:.6g}") if isinstance(value, float) else value


def all_benchmarks() -> list[Benchmark]:
    """Every comparison, in report order."""
    from . import (
        checkpoints,
        contributed,
        fanout,
        frames,
        kernel,
        magic,
        storage,
        tenancy,
        transfer,
    )

    found = [
        kernel.CELL_ROUNDTRIP,
        magic.MAGIC_ROUNDTRIP,
        fanout.FANOUT,
        fanout.FANOUT_IPYPARALLEL,
        frames.FRAMES,
        transfer.TRANSFER,
        storage.STORAGE,
        checkpoints.RESTORE,
        kernel.STARTUP,
        contributed.JOIN,
        contributed.GPU_SLOTS,
        tenancy.LEASE,
    ]
    assert tuple(b.id for b in found) == IDS
    return found


# ---------------------------------------------------------------- measuring


def timed(fn: Callable[[], Any]) -> float:
    """Seconds ``fn()`` took."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def interleave(
    dash: Callable[[], float],
    baseline: Callable[[], float],
    reps: int,
    *,
    warmup: int = 1,
) -> tuple[list[float], list[float]]:
    """Run both ``reps`` times, alternating which goes first, after ``warmup`` unrecorded
    rounds; each callable returns its own measurement."""
    for _ in range(warmup):
        dash()
        baseline()
    dash_values: list[float] = []
    baseline_values: list[float] = []
    for i in range(reps):
        # Alternating the order cancels what running first or second does (caches, GC).
        if i % 2 == 0:
            dash_values.append(dash())
            baseline_values.append(baseline())
        else:
            baseline_values.append(baseline())
            dash_values.append(dash())
    return dash_values, baseline_values


def median(values: list[float]) -> float:
    return statistics.median(values)


def percentile(values: list[float], q: int) -> float:
    """The ``q``-th percentile (inclusive interpolation)."""
    if len(values) < 2:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


class OtherLoad:
    """Samples the CPU used by processes outside this run's process tree, to flag noise."""

    def __init__(self, interval: float = 1.0):
        self.interval = interval
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="other-load", daemon=True)

    def __enter__(self) -> OtherLoad:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()

    def mark(self) -> tuple[int, float, float]:
        return len(self.samples), psutil.cpu_times().steal, time.monotonic()

    def since(self, mark: tuple[int, float, float]) -> dict[str, float | None]:
        """Mean CPU cores others used since ``mark``, and cores the hypervisor stole."""
        index, steal, at = mark
        window = self.samples[index:]
        elapsed = max(time.monotonic() - at, 1e-9)
        return {
            "others_cpu_cores": round(sum(window) / len(window), 2) if window else None,
            "steal_cpu_cores": round((psutil.cpu_times().steal - steal) / elapsed, 2),
        }

    def _loop(self) -> None:
        me = psutil.Process()
        while not self._stop.wait(self.interval):
            with contextlib.suppress(psutil.Error):
                ours = {me.pid} | {p.pid for p in me.children(recursive=True)}
                busy = 0.0
                for proc in psutil.process_iter():
                    if proc.pid in ours:
                        continue
                    with contextlib.suppress(psutil.Error):
                        busy += proc.cpu_percent(None)
                self.samples.append(busy / 100)


# ---------------------------------------------------------------- the cluster


def plain_worker_argv(scheduler: str, name: str, ca: str, cert: str, key: str) -> list[str]:
    """A plain ``dask worker`` (one thread, 1 GB, a CPU worker by DASH's tags) with a ready
    certificate: the baseline for a DASH worker joining."""
    return [
        sys.executable, "-m", "distributed.cli.dask_worker", scheduler,
        "--name", name, "--nthreads", "1", "--memory-limit", "1GB", "--no-dashboard",
        "--tls-ca-file", ca, "--tls-cert", cert, "--tls-key", key,
        "--resources", "pool:cpu=1000000",
    ]  # fmt: skip


@contextlib.contextmanager
def environment(**changes: str) -> Iterator[None]:
    """Set environment variables for the duration (for children started meanwhile)."""
    saved = {name: os.environ.get(name) for name in changes}
    os.environ.update(changes)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def tests_module(name: str) -> ModuleType:
    """A helper module from ``tests/`` (``conftest``, ``kernels``)."""
    if str(TESTS_DIR) not in sys.path:
        sys.path.insert(0, str(TESTS_DIR))
    return importlib.import_module(name)


class Context:
    """What the comparisons share: sizes, a scratch directory, and one lazily started gateway
    (2 local workers) with a ``dk`` connection to it, all torn down by ``close``."""

    def __init__(self, sizes: Sizes, workdir: Path):
        self.sizes = sizes
        self.workdir = workdir
        self._cleanup = contextlib.ExitStack()
        self._gateway: Any = None
        self._gateway_error: BaseException | None = None
        self._connection: Any = None

    def directory(self, name: str) -> Path:
        path = self.workdir / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    def gateway(self) -> Any:
        """The running gateway (a ``tests/conftest.py`` ``Gateway``), started on first use."""
        if self._gateway_error is not None:
            raise RuntimeError(f"the gateway did not start: {self._gateway_error}")
        if self._gateway is None:
            launch_gateway = tests_module("conftest").launch_gateway
            print(f"starting dash-gateway with {LOCAL_WORKERS} local workers ...", flush=True)
            gateway = launch_gateway(
                self.directory("gateway"),
                local_workers=LOCAL_WORKERS,
                worker_memory_limit=WORKER_MEMORY_LIMIT,
            )
            self._cleanup.callback(self._stop_gateway, gateway)
            try:
                gateway.wait_for_workers(LOCAL_WORKERS)
            except BaseException as exc:  # pytest.fail raises a BaseException
                self._gateway_error = exc
                raise RuntimeError(f"the gateway did not start: {exc}") from None
            self._gateway = gateway
        return self._gateway

    def connection(self) -> Any:
        """This process's ``dk`` connection to the gateway (so ``dk.map`` uses it)."""
        if self._connection is None:
            import cloudpickle

            import dash_kernel as dk

            from . import tasks

            gateway = self.gateway()
            self._connection = dk.connect(gateway.url, gateway.token)
            self._cleanup.callback(dk.disconnect)
            # DASH ships this (uninstalled) package by value on its own; raw Dask needs
            # telling, and both then send the same bytes.
            cloudpickle.register_pickle_by_value(tasks)
        return self._connection

    @staticmethod
    def _stop_gateway(gateway: Any) -> None:
        print("stopping dash-gateway ...", flush=True)
        try:
            gateway.stop()
        except BaseException as exc:  # stop() reports leftovers with pytest.fail / assert
            print(f"warning: stopping the gateway: {exc}", file=sys.stderr)

    def close(self) -> None:
        self._cleanup.close()


# ---------------------------------------------------------------- the run


def machine_info() -> dict[str, Any]:
    import dask
    import distributed

    model = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "cpu_count": os.cpu_count(),
        "cpu_model": model,
        "ram_gib": round(psutil.virtual_memory().total / (1 << 30), 1),
        "python": platform.python_version(),
        "dask": dask.__version__,
        "distributed": distributed.__version__,
        "platform": platform.platform(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for package in ("dash-distributed", "ipyparallel", "numpy", "cloudpickle"):
        with contextlib.suppress(PackageNotFoundError):
            found[package] = version(package)
    return found


def run(sizes: Sizes, only: set[str] | None = None) -> dict[str, Any]:
    """Run the selected comparisons (all by default); return the report as JSON data."""
    rows: list[Row] = []
    workdir = Path(tempfile.mkdtemp(prefix="dash-bench-"))
    context = Context(sizes, workdir)
    started = time.time()
    idle_others = psutil.cpu_percent(interval=1.0) * (os.cpu_count() or 1) / 100
    try:
        with OtherLoad() as load:
            for bench in all_benchmarks():
                rows.append(_run_one(bench, context, load, only))
    finally:
        context.close()
        shutil.rmtree(workdir, ignore_errors=True)
    return {
        "machine": machine_info(),
        "run": {
            "mode": sizes.mode,
            "seconds": round(time.time() - started, 1),
            "cluster": f"dash-gateway, {LOCAL_WORKERS} local workers x 1 thread, "
            f"{WORKER_MEMORY_LIMIT} limit each",
            "cpu_cores_busy_before_start": round(idle_others, 2),
            "versions": _versions(),
        },
        "comparisons": [row.to_json() for row in rows],
    }


def _run_one(bench: Benchmark, context: Context, load: OtherLoad, only: set[str] | None) -> Row:
    row = Row(bench.id, bench.what, bench.unit, bench.baseline_name)
    if bench.run is None:
        row.missing, row.reason = True, bench.missing or "not built yet"
        return row
    if only is not None and bench.id not in only:
        row.missing, row.reason = True, "not run: not selected with --only"
        return row
    print(f"[{bench.id}] running ...", flush=True)
    mark = load.mark()
    try:
        result = bench.run(context)
    except Exception as exc:
        traceback.print_exc()
        row.failed, row.reason = True, f"failed: {type(exc).__name__}: {exc}"[:2000]
        return row
    row.dash, row.baseline, row.n = result.dash, result.baseline, result.n
    row.extra = {**result.extra, **load.since(mark)}
    print(f"[{bench.id}] dash {row.dash:.4g} vs {row.baseline:.4g} {row.unit}", flush=True)
    return row
