"""A gateway restart under per-user clusters kept running: the next gateway adopts every
user's scheduler and leased workers, so no session, no running cell and no result is lost."""

from __future__ import annotations

import contextlib
import json
import signal
import time
from pathlib import Path

import psutil
import pytest
from conftest import Gateway, launch_gateway, wait_gone, wait_until
from distributed import Client
from kernels import KernelDriver, without_dash_env
from test_tenancy import cluster_of, leases, security_from

# Users' schedulers and workers cannot import this module: its functions travel by value.
pytestmark = [pytest.mark.timeout(300), pytest.mark.usefixtures("by_value")]


KEEP = ["--tenancy=per-user", "--DashGateway.keep_clusters_running=True"]


def _relaunch(gw: Gateway, tmp: Path, keep: bool) -> Gateway:
    port = int(gw.url.rsplit(":", 1)[1].strip("/"))
    extra = KEEP if keep else ["--tenancy=per-user"]
    new = launch_gateway(
        tmp, local_workers=2, data_dir=gw.data_dir, port=port, token=gw.token, extra=extra
    )
    new.wait_for_workers(0)
    return new


def _recorded_processes(data_dir: Path) -> list[psutil.Process]:
    """The schedulers and lease workers a gateway recorded as kept running."""
    procs = []
    for path in [
        *data_dir.glob("clusters/*/cluster.json"),
        *data_dir.glob("clusters/leases/*.json"),
    ]:
        with contextlib.suppress(OSError, ValueError, psutil.Error):
            procs.append(psutil.Process(int(json.loads(path.read_text())["pid"])))
    return procs


def test_a_restarted_gateway_adopts_clusters_sessions_and_running_work(tmp_path: Path) -> None:
    gw = launch_gateway(tmp_path / "gw0", local_workers=2, extra=KEEP)
    gateways = [gw]
    kernel = client = None
    try:
        gw.wait_for_workers(0)
        tokens = gw.add_users("alice", "bob")
        env = dict(without_dash_env(), DASH_GATEWAY_URL=gw.url, DASH_TOKEN=tokens["alice"])
        kernel = KernelDriver("dash", env=env, cwd=str(tmp_path))
        first = kernel.execute("import os\nstate = 41\nprint(os.getpid())", timeout=120)
        assert first.status == "ok", first.traceback_text()
        session_pid = int(first.stream().split()[-1])

        bob = cluster_of(gw, tokens["bob"])
        client = Client(bob["scheduler"], security=security_from(bob, tmp_path / "bob"))
        running = client.submit(lambda: (time.sleep(12), "bob's result")[1], pure=False)
        wait_until(lambda: client.processing() and any(client.processing().values()),
                   what="bob's task to start")  # fmt: skip
        before = {(x["id"], x["user"]) for x in leases(gw)}
        recorded = _recorded_processes(gw.data_dir)
        assert len(recorded) >= 4  # two schedulers, alice's session worker, bob's worker
        assert {"alice", "bob"} <= {user for _, user in before}

        # Alice's cell is running when the gateway goes: SIGTERM, then SIGKILL of the next.
        msg_id = kernel.client.execute("import time\ntime.sleep(6)\nprint('cell done', state)")
        gw.stop(signal.SIGTERM, keeps=True)
        gw = _relaunch(gw, tmp_path / "gw1", keep=True)
        gateways.append(gw)
        assert "Adopted alice's cluster" in gw.log() and "Adopted bob's cluster" in gw.log()
        assert {(x["id"], x["user"]) for x in leases(gw)} == before

        gw.process.send_signal(signal.SIGKILL)
        gw.process.wait(10)
        gw = _relaunch(gw, tmp_path / "gw2", keep=False)
        gateways.append(gw)
        assert {(x["id"], x["user"]) for x in leases(gw)} == before

        # The running cell finished, with its output; bob's running task too.
        output = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            msg = kernel.client.get_iopub_msg(timeout=60)
            if msg["parent_header"].get("msg_id") != msg_id:
                continue
            if msg["msg_type"] == "stream":
                output.append(msg["content"]["text"])
            if msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
                break
        assert "".join(output) == "cell done 41\n"
        assert running.result(timeout=60) == "bob's result"

        # The same session, its state kept, no restore: and neither sees the other's.
        again = kernel.execute("print(os.getpid(), state)", timeout=60)
        assert again.status == "ok", again.traceback_text()
        assert again.stream() == f"{session_pid} 41\n"
        assert "restor" not in again.stream().lower()
        assert "alice" not in repr(client.get_events())
    finally:
        if client is not None:
            client.close()
        if kernel is not None:
            kernel.shutdown()
        kept = _recorded_processes(gateways[0].data_dir)
        for g in gateways:
            g.stop()  # the last one keeps nothing running: it stops what it adopted
        assert not wait_gone(kept, timeout=20), "kept schedulers or lease workers outlived it"
