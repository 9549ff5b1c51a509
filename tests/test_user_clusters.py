"""Per-user clusters: TLS identities that admit only their own cluster, idle stop, adoption."""

from __future__ import annotations

import asyncio
import os
import signal
import ssl
import stat
from pathlib import Path

import psutil
import pytest
from distributed import Client, Worker

from dash_gateway.scheduler_rpc import scheduler_identity
from dash_gateway.tls import Credentials
from dash_gateway.user_clusters import UserClusters, cluster_id
from dash_kernel.resources import CPU_POOL, POOL_CAPACITY

pytestmark = pytest.mark.timeout(60)

CONNECT_TIMEOUT = "3s"


def _manager(tmp_path: Path, **config: object) -> UserClusters:
    config.setdefault("poll_interval", 0.2)
    return UserClusters(data_dir=str(tmp_path / "data"), run_root=str(tmp_path / "run"), **config)


async def _connects(address: str, security: object) -> bool:
    try:
        client = await Client(
            address, security=security, asynchronous=True, timeout=CONNECT_TIMEOUT
        )
    except (OSError, asyncio.TimeoutError):
        return False
    await client.close()
    return True


async def _registers(address: str, security: object, name: str) -> bool:
    try:
        worker = await Worker(
            address, security=security, name=name, nthreads=1, death_timeout=3, dashboard=False
        )
    except (OSError, asyncio.TimeoutError, RuntimeError):
        return False
    await worker.close()
    return True


async def _handshake_accepted(address: str, creds: Credentials, directory: Path) -> bool:
    """Does the scheduler at ``address`` accept ``creds`` in the TLS handshake itself? The
    client side verifies nothing, so only the scheduler's trust store decides."""
    _, cert, key = creds.write(directory, "probe")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.load_cert_chain(cert, key)
    host, port = address.split("://", 1)[1].rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port), ssl=context)
    try:
        # TLS 1.3 sends the server's verdict on the client's certificate after the handshake;
        # an accepted peer then gets the first bytes of Dask's own handshake.
        return bool(await asyncio.wait_for(reader.read(1), 5.0))
    except ssl.SSLError as exc:
        assert "unknown ca" in str(exc).lower() or "certificate" in str(exc).lower()
        return False
    finally:
        writer.close()


def test_cluster_ids_are_path_safe() -> None:
    names = ["alice", "../../etc", "a/b", "Ünïcode", "", ".", "x" * 300]
    ids = [cluster_id(n) for n in names]
    assert len(set(ids)) == len(ids)
    for cid in ids:
        assert "/" not in cid and cid not in (".", "..") and len(cid) <= 41
        assert cid == Path(cid).name


def test_two_users_are_refused_by_each_other(tmp_path) -> None:
    async def main() -> None:
        clusters = _manager(tmp_path)
        await clusters.start()
        try:
            alice, bob = await asyncio.gather(clusters.ensure("alice"), clusters.ensure("bob"))
            assert alice.address != bob.address
            for own, other in ((alice, bob), (bob, alice)):
                assert await _connects(own.address, own.credentials.security())
                assert not await _connects(other.address, own.credentials.security())

            probes = tmp_path / "probes"
            for own, other in ((alice, bob), (bob, alice)):
                assert await _handshake_accepted(own.address, own.credentials, probes)
                assert not await _handshake_accepted(other.address, own.credentials, probes)

            bobs_lease = clusters.identity("bob").lease_worker("local")
            assert not await _handshake_accepted(alice.address, bobs_lease, probes)
            security = bobs_lease.security()
            assert not await _registers(alice.address, security, "local-lease-1")
            # The same certificate is a good lease worker in bob's own cluster.
            async with (
                Worker(
                    bob.address,
                    security=security,
                    name="local-lease-1",
                    nthreads=1,
                    dashboard=False,
                    # As a DASH CPU worker declares, so the scheduler plugin places CPU work here.
                    resources={CPU_POOL: POOL_CAPACITY},
                ) as worker,
                Client(
                    bob.address, security=bob.credentials.security(), asynchronous=True
                ) as client,
            ):
                assert await asyncio.wait_for(client.submit(sum, [1, 2, 3]), 20) == 6
                control = clusters.identity("bob").control()
                workers = (await scheduler_identity(bob.address, control))["workers"]
                assert list(workers) == [worker.address]
            assert not (
                await scheduler_identity(alice.address, clusters.identity("alice").control())
            )["workers"]

            # The gateway's control identity for each cluster works there, and only there.
            for user, access in (("alice", alice), ("bob", bob)):
                control = clusters.identity(user).control()
                assert await scheduler_identity(access.address, control)
                assert await clusters.activity(user) == {"clients": 0, "tasks": 0}
            with pytest.raises((OSError, asyncio.TimeoutError)):
                await scheduler_identity(alice.address, clusters.identity("bob").control(), 3)

            for user in ("alice", "bob"):
                tls = tmp_path / "data" / "clusters" / cluster_id(user) / "tls"
                assert stat.S_IMODE(tls.stat().st_mode) == 0o700
                assert stat.S_IMODE((tls / "ca-key.pem").stat().st_mode) == 0o600
        finally:
            await clusters.close()
        assert not clusters.running()

    asyncio.run(main())


