"""Resource specs: the one parser for ``gpu=``, ``cpu=``, ``memory=``, ``vram=`` everywhere.

A :class:`ResourceSpec` is what a user asks for; :func:`worker_resources` is what a worker
declares. Both speak Dask's abstract resources, so placement is Dask's own:

============  ==========================================  ===============================
resource      a worker declares                           a spec asks for
============  ==========================================  ===============================
``CPU``       its threads                                 ``cpu=4``
``MEMORY``    its memory limit in bytes                   ``memory="16GB"``
``GPU``       its GPUs: 1, or N on a multi-GPU worker     ``gpu=1``, ``gpu=2``
``VRAM``      the memory of each of its GPUs, in bytes    ``vram="24GB"``
``gpu:T``     1 for each token T of its GPU model         ``gpu="A100"`` (with ``GPU=1``)
``pool:cpu``  a large capacity, on CPU workers only       (added by the DASH scheduler)
``pool:gpu``  a large capacity, on one-GPU workers only   (added by the DASH scheduler)
============  ==========================================  ===============================

GPU workers take only GPU work: the DASH scheduler plugin adds ``pool:cpu=1`` to every
task that asks for no GPU (:func:`placement_restrictions`), and only CPU workers declare
``pool:cpu``. ``vram=`` alone shares a GPU: VRAM is consumed, ``GPU`` is not.

A machine sharing N ≥ 2 GPUs of one model also runs a multi-GPU worker declaring
``GPU=N``, which sees all N (``dash_worker.plan``); work asking for fewer than 2 GPUs gets
``pool:gpu=1`` added, which only one-GPU workers declare, so it never holds all N GPUs.
The workers of one GPU never use it at once (``dash_worker.gpu_locks``).

A model name is matched by tokens, so ``gpu="A100"`` and ``gpu="RTX 4090"`` match
"NVIDIA A100-SXM4-80GB" and "NVIDIA GeForce RTX 4090".
"""

from __future__ import annotations

import math
import numbers
import re
import shlex
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from dask.utils import format_bytes, parse_bytes

from .errors import DashError

__all__ = [
    "ResourceSpec",
    "ResourceSpecError",
    "ResourceUnavailable",
    "check_satisfiable",
    "counted_gpus",
    "describe_wait",
    "gpu_model_tokens",
    "placement_restrictions",
    "worker_resources",
]

CPU, MEMORY, GPU, VRAM = "CPU", "MEMORY", "GPU", "VRAM"
MODEL_PREFIX = "gpu:"
CPU_POOL = "pool:cpu"
GPU_POOL = "pool:gpu"
# ``pool:cpu`` and ``pool:gpu`` are tags, not budgets: threads bound how much runs at once. A
# budget would deadlock a task that waits on its own subtasks, as Dask keeps a seceded task's
# resources.
POOL_CAPACITY = 1_000_000
# A session worker (a lease of its own for one remote session, holding no core of the work's
# slots) declares this, one; a CPU session of a per-user cluster asks for it.
SESSION_POOL = "pool:session"
_VENDOR_WORDS = {"nvidia", "amd", "intel", "corporation"}
SPEC_KEYS = ("gpu", "cpu", "memory", "vram")
_SIZES = "'16GB' or '512MiB'"
_NUMERIC = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")
# Meant as numbers, though float() refuses them ("1,5", "1.2.3"): never a GPU model name.
_NUMERIC_LIKE = re.compile(r"^[+-]?[\d.,]*\d[\d.,]*$")


class ResourceSpecError(DashError, ValueError):
    """A resource spec that is malformed: it names the field and what is accepted."""


class ResourceUnavailable(DashError, RuntimeError):
    """A well-formed spec that no worker in the cluster could ever satisfy."""


def gpu_model_tokens(model: str) -> list[str]:
    """Lower-case tokens of a GPU model name, without vendor words.

    >>> gpu_model_tokens("NVIDIA GeForce RTX 4090")
    ['geforce', 'rtx', '4090']
    """
    tokens = [t for t in re.split(r"[^0-9a-z]+", model.lower()) if t]
    return [t for t in tokens if t not in _VENDOR_WORDS]


