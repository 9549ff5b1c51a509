"""What this machine has (CPUs, memory, disk, NVIDIA GPUs through NVML) and how busy it is."""

from __future__ import annotations

import contextlib
import logging
import os
import platform
import socket
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

import dask
import psutil

from dash_kernel._version import __version__

__all__ = ["GpuMonitor", "default_local_directory", "probe_gpus", "probe_hardware", "utilisation"]

log = logging.getLogger(__name__)

GPU_PROBE_OK = "ok"


def _import_nvml() -> ModuleType | None:
    try:
        import pynvml
    except ImportError:
        return None
    return pynvml


def _text(value: str | bytes) -> str:
    # Older NVML bindings return bytes where newer ones return str.
    return value.decode() if isinstance(value, bytes) else str(value)


def _nvml_failure(nvml: ModuleType, exc: Exception) -> str:
    """One line saying why NVML could not be used."""
    if isinstance(exc, getattr(nvml, "NVMLError_LibraryNotFound", ())):
        return "no NVIDIA driver (libnvidia-ml.so.1 not found)"
    if isinstance(exc, getattr(nvml, "NVMLError_DriverNotLoaded", ())):
        return "the NVIDIA driver is not loaded"
    if isinstance(exc, getattr(nvml, "NVMLError_NoPermission", ())):
        return "no permission to use the NVIDIA driver"
    return f"NVML failed: {exc}"


def _nvml_errors(nvml: ModuleType) -> tuple[type[BaseException], ...]:
    # OSError: a driver library that exists but cannot be loaded (wrong architecture, say).
    return (getattr(nvml, "NVMLError", RuntimeError), OSError)


def _read_gpu(nvml: ModuleType, index: int, driver: str) -> dict[str, Any]:
    handle = nvml.nvmlDeviceGetHandleByIndex(index)
    major, minor = nvml.nvmlDeviceGetCudaComputeCapability(handle)
    return {
        "index": index,
        "name": _text(nvml.nvmlDeviceGetName(handle)),
        "uuid": _text(nvml.nvmlDeviceGetUUID(handle)),
        "vram": int(nvml.nvmlDeviceGetMemoryInfo(handle).total),
        "driver": driver,
        "compute_capability": f"{major}.{minor}",
        "declared": False,
    }


def probe_gpus(nvml: ModuleType | None = None) -> tuple[list[dict[str, Any]], str]:
    """The NVIDIA GPUs NVML reports, and ``"ok"`` or one line saying why there are none.

    ``nvml`` is the ``pynvml`` module (imported when not given); tests pass a replay of
    recorded NVML answers instead. Never raises: a machine without GPUs is not an error.
    """
    if nvml is None:
        nvml = _import_nvml()
        if nvml is None:
            return [], "the nvidia-ml-py package (module pynvml) is not installed"
    errors = _nvml_errors(nvml)
    try:
        nvml.nvmlInit()
    except errors as exc:
        return [], _nvml_failure(nvml, exc)
    try:
        try:
            driver = _text(nvml.nvmlSystemGetDriverVersion())
            count = int(nvml.nvmlDeviceGetCount())
        except errors as exc:
            return [], _nvml_failure(nvml, exc)
        gpus, skipped = [], []
        for index in range(count):
            try:
                gpus.append(_read_gpu(nvml, index, driver))
            except errors as exc:
                log.warning("GPU %d could not be read, so it is not shared: %s", index, exc)
                skipped.append(f"GPU {index} could not be read ({exc})")
        if skipped:
            return gpus, "; ".join(skipped)
        if not gpus:
            return [], "NVML reports no GPUs"
        return gpus, GPU_PROBE_OK
    finally:
        with contextlib.suppress(errors):
            nvml.nvmlShutdown()


def default_local_directory() -> str:
    """Where Dask workers keep scratch files when no ``--local-directory`` is given."""
    return str(dask.config.get("temporary-directory", None) or tempfile.gettempdir())


def _disk(path: str) -> dict[str, Any]:
    # The directory may not exist yet: measure the nearest existing parent's filesystem.
    probe = Path(path).expanduser().resolve()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    usage = psutil.disk_usage(str(probe))
    return {"path": str(Path(path).expanduser()), "total": usage.total, "free": usage.free}


