"""From hardware and the contributor's caps to the Dask workers a machine runs (pure functions).

The rule, for a machine M sharing ``cpus`` cores, ``memory`` bytes and some GPUs:

- one worker ``M-gpu<index>`` per shared GPU, with ``gpu_threads`` threads,
  ``CUDA_VISIBLE_DEVICES`` set to that GPU (its UUID when NVML gave one), and resources
  ``GPU=1``, ``VRAM``, the model's ``gpu:<token>`` tags;
- for each GPU model with N ≥ 2 shared GPUs, one more worker ``M-gpu<i>+<j>...`` with
  ``gpu_threads`` threads, ``CUDA_VISIBLE_DEVICES`` naming all N, and resources ``GPU=N``,
  ``VRAM`` (of each GPU) and the model's tags, for work that asks for 2 or more GPUs
  (``gpu=2``). It and the one-GPU workers never use a GPU at once: their tasks hold per-GPU
  locks, and a one-GPU worker pauses while the multi-GPU worker wants its GPU
  (:mod:`dash_worker.gpu_locks`). A slice of N GPUs, as a per-user lease will be;
- one worker ``M-cpu`` with ``cpus`` threads if ``cpus > 0``, with no GPU visible;
- ``memory`` is split equally between these workers (rounded down to a MiB), and each
  declares its share as ``MEMORY`` and has it as its Dask memory limit (the nanny restarts
  a worker that goes over it). Equally, not by threads: a GPU worker's host memory need
  follows its GPU (staging batches, loading checkpoints), not its two driver threads, so a
  per-thread split would starve GPUs that sit beside a many-core CPU worker. A multi-GPU
  worker has a share too: it may hold data while the one-GPU workers do, and the cap holds.
- the whole agent is pinned to ``cpus`` cores; with ``--cpus 0`` (GPUs only) to one core
  per shared GPU, since a GPU worker's threads still need a core to drive the GPU.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from dask.utils import format_bytes, parse_bytes

from dash_kernel.resources import worker_resources
from dash_worker.gpu_locks import LOCKS_ENV, lock_config

__all__ = [
    "CapsError",
    "WorkerSpec",
    "affinity_cores",
    "default_machine_name",
    "gpu_identities",
    "match_gpus",
    "parse_declared_gpu",
    "parse_gpu_selection",
    "plan_workers",
    "resolve_caps",
    "validate_machine_name",
    "with_gpu_locks",
]

MACHINE_NAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,39}$")
RESERVED_MACHINE_NAMES = ("local",)
# Below this a worker cannot hold a Dask worker process and one remote IPython kernel.
MIN_WORKER_MEMORY = 256 * 2**20
MIB = 2**20


class CapsError(ValueError):
    """Caps or options that this machine cannot honour; the message says what it has."""


@dataclass(frozen=True)
class WorkerSpec:
    """One Dask worker (one nanny) the agent runs."""

    name: str
    nthreads: int
    memory_limit: int
    resources: dict[str, float]
    env: dict[str, str] = field(default_factory=dict)
    # The one GPU of a one-GPU worker; a multi-GPU worker has them in ``gpus`` instead.
    gpu: dict[str, Any] | None = None
    gpus: tuple[dict[str, Any], ...] = ()
    # Names of the GPU locks its tasks take (:mod:`dash_worker.gpu_locks`), and whether
    # it reserves them (a multi-GPU worker) or pauses while another worker does.
    gpu_locks: tuple[str, ...] = ()
    reserves_gpus: bool = False


def validate_machine_name(name: str) -> str:
    """``name`` if it is a valid machine name, else :class:`CapsError` saying what is allowed."""
    if not MACHINE_NAME.match(name):
        raise CapsError(
            f"machine name {name!r} is not allowed: use 1 to 40 lower-case letters, digits "
            "and '-', starting with a letter or digit"
        )
    if name in RESERVED_MACHINE_NAMES:
        raise CapsError(f"machine name {name!r} is reserved for the gateway's own workers")
    return name


def default_machine_name(hostname: str) -> str:
    """A valid machine name made from a host name ("GPU_Box.lan" -> "gpu-box")."""
    short = hostname.split(".", 1)[0].lower()
    name = re.sub(r"[^a-z0-9-]+", "-", short).strip("-")[:40].strip("-") or "machine"
    if name in RESERVED_MACHINE_NAMES:
        name = f"{name}-machine"
    return name


def parse_declared_gpu(text: str) -> dict[str, Any]:
    """``"NVIDIA A100-SXM4-80GB:80GB"`` -> ``{"name": "NVIDIA A100-SXM4-80GB", "vram": 80e9}``."""
    model, sep, size = text.rpartition(":")
    model = model.strip()
    if not sep or not model or not size.strip():
        raise CapsError(f"expected MODEL:VRAM such as 'NVIDIA A100-SXM4-80GB:80GB'; got {text!r}")
    try:
        vram = parse_bytes(size.strip().replace(" ", ""))
    except (ValueError, TypeError) as exc:
        raise CapsError(f"VRAM in {text!r} must be a size such as 24GB or 80GiB") from exc
    if vram <= 0:
        raise CapsError(f"VRAM in {text!r} must be positive")
    return {"name": model, "vram": int(vram)}


def parse_gpu_selection(text: str) -> list[int] | str:
    """``"all"``, ``"none"`` or a list of GPU indices from ``"0,1"``."""
    value = text.strip().lower()
    if value in ("all", "none"):
        return value
    try:
        indices = [int(part) for part in value.split(",") if part.strip()]
    except ValueError:
        raise CapsError(
            f"expected 'all', 'none' or GPU indices such as 0,1; got {text!r}"
        ) from None
    if not indices or any(i < 0 for i in indices):
        raise CapsError(f"expected 'all', 'none' or GPU indices such as 0,1; got {text!r}")
    return sorted(set(indices))


def _describe_gpus(gpus: Sequence[Mapping[str, Any]], gpu_probe: str) -> str:
    if not gpus:
        return f"this machine has no GPUs ({gpu_probe})"
    return "its GPUs are " + ", ".join(f"{g['index']} ({g['name']})" for g in gpus)


def resolve_caps(
    hardware: Mapping[str, Any],
    cpus: int | None = None,
    memory: int | str | None = None,
    gpus: str | Sequence[int] | None = None,
) -> dict[str, Any]:
    """The caps to share: defaults are all CPUs, all memory and all GPUs; more than the
    machine has is a :class:`CapsError`."""
    have_cpus = int(hardware["cpus"])
    have_memory = int(hardware["memory"])
    if cpus is None:
        cpus = have_cpus
    if cpus < 0:
        raise CapsError(f"--cpus must be 0 or more; got {cpus}")
    if cpus > have_cpus:
        raise CapsError(f"--cpus {cpus} is more than this machine's {have_cpus} CPU cores")

    if memory is None:
        nbytes = have_memory
    else:
        try:
            nbytes = int(memory) if isinstance(memory, int) else parse_bytes(memory)
        except (ValueError, TypeError) as exc:
            raise CapsError(f"--memory must be a size such as 16GB; got {memory!r}") from exc
        if nbytes <= 0:
            raise CapsError(f"--memory must be positive; got {memory!r}")
        if nbytes > have_memory:
            raise CapsError(
                f"--memory {format_bytes(nbytes)} is more than this machine's "
                f"{format_bytes(have_memory)} of memory"
            )

    machine_gpus = list(hardware.get("gpus") or [])
    selection = "all" if gpus is None else gpus
    if isinstance(selection, str):
        selection = parse_gpu_selection(selection)
    if selection == "all":
        indices = [int(g["index"]) for g in machine_gpus]
    elif selection == "none":
        indices = []
    else:
        known = {int(g["index"]) for g in machine_gpus}
        missing = [i for i in selection if i not in known]
        if missing:
            raise CapsError(
                f"--gpus {','.join(map(str, selection))}: there is no GPU "
                f"{', '.join(map(str, missing))}; "
                f"{_describe_gpus(machine_gpus, str(hardware.get('gpu_probe', '')))}"
            )
        indices = sorted(set(selection))

    if cpus == 0 and not indices:
        raise CapsError("nothing to share: --cpus 0 and no GPUs; share some CPU cores or a GPU")
    return {"cpus": cpus, "memory": int(nbytes), "gpus": indices}


def _multi_gpu_groups(shared: Sequence[Mapping[str, Any]]) -> list[list[Mapping[str, Any]]]:
    """The shared GPUs of each model that has two or more of them, in index order."""
    by_model: dict[str, list[Mapping[str, Any]]] = {}
    for gpu in shared:
        by_model.setdefault(str(gpu["name"]), []).append(gpu)
    return [group for group in by_model.values() if len(group) >= 2]


def _device(gpu: Mapping[str, Any]) -> str:
    # A UUID names the same GPU whatever order CUDA enumerates devices in (its default,
    # fastest first, differs from NVML's PCI order on mixed machines).
    return str(gpu.get("uuid") or gpu["index"])


def _lock_name(identity: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", identity)


def plan_workers(
    machine: str,
    hardware: Mapping[str, Any],
    caps: Mapping[str, Any],
    gpu_threads: int = 2,
) -> list[WorkerSpec]:
    """The workers for ``caps`` on ``hardware`` (see the module docstring for the rule)."""
    if gpu_threads < 1:
        raise CapsError(f"--gpu-threads must be 1 or more; got {gpu_threads}")
    by_index = {int(g["index"]): g for g in hardware.get("gpus") or []}
    shared = [by_index[i] for i in caps["gpus"] if i in by_index]
    groups = _multi_gpu_groups(shared)
    cpus = int(caps["cpus"])
    nworkers = len(shared) + len(groups) + (1 if cpus > 0 else 0)
    if nworkers == 0:
        raise CapsError("nothing to share: no CPU cores and none of the capped GPUs is present")
    share = int(caps["memory"]) // nworkers // MIB * MIB
    if share < MIN_WORKER_MEMORY:
        raise CapsError(
            f"--memory {format_bytes(int(caps['memory']))} split over {nworkers} worker(s) "
            f"leaves {format_bytes(share)} each; each needs at least "
            f"{format_bytes(MIN_WORKER_MEMORY)}"
        )
    # Only GPUs that a multi-GPU worker also sees need locks.
    locks = gpu_identities(hardware, (int(g["index"]) for group in groups for g in group))
    specs = [_one_gpu_worker(machine, gpu, gpu_threads, share, locks) for gpu in shared]
    specs += [_multi_gpu_worker(machine, group, gpu_threads, share, locks) for group in groups]
    if cpus > 0:
        specs.append(
            WorkerSpec(
                name=f"{machine}-cpu",
                nthreads=cpus,
                memory_limit=share,
                resources=worker_resources(cpus, share),
                # CPU work must not reach any GPU, shared or kept by the contributor.
                env={"CUDA_VISIBLE_DEVICES": ""},
            )
        )
    return specs


def _one_gpu_worker(
    machine: str, gpu: Mapping[str, Any], threads: int, memory: int, locks: Mapping[str, str]
) -> WorkerSpec:
    identity = locks.get(str(gpu["index"]))
    return WorkerSpec(
        name=f"{machine}-gpu{gpu['index']}",
        nthreads=threads,
        memory_limit=memory,
        resources=worker_resources(
            threads, memory, gpu_model=str(gpu["name"]), vram=int(gpu["vram"])
        ),
        env={"CUDA_VISIBLE_DEVICES": _device(gpu)},
        gpu=dict(gpu),
        gpu_locks=(_lock_name(identity),) if identity else (),
    )


def _multi_gpu_worker(
    machine: str,
    group: Sequence[Mapping[str, Any]],
    threads: int,
    memory: int,
    locks: Mapping[str, str],
) -> WorkerSpec:
    return WorkerSpec(
        name=f"{machine}-gpu" + "+".join(str(g["index"]) for g in group),
        nthreads=threads,
        memory_limit=memory,
        resources=worker_resources(
            threads,
            memory,
            gpu_model=str(group[0]["name"]),
            vram=min(int(g["vram"]) for g in group),
            gpus=len(group),
        ),
        env={"CUDA_VISIBLE_DEVICES": ",".join(_device(g) for g in group)},
        gpus=tuple(dict(g) for g in group),
        gpu_locks=tuple(_lock_name(locks[str(g["index"])]) for g in group),
        reserves_gpus=True,
    )


def with_gpu_locks(workers: Iterable[WorkerSpec], directory: str) -> list[WorkerSpec]:
    """``workers``, those that share GPUs with another worker told where their locks are."""
    return [
        replace(w, env={**w.env, LOCKS_ENV: lock_config(directory, w.gpu_locks, w.reserves_gpus)})
        if w.gpu_locks
        else w
        for w in workers
    ]


def affinity_cores(
    caps: Mapping[str, Any], workers: Sequence[WorkerSpec], available: Iterable[int]
) -> list[int]:
    """The cores to pin the agent (and so all its workers) to."""
    cores = sorted(available)
    cpus = int(caps["cpus"])
    want = cpus if cpus > 0 else sum(1 for w in workers if w.gpu is not None)
    if want > len(cores):
        raise CapsError(
            f"--cpus {want} is more than the {len(cores)} CPU cores this process may use "
            "(its CPU affinity)"
        )
    # The highest-numbered cores: the OS tends to put interrupts and housekeeping on core 0.
    return cores[len(cores) - want :]


def _identity(gpu: Mapping[str, Any], declared_rank: int) -> str:
    return str(gpu["uuid"]) if gpu.get("uuid") else f"declared:{declared_rank}"


def gpu_identities(hardware: Mapping[str, Any], indices: Iterable[int]) -> dict[str, str]:
    """What identifies each shared GPU across restarts: its UUID, or for a declared GPU its
    place among the declared ones (``declared:0``). Keyed by index as a string (JSON)."""
    out, declared = {}, 0
    wanted = set(indices)
    for gpu in hardware.get("gpus") or []:
        if int(gpu["index"]) in wanted:
            out[str(gpu["index"])] = _identity(gpu, declared)
        if not gpu.get("uuid"):
            declared += 1
    return out


def match_gpus(
    hardware: Mapping[str, Any], caps: Mapping[str, Any], identities: Mapping[str, str]
) -> tuple[dict[str, Any], list[str]]:
    """Caps whose GPU indices point at the GPUs chosen at join, found again on today's probe.

    GPU indices can move (a GPU removed, a driver that fails to load one), so ``start``
    finds each shared GPU by its identity (:func:`gpu_identities`). Returns the caps to use
    and one warning per GPU that is gone: the machine then shares fewer, never others.
    """
    now: dict[str, int] = {}
    declared = 0
    for gpu in hardware.get("gpus") or []:
        now[_identity(gpu, declared)] = int(gpu["index"])
        if not gpu.get("uuid"):
            declared += 1
    indices, warnings = [], []
    for index in caps.get("gpus", []):
        identity = identities.get(str(index))
        if identity is None:
            # Credentials written without identities: trust the index.
            indices.append(int(index))
        elif identity in now:
            indices.append(now[identity])
        else:
            warnings.append(f"GPU {index} ({identity}) is no longer found, so it is not shared")
    return {**caps, "gpus": sorted(set(indices))}, warnings
