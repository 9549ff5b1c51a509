"""Draining the only machine that can hold a session (issue #12, item 3): the session
stays, the kernel answers and says so, the drain says what it waits for, and the session
moves, variables and all, once a machine that fits joins; a session lost with its draining
machine is reported. Real gateway, real ``dash-worker join`` agents (GPUs declared), a real
DASH kernel."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from conftest import Gateway, wait_until
from kernels import Execution, KernelDriver

A100 = "NVIDIA A100-SXM4-80GB:80GB"
STAYS = "your session stays until a machine that fits joins"


def drain_message(gw: Gateway, machine: str) -> str:
    return str((gw.machines()[machine].get("drain") or {}).get("message") or "")


def run_until(
    kernel: KernelDriver, code: str, seen: str, timeout: float = 60
) -> tuple[Execution, list[Execution]]:
    """Run ``code`` until its stderr shows ``seen``; that run, and every run, in order."""
    deadline = time.monotonic() + timeout
    runs: list[Execution] = []
    while True:
        run = kernel.execute(code, timeout=120)
        runs.append(run)
        assert run.status == "ok", run.traceback_text()
        if seen in run.stream("stderr") or time.monotonic() > deadline:
            return run, runs
        time.sleep(0.5)


def session_worker(run: Execution) -> Any:
    return run.reply["metadata"].get("dash", {}).get("worker")


def test_a_session_no_other_machine_can_hold_stays_until_one_joins(
    gateway_factory, contributors, tmp_path: Path
) -> None:
    gw = gateway_factory(local_workers=0)
    gw.wait_for_workers(0)
    gpu = ("--cpus", "0", "--memory", "1.5GB", "--declare-gpu", A100)
    agents = {
        "rig": contributors(gw, "--name", "rig", *gpu),
        "plain": contributors(gw, "--name", "plain", "--cpus", "1", "--memory", "1GB",
                              "--gpus", "none"),
    }  # fmt: skip
    gw.wait_for_workers(2)
    with KernelDriver(kernel_name="dash", env=gw.env, cwd=str(tmp_path)) as kernel:
        use = kernel.execute('%dash use gpu="A100"', timeout=120)
        assert use.status == "ok", use.traceback_text()
        first = kernel.execute("kept = 41", timeout=120)
        assert first.status == "ok", first.traceback_text()
        assert session_worker(first) == "rig-gpu0"
        code, body = gw.call("POST", "dash/api/workers/rig/drain")
        assert code == 200, body

        # The kernel answers, the cell runs where the session is, and says why, once.
        run, runs = run_until(kernel, "print(kept + 1)", STAYS)
        assert STAYS in run.stream("stderr"), run.stream("stderr")
        assert f"DASH: machine rig is draining; {STAYS}" in run.stream("stderr")
        assert run.stream() == "42\n" and session_worker(run) == "rig-gpu0"
        again = kernel.execute("print(kept + 2)", timeout=60)
        assert again.status == "ok" and again.stream() == "43\n"
        assert STAYS not in again.stream("stderr")
        # The drain waits, and says for what.
        message = wait_until(lambda: drain_message(gw, "rig"), 15, "a drain status")
        assert "waiting for 1 session that no other machine can hold" in message, message
        assert "operator's" in message and "A100" in message.upper(), message
        assert agents["rig"].process.poll() is None, agents["rig"].log()

        # A machine that fits joins: the session moves before its next cell, and the
        # drain ends.
        rig2 = contributors(gw, "--name", "rig2", *gpu)
        wait_until(lambda: "rig2-gpu0" in {w["name"] for w in gw.status()["workers"]}, 60,
                   "rig2-gpu0")  # fmt: skip
        moved, _ = run_until(kernel, "print(kept + 3)", "The session moved")
        notice = moved.stream("stderr")
        assert "The session moved to worker rig2-gpu0" in notice, notice
        assert "Carried over: kept" in notice, notice
        assert moved.stream() == "44\n" and session_worker(moved) == "rig2-gpu0"
        assert agents["rig"].wait_exit(60) == 0, agents["rig"].log()

        # Draining rig2 too, the session stays; then rig2 goes, and the session with it:
        # that is reported, and every later cell answers at once, naming what it needs.
        code, body = gw.call("POST", "dash/api/workers/rig2/drain")
        assert code == 200, body
        run_until(kernel, "print(kept)", STAYS)
        rig2.stop()
        deadline = time.monotonic() + 90
        seen = ""
        while "was lost" not in seen and time.monotonic() < deadline:
            seen += kernel.execute("print(kept)", timeout=60).stream("stderr")
        assert "DASH: machine rig2 is draining, and the session on it was lost" in seen, seen
        assert "No machine that fits a session asking for gpu='A100' is connected" in seen
        started = time.monotonic()
        after = kernel.execute("print(kept)", timeout=60)
        assert after.status == "error" and "gpu='A100'" in after.error["evalue"], after.error
        assert time.monotonic() - started < 30


def test_a_drains_status_names_other_users_to_no_one_but_the_operator():
    from dash_gateway.machines import drain_message, drains_for

    alice = {"id": "s1", "user": "alice", "notebook": "train.ipynb", "worker": "rig-gpu0",
             "needs": "1 GPU (a100)", "movable": False}  # fmt: skip
    record = {"name": "rig", "owner": "bob", "state": "draining",
              "drain": {"sessions": [alice], "tasks": 0,
                        "message": drain_message([alice], 0)}}  # fmt: skip
    assert "alice's notebook train.ipynb on rig-gpu0" in record["drain"]["message"]
    assert drains_for([record], "operator", operator=True) == [record]
    [seen] = drains_for([record], "bob", operator=False)
    assert "another user's session on rig-gpu0" in seen["drain"]["message"]
    assert "alice" not in str(seen) and "train.ipynb" not in str(seen) and "s1" not in str(seen)
    [own] = drains_for([{**record, "owner": "carol"}], "alice", operator=False)
    assert "alice's notebook train.ipynb" in own["drain"]["message"]
