"""Contributed machines end to end: a gateway without local workers, real ``dash-worker join``
agents (GPUs declared, as this machine has none), placement by GPU count, model and VRAM,
CPU work kept off GPU workers, pause, drain, revoke, owners, and reconnection."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import Gateway, run_dash_worker, wait_until

import dash_kernel as dk
from dash_kernel.resources import ResourceUnavailable

GB = 10**9
A100 = "NVIDIA A100-SXM4-80GB:80GB"
ADA = "NVIDIA RTX 6000 Ada Generation:48GB"


def live_workers(gw: Gateway) -> dict[str, dict[str, Any]]:
    return {w["name"]: w for w in gw.status()["workers"]}


@pytest.fixture(scope="module")
def pool(bare_gateway: Gateway, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    """Two contributed machines: ``rig`` (an A100 and one CPU core) and ``ada`` (a 48 GB
    RTX 6000 Ada with three GPU threads, no CPU worker)."""
    tmp = tmp_path_factory.mktemp("pool-agents")
    agents = [
        run_dash_worker(
            tmp, "join", bare_gateway.url, "--token", bare_gateway.invite()["token"],
            "--name", "rig", "--cpus", "1", "--memory", "2GB", "--declare-gpu", A100,
            name="rig",
        ),
        run_dash_worker(
            tmp, "join", bare_gateway.url, "--token", bare_gateway.invite()["token"],
            "--name", "ada", "--cpus", "0", "--memory", "2GB", "--declare-gpu", ADA,
            "--gpu-threads", "3", name="ada",
        ),
    ]  # fmt: skip
    try:
        expected = {"rig-gpu0", "rig-cpu", "ada-gpu0"}
        wait_until(
            lambda: expected <= set(live_workers(bare_gateway)),
            60,
            f"workers {expected}; logs:\n" + "\n".join(a.log()[-3000:] for a in agents),
        )
        dk.connect(bare_gateway.url, bare_gateway.token)
        yield bare_gateway
    finally:
        dk.disconnect()
        for agent in agents:
            agent.stop()


def where() -> tuple[str, str | None]:
    from distributed import get_worker

    return get_worker().name, os.environ.get("CUDA_VISIBLE_DEVICES")


def interval(seconds: float) -> tuple[str, float, float]:
    from distributed import get_worker

    start = time.time()
    time.sleep(seconds)
    return get_worker().name, start, time.time()


def test_joined_machines_are_registered_with_their_hardware(pool: Gateway) -> None:
    machines = pool.machines()
    rig, ada = machines["rig"], machines["ada"]
    assert rig["owner"] == ada["owner"] == "operator"
    assert rig["state"] == ada["state"] == "active"
    [gpu] = rig["hardware"]["gpus"]
    assert (gpu["name"], gpu["vram"], gpu["declared"]) == ("NVIDIA A100-SXM4-80GB", 80 * GB, True)
    assert rig["caps"]["cpus"] == 1 and rig["last_heartbeat"]
    assert {w["name"] for w in rig["workers"]} == {"rig-gpu0", "rig-cpu"}
    workers = live_workers(pool)
    assert workers["rig-gpu0"]["resources"]["GPU"] == 1
    assert workers["rig-gpu0"]["resources"]["VRAM"] == 80 * GB
    assert workers["rig-gpu0"]["resources"]["gpu:a100"] == 1
    assert "pool:cpu" not in workers["rig-gpu0"]["resources"]
    assert workers["ada-gpu0"]["nthreads"] == 3
    assert "pool:cpu" in workers["rig-cpu"]["resources"]


def test_gpu_work_lands_by_count_model_and_vram(pool: Gateway) -> None:
    names = {dk.remote(gpu=1)(where)()[0] for _ in range(6)}
    assert names <= {"rig-gpu0", "ada-gpu0"}
    assert dk.remote(gpu="A100")(where)() == ("rig-gpu0", "0")
    assert dk.remote(gpu="RTX 6000")(where)() == ("ada-gpu0", "0")
    assert dk.remote(vram="60GB")(where)()[0] == "rig-gpu0"


def test_cpu_work_never_takes_a_gpu_slot(pool: Gateway) -> None:
    assert set(n for n, _ in dk.map(lambda _: where(), range(40), progress=False)) == {"rig-cpu"}
    # Plain Dask calls get the same placement: it is the scheduler's, not the client's.
    client = dk.connect().client
    names = {a: w["name"] for a, w in client.scheduler_info(n_workers=-1)["workers"].items()}
    by_pid = {pid: names[address] for address, pid in client.run(os.getpid).items()}
    pids = client.gather([client.submit(os.getpid, pure=False) for _ in range(10)])
    assert {by_pid[pid] for pid in pids} == {"rig-cpu"}
    assert dk.remote(cpu=1)(where)()[0] == "rig-cpu"


def test_vram_is_consumed_so_a_gpu_is_shared_until_it_is_full(pool: Gateway) -> None:
    # With rig paused, the 48 GB GPU (3 threads) is the only place for 20 GB tasks: two
    # run together, and the third waits for VRAM, not for a thread.
    code, _ = pool.call("POST", "dash/api/workers/rig/pause")
    assert code == 200
    try:
        wait_until(lambda: live_workers(pool)["rig-gpu0"]["status"] == "paused", 10, "paused")
        share = dk.remote(vram="20GB")(interval)
        futures = [share.submit(2.0) for _ in range(3)]
        spans = sorted(dk.connect().client.gather(futures), key=lambda span: span[1])
    finally:
        pool.call("POST", "dash/api/workers/rig/resume")
    assert {name for name, _, _ in spans} == {"ada-gpu0"}
    (_, start0, end0), (_, start1, end1), (_, start2, _) = spans
    assert start1 < end0, "two 20 GB tasks should share the 48 GB GPU"
    assert start2 >= min(end0, end1) - 0.05, "the third should wait for VRAM"


def test_impossible_specs_fail_at_once_naming_the_closest_machine(pool: Gateway) -> None:
    started = time.monotonic()
    with pytest.raises(ResourceUnavailable, match="no GPU model matching 'h100'") as info:
        dk.remote(gpu="H100")(where)()
    assert "Closest worker" in str(info.value)
    with pytest.raises(ResourceUnavailable, match="Closest worker: rig-gpu0") as info:
        dk.remote(vram="100GB")(where)()
    assert "VRAM 93.13 GiB asked, it has 74.51 GiB" in str(info.value)
    assert time.monotonic() - started < 10


def test_queued_work_says_why(pool: Gateway, capfd: pytest.CaptureFixture[str]) -> None:
    blocker = dk.remote(gpu="A100")(interval).submit(6.0)
    wait_until(lambda: machine_workers(pool, "rig")["rig-gpu0"]["processing"], 10, "blocker")
    assert dk.remote(gpu="A100")(where)()[0] == "rig-gpu0"
    assert blocker.result()[0] == "rig-gpu0"
    out = capfd.readouterr().out  # news, not an error: on stdout
    assert "DASH: queued: it needs gpu='A100'" in out
    assert "rig-gpu0 has no GPU free (1 in all)" in out


# ----- machine states --------------------------------------------------------------------


def machine_workers(gw: Gateway, machine: str) -> dict[str, dict[str, Any]]:
    return {w["name"]: w for w in gw.machines().get(machine, {}).get("workers", [])}


def test_a_paused_machine_takes_no_new_work_until_resumed(pool: Gateway, contributors) -> None:
    agent = contributors(pool, "--name", "pz", "--cpus", "1", "--memory", "1GB", "--gpus", "none")
    wait_until(lambda: "pz-cpu" in live_workers(pool), 60, f"pz-cpu:\n{agent.log()}")
    code, record = pool.call("POST", "dash/api/workers/pz/pause")
    assert code == 200 and record["state"] == "paused", record
    wait_until(lambda: live_workers(pool)["pz-cpu"]["status"] == "paused", 10, "pz-cpu paused")
    client = dk.connect().client
    future = client.submit(os.getpid, workers=["pz-cpu"], pure=False)
    time.sleep(1.5)
    assert future.status == "pending"
    code, record = pool.call("POST", "dash/api/workers/pz/resume")
    assert code == 200 and record["state"] == "active"
    assert future.result(timeout=30) > 0


def test_a_drained_machine_finishes_its_work_then_leaves(
    pool: Gateway, contributors, tmp_path: Path
) -> None:
    agent = contributors(pool, "--name", "dr", "--cpus", "1", "--memory", "1GB", "--gpus", "none")
    wait_until(lambda: "dr-cpu" in live_workers(pool), 60, f"dr-cpu:\n{agent.log()}")
    client = dk.connect().client
    running = client.submit(time.sleep, 3.0, workers=["dr-cpu"], pure=False)
    wait_until(lambda: machine_workers(pool, "dr")["dr-cpu"]["processing"] == 1, 10, "running")
    code, record = pool.call("POST", "dash/api/workers/dr/drain")
    assert code == 200 and record["state"] == "draining"
    wait_until(lambda: live_workers(pool)["dr-cpu"]["status"] == "paused", 10, "dr-cpu held")
    later = client.submit(os.getpid, workers=["dr-cpu"], pure=False)
    assert running.result(timeout=30) is None  # it ran to the end
    assert agent.wait_exit(30) == 0, agent.log()
    assert "drained" in agent.log()
    assert later.status == "pending"
    client.cancel([later])
    # Started again, the machine is active and takes new work.
    again = run_dash_worker(tmp_path, "start", name="dr")
    try:
        wait_until(lambda: "dr-cpu" in live_workers(pool), 60, f"dr-cpu back:\n{again.log()}")
        assert pool.machines()["dr"]["state"] == "active"
        pinned = client.submit(os.getpid, workers=["dr-cpu"], pure=False)
        assert pinned.result(timeout=30) > 0
    finally:
        again.stop()


def test_a_revoked_machine_is_dropped_and_cannot_come_back(
    pool: Gateway, contributors, tmp_path: Path
) -> None:
    agent = contributors(pool, "--name", "rv", "--cpus", "1", "--memory", "1GB", "--gpus", "none")
    wait_until(lambda: "rv-cpu" in live_workers(pool), 60, f"rv-cpu:\n{agent.log()}")
    started = time.monotonic()
    code, record = pool.call("DELETE", "dash/api/workers/rv")
    assert code == 200 and record["state"] == "revoked"
    wait_until(lambda: "rv-cpu" not in live_workers(pool), 10, "rv-cpu dropped")
    dropped_after = time.monotonic() - started
    assert dropped_after < 10
    assert agent.wait_exit(30) == 3, agent.log()
    assert "revoked" in agent.log()
    again = run_dash_worker(tmp_path, "start", name="rv")
    assert again.wait_exit(30) == 3
    assert "revoked" in again.log()


def test_one_user_cannot_act_on_another_users_machine(pool: Gateway, contributors) -> None:
    bob_token = pool.add_users("bob")["bob"]
    agent = contributors(
        pool, "--name", "bobs", "--cpus", "1", "--memory", "1GB", "--gpus", "none",
        invite=pool.invite(token=bob_token),
    )  # fmt: skip
    wait_until(lambda: "bobs-cpu" in live_workers(pool), 60, f"bobs-cpu:\n{agent.log()}")
    assert pool.machines()["bobs"]["owner"] == "bob"
    code, reply = pool.call("POST", "dash/api/workers/rig/pause", token=bob_token)
    assert code == 403 and "belongs to operator" in reply["message"]
    code, reply = pool.call("DELETE", "dash/api/workers/rig", token=bob_token)
    assert code == 403
    code, reply = pool.call("POST", "dash/api/workers/bobs/pause", token=bob_token)
    assert code == 200 and reply["state"] == "paused"
    code, reply = pool.call("POST", "dash/api/workers/bobs/resume")
    assert code == 200 and reply["state"] == "active"


# ----- invites and certificates ----------------------------------------------------------


def test_bad_invites_are_refused_with_the_reason(pool: Gateway, contributors) -> None:
    garbage = contributors(pool, "--name", "bad1", invite={"token": "not-a-real-invite"})
    assert garbage.wait_exit(30) == 1
    assert "invalid invite" in garbage.log()

    invite = pool.invite()
    first = contributors(pool, "--name", "once", "--cpus", "1", "--gpus", "none", invite=invite)
    wait_until(lambda: "once" in pool.machines(), 30, f"machine once:\n{first.log()}")
    reused = contributors(pool, "--name", "twice", invite=invite)
    assert reused.wait_exit(30) == 1
    assert "already used" in reused.log()

    short = pool.invite(expires_in=1)
    time.sleep(1.5)
    expired = contributors(pool, "--name", "late", invite=short)
    assert expired.wait_exit(30) == 1
    assert "expired" in expired.log()


def test_only_worker_certificates_from_the_gateway_ca_can_join(pool: Gateway, tmp_path) -> None:
    from distributed import Worker
    from distributed.security import Security

    scheduler = pool.status()["scheduler"]
    tls = pool.cluster()["tls"]
    as_client = Security(
        require_encryption=True,
        tls_ca_file=tls["ca"],
        tls_worker_cert=tls["cert"],
        tls_worker_key=tls["key"],
    )

    async def join(security: Security | None, name: str) -> str:
        try:
            worker = Worker(scheduler, name=name, security=security, nthreads=1)
            await asyncio.wait_for(worker, 20)
        except BaseException as exc:  # noqa: BLE001 - the reason is the assertion
            chain, seen = [], exc
            while seen is not None:
                chain.append(repr(seen))
                seen = seen.__cause__ or seen.__context__
            return " | ".join(chain)
        await worker.close()
        return "joined"

    assert "a client certificate cannot register a worker" in asyncio.run(
        join(as_client, "rig-sneaky")
    )
    assert asyncio.run(join(None, "nocert")) != "joined"
    assert "rig-sneaky" not in live_workers(pool)


# ----- approval and restarts ---------------------------------------------------------------


def test_manual_approval_holds_a_machine_until_an_operator_approves(
    gateway_factory, contributors
) -> None:
    gw = gateway_factory(local_workers=0, extra=["--DashGateway.approve_workers=manual"])
    gw.wait_for_workers(0)
    agent = contributors(gw, "--name", "held", "--cpus", "1", "--memory", "1GB", "--gpus", "none")
    wait_until(lambda: gw.machines().get("held", {}).get("state") == "pending", 30, "pending")
    time.sleep(1.0)
    assert "held-cpu" not in live_workers(gw)
    assert "approv" in agent.log()
    code, record = gw.call("POST", "dash/api/workers/held/approve")
    assert code == 200 and record["state"] == "active"
    wait_until(lambda: "held-cpu" in live_workers(gw), 60, f"held-cpu:\n{agent.log()}")


def test_workers_come_back_by_themselves_after_a_gateway_restart(
    gateway_factory, contributors, tmp_path
) -> None:
    first = gateway_factory(local_workers=0)
    first.wait_for_workers(0)
    agent = contributors(first, "--name", "phoenix", "--cpus", "1", "--memory", "1GB")
    wait_until(lambda: "phoenix-cpu" in live_workers(first), 60, f"phoenix:\n{agent.log()}")
    port = int(first.url.rsplit(":", 1)[1].strip("/"))
    first.stop()
    assert agent.process.poll() is None, agent.log()
    second = gateway_factory(local_workers=0, data_dir=first.data_dir, port=port, token=first.token)
    second.wait_for_workers(0)
    wait_until(lambda: "phoenix-cpu" in live_workers(second), 90, f"phoenix back:\n{agent.log()}")
    assert second.machines()["phoenix"]["state"] == "active"
