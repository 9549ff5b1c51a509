"""A cluster per user on leased workers: each account's work runs in its own scheduler and
worker processes, and bob, attacking as he can from his client and his tasks, reaches
nothing of alice's."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import Gateway, wait_until
from distributed import Client, Worker, get_worker
from distributed.security import Security
from kernels import KernelDriver, dash_ipython_kernel, without_dash_env

from dash_gateway.leases import FirstComeFirstServed, Lease, Request, Slot
from dash_kernel.resources import worker_resources

# Users' schedulers and workers cannot import this module: its functions travel by value.
pytestmark = [pytest.mark.timeout(180), pytest.mark.usefixtures("by_value")]


@pytest.fixture(scope="module")
def accounts(tenant_gateway: Gateway) -> dict[str, str]:
    return tenant_gateway.add_users("alice", "bob")


def cluster_of(gw: Gateway, token: str) -> dict[str, Any]:
    code, info = gw.request("dash/api/cluster", token=token)
    assert code == 200, info
    return info


def security_from(info: dict[str, Any], directory: Path) -> Security:
    directory.mkdir(parents=True, exist_ok=True)
    for name in ("ca", "cert", "key"):
        (directory / f"{name}.pem").write_text(info["tls"][name])
    return Security(
        tls_ca_file=str(directory / "ca.pem"),
        tls_client_cert=str(directory / "cert.pem"),
        tls_client_key=str(directory / "key.pem"),
        require_encryption=True,
    )


@pytest.fixture(scope="module")
def clients(
    tenant_gateway: Gateway, accounts: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, tuple[dict[str, Any], Client]]]:
    """Each account's own client on its own cluster, as ``dk.connect()`` makes it."""
    out = {}
    try:
        for user, token in accounts.items():
            info = cluster_of(tenant_gateway, token)
            security = security_from(info, tmp_path_factory.mktemp(user))
            out[user] = (info, Client(info["scheduler"], security=security, timeout=20))
        yield out
    finally:
        for _, client in out.values():
            client.close()


def leases(gw: Gateway) -> list[dict[str, Any]]:
    code, reply = gw.request("dash/api/pool")
    assert code == 200, reply
    return reply["leases"]


def worker_pid_and_keys() -> tuple[int, str, list[str]]:
    worker = get_worker()
    return os.getpid(), str(worker.name), [str(k) for k in worker.data]


def lease_credentials() -> dict[str, str]:
    """Run as a task: what a lease worker's own files give away to the code it runs."""
    return {
        name: Path(name).read_text()
        for name in ("worker-ca.pem", "worker.pem", "worker-key.pem")
        if Path(name).exists()
    }


def test_each_user_works_in_a_cluster_of_their_own(
    tenant_gateway: Gateway, clients: dict[str, tuple[dict[str, Any], Client]]
) -> None:
    (alice_info, alice), (bob_info, bob) = clients["alice"], clients["bob"]
    assert alice_info["scheduler"] != bob_info["scheduler"]
    assert alice_info["tls"]["ca"] != bob_info["tls"]["ca"]

    ran, held = {}, []
    for user, client in (("alice", alice), ("bob", bob)):
        # Results held keep their workers leased (an idle lease holds no result).
        held.append(futures := client.map(lambda i: (i * i, worker_pid_and_keys()[1]), range(20)))
        results = client.gather(futures)
        assert [r[0] for r in results] == [i * i for i in range(20)]
        ran[user] = {r[1] for r in results}
        # From the scheduler's side, too: only this user's leased workers are there.
        on_scheduler = {w["name"] for w in client.scheduler_info()["workers"].values()}
        assert ran[user] <= on_scheduler
    by_worker = {lease["worker"]: lease["user"] for lease in leases(tenant_gateway)}
    for user, names in ran.items():
        assert {by_worker.get(name) for name in names} == {user}, (user, names, by_worker)
    assert not ran["alice"] & ran["bob"]