def _shown(value: Any) -> str:
    # As the user typed it: ``got -1`` for ``--gpu -1``, but ``got ''`` for an empty string.
    return value.strip() if isinstance(value, str) and value.strip() else repr(value)


def _number(value: Any) -> float | None:
    """``value`` as a finite number if it is one or reads as one ("2", "-1", "1.5"), else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, numbers.Real):
        number = float(value)
    elif isinstance(value, str) and _NUMERIC.match(value.strip()):
        number = float(value.strip())
    else:
        return None
    return number if math.isfinite(number) else None


def _parse_gpu(gpu: Any) -> tuple[int, str | None]:
    """``(count, model)``: a whole number of GPUs, or one GPU of a named model."""
    if gpu is None or gpu is False:
        return 0, None
    if gpu is True:
        return 1, None
    number = _number(gpu)
    if number is not None and number.is_integer() and number >= 1:
        return int(number), None
    text = gpu.strip() if isinstance(gpu, str) else None
    numeric = text is not None and bool(_NUMERIC.match(text) or _NUMERIC_LIKE.match(text))
    if text is not None and not numeric and gpu_model_tokens(text):
        return 1, gpu.strip()
    raise ResourceSpecError(
        f"gpu must be a whole number of GPUs ≥ 1 or a model name; got {_shown(gpu)}"
    )


def _parse_cpu(cpu: Any) -> float | int | None:
    if cpu is None:
        return None
    number = _number(cpu)
    if number is None or number <= 0:
        raise ResourceSpecError(
            f"cpu must be a positive number of cores (such as 4 or 0.5); got {_shown(cpu)}"
        )
    return int(number) if number.is_integer() else number


def _parse_bytes(field_name: str, value: Any) -> int | None:
    if value is None:
        return None
    hint = f"{field_name} must be a size above zero, such as {_SIZES}; got {_shown(value)}"
    if isinstance(value, bool):
        raise ResourceSpecError(hint)
    number = _number(value)
    if number is not None:
        nbytes = number
    else:
        try:
            nbytes = float(parse_bytes(str(value).replace(" ", "")))
        except (ValueError, TypeError, OverflowError) as exc:
            raise ResourceSpecError(hint) from exc
    # Below one byte (0.5, "-1GB", "0") is no size at all.
    if not math.isfinite(nbytes) or nbytes < 1:
        raise ResourceSpecError(hint)
    return int(nbytes)


@dataclass(frozen=True)
class ResourceSpec:
    """What a piece of work needs. Empty means "any worker"."""

    gpu: int = 0
    gpu_model: str | None = None
    cpu: float | None = None
    memory: int | None = None
    vram: int | None = None
    _text: str = field(default="", compare=False, repr=False)

    @classmethod
    def parse(
        cls,
        gpu: int | str | bool | None = None,
        cpu: float | str | None = None,
        memory: int | str | None = None,
        vram: int | str | None = None,
    ) -> ResourceSpec:
        """Build a spec from keyword values, as given to ``dk.remote`` or ``%%dash``."""
        n_gpu, model = _parse_gpu(gpu)
        spec = cls(
            gpu=n_gpu,
            gpu_model=model,
            cpu=_parse_cpu(cpu),
            memory=_parse_bytes("memory", memory),
            vram=_parse_bytes("vram", vram),
        )
        object.__setattr__(spec, "_text", spec._describe())
        return spec

    @classmethod
    def from_string(cls, text: str) -> ResourceSpec:
        """Parse ``"gpu=1 memory=16GB"`` (also comma-separated), as ``%dash use`` takes it."""
        values: dict[str, str] = {}
        for part in shlex.split(text.replace(",", " ")):
            key, sep, value = part.partition("=")
            key = key.strip().lower()
            if not sep or key not in SPEC_KEYS or not value:
                raise ResourceSpecError(
                    f"cannot read {part!r}: write key=value with keys {', '.join(SPEC_KEYS)}"
                )
            values[key] = value
        return cls.parse(**values)

    @classmethod
    def coerce(cls, spec: ResourceSpec | Mapping[str, Any] | str | None) -> ResourceSpec:
        """Accept a spec, a mapping of keyword values, a string, or None."""
        if spec is None:
            return cls()
        if isinstance(spec, ResourceSpec):
            return spec
        if isinstance(spec, str):
            return cls.from_string(spec)
        unknown = set(spec) - set(SPEC_KEYS)
        if unknown:
            raise ResourceSpecError(
                f"unknown resource {sorted(unknown)[0]!r}; use {', '.join(SPEC_KEYS)}"
            )
        return cls.parse(**spec)

    def __bool__(self) -> bool:
        return bool(self.to_dask())

    def __str__(self) -> str:
        return self._text or self._describe()

    def _describe(self) -> str:
        parts = []
        if self.gpu_model:
            parts.append(f"gpu={self.gpu_model!r}")
        elif self.gpu:
            parts.append(f"gpu={self.gpu}")
        if self.cpu is not None:
            parts.append(f"cpu={self.cpu}")
        if self.memory is not None:
            parts.append(f"memory={format_bytes(self.memory)}")
        if self.vram is not None:
            parts.append(f"vram={format_bytes(self.vram)}")
        return ", ".join(parts) or "any worker"

    def to_dask(self) -> dict[str, float]:
        """The ``resources=`` restriction Dask places this work by."""
        out: dict[str, float] = {}
        if self.gpu:
            out[GPU] = self.gpu
        if self.gpu_model:
            for token in gpu_model_tokens(self.gpu_model):
                out[MODEL_PREFIX + token] = 1
        if self.cpu is not None:
            out[CPU] = self.cpu
        if self.memory is not None:
            out[MEMORY] = self.memory
        if self.vram is not None:
            out[VRAM] = self.vram
        return out


def worker_resources(
    nthreads: int,
    memory_limit: int | None,
    gpu_model: str | None = None,
    vram: int | None = None,
    gpus: int = 1,
) -> dict[str, float]:
    """The resources a worker declares: its threads, memory and GPUs.

    A worker without a GPU is a CPU worker and declares the ``pool:cpu`` tag; a worker with
    one GPU declares ``pool:gpu``; a worker holding ``gpus`` ≥ 2 GPUs of one model declares
    ``GPU=gpus`` and neither tag, so that only work asking for two or more GPUs lands there.
    ``vram`` is the memory of each of its GPUs.
    """
    if gpus < 1:
        raise ValueError(f"a GPU worker holds 1 or more GPUs, not {gpus}")
    out: dict[str, float] = {CPU: nthreads}
    if memory_limit:
        out[MEMORY] = int(memory_limit)
    if not gpu_model:
        out[CPU_POOL] = POOL_CAPACITY
        return out
    out[GPU] = gpus
    if vram:
        out[VRAM] = int(vram)
    for token in gpu_model_tokens(gpu_model):
        out[MODEL_PREFIX + token] = 1
    if gpus == 1:
        out[GPU_POOL] = POOL_CAPACITY
    return out


def counted_gpus(resources: Mapping[str, float]) -> int:
    """The GPUs a worker adds to a count of its cluster's GPUs: none for a multi-GPU
    worker, whose GPUs are also its machine's one-GPU workers'."""
    gpus = int(resources.get(GPU, 0))
    return 0 if gpus >= 2 and GPU_POOL not in resources else gpus


def is_gpu_work(resources: Mapping[str, float] | None) -> bool:
    """Does work restricted to ``resources`` ask for a GPU (count, model or VRAM)?"""
    return any(k in (GPU, VRAM) or k.startswith(MODEL_PREFIX) for k in resources or ())


def session_worker_resources(memory_limit: int | None) -> dict[str, float]:
    """What a session worker declares: one session (``pool:session``) and its memory, and no
    ``pool:cpu``, so that only a session lands there."""
    out: dict[str, float] = {SESSION_POOL: 1, CPU: 1}
    if memory_limit:
        out[MEMORY] = int(memory_limit)
    return out


def placement_restrictions(resources: Mapping[str, float] | None) -> dict[str, float]:
    """The restrictions the DASH scheduler places work by: a session that asks for a session
    worker (``pool:session``) as asked; work that asks for no GPU on a
    CPU worker (``pool:cpu``), so it never takes a GPU worker's slot; work that asks for
    one GPU, a model or VRAM on a one-GPU worker (``pool:gpu``), so it never holds all the
    GPUs of a multi-GPU worker; work that asks for two or more GPUs as asked."""
    out = dict(resources or {})
    if SESSION_POOL in out:
        return out
    if not is_gpu_work(out):
        out[CPU_POOL] = out.get(CPU_POOL, 1)
    elif out.get(GPU, 0) < 2:
        out[GPU_POOL] = out.get(GPU_POOL, 1)
    return out


def format_resources(resources: Mapping[str, float]) -> str:
    """A short human description of a worker's declared resources."""
    parts = []
    model = " ".join(k[len(MODEL_PREFIX) :] for k in resources if k.startswith(MODEL_PREFIX))
    if resources.get(GPU):
        gpus = int(resources[GPU])
        parts.append(f"{gpus} GPU" + (f" ({model})" if model else ""))
        if resources.get(VRAM):
            parts.append(f"{format_bytes(int(resources[VRAM]))} VRAM")
    if CPU in resources:
        parts.append(f"{resources[CPU]:g} CPU")
    if resources.get(MEMORY):
        parts.append(f"{format_bytes(int(resources[MEMORY]))} RAM")
    return ", ".join(parts) or "no declared resources"


