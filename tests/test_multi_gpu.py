"""Several GPUs for one task: a real ``dash-worker join`` agent declaring two GPUs (this
machine has none) runs ``gpu=2`` work seeing both, ``gpu=1`` work one per GPU, never the
two on one GPU at once; ``gpu=3`` fails at once saying what exists."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from typing import Any

import pytest
from conftest import Gateway, run_dash_worker

import dash_kernel as dk
from dash_kernel.resources import ResourceUnavailable
from dash_kernel.status import cluster_status

A100 = "NVIDIA A100-SXM4-80GB:80GB"
WORKERS = {"duo-gpu0", "duo-gpu1", "duo-gpu0+1", "duo-cpu"}


def live_workers(gw: Gateway) -> dict[str, dict[str, Any]]:
    return {w["name"]: w for w in gw.status()["workers"]}


@pytest.fixture(scope="module")
def duo(bare_gateway: Gateway, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    """One contributed machine, ``duo``, sharing two A100s and one CPU core."""
    agent = run_dash_worker(
        tmp_path_factory.mktemp("duo"), "join", bare_gateway.url,
        "--token", bare_gateway.invite()["token"], "--name", "duo", "--cpus", "1",
        "--memory", "3GB", "--declare-gpu", A100, "--declare-gpu", A100, name="duo",
    )  # fmt: skip
    try:
        for _ in range(900):
            if set(live_workers(bare_gateway)) >= WORKERS or agent.process.poll() is not None:
                break
            time.sleep(0.1)
        assert set(live_workers(bare_gateway)) >= WORKERS, agent.log()[-6000:]
        dk.connect(bare_gateway.url, bare_gateway.token)
        yield bare_gateway
    finally:
        dk.disconnect()
        agent.stop()


def wait_running(gw: Gateway, *names: str) -> None:
    deadline = time.monotonic() + 10
    while any(live_workers(gw)[name]["status"] != "running" for name in names):
        assert time.monotonic() < deadline, live_workers(gw)
        time.sleep(0.05)


def span(seconds: float) -> dict[str, Any]:
    """Where this task ran, which GPUs it saw, and when (wall clock)."""
    from distributed import get_worker

    start = time.time()
    time.sleep(seconds)
    return {
        "worker": get_worker().name,
        "devices": os.environ.get("CUDA_VISIBLE_DEVICES", ""),
        "start": start,
        "end": time.time(),
    }


def test_the_machine_runs_a_worker_holding_both_gpus(duo: Gateway) -> None:
    workers = live_workers(duo)
    both = workers["duo-gpu0+1"]["resources"]
    assert both["GPU"] == 2 and both["gpu:a100"] == 1 and both["VRAM"] == 80 * 10**9
    assert "pool:gpu" not in both
    assert workers["duo-gpu0"]["resources"]["GPU"] == 1
    # Two GPUs, though three workers see them.
    assert cluster_status(dk.connect()).totals["gpus"] == 2


def test_gpu2_sees_both_gpus_and_gpu1_one(duo: Gateway) -> None:
    assert dk.remote(gpu=2)(span)(0)["devices"] == "0,1"
    assert dk.remote(gpu="2")(span)(0)["worker"] == "duo-gpu0+1"
    # The one-GPU workers were paused while the 2-GPU tasks ran; each resumes on its own,
    # and Dask gives all waiting work to the first one back.
    wait_running(duo, "duo-gpu0", "duo-gpu1")
    ones = dk.connect().client.gather([dk.remote(gpu=1)(span).submit(1.5) for _ in range(2)])
    # Two at once, one per GPU: neither waits for the other, nor lands on the 2-GPU worker.
    assert sorted(s["devices"] for s in ones) == ["0", "1"]
    assert ones[0]["start"] < ones[1]["end"] and ones[1]["start"] < ones[0]["end"]


def overlaps(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return a["start"] < b["end"] and b["start"] < a["end"]


def test_a_gpu_is_never_used_by_two_workers_at_once(duo: Gateway) -> None:
    one, two = dk.remote(gpu=1)(span), dk.remote(gpu=2)(span)
    wait_running(duo, "duo-gpu0", "duo-gpu1")
    first = [one.submit(2.0) for _ in range(2)]
    time.sleep(0.5)  # both GPUs busy with one-GPU work
    both = two.submit(2.0)
    time.sleep(0.5)
    later = [one.submit(1.0) for _ in range(4)]
    client = dk.connect().client
    spans = client.gather(first + later)
    held = both.result()
    assert held["devices"] == "0,1"
    for s in spans:
        assert s["devices"] in ("0", "1")
        assert not overlaps(s, held), f"{s} ran on GPU {s['devices']} while {held} held it"
    # The 2-GPU task waited only for the work already running, not for work sent later.
    assert all(s["start"] >= held["end"] for s in spans[2:]), (spans, held)


def test_three_gpus_fail_at_once_saying_what_exists(duo: Gateway) -> None:
    started = time.monotonic()
    with pytest.raises(ResourceUnavailable) as info:
        dk.remote(gpu=3)(span)(0)
    message = str(info.value)
    assert "Closest worker: duo-gpu0+1 (2 GPU (a100 sxm4 80gb)" in message
    assert "GPU 3 asked, it has 2" in message
    assert time.monotonic() - started < 10