def probe_hardware(
    local_directory: str | None = None,
    declared_gpus: Iterable[Mapping[str, Any]] = (),
    nvml: ModuleType | None = None,
) -> dict[str, Any]:
    """The ``hardware`` record sent at enrolment; declared GPUs get indices after the probed ones."""
    gpus, gpu_probe = probe_gpus(nvml)
    for declared in declared_gpus:
        gpus.append(
            {
                "index": len(gpus),
                "name": str(declared["name"]),
                "uuid": None,
                "vram": int(declared["vram"]),
                "driver": None,
                "compute_capability": None,
                "declared": True,
            }
        )
    return {
        "hostname": socket.gethostname(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "dash_version": __version__,
        "cpus": psutil.cpu_count(logical=True) or os.cpu_count() or 1,
        "cpus_physical": psutil.cpu_count(logical=False),
        "memory": psutil.virtual_memory().total,
        "disk": _disk(local_directory or default_local_directory()),
        "gpus": gpus,
        "gpu_probe": gpu_probe,
    }


class GpuMonitor:
    """Reads GPU load for heartbeats, keeping NVML open between reads.

    Opening NVML once matters: on a machine without persistence mode each ``nvmlInit``
    makes the driver set every GPU up again, which can take a second per heartbeat.
    """

    def __init__(self, nvml: ModuleType | None = None):
        self._nvml = nvml
        self._open = False
        self._failed = False

    def _ensure_open(self) -> ModuleType | None:
        if self._open or self._failed:
            return self._nvml if self._open else None
        if self._nvml is None:
            self._nvml = _import_nvml()
        if self._nvml is None:
            self._failed = True
            return None
        try:
            self._nvml.nvmlInit()
        except _nvml_errors(self._nvml) as exc:
            log.info("GPU load is not reported: %s", _nvml_failure(self._nvml, exc))
            self._failed = True
            return None
        self._open = True
        return self._nvml

    def read(self, gpu: Mapping[str, Any]) -> dict[str, Any]:
        """Load of one GPU record (from :func:`probe_hardware`); None where NVML does not answer."""
        out: dict[str, Any] = {
            "index": gpu["index"],
            "utilisation": None,
            "memory_used": None,
            "memory_total": None,
        }
        if gpu.get("declared"):
            return out
        nvml = self._ensure_open()
        if nvml is None:
            return out
        errors = _nvml_errors(nvml)
        try:
            # By UUID: NVML's index order (PCI bus) need not match the one recorded at start.
            if gpu.get("uuid"):
                handle = nvml.nvmlDeviceGetHandleByUUID(gpu["uuid"])
            else:
                handle = nvml.nvmlDeviceGetHandleByIndex(gpu["index"])
        except errors:
            return out
        with contextlib.suppress(errors):
            out["utilisation"] = float(nvml.nvmlDeviceGetUtilizationRates(handle).gpu)
        try:
            memory = nvml.nvmlDeviceGetMemoryInfo(handle)
            out["memory_used"], out["memory_total"] = int(memory.used), int(memory.total)
        except errors:
            pass
        return out

    def close(self) -> None:
        if self._open and self._nvml is not None:
            try:
                self._nvml.nvmlShutdown()
            except _nvml_errors(self._nvml):
                pass
        self._open = False


def utilisation(
    gpus: Iterable[Mapping[str, Any]] = (), monitor: GpuMonitor | None = None
) -> dict[str, Any]:
    """The ``utilisation`` record of a heartbeat: CPU and memory load, and each shared GPU's."""
    memory = psutil.virtual_memory()
    gpus = list(gpus)
    own = monitor is None and bool(gpus)
    monitor = monitor or GpuMonitor()
    try:
        gpu_rows = [monitor.read(gpu) for gpu in gpus]
    finally:
        if own:
            monitor.close()
    return {
        # Since the previous call (the previous heartbeat); the very first call reads 0.0.
        "cpu_percent": float(psutil.cpu_percent(interval=None)),
        "memory_used": int(memory.total - memory.available),
        "memory_total": int(memory.total),
        "gpus": gpu_rows,
    }