def _shortfall(need: Mapping[str, float], have: Mapping[str, float]) -> list[str]:
    return [key for key, amount in need.items() if have.get(key, 0) < amount]


def _deficit(need: Mapping[str, float], have: Mapping[str, float]) -> float:
    """How far ``have`` falls short of ``need``, as a sum of fractions of what is asked."""
    return sum(max(amount - have.get(key, 0), 0) / amount for key, amount in need.items())


def check_satisfiable(
    spec: ResourceSpec,
    workers: Iterable[tuple[str, Mapping[str, float]]],
    *,
    pool: bool = False,
) -> None:
    """Raise :class:`ResourceUnavailable` if no worker's total resources meet ``spec``.

    ``workers`` yields ``(name, declared resources)``: connected workers, or with ``pool``
    the slots of the gateway's pool, which workers are leased from. The message names the
    closest one (fewest unmet resources) and what it has, so the user knows what there is.
    """
    candidates = list(workers)
    need = _need(spec, (have for _, have in candidates))
    if not need:
        return
    if not candidates:
        raise ResourceUnavailable(f"no workers are connected, so nothing can run {spec}")
    scored = sorted(
        (len(_shortfall(need, have)), _deficit(need, have), name, have) for name, have in candidates
    )
    if scored[0][0] == 0:
        return
    _, _, name, have = scored[0]
    missing = "; ".join(_explain(key, need[key], have) for key in _shortfall(need, have))
    if pool:
        raise ResourceUnavailable(
            f"no machine in the pool could ever run work that needs {spec}. "
            f"The closest is {name} ({format_resources(have)}): {missing}. "
            f"The pool has {len(candidates)} slot(s)."
        )
    raise ResourceUnavailable(
        f"no worker can ever run work that needs {spec}. "
        f"Closest worker: {name} ({format_resources(have)}): {missing}. "
        f"{len(candidates)} worker(s) connected."
    )