def test_bob_reaches_nothing_of_alices(
    tenant_gateway: Gateway,
    clients: dict[str, tuple[dict[str, Any], Client]],
    tmp_path: Path,
) -> None:
    (alice_info, alice), (bob_info, bob) = clients["alice"], clients["bob"]
    secret = alice.submit(lambda: "alice's secret result", pure=False)
    assert secret.result(timeout=60) == "alice's secret result"
    alice.log_event("alice-private", {"typed": "hunter2"})
    alice_scheduler_pid = alice.run_on_scheduler(os.getpid)
    alice_pids = set(alice.run(os.getpid).values())
    assert alice_pids

    # His certificate is refused by her scheduler, in the TLS handshake.
    bob_security = security_from(bob_info, tmp_path / "bob")
    with pytest.raises((OSError, TimeoutError)):
        Client(alice_info["scheduler"], security=bob_security, timeout=5)

    # Her events, her scheduler and her workers are not in his cluster.
    assert "alice-private" not in bob.get_events()
    assert "hunter2" not in repr(bob.get_events())
    assert bob.run_on_scheduler(os.getpid) != alice_scheduler_pid
    assert not set(bob.run(os.getpid).values()) & alice_pids

    # His task lands in a process that never served her, holding none of her results.
    pid, _, keys = bob.submit(lambda: worker_pid_and_keys(), pure=False).result(timeout=60)
    assert pid not in alice_pids
    assert secret.key not in keys

    # A worker leased to him cannot register with her scheduler: its certificate, taken
    # from inside his task, belongs to his cluster's CA alone.
    stolen = bob.submit(lambda: lease_credentials(), pure=False).result(timeout=60)
    assert stolen.get("worker.pem") and stolen.get("worker-key.pem")
    for name, text in stolen.items():
        (tmp_path / name).write_text(text)
    rogue_security = Security(
        tls_ca_file=str(tmp_path / "worker-ca.pem"),
        tls_worker_cert=str(tmp_path / "worker.pem"),
        tls_worker_key=str(tmp_path / "worker-key.pem"),
        require_encryption=True,
    )
    before = set(alice.scheduler_info()["workers"])

    async def register() -> None:
        worker = Worker(
            alice_info["scheduler"],
            security=rogue_security,
            name="local-rogue",
            nthreads=1,
            dashboard=False,
            death_timeout=5,
        )
        try:
            await worker
        finally:
            await worker.close()

    with pytest.raises((OSError, TimeoutError, RuntimeError)):
        asyncio.run(register())
    assert set(alice.scheduler_info()["workers"]) == before
    secret.release()


def test_leases_are_granted_on_demand_and_released_when_idle(
    tenant_gateway: Gateway, clients: dict[str, tuple[dict[str, Any], Client]]
) -> None:
    _, alice = clients["alice"]
    assert alice.submit(lambda: 1, pure=False).result(timeout=60) == 1
    mine = wait_until(
        lambda: [x for x in leases(tenant_gateway) if x["user"] == "alice"],
        what="alice's lease",
    )
    pids = set(alice.run(os.getpid).values())
    # Nothing to do and no result held for 3 s: back to the pool, its process gone.
    wait_until(
        lambda: not [x for x in leases(tenant_gateway) if x["user"] == "alice"],
        timeout=30,
        what=f"alice's leases to be released (she holds {alice.has_what()})",
    )
    wait_until(lambda: not alice.scheduler_info()["workers"], what="the workers to leave")
    for pid in pids:
        wait_until(lambda pid=pid: not _alive(pid), what=f"worker process {pid} to exit")
    # New work gets a new lease.
    assert alice.submit(lambda: 2, pure=False).result(timeout=60) == 2
    again = [x for x in leases(tenant_gateway) if x["user"] == "alice"]
    assert again and {x["id"] for x in again}.isdisjoint(x["id"] for x in mine)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"


def test_a_user_sees_the_pool_but_only_their_own_leases(
    tenant_gateway: Gateway, accounts: dict[str, str], clients: dict[str, Any]
) -> None:
    _, bob = clients["bob"]
    held = bob.submit(time.sleep, 5, pure=False)
    wait_until(
        lambda: [x for x in leases(tenant_gateway) if x["user"] == "bob"], what="bob's lease"
    )
    code, alices = tenant_gateway.request("dash/api/pool", token=accounts["alice"])
    assert code == 200
    workers = [s for s in alices["pool"] if "pool:session" not in s["resources"]]
    sessions = [s for s in alices["pool"] if "pool:session" in s["resources"]]
    assert len(workers) == 2 and len(sessions) == 8
    assert all(x["user"] == "alice" for x in alices["leases"])
    assert "other" in {slot["leased"] for slot in alices["pool"]}
    assert "bob" not in repr(alices)
    held.cancel()


def test_an_impossible_spec_speaks_about_the_pool(
    tenant_gateway: Gateway, accounts: dict[str, str], tmp_path: Path
) -> None:
    env = dict(without_dash_env(), DASH_GATEWAY_URL=tenant_gateway.url)
    env["DASH_TOKEN"] = accounts["alice"]
    with dash_ipython_kernel(env, str(tmp_path)) as kernel:
        done = kernel.execute("%%dash --gpu 1\nx = 1", timeout=60)
        assert done.status == "error"
        text = done.traceback_text()
        assert "no machine in the pool could ever run" in text, text
        assert "The closest is local/" in text and "it has no GPU" in text
        ok = kernel.execute("%%dash\ny = 6 * 7", timeout=90)
        assert ok.status == "ok", ok.traceback_text()
        assert kernel.execute("print(y)").stream() == "42\n"


