"""The gateway against real processes: auth, status, mutual-TLS credentials, supervision, shutdown."""

from __future__ import annotations

import asyncio
import datetime
import json
import signal
import stat
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator

import psutil
import pytest
from conftest import Gateway, alive, launch_gateway, wait_gone
from cryptography import x509
from cryptography.x509.oid import NameOID
from distributed import Client
from distributed.comm import connect
from distributed.security import Security

from dash_kernel._version import __version__
from dash_kernel.resources import POOL_CAPACITY


def _security(creds: dict) -> Security:
    tls = creds["tls"]
    return Security(
        tls_ca_file=tls["ca"],
        tls_client_cert=tls["cert"],
        tls_client_key=tls["key"],
        require_encryption=True,
    )


def _children_by_module(gw: Gateway) -> dict[str, psutil.Process]:
    found = {}
    for p in gw.descendants():
        try:
            cmd = " ".join(p.cmdline())
        except psutil.Error:  # exited meanwhile, or a zombie not yet reaped
            continue
        for module in ("dash_gateway.scheduler_process", "dash_worker", "ipykernel_launcher"):
            if f"-m {module}" in cmd:
                found[module] = p
    return found


def test_status_requires_a_valid_token(gateway: Gateway) -> None:
    code, body = gateway.request("dash/api/status", token=None)
    assert code == 403, body
    assert isinstance(body, dict) and "message" in body
    code, body = gateway.request("dash/api/status", token="not-the-token")
    assert code == 403, body
    code, body = gateway.request("dash/api/cluster", token=None)
    assert code == 403, body


def test_status_lists_the_local_workers(gateway: Gateway) -> None:
    status = gateway.status()
    assert status["version"] == __version__
    assert status["scheduler"].startswith("tls://127.0.0.1:")
    assert status["state"] == "running"
    assert [w["name"] for w in status["workers"]] == ["local-0", "local-1"]
    for worker in status["workers"]:
        assert set(worker) == {"name", "address", "resources", "nthreads", "memory_limit", "status"}
        assert worker["address"].startswith("tls://")
        assert worker["status"] == "running"
        assert worker["nthreads"] == 1
        assert worker["memory_limit"] == 10**9
        assert worker["resources"] == {"CPU": 1, "MEMORY": 10**9, "pool:cpu": POOL_CAPACITY}


def test_lab_is_served(gateway: Gateway) -> None:
    code, body = gateway.request("lab")
    assert code == 200
    assert "<html" in body.lower() and "jupyterlab" in body.lower()


def test_cluster_credentials_run_a_task(gateway: Gateway) -> None:
    creds = gateway.cluster()
    assert set(creds) == {"scheduler", "tls"}
    assert set(creds["tls"]) == {"ca", "cert", "key"}
    assert creds["scheduler"] == gateway.status()["scheduler"]

    cert = x509.load_pem_x509_certificate(creds["tls"]["cert"].encode())
    ou = cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)[0].value
    assert ou == "client"
    lifetime = cert.not_valid_after_utc - datetime.datetime.now(datetime.timezone.utc)
    assert datetime.timedelta(days=6) < lifetime <= datetime.timedelta(days=7)

    with Client(creds["scheduler"], security=_security(creds), timeout=20) as client:
        assert client.submit(lambda: 1).result(timeout=20) == 1
        # The resources the workers declare are usable as restrictions.
        assert client.submit(lambda: 2, resources={"CPU": 1}).result(timeout=20) == 2


@pytest.mark.parametrize(
    "how", ["plain tcp", "tls without certificate", "certificate of another CA"]
)
def test_client_without_the_gateways_certificate_cannot_connect(gateway: Gateway, how: str) -> None:
    address = gateway.status()["scheduler"]
    if how == "plain tcp":
        address, args = address.replace("tls://", "tcp://"), {}
    elif how == "tls without certificate":
        args = {}
    else:
        args = Security.temporary().get_connection_args("client")

    async def identity() -> object:
        # The whole attempt is bounded: a handshake the scheduler drops must not hang the test.
        comm = await asyncio.wait_for(connect(address, timeout=2, **args), 20)
        try:
            await comm.write({"op": "identity", "reply": True})
            return await asyncio.wait_for(comm.read(), 10)
        finally:
            await comm.close()

    with pytest.raises((OSError, TypeError, ValueError, asyncio.TimeoutError)):
        asyncio.run(identity())


def test_certificate_authority_files_are_private(gateway: Gateway) -> None:
    tls_dir = gateway.data_dir / "tls"
    assert stat.S_IMODE(tls_dir.stat().st_mode) == 0o700
    for name in ("ca.pem", "ca-key.pem"):
        assert stat.S_IMODE((tls_dir / name).stat().st_mode) == 0o600
    ca = x509.load_pem_x509_certificate((tls_dir / "ca.pem").read_bytes())
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert gateway.cluster()["tls"]["ca"].strip() == (tls_dir / "ca.pem").read_text().strip()


