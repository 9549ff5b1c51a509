"""The scheduler's DASH policy, in a real TLS scheduler with real workers: admission by
certificate, machine states from the policy file, and GPU workers kept for GPU work."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from distributed import Client, Scheduler, Worker, get_worker
from distributed.core import Status

from dash_gateway.policy import policy_path, write_policy
from dash_gateway.scheduler_plugin import DashSchedulerPlugin, PeerIdentity, admission_refusal
from dash_gateway.tls import CertificateAuthority, Credentials, security_for
from dash_kernel.resources import ResourceSpec, worker_resources

GiB = 2**30


def test_admission_rules() -> None:
    from dash_gateway.policy import ClusterPolicy

    policy = ClusterPolicy(machines={"rig": "active", "old": "revoked"}, revoked_serials={"AB"})
    worker = PeerIdentity(role="worker", name="rig", serial="1F")
    assert admission_refusal(worker, "rig-gpu0", policy) is None
    assert admission_refusal(worker, "rig", policy) is None
    assert "may only register workers named rig-" in admission_refusal(worker, "rigx-cpu", policy)
    client = PeerIdentity(role="client", name="rig", serial="1F")
    assert "a client certificate cannot register" in admission_refusal(client, "rig-cpu", policy)
    revoked = PeerIdentity(role="worker", name="rig", serial="AB")
    assert "was revoked" in admission_refusal(revoked, "rig-cpu", policy)
    assert "is revoked" in admission_refusal(PeerIdentity("worker", "old", "1"), "old-cpu", policy)
    assert "not registered" in admission_refusal(PeerIdentity("worker", "new", "1"), "new", policy)
    assert admission_refusal(None, "rig-cpu", policy) == "no verified client certificate"


class Pool:
    """A TLS scheduler with the DASH plugin, and helpers to add workers and a client."""

    def __init__(self, tmp: Path):
        self.ca = CertificateAuthority(tmp / "tls")
        self.policy_file = policy_path(tmp)
        self.scheduler: Scheduler | None = None
        self.workers: list[Worker] = []

    def set_policy(self, machines: dict[str, str], revoked: list[int] = ()) -> None:
        write_policy(self.policy_file, machines, revoked)

    async def start(self) -> None:
        plugin = DashSchedulerPlugin(self.policy_file, poll_interval=0.1)
        creds = self.ca.issue("scheduler", "dash-scheduler")
        self.scheduler = Scheduler(
            plugins=[plugin],
            host="127.0.0.1",
            protocol="tls",
            security=creds.security(),
            dashboard=False,
            dashboard_address="127.0.0.1:0",
        )
        plugin.install(self.scheduler)
        await self.scheduler

    async def add_worker(
        self, name: str, creds: Credentials, **resources: Any
    ) -> tuple[Worker, Credentials]:
        worker = Worker(
            self.scheduler.address,
            name=name,
            nthreads=2,
            security=security_for("worker", ca=creds.ca, cert=creds.cert, key=creds.key),
            resources=resources.get("resources"),
        )
        self.workers.append(worker)
        await worker
        return worker, creds

    async def client(self) -> Client:
        creds = self.ca.issue("client", "alice")
        return await Client(self.scheduler.address, security=creds.security(), asynchronous=True)

    async def close(self) -> None:
        for worker in self.workers:
            with contextlib.suppress(Exception):
                await worker.close()
        if self.scheduler is not None:
            await self.scheduler.close()


@contextlib.asynccontextmanager
async def running_pool(tmp: Path) -> AsyncIterator[Pool]:
    pool = Pool(tmp)
    pool.set_policy({"rig": "active"})
    await pool.start()
    try:
        yield pool
    finally:
        await pool.close()


async def until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


def _serial(creds: Credentials) -> int:
    return x509.load_pem_x509_certificate(creds.cert.encode()).serial_number


async def refused(join: Any) -> str:
    """The scheduler's reason for refusing a worker (Dask wraps it in its own error)."""
    with pytest.raises(RuntimeError, match="Worker failed to start") as info:
        await join
    chain, exc = [], info.value
    while exc is not None:
        chain.append(str(exc))
        exc = exc.__cause__ or exc.__context__
    return " | ".join(chain)


def run(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 60))


def test_only_worker_certificates_of_admitted_machines_may_join(tmp_path: Path) -> None:
    async def main() -> None:
        async with running_pool(tmp_path) as pool:
            rig = pool.ca.issue("worker", "rig")
            await pool.add_worker("rig-cpu", rig)
            assert [ws.name for ws in pool.scheduler.workers.values()] == ["rig-cpu"]

            as_client = pool.ca.issue("client", "rig")
            assert "a client certificate cannot register a worker" in await refused(
                pool.add_worker("rig-gpu0", as_client)
            )
            assert "may only register workers named rig-" in await refused(
                pool.add_worker("other-cpu", pool.ca.issue("worker", "rig"))
            )
            assert "'stranger' is not registered" in await refused(
                pool.add_worker("stranger-cpu", pool.ca.issue("worker", "stranger"))
            )
            assert [ws.name for ws in pool.scheduler.workers.values()] == ["rig-cpu"]

    run(main())


def test_a_revoked_certificate_is_dropped_and_cannot_come_back(tmp_path: Path) -> None:
    async def main() -> None:
        async with running_pool(tmp_path) as pool:
            rig = pool.ca.issue("worker", "rig")
            await pool.add_worker("rig-cpu", rig)
            pool.set_policy({"rig": "active"}, revoked=[_serial(rig)])
            await until(lambda: not pool.scheduler.workers)
            assert "was revoked" in await refused(pool.add_worker("rig-cpu", rig))

    run(main())


def test_paused_machines_take_no_new_work_until_resumed(tmp_path: Path) -> None:
    async def main() -> None:
        async with running_pool(tmp_path) as pool:
            cpu = worker_resources(2, GiB)
            await pool.add_worker("rig-cpu", pool.ca.issue("worker", "rig"), resources=cpu)
            [ws] = pool.scheduler.workers.values()
            pool.set_policy({"rig": "paused"})
            await until(lambda: ws.status == Status.paused)
            async with await pool.client() as client:
                future = client.submit(lambda: get_worker().name, pure=False)
                await asyncio.sleep(1.0)
                assert future.status == "pending"
                pool.set_policy({"rig": "active"})
                assert await future == "rig-cpu"

    run(main())


def test_gpu_workers_take_only_gpu_work(tmp_path: Path) -> None:
    async def main() -> None:
        async with running_pool(tmp_path) as pool:
            gpu = worker_resources(2, 4 * GiB, gpu_model="NVIDIA A100-SXM4-80GB", vram=80 * GiB)
            await pool.add_worker("rig-gpu0", pool.ca.issue("worker", "rig"), resources=gpu)
            async with await pool.client() as client:
                where = lambda: get_worker().name  # noqa: E731
                plain = client.submit(where, pure=False)
                cpu_bound = client.submit(where, pure=False, resources={"CPU": 1})
                on_gpu = client.submit(
                    where, pure=False, resources=ResourceSpec.parse(gpu="A100").to_dask()
                )
                assert await on_gpu == "rig-gpu0"
                await asyncio.sleep(1.0)
                assert (plain.status, cpu_bound.status) == ("pending", "pending")
                await pool.add_worker(
                    "rig-cpu", pool.ca.issue("worker", "rig"), resources=worker_resources(2, GiB)
                )
                assert await client.gather([plain, cpu_bound]) == ["rig-cpu", "rig-cpu"]

    run(main())