def test_two_users_dash_kernels_run_side_by_side(
    tenant_gateway: Gateway, accounts: dict[str, str], tmp_path: Path
) -> None:
    kernels = {}
    try:
        for user in ("alice", "bob"):
            env = dict(without_dash_env(), DASH_GATEWAY_URL=tenant_gateway.url)
            env["DASH_TOKEN"] = accounts[user]
            kernels[user] = KernelDriver("dash", env=env, cwd=str(tmp_path))
        for user, kernel in kernels.items():
            done = kernel.execute(f"who = {user!r}\nimport os\nprint(os.getpid())", timeout=120)
            assert done.status == "ok", done.traceback_text()
        # Each session is a lease of its own, on a session worker: the two worker slots
        # stay free for the notebooks' fan-out.
        held = leases(tenant_gateway)
        for user in kernels:
            mine = [x for x in held if x["user"] == user]
            assert [x["resources"].get("pool:session") for x in mine] == [1], held
        # The dashboard's overview: each user sees their own session only, the operator both.
        for user in kernels:
            code, view = tenant_gateway.request("dash/api/overview", token=accounts[user])
            assert code == 200, view
            assert [row["user"] for row in view["sessions"]] == [user], view["sessions"]
        code, view = tenant_gateway.request("dash/api/overview")
        assert sorted(row["user"] for row in view["sessions"]) == ["alice", "bob"]
        for user, kernel in kernels.items():
            done = kernel.execute(
                "import dash_kernel as dk\n"
                "print(who, sum(dk.map(lambda i: i * i, range(50), progress=False)))",
                timeout=120,
            )
            assert done.status == "ok", done.traceback_text()
            # A notice may say why the work waits (the pool is shared); nothing else is said.
            *notices, result = done.stream().splitlines()
            assert result == f"{user} {sum(i * i for i in range(50))}", done.stream()
            assert all(line.startswith("DASH: ") for line in notices), notices
    finally:
        for kernel in kernels.values():
            kernel.shutdown()


def _slot(machine: str, index: int, gpu: str | None = None) -> Slot:
    resources = worker_resources(1, 10**9, gpu_model=gpu)
    return Slot(machine, index, 1, 10**9, resources)


def test_first_come_first_served_with_a_cap_and_the_smallest_slot() -> None:
    policy = FirstComeFirstServed(max_leases_per_user=2)
    cpu, gpu = {"CPU": 1, "pool:cpu": 1}, {"GPU": 1, "pool:gpu": 1}
    free = [_slot("m", 0, gpu="A100"), _slot("m", 1), _slot("m", 2), _slot("m", 3)]
    held = [Lease("L1", "alice", "", _slot("x", 0))]
    grants = policy.grants(
        [
            Request("bob", cpu, count=5, since=2.0),
            Request("alice", cpu, count=5, since=1.0),
            Request("carol", gpu, count=1, since=3.0),
        ],
        free,
        held,
    )
    got = [(request.user, slot.key) for request, slot in grants]
    # alice came first but holds one lease already: one more reaches her cap of 2; bob
    # gets the other CPU slots; carol's GPU work gets the GPU slot, never spent on CPU work.
    assert got == [("alice", "m/1"), ("bob", "m/2"), ("bob", "m/3"), ("carol", "m/0")]


def test_idle_leases_of_others_are_reclaimed_for_waiting_work() -> None:
    policy = FirstComeFirstServed(reclaim_idle_after=2.0)
    cpu = {"CPU": 1, "pool:cpu": 1}
    idle = Lease("L1", "alice", "", _slot("m", 0), state="running", idle_for=5.0)
    fresh = Lease("L2", "alice", "", _slot("m", 1), state="running", idle_for=0.5)
    own = Lease("L3", "bob", "", _slot("m", 2), state="running", idle_for=9.0)
    chosen = policy.reclaims([Request("bob", cpu, count=3, since=1.0)], [idle, fresh, own])
    # Only another user's lease idle long enough; bob's own idle worker would take his work.
    assert chosen == [idle]


