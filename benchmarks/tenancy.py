"""``lease``: a user's first task on a cold per-user cluster's lease, against a plain worker.

A gateway with ``tenancy='per-user'`` and one local slot; an account's client on its own
cluster. Each repetition waits until the pool is empty (the lease idled out), then times a
no-op task from submission to result: the broker sees the demand, leases the slot, and
``dash-worker serve`` starts a worker that registers. The baseline is a plain ``dask worker``
started at submission with a ready certificate of the same cluster, until the same task
returns. Also reported: lease granted → worker registered (median and p95), from the broker's
own record.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Any

from .harness import Benchmark, Context, Result, median, percentile, plain_worker_argv, tests_module

IDLE_TIMEOUT = 1.0


def _noop() -> int:
    return 1


def _leases(gateway: Any) -> list[dict[str, Any]]:
    code, reply = gateway.request("dash/api/pool")
    if code != 200:
        raise RuntimeError(f"GET /dash/api/pool answered {code}: {reply}")
    return list(reply["leases"])


def _wait_for_empty_pool(gateway: Any, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while _leases(gateway):
        if time.monotonic() > deadline:
            raise RuntimeError(f"the pool's leases did not end within {timeout:.0f}s")
        time.sleep(0.1)


def _seconds_to_registered(gateway: Any, timeout: float = 30) -> float:
    """The broker's record of the current lease: granted → registered (its scheduler's clock)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for lease in _leases(gateway):
            if lease["registered"] is not None:
                return float(lease["registered"] - lease["granted"])
        time.sleep(0.05)
    raise RuntimeError(f"no lease was recorded as registered within {timeout:.0f}s")


def run_lease(ctx: Context) -> Result:
    from distributed import Client
    from distributed.security import Security

    from dash_gateway.user_clusters import ClusterTLS, cluster_id

    conftest = tests_module("conftest")
    gateway = conftest.launch_gateway(
        ctx.directory("tenant-gateway"),
        local_workers=1,
        extra=["--tenancy=per-user", f"--DashGateway.lease_idle_timeout={IDLE_TIMEOUT}"],
    )
    logs = ctx.directory("lease-logs")
    try:
        gateway.wait_for_workers(0)
        token = gateway.add_users("bench")["bench"]
        code, info = gateway.request("dash/api/cluster", token=token)
        if code != 200:
            raise RuntimeError(f"GET /dash/api/cluster answered {code}: {info}")
        for name in ("ca", "cert", "key"):
            (logs / f"client-{name}.pem").write_text(info["tls"][name])
        security = Security(
            tls_ca_file=str(logs / "client-ca.pem"),
            tls_client_cert=str(logs / "client-cert.pem"),
            tls_client_key=str(logs / "client-key.pem"),
            require_encryption=True,
        )
        tls = ClusterTLS(
            gateway.data_dir / "clusters" / cluster_id("bench") / "tls", cluster_id("bench"), None
        )
        dash, raw, registered = [], [], []
        with Client(info["scheduler"], security=security, timeout=30) as client:
            for i in range(ctx.sizes.startup_reps):
                _wait_for_empty_pool(gateway)
                start = time.perf_counter()
                client.submit(_noop, pure=False).result(timeout=120)
                dash.append(time.perf_counter() - start)
                registered.append(_seconds_to_registered(gateway))
                _wait_for_empty_pool(gateway)
                raw.append(_plain_worker_first_task(client, info["scheduler"], tls, logs, i))
    finally:
        gateway.stop()
    return Result(
        dash=median(dash),
        baseline=median(raw),
        n=len(dash),
        extra={
            "granted_to_registered_median_s": median(registered),
            "granted_to_registered_p95_s": percentile(registered, 95),
            "dash_all": dash,
        },
    )


def _plain_worker_first_task(client: Any, scheduler: str, tls: Any, logs: Path, i: int) -> float:
    from dash_gateway.policy import LOCAL_MACHINE

    ca, cert, key = tls.lease_worker(LOCAL_MACHINE).write(logs, f"raw{i}")
    worker = f"{LOCAL_MACHINE}-raw{i}"
    argv = plain_worker_argv(scheduler, worker, ca, cert, key)
    start = time.perf_counter()
    with open(logs / f"raw{i}.log", "wb") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
    try:
        client.submit(_noop, workers=[worker], pure=False).result(timeout=120)
        return time.perf_counter() - start
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


LEASE = Benchmark(
    id="lease",
    what="a cold per-user cluster's first task: the broker leases a slot and its worker "
    "registers, until the task returns, vs a plain dask worker with a ready certificate",
    unit="s",
    baseline_name="dask worker",
    run=run_lease,
)
