"""Ask the Dask scheduler for facts (its workers) without ever unpickling what comes back."""

from __future__ import annotations

import contextvars
from typing import Any

import distributed.protocol.pickle as dask_pickle
from distributed.core import rpc

# Dask's wire protocol unpickles some payloads no matter what ``deserialize=`` says
# (``__Pickled__`` frames, error replies). User code can reach the scheduler, so a reply
# is not trusted: while this flag is set in the current task, Dask's unpickler refuses.
_REFUSE_PICKLES: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "dash_refuse_pickles", default=False
)
_original_loads = dask_pickle.loads


class PickleRefused(RuntimeError):
    """The scheduler sent a pickle where plain data was expected."""


def _guarded_loads(*args: Any, **kwargs: Any) -> Any:
    if _REFUSE_PICKLES.get():
        raise PickleRefused("refusing to unpickle data sent by the scheduler")
    return _original_loads(*args, **kwargs)


if getattr(dask_pickle.loads, "__name__", "") != _guarded_loads.__name__:
    dask_pickle.loads = _guarded_loads

WORKER_FIELDS = ("name", "address", "resources", "nthreads", "memory_limit", "status")


def _plain(value: Any) -> Any:
    """Keep only JSON-able plain data (msgpack gives tuples, which JSON writes as lists)."""
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return repr(value)


async def call_scheduler(
    address: str, connection_args: dict[str, Any], op: str, timeout: float = 5, **kwargs: Any
) -> Any:
    """Call the scheduler's ``op`` handler; the reply is plain data or an error, never a pickle."""
    token = _REFUSE_PICKLES.set(True)
    try:
        async with rpc(
            address, connection_args=connection_args, deserialize=False, timeout=timeout
        ) as scheduler:
            reply = await getattr(scheduler, op)(**kwargs)
    finally:
        _REFUSE_PICKLES.reset(token)
    return _plain(reply)


async def scheduler_identity(
    address: str, connection_args: dict[str, Any], timeout: float = 5
) -> dict[str, Any]:
    """The scheduler's ``identity`` (all workers), as plain data."""
    info = await call_scheduler(address, connection_args, "identity", timeout, n_workers=-1)
    if not isinstance(info, dict):
        raise RuntimeError(f"unexpected identity reply from the scheduler: {type(info).__name__}")
    return info


def workers_from_identity(info: dict[str, Any]) -> list[dict[str, Any]]:
    """The ``workers`` list of ``/dash/api/status``, sorted by name."""
    workers = []
    for address, worker in (info.get("workers") or {}).items():
        if not isinstance(worker, dict):
            continue
        row = {key: worker.get(key) for key in WORKER_FIELDS}
        row["address"] = address
        workers.append(row)
    return sorted(workers, key=lambda w: str(w["name"]))