def test_kernels_get_the_gateway_url_and_token(gateway: Gateway) -> None:
    code, kernel = _post(gateway, "api/kernels")
    assert code == 201, kernel
    try:
        deadline = time.monotonic() + 30
        while "ipykernel_launcher" not in _children_by_module(gateway):
            assert time.monotonic() < deadline, "the kernel process did not appear"
            time.sleep(0.1)
        env = _children_by_module(gateway)["ipykernel_launcher"].environ()
        assert env["DASH_GATEWAY_URL"] == gateway.url
        assert env["DASH_TOKEN"] == gateway.token
    finally:
        _delete(gateway, f"api/kernels/{kernel['id']}")
    # Processes that run user code never see the server's token.
    children = _children_by_module(gateway)
    for module in ("dash_gateway.scheduler_process", "dash_worker"):
        assert "DASH_TOKEN" not in children[module].environ()


@pytest.fixture(scope="module")
def spare_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    """A second gateway to crash and stop, so the session's gateway stays untouched (with a
    data directory of its own: one gateway per directory, see test_data_dir_lock.py)."""
    gw = launch_gateway(tmp_path_factory.mktemp("spare"), local_workers=1)
    try:
        gw.wait_for_workers(1)
        yield gw
    finally:
        gw.stop()


def test_a_crashed_worker_agent_is_restarted(spare_gateway: Gateway) -> None:
    gw = spare_gateway
    agent = _children_by_module(gw)["dash_worker"]
    agent.kill()
    deadline = time.monotonic() + 5
    while _children_by_module(gw).get("dash_worker", agent).pid == agent.pid:
        assert time.monotonic() < deadline, "the worker agent was not restarted"
        time.sleep(0.1)
    status = gw.wait_for_workers(1, timeout=30)
    assert [w["name"] for w in status["workers"]] == ["local-0"]


def test_a_crashed_scheduler_is_restarted_at_the_same_address(spare_gateway: Gateway) -> None:
    gw = spare_gateway
    before = gw.status()["scheduler"]
    creds = gw.cluster()
    _children_by_module(gw)["dash_gateway.scheduler_process"].kill()
    # Noticed within a poll interval; a loaded machine answers the status call slowly.
    deadline = time.monotonic() + 15
    while gw.status()["state"] == "running":
        assert time.monotonic() < deadline, "the scheduler's death went unnoticed"
        time.sleep(0.1)
    status = gw.wait_for_workers(1, timeout=45)
    assert status["scheduler"] == before
    # Credentials handed out before the crash still work: same CA, same address.
    with Client(creds["scheduler"], security=_security(creds), timeout=20) as client:
        assert client.submit(lambda: 3).result(timeout=20) == 3


def test_sigint_stops_everything(spare_gateway: Gateway) -> None:
    gw = spare_gateway
    procs = gw.descendants()
    assert len(procs) >= 3  # scheduler, agent, worker process
    gw.process.send_signal(signal.SIGINT)
    assert gw.process.wait(30) == 0, gw.log()[-4000:]
    assert not wait_gone(procs, timeout=10), gw.log()[-4000:]
    assert "DASH cluster stopped" in gw.log()
    assert not (gw.data_dir / "run" / str(gw.process.pid)).exists()


def test_children_exit_when_the_gateway_is_killed(gateway_factory) -> None:
    gw = gateway_factory(local_workers=1)
    gw.wait_for_workers(1)
    procs = gw.descendants()
    assert len(procs) >= 3
    gw.process.send_signal(signal.SIGKILL)
    gw.process.wait(10)
    started = time.monotonic()
    left = wait_gone(procs, timeout=15)
    assert not left, f"left after {time.monotonic() - started:.0f}s: {[p.cmdline() for p in left]}"
    assert not alive(procs)


def _post(gw: Gateway, path: str) -> tuple[int, dict]:
    req = urllib.request.Request(
        gw.url + path,
        data=b"{}",
        method="POST",
        headers={"Authorization": f"token {gw.token}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=30) as resp:
        return resp.status, json.loads(resp.read())


def _delete(gw: Gateway, path: str) -> None:
    req = urllib.request.Request(
        gw.url + path, method="DELETE", headers={"Authorization": f"token {gw.token}"}
    )
    with urllib.request.urlopen(req, timeout=30):
        pass


@pytest.mark.parametrize(
    "command", ["", "users", "users add", "users list", "users remove", "invite"]
)
@pytest.mark.parametrize("option", ["--help", "--help-all"])
def test_every_command_prints_its_help(command: str, option: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "dash_gateway", *command.split(), option],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stdout + result.stderr, result.stderr
    assert "--data-dir" in result.stdout or "data_dir" in result.stdout, result.stdout