def _explain(key: str, amount: float, have: Mapping[str, float]) -> str:
    if key == CPU_POOL:
        return "it is a GPU worker, and GPU workers take only work that asks for a GPU"
    if key == GPU_POOL:
        gpus = have.get(GPU, 0)
        if not gpus:
            return "it has no GPU"
        return f"it holds {gpus:g} GPUs together and takes only work that asks for 2 or more"
    if key.startswith(MODEL_PREFIX):
        return f"no GPU model matching {key[len(MODEL_PREFIX) :]!r}"
    if key in (MEMORY, VRAM):
        return (
            f"{key} {format_bytes(int(amount))} asked, it has {format_bytes(int(have.get(key, 0)))}"
        )
    return f"{key} {amount:g} asked, it has {have.get(key, 0):g}"


def _need(spec: ResourceSpec, declared: Iterable[Mapping[str, float]]) -> dict[str, float]:
    need = spec.to_dask()
    if any(CPU_POOL in have or GPU in have for have in declared):
        # A DASH cluster: work without a GPU goes to CPU workers only.
        need = placement_restrictions(need)
    return need


def describe_pool_wait(spec: ResourceSpec, slots: Iterable[Mapping[str, Any]]) -> str | None:
    """Why work needing ``spec`` waits in a cluster that leases its workers from a pool:
    because every slot that fits is leased to other users' work. None if a fitting slot is
    free or being leased to this user now (a worker is on its way), or none ever could fit;
    ``""`` if this user's own workers that fit are all running (ask :func:`describe_wait`).

    ``slots`` are the pool's rows: ``name``, ``resources``, ``leased`` (None, ``"you"`` or
    ``"other"``; never whom) and ``starting``.
    """
    rows = list(slots)
    need = _need(spec, (row.get("resources") or {} for row in rows))
    fits = [row for row in rows if not _shortfall(need, row.get("resources") or {})]
    if not fits or any(row.get("leased") is None or row.get("starting") for row in fits):
        return None
    if any(row.get("leased") == "you" for row in fits):
        return ""
    what = "a GPU" if is_gpu_work(need) else "a worker"
    if len(fits) == 1:
        row = fits[0]
        described = format_resources(row.get("resources") or {})
        return (
            f"waiting for {what}: the pool's one {row['name']} ({described}) is leased to "
            "another user's work"
        )
    return f"waiting for {what}: all {len(fits)} slots of the pool that can run it are leased to other users' work"


