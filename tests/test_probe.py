"""The hardware probe: NVML answers recorded on GPU machines replayed, and the real probe here."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import psutil
import pynvml
import pytest

from dash_kernel._version import __version__
from dash_worker.probe import GpuMonitor, probe_gpus, probe_hardware, utilisation

NVML_DATA = Path(__file__).parent / "data" / "nvml"


class ReplayNvml:
    """Stands in for the ``pynvml`` module, answering from a recorded file.

    Errors are ``pynvml``'s own exception classes, so the probe is tested against what the
    real bindings raise. ``calls`` records init/shutdown balance.
    """

    NVMLError = pynvml.NVMLError

    def __init__(self, name: str):
        self.data = json.loads((NVML_DATA / f"{name}.json").read_text())
        self.devices: list[dict[str, Any]] = self.data.get("devices", [])
        self.calls: list[str] = []

    def __getattr__(self, name: str) -> Any:
        if name.startswith("NVMLError_"):
            return getattr(pynvml, name)
        raise AttributeError(name)

    def _raise_if(self, device: dict[str, Any], call: str) -> None:
        error = device.get("errors", {}).get(call)
        if error:
            raise getattr(pynvml, error)()

    def _str(self, text: str) -> str | bytes:
        return text.encode() if self.data.get("strings_as_bytes") else text

    def nvmlInit(self) -> None:
        self.calls.append("init")
        if "init_error" in self.data:
            raise getattr(pynvml, self.data["init_error"])()

    def nvmlShutdown(self) -> None:
        self.calls.append("shutdown")

    def nvmlSystemGetDriverVersion(self) -> str | bytes:
        return self._str(self.data["driver"])

    def nvmlDeviceGetCount(self) -> int:
        return len(self.devices)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> dict[str, Any]:
        if index >= len(self.devices):
            raise pynvml.NVMLError_InvalidArgument()
        self._raise_if(self.devices[index], "nvmlDeviceGetHandleByIndex")
        return self.devices[index]

    def nvmlDeviceGetHandleByUUID(self, uuid: str | bytes) -> dict[str, Any]:
        uuid = uuid.decode() if isinstance(uuid, bytes) else uuid
        for device in self.devices:
            if device.get("uuid") == uuid:
                return device
        raise pynvml.NVMLError_NotFound()

    def nvmlDeviceGetName(self, handle: dict[str, Any]) -> str | bytes:
        self._raise_if(handle, "nvmlDeviceGetName")
        return self._str(handle["name"])

    def nvmlDeviceGetUUID(self, handle: dict[str, Any]) -> str | bytes:
        return self._str(handle["uuid"])

    def nvmlDeviceGetMemoryInfo(self, handle: dict[str, Any]) -> SimpleNamespace:
        self._raise_if(handle, "nvmlDeviceGetMemoryInfo")
        return SimpleNamespace(**handle["memory"])

    def nvmlDeviceGetCudaComputeCapability(self, handle: dict[str, Any]) -> tuple[int, int]:
        return tuple(handle["compute_capability"])  # type: ignore[return-value]

    def nvmlDeviceGetUtilizationRates(self, handle: dict[str, Any]) -> SimpleNamespace:
        self._raise_if(handle, "nvmlDeviceGetUtilizationRates")
        return SimpleNamespace(**handle["utilization"])


def test_h200() -> None:
    nvml = ReplayNvml("h200")
    gpus, reason = probe_gpus(nvml)
    assert reason == "ok"
    assert gpus == [
        {
            "index": 0,
            "name": "NVIDIA H200",
            "uuid": "GPU-5d8c6f5e-3f0b-2a1c-9e7b-1f2d3c4b5a69",
            "vram": 150754820096,
            "driver": "550.54.15",
            "compute_capability": "9.0",
            "declared": False,
        },
        {
            "index": 1,
            "name": "NVIDIA H200",
            "uuid": "GPU-0a7e2b94-61c3-4f8d-b2e5-7c9a1d3e5f20",
            "vram": 150754820096,
            "driver": "550.54.15",
            "compute_capability": "9.0",
            "declared": False,
        },
    ]
    assert nvml.calls == ["init", "shutdown"]


def test_a100() -> None:
    gpus, reason = probe_gpus(ReplayNvml("a100"))
    assert reason == "ok"
    [gpu] = gpus
    assert gpu["name"] == "NVIDIA A100-SXM4-80GB"
    assert gpu["vram"] == 80 * 2**30
    assert gpu["compute_capability"] == "8.0"


def test_rtx4090_with_old_bindings_and_a_lost_gpu() -> None:
    """Bytes from old bindings are decoded; a GPU that cannot be read is left out and said."""
    gpus, reason = probe_gpus(ReplayNvml("rtx4090"))
    assert [(g["index"], g["name"], g["compute_capability"]) for g in gpus] == [
        (0, "NVIDIA GeForce RTX 4090", "8.9")
    ]
    assert gpus[0]["uuid"] == "GPU-3c2b1a09-8f7e-6d5c-4b3a-291807f6e5d4"
    assert gpus[0]["driver"] == "550.54.15"
    assert reason == "GPU 1 could not be read (GPU is lost)"


@pytest.mark.parametrize(
    ("recording", "reason"),
    [
        ("library_not_found", "no NVIDIA driver (libnvidia-ml.so.1 not found)"),
        ("driver_not_loaded", "the NVIDIA driver is not loaded"),
    ],
)
def test_nvml_failures_are_a_clean_answer(recording: str, reason: str) -> None:
    nvml = ReplayNvml(recording)
    assert probe_gpus(nvml) == ([], reason)
    assert nvml.calls == ["init"]  # nothing to shut down after a failed init


def test_declared_gpus_follow_the_probed_ones() -> None:
    hardware = probe_hardware(
        declared_gpus=[{"name": "NVIDIA A100-SXM4-80GB", "vram": 80 * 10**9}],
        nvml=ReplayNvml("h200"),
    )
    assert [(g["index"], g["name"], g["declared"]) for g in hardware["gpus"]] == [
        (0, "NVIDIA H200", False),
        (1, "NVIDIA H200", False),
        (2, "NVIDIA A100-SXM4-80GB", True),
    ]
    declared = hardware["gpus"][2]
    assert declared["vram"] == 80 * 10**9
    assert declared["uuid"] is None and declared["driver"] is None
    assert hardware["gpu_probe"] == "ok"


def test_gpu_utilisation_replayed() -> None:
    nvml = ReplayNvml("rtx4090")
    gpus, _ = probe_gpus(nvml)
    declared = {"index": 1, "name": "X", "uuid": None, "vram": 1, "declared": True}
    monitor = GpuMonitor(nvml)
    load = utilisation([*gpus, declared], monitor)
    monitor.close()
    assert load["gpus"] == [
        # This GPU does not report its utilisation (NotSupported); its memory it does.
        {"index": 0, "utilisation": None, "memory_used": 2**30, "memory_total": 25757220864},
        {"index": 1, "utilisation": None, "memory_used": None, "memory_total": None},
    ]
    h200 = ReplayNvml("h200")
    monitor = GpuMonitor(h200)
    rows = [monitor.read(g) for g in probe_gpus(h200)[0]]
    assert [r["utilisation"] for r in rows] == [37.0, 0.0]
    assert rows[0]["memory_used"] == 584056832
    monitor.read(probe_gpus(h200)[0][0])
    monitor.close()
    # NVML stays open between reads: one init for the monitor, however many reads.
    assert h200.calls.count("init") == 1 + 2  # the monitor's, and the two probes'


def test_gpu_utilisation_without_nvml() -> None:
    monitor = GpuMonitor(ReplayNvml("driver_not_loaded"))
    gpu = {"index": 0, "name": "NVIDIA H200", "uuid": "GPU-x", "vram": 1, "declared": False}
    assert monitor.read(gpu) == {
        "index": 0,
        "utilisation": None,
        "memory_used": None,
        "memory_total": None,
    }


def test_real_probe_on_this_machine(tmp_path: Path) -> None:
    """This machine has no NVIDIA GPU: the probe says why, and reports the rest."""
    if Path("/dev/nvidiactl").exists():
        pytest.skip("this machine has an NVIDIA driver")
    hardware = probe_hardware(local_directory=str(tmp_path / "not-yet-made"))
    assert hardware["gpus"] == []
    assert hardware["gpu_probe"] != "ok"
    assert "\n" not in hardware["gpu_probe"]
    assert hardware["gpu_probe"] in (
        "no NVIDIA driver (libnvidia-ml.so.1 not found)",
        "the NVIDIA driver is not loaded",
    )
    assert hardware["hostname"] == socket.gethostname()
    assert hardware["dash_version"] == __version__
    assert hardware["cpus"] == psutil.cpu_count() >= 1
    assert hardware["cpus_physical"] in (None, psutil.cpu_count(logical=False))
    assert hardware["memory"] == psutil.virtual_memory().total
    disk = hardware["disk"]
    assert disk["path"] == str(tmp_path / "not-yet-made")
    assert 0 < disk["free"] <= disk["total"]
    json.dumps(hardware)  # it travels as JSON


def test_real_utilisation_on_this_machine() -> None:
    load = utilisation()
    assert set(load) == {"cpu_percent", "memory_used", "memory_total", "gpus"}
    assert 0 <= load["cpu_percent"] <= 100 * (os.cpu_count() or 1)
    assert 0 < load["memory_used"] < load["memory_total"]
    assert load["gpus"] == []