def test_the_queued_notice_speaks_about_the_pool() -> None:
    from dash_kernel.resources import ResourceSpec, describe_pool_wait

    gpu = worker_resources(1, 10**9, gpu_model="NVIDIA A100", vram=40 * 2**30)
    cpu = worker_resources(1, 10**9)

    def row(name: str, resources: dict, leased: str | None, starting: bool = False) -> dict:
        return {"name": name, "resources": resources, "leased": leased, "starting": starting}

    spec = ResourceSpec.parse(gpu="A100")
    taken = [row("m/0", gpu, "other"), row("local/0", cpu, None)]
    reason = describe_pool_wait(spec, taken)
    assert reason is not None and reason.startswith("waiting for a GPU: the pool's one m/0 (1 GPU")
    assert reason.endswith("is leased to another user's work")
    # A free slot that fits, or the user's own lease on its way: a worker is coming.
    assert describe_pool_wait(spec, [row("m/0", gpu, None)]) is None
    assert describe_pool_wait(spec, [row("m/0", gpu, "you", starting=True)]) is None
    # The user's own running worker: the workers' own view says why (busy with what).
    assert describe_pool_wait(spec, [row("m/0", gpu, "you")]) == ""


STRESS_KERNELS, STRESS_CELLS = 8, 20


def _stress_cell(tag: str, i: int) -> tuple[str, str]:
    """Cell ``i`` of kernel ``tag``, and exactly what it prints."""
    if i % 5 == 4:
        expected = sum(j * j + i for j in range(50))
        code = f"print({tag!r}, {i}, sum(dk.map(lambda j: j * j + {i}, range(50))))"
    elif i % 2:
        total = sum(range(i * 1000))
        code = f"acc = sum(range({i} * 1000))\nprint({tag!r}, {i}, acc)"
        expected = total
    else:
        # State kept in the session: the even cells before this one that appended.
        code = f"print({tag!r}, {i}, len(seen))\nseen.append({i})"
        expected = len([k for k in range(i) if k % 2 == 0 and k % 5 != 4])
    return code, f"{tag} {i} {expected}"


@pytest.mark.timeout(420)
def test_eight_dash_kernels_twenty_cells_each(
    tenant_gateway: Gateway, accounts: dict[str, str], tmp_path: Path
) -> None:
    """Eight notebooks at once on a 2-core pool (two worker slots): every cell completes with
    its own output, none hangs, nothing lands in another kernel or after its cell's idle."""
    import concurrent.futures

    env_of = {}
    for user in ("alice", "bob"):
        env = dict(without_dash_env(), DASH_GATEWAY_URL=tenant_gateway.url)
        env["DASH_TOKEN"] = accounts[user]
        env_of[user] = env

    def notebook(n: int) -> list[str]:
        tag = f"nb{n}"
        problems = []
        user = ("alice", "bob")[n % 2]
        with KernelDriver("dash", env=env_of[user], cwd=str(tmp_path)) as kernel:
            setup = kernel.execute("import dash_kernel as dk\nseen = []", timeout=240)
            if setup.status != "ok":
                return [f"{tag} setup: {setup.traceback_text()}"]
            for i in range(STRESS_CELLS):
                code, expected = _stress_cell(tag, i)
                done = kernel.execute(code, timeout=240)
                lines = [
                    line for line in done.stream().splitlines() if not line.startswith("DASH: ")
                ]
                if done.status != "ok" or lines != [expected]:
                    problems.append(
                        f"{tag} cell {i}: {done.status} {lines!r} {done.traceback_text()}"
                    )
            strays = [
                m
                for m in kernel.strays
                if m["msg_type"] in ("stream", "execute_result", "error", "display_data")
            ]
            if strays:
                problems.append(f"{tag}: output after its cell's idle: {strays[:3]}")
        return problems

    with concurrent.futures.ThreadPoolExecutor(STRESS_KERNELS) as pool:
        results = list(pool.map(notebook, range(STRESS_KERNELS)))
    problems = [p for r in results for p in r]
    assert not problems, "\n".join(problems[:10])


def test_an_existing_scheduler_is_single_tenant(gateway_factory) -> None:
    gw = gateway_factory(local_workers=0, extra=["--scheduler-address=tls://127.0.0.1:9"])
    gw.wait_for_workers(0)
    token = gw.add_users("carol")["carol"]
    code, reply = gw.request("dash/api/cluster", token=token)
    assert code == 403, reply
    assert "--scheduler-address" in reply["message"] and "--tenancy per-user" in reply["message"]
    code, reply = gw.request("dash/api/cluster")
    assert code == 200 and reply["scheduler"] == "tls://127.0.0.1:9"

    refused = gateway_factory(
        local_workers=0, extra=["--scheduler-address=tls://127.0.0.1:9", "--tenancy=per-user"]
    )
    assert refused.process.wait(60) != 0
    assert "cannot be combined with --scheduler-address" in refused.log()
