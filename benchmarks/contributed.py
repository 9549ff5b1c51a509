"""``join`` and ``gpu_slots``: a contributed machine joining, and GPU workers kept for GPU work.

``join``: seconds from starting ``dash-worker join`` (probe, enrolment, a certificate from
the gateway, a nanny) to its worker returning a first task, against a plain ``dask worker``
started with a ready-made certificate against the same scheduler.

``gpu_slots``: a mixed workload (GPU tasks and many short CPU tasks) on CPU workers plus one
GPU worker; the share of the GPU worker's busy time taken by CPU tasks, under the DASH
scheduler against a plain Dask scheduler with the same workers and resources.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .harness import Benchmark, Context, Result, median, plain_worker_argv

GPU_MODEL = "NVIDIA L4"
GPU_DECLARATION = f"{GPU_MODEL}:24GB"
CPU_TASK_SECONDS, GPU_TASK_SECONDS = 0.1, 0.3
STOP_TIMEOUT = 30.0


def _noop() -> int:
    return 1


def _span(kind: str, seconds: float) -> tuple[str, str, float, float]:
    from distributed import get_worker

    start = time.time()
    time.sleep(seconds)
    return kind, get_worker().name, start, time.time()


@contextlib.contextmanager
def _process(argv: list[str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _join_argv(ctx: Context, name: str, *extra: str) -> list[str]:
    gateway = ctx.gateway()
    return [
        sys.executable, "-m", "dash_worker", "join", gateway.url,
        "--token", gateway.invite()["token"], "--name", name,
        "--config-dir", str(ctx.directory(f"agent-{name}")), *extra,
    ]  # fmt: skip


def _seconds_to_first_task(client: Any, argv: list[str], worker: str, log: Path) -> float:
    start = time.perf_counter()
    with _process(argv, log):
        # A task pinned to a worker that has not joined yet waits for it.
        client.submit(_noop, workers=[worker], pure=False).result(timeout=120)
        return time.perf_counter() - start


def run_join(ctx: Context) -> Result:
    from dash_gateway.policy import LOCAL_MACHINE
    from dash_gateway.tls import CertificateAuthority

    gateway = ctx.gateway()
    client = ctx.connection().client
    scheduler = gateway.status()["scheduler"]
    ca = CertificateAuthority(gateway.data_dir / "tls")
    logs = ctx.directory("join-logs")
    dash, raw = [], []
    for i in range(ctx.sizes.startup_reps):
        name = f"bench{i}"
        argv = _join_argv(ctx, name, "--cpus", "1", "--memory", "1GB", "--gpus", "none")
        dash.append(_seconds_to_first_task(client, argv, f"{name}-cpu", logs / f"{name}.log"))

        # The same scheduler admits the gateway's own machine name with its CA's certificate.
        ca_file, cert, key = ca.issue("worker", LOCAL_MACHINE).write(logs, f"raw{i}")
        worker = f"{LOCAL_MACHINE}-raw{i}"
        argv = plain_worker_argv(scheduler, worker, ca_file, cert, key)
        raw.append(_seconds_to_first_task(client, argv, worker, logs / f"raw{i}.log"))
    return Result(dash=median(dash), baseline=median(raw), n=len(dash), extra={"dash_all": dash})


JOIN = Benchmark(
    id="join",
    what="dash-worker join (probe, enrol, certificate, nanny) until its first task returns "
    "vs a plain dask worker with a ready certificate",
    unit="s",
    baseline_name="dask worker",
    run=run_join,
)


def _workload(client: Any, gpu_tasks: int, cpu_tasks: int, gpu: dict[str, float]) -> list[Any]:
    # A CPU fan-out is under way when GPU work arrives, as when one user renders frames
    # while another trains: where do the CPU tasks go, and does the GPU work wait?
    futures = [client.submit(_span, "cpu", CPU_TASK_SECONDS, pure=False) for _ in range(cpu_tasks)]
    futures += [
        client.submit(_span, "gpu", GPU_TASK_SECONDS, resources=gpu, pure=False)
        for _ in range(gpu_tasks)
    ]
    return client.gather(futures)


def _gpu_slot_use(spans: list[Any], gpu_worker: str) -> tuple[float, float]:
    """The share of ``gpu_worker``'s busy time spent on CPU tasks, and the seconds from the
    first task's start until the last GPU task ended."""
    on_gpu = [(kind, end - start) for kind, worker, start, end in spans if worker == gpu_worker]
    busy = sum(seconds for _, seconds in on_gpu)
    taken = sum(seconds for kind, seconds in on_gpu if kind == "cpu")
    first = min(start for *_, start, _ in spans)
    gpu_done = max(end for kind, *_, end in spans if kind == "gpu")
    return (taken / busy if busy else 0.0), gpu_done - first


def run_gpu_slots(ctx: Context) -> Result:
    from dash_kernel.resources import ResourceSpec, worker_resources

    gpu_tasks, cpu_tasks = 8, 200 if ctx.sizes.mode != "tiny" else 40
    gpu = ResourceSpec.parse(gpu=1).to_dask()
    client = ctx.connection().client
    name = "slots"
    argv = _join_argv(ctx, name, "--cpus", "0", "--memory", "1GB", "--declare-gpu", GPU_DECLARATION)
    with _process(argv, ctx.directory("slots-logs") / "agent.log"):
        client.submit(_noop, resources=gpu, pure=False).result(timeout=120)
        dash_share, dash_gpu_done = _gpu_slot_use(
            _workload(client, gpu_tasks, cpu_tasks, gpu), f"{name}-gpu0"
        )

    # Plain Dask: the same three workers and resources, no DASH scheduler plugin.
    from distributed import Client, LocalCluster, Nanny

    with LocalCluster(n_workers=0, dashboard_address=None, processes=True) as cluster:
        cpu_resources = worker_resources(1, 2 * 10**9)
        gpu_resources = worker_resources(2, 10**9, gpu_model=GPU_MODEL, vram=24 * 10**9)
        specs = {
            "cpu-0": {"cls": Nanny, "options": {"nthreads": 1, "resources": cpu_resources}},
            "cpu-1": {"cls": Nanny, "options": {"nthreads": 1, "resources": cpu_resources}},
            "gpu0": {"cls": Nanny, "options": {"nthreads": 2, "resources": gpu_resources}},
        }
        for worker, spec in specs.items():
            spec["options"]["name"] = worker
        cluster.worker_spec.update(specs)
        cluster.scale(len(specs))
        with Client(cluster) as raw_client:
            raw_client.wait_for_workers(len(specs), timeout=120)
            raw_share, raw_gpu_done = _gpu_slot_use(
                _workload(raw_client, gpu_tasks, cpu_tasks, gpu), "gpu0"
            )
    return Result(
        dash=dash_share,
        baseline=raw_share,
        n=gpu_tasks + cpu_tasks,
        extra={"dash_gpu_work_done_s": dash_gpu_done, "baseline_gpu_work_done_s": raw_gpu_done},
    )


GPU_SLOTS = Benchmark(
    id="gpu_slots",
    what="share of a GPU worker's busy time taken by CPU tasks when 8 GPU tasks arrive "
    "during a fan-out of 0.1 s CPU tasks",
    unit="share",
    baseline_name="plain Dask scheduler",
    run=run_gpu_slots,
)
