"""A task that kills its worker: only that worker dies, nothing else fails, the user is told."""

from __future__ import annotations

import os
import threading
import time

import pytest
from conftest import wait_until

import dash_kernel as dk
from dash_kernel.errors import WorkerKilledError


@pytest.fixture(scope="module")
def conn(gateway):
    connection = dk.connect(gateway.url, gateway.token)
    yield connection
    dk.disconnect()


def worker_pids(conn, count: int = 2) -> dict[str, int]:
    """Worker name -> process id, once ``count`` workers are connected."""

    def pids():
        info = conn.client.scheduler_info(n_workers=-1)["workers"]
        if len(info) < count:
            return None
        by_address = conn.client.run(os.getpid)
        return {str(w["name"]): by_address[a] for a, w in info.items() if a in by_address}

    return wait_until(lambda: (p := pids()) and len(p) == count and p, 60, "workers")


def segfault(path=None):
    import ctypes

    if path:
        with open(path, "a") as f:
            f.write("x")
    ctypes.string_at(0)


def slow(x):
    time.sleep(0.2)
    return x


@pytest.mark.timeout(120)
def test_a_segfault_kills_one_worker_and_says_which_and_how(conn):
    before = worker_pids(conn)
    results: dict[str, object] = {}

    def other_work():
        try:
            results["value"] = dk.map(slow, range(30), progress=False)
        except BaseException as exc:  # noqa: BLE001 - the test reports it
            results["value"] = exc

    meanwhile = threading.Thread(target=other_work)
    meanwhile.start()
    time.sleep(0.5)  # the other work is running on both workers
    with pytest.raises(WorkerKilledError) as info:
        dk.remote(segfault)()
    meanwhile.join(60)
    assert results["value"] == list(range(30))
    message = str(info.value)
    assert message.startswith("the task killed its worker local-") and "(SIGSEGV)" in message
    after = worker_pids(conn)
    restarted = [name for name in before if before[name] != after[name]]
    assert restarted == [info.value.worker], (before, after)


@pytest.mark.timeout(120)
def test_retries_rerun_a_task_that_killed_its_worker_once(conn, tmp_path):
    attempts = tmp_path / "attempts"
    with pytest.raises(WorkerKilledError, match="SIGSEGV"):
        dk.remote(segfault, retries=1)(str(attempts))
    assert attempts.read_text() == "xx"
    worker_pids(conn)  # both workers are back


@pytest.mark.timeout(180)
def test_a_segfaulting_cell_in_the_embedded_cluster_kills_one_worker(tmp_path):
    from kernels import KernelDriver

    env = {k: v for k, v in os.environ.items() if not k.startswith("DASH_")}
    env["DASH_LOCAL_WORKERS"] = "2"
    pids = (
        "import os\nc = dk.connect().client\nc.wait_for_workers(2, timeout=60)\n"
        "print(sorted(c.run(os.getpid).values()))"
    )
    with KernelDriver(env=env, cwd=str(tmp_path)) as kernel:
        setup = kernel.execute("%load_ext dash_kernel\nimport dash_kernel as dk", timeout=120)
        assert setup.status == "ok", setup.traceback_text()
        before = kernel.execute(pids, timeout=60).stream()
        run = kernel.execute("%%dash\nimport ctypes\nctypes.string_at(0)", timeout=120)
        assert run.error["ename"] == "WorkerKilledError", run.traceback_text()
        assert run.error["evalue"] in (
            f"the task killed its worker {n} (SIGSEGV)" for n in (0, 1)
        ), run.error["evalue"]
        assert run.traceback_text().count("\n") == 0  # one line, no frames
        after = kernel.execute(pids, timeout=60).stream()
    assert len(set(eval(before)) - set(eval(after))) == 1, (before, after)