def test_idle_cluster_stops_and_busy_one_is_kept(tmp_path) -> None:
    async def main() -> None:
        clusters = _manager(tmp_path, idle_timeout=1.5)
        await clusters.start()
        try:
            idle = await clusters.ensure("idle")
            busy = await clusters.ensure("busy")
            pid = clusters.running()["idle"].pid
            async with Client(
                busy.address, security=busy.credentials.security(), asynchronous=True
            ):
                for _ in range(60):
                    if "idle" not in clusters.running():
                        break
                    await asyncio.sleep(0.1)
                assert "idle" not in clusters.running()
                assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == "zombie"
                assert not await _connects(idle.address, idle.credentials.security())
                await asyncio.sleep(2.0)
                assert "busy" in clusters.running()
                assert await clusters.activity("busy") == {"clients": 1, "tasks": 0}
        finally:
            await clusters.close()

    asyncio.run(main())


def test_restarted_manager_adopts_live_and_forgets_dead(tmp_path) -> None:
    async def main() -> None:
        first = _manager(tmp_path, keep_running=True)
        await first.start()
        alice = await first.ensure("alice")
        await first.ensure("bob")
        records = first.running()
        await first.close()  # as a gateway exit with keep_running: the schedulers live on
        dead = records["bob"].pid
        os.kill(dead, signal.SIGKILL)
        await asyncio.to_thread(psutil.Process(dead).wait, 10)

        second = _manager(tmp_path, keep_running=False)
        await second.start()
        try:
            assert set(second.running()) == {"alice"}
            again = await second.ensure("alice")
            assert again.address == alice.address
            assert second.running()["alice"].pid == records["alice"].pid
            assert await _connects(again.address, again.credentials.security())
            # The old credentials stay valid: the cluster keeps its CA across gateways.
            assert await _connects(alice.address, alice.credentials.security())

            assert not (
                tmp_path / "data" / "clusters" / cluster_id("bob") / "cluster.json"
            ).exists()
            bob = await second.ensure("bob")
            assert second.running()["bob"].pid != dead
            assert await _connects(bob.address, bob.credentials.security())
        finally:
            await second.close()
        assert not psutil.pid_exists(records["alice"].pid) or (
            psutil.Process(records["alice"].pid).status() == "zombie"
        )

    asyncio.run(main())


def test_scheduler_gets_no_gateway_secrets(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("DASH_TOKEN", "secret-operator-token")
    monkeypatch.setenv("DASH_SOMETHING", "gateway-only")
    monkeypatch.setenv("JUPYTER_TOKEN", "secret-jupyter-token")
    root_ca_key = tmp_path / "data" / "tls" / "ca-key.pem"

    async def main() -> None:
        clusters = _manager(tmp_path)
        await clusters.start()
        try:
            await clusters.ensure("alice")
            record = clusters.running()["alice"]
            proc = Path("/proc") / str(record.pid)
            environ = (proc / "environ").read_bytes().decode()
            cmdline = (proc / "cmdline").read_bytes().decode()
            cwd = os.readlink(proc / "cwd")
        finally:
            await clusters.close()
        data_dir = str(tmp_path / "data")
        for text in (environ, cmdline):
            for secret in (
                "secret-operator-token", "secret-jupyter-token", "gateway-only",
                "DASH_TOKEN", "JUPYTER_TOKEN", data_dir, str(root_ca_key), "ca-key",
            ):  # fmt: skip
                assert secret not in text
        assert cwd == record.run_dir
        assert Path(cwd).parent == tmp_path / "run"
        assert f"HOME={record.run_dir}" in environ.split("\0")

    asyncio.run(main())
