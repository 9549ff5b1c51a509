"""What the "DASH distributed" kernel says it can do: in its kernel_info reply and its
kernelspec. It says only what is true (no debugger: breakpoints would be in this relay
process, where no cell runs) and declares what ipykernel's own kernelspec does."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from ipykernel.kernelspec import get_kernel_dict
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import KernelManager
from kernels import KernelDriver

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def kernel(tmp_path_factory):
    """A DASH kernel that never runs a cell, so it needs no gateway."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DASH_")}
    with KernelDriver(
        kernel_name="dash", env=env, cwd=str(tmp_path_factory.mktemp("info"))
    ) as driver:
        yield driver


def _control(kernel: KernelDriver, msg_type: str, content: dict) -> dict:
    client = kernel.client
    message = client.session.msg(msg_type, content)
    client.control_channel.send(message)
    while True:
        reply = client.get_control_msg(timeout=10)
        if reply["parent_header"].get("msg_id") == message["header"]["msg_id"]:
            return reply


def test_kernel_info_offers_no_debugger_and_no_subshells(kernel):
    kernel.client.kernel_info()
    reply = kernel.client.get_shell_msg(timeout=10)
    assert reply["msg_type"] == "kernel_info_reply"
    assert reply["content"]["implementation"] == "dash_kernel"
    assert reply["content"]["supported_features"] == []


def test_a_debug_request_is_answered_with_an_error(kernel):
    request = {"seq": 1, "type": "request", "command": "initialize", "arguments": {}}
    reply = _control(kernel, "debug_request", request)
    assert reply["msg_type"] == "debug_reply"
    content = reply["content"]
    assert (content["type"], content["success"], content["request_seq"]) == ("response", False, 1)
    assert content["command"] == "initialize"
    assert "no debugger" in content["message"]


def test_a_subshell_request_is_refused(kernel):
    reply = _control(kernel, "create_subshell_request", {})
    assert reply["content"]["status"] == "error"
    assert "no subshells" in reply["content"]["evalue"]


def test_the_installed_kernelspec_declares_what_ipykernels_does_but_the_debugger():
    ipykernel_spec = get_kernel_dict()
    spec = KernelSpecManager().get_kernel_spec("dash")
    assert spec.metadata["debugger"] is False
    assert (
        spec.metadata["supported_encryption"] == ipykernel_spec["metadata"]["supported_encryption"]
    )
    assert spec.kernel_protocol_version == ipykernel_spec["kernel_protocol_version"]
    shipped = json.loads((REPO / "kernelspecs" / "dash" / "kernel.json").read_text())
    assert json.loads(Path(spec.resource_dir, "kernel.json").read_text()) == shipped


def _start_and_log(tmp_path: Path, encryption: str) -> tuple[bool, str]:
    """Start the DASH kernel as a manager with ``transport_encryption`` does, ask it for
    kernel_info; whether it got Curve keys, and what it logged."""
    manager = KernelManager(kernel_name="dash", transport_encryption=encryption)
    env = {k: v for k, v in os.environ.items() if not k.startswith("DASH_")}
    log_path = tmp_path / f"kernel-{encryption}.log"
    with open(log_path, "wb") as log:
        manager.start_kernel(env=env, cwd=str(tmp_path), stdout=log, stderr=log)
    client = manager.client()
    try:
        client.start_channels()
        client.wait_for_ready(timeout=60)
        client.kernel_info()
        assert client.get_shell_msg(timeout=10)["content"]["status"] == "ok"
    finally:
        client.stop_channels()
        manager.shutdown_kernel(now=False)
    return manager.curve_publickey is not None, log_path.read_text()


def test_a_manager_that_encrypts_when_it_can_runs_the_kernel_over_curve(tmp_path):
    # as a Jupyter Server with c.MappingKernelManager.transport_encryption = "auto" does
    encrypted, logged = _start_and_log(tmp_path, "auto")
    assert encrypted
    assert "without encryption" not in logged
    # and the warning it would give otherwise is seen here
    encrypted, logged = _start_and_log(tmp_path, "disabled")
    assert not encrypted
    assert "Kernel is running over TCP without encryption" in logged


def test_the_gateway_starts_its_kernels_over_curve(gateway):
    """The gateway's kernels get CurveZMQ keys unless its operator says otherwise: their
    ports are open on loopback to every process on the machine."""
    code, started = gateway.call("POST", "api/kernels", {"name": "dash"})
    assert code == 201, started
    try:
        runtime = gateway.log_path.parent / "jupyter-runtime"
        [connection] = runtime.glob(f"kernel-{started['id']}.json")
        info = json.loads(connection.read_text())
        assert info.get("curve_publickey") and info.get("curve_secretkey"), sorted(info)
    finally:
        gateway.call("DELETE", f"api/kernels/{started['id']}")