def describe_wait(
    spec: ResourceSpec,
    workers: Iterable[Mapping[str, Any]],
    waiting_on: Mapping[str, int] | None = None,
) -> str | None:
    """Why work needing ``spec`` is queued, or None if some worker that fits is free.

    ``workers`` are rows of the scheduler's ``dash_workers``: ``name``, ``status``,
    ``nthreads``, ``processing``, ``resources`` and ``used_resources``. ``waiting_on``
    counts, by worker name, the waiting tasks of this work already assigned there (Dask
    counts their resources as used, though they wait for them).
    """
    rows = list(workers)
    need = _need(spec, (row.get("resources") or {} for row in rows))
    fits = [row for row in rows if not _shortfall(need, row.get("resources") or {})]
    if not fits:
        return None
    busy = []
    for row in fits:
        mine = (waiting_on or {}).get(row["name"], 0)
        have = row.get("resources") or {}
        used = {k: v - mine * need.get(k, 0) for k, v in (row.get("used_resources") or {}).items()}
        short = [
            key
            for key in need
            if key != CPU_POOL
            and not key.startswith(MODEL_PREFIX)
            and have.get(key, 0) - used.get(key, 0) < need[key]
        ]
        if row.get("status") != "running":
            busy.append(f"{row['name']} is {row.get('status')}")
        elif short:
            parts = [_free(key, have, used) for key in short]
            busy.append(f"{row['name']} has {', '.join(parts)}")
        elif row.get("processing", 0) - mine >= row.get("nthreads", 1):
            busy.append(f"{row['name']} is busy with {row['processing'] - mine} task(s)")
        else:
            return None
    many = f"all {len(fits)} workers that can run it are" if len(fits) > 1 else "the one worker"
    verb = "" if len(fits) > 1 else " that can run it is"
    return f"queued: it needs {spec}, and {many}{verb} busy ({'; '.join(busy)})"


def _free(key: str, have: Mapping[str, float], used: Mapping[str, float]) -> str:
    free, total = max(have[key] - used.get(key, 0), 0), have[key]
    if key in (MEMORY, VRAM):
        if not free:
            return f"no {key} free ({format_bytes(int(total))} in all)"
        return f"{format_bytes(int(free))} of {format_bytes(int(total))} {key} free"
    return f"no {key} free ({total:g} in all)" if not free else f"{free:g} of {total:g} {key} free"
