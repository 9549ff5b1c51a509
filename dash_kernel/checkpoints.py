"""Session checkpoints: a remote session's picklable variables, kept in storage after each cell and put back into a new session.

The DASH kernel names one checkpoint per notebook kernel (``sessions/<notebook>-<id>``)
and, after every cell that ran remotely, asks its session's kernel to call
:func:`remote_take`. Each variable is pickled on its own (one that cannot be is named,
not fatal) and stored as content-addressed chunks, so an unchanged variable costs a hash,
not an upload, and an unchanged namespace writes nothing at all. When a session is lost
(its worker died, the gateway restarted) or moved (``%dash use``), the new session's
kernel calls :func:`remote_restore`. Only the last :data:`KEEP_VERSIONS` versions are kept.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import re
import time
import warnings
from collections.abc import Iterable, Iterator, Mapping, MutableMapping
from pathlib import PurePath
from typing import Any

from .storage.api import ENV_STORAGE_TOKEN, ENV_STORAGE_URL, storage_client
from .storage.backends import NotFound, StorageError
from .storage.transport import CHECKPOINT_PREFIX, DirectTransport

__all__ = [
    "CHECKPOINT_PREFIX",
    "checkpoint_name",
    "list_checkpoints",
    "remote_restore",
    "remote_take",
    "restore",
    "take",
]

log = logging.getLogger(__name__)

KEEP_VERSIONS = 2
# Without a gateway (whose checkpoint_retention does this), checkpoints older than this
# are deleted from embedded storage by the first checkpoint a process takes.
ENV_RETENTION = "DASH_CHECKPOINT_RETENTION"
DEFAULT_RETENTION = 30 * 86400.0
_expired_embedded = False
# The digest of what the last checkpoint in this process stored, by checkpoint name: an
# unchanged namespace is not written again.
_last_digest: dict[str, str] = {}


def checkpoint_name(notebook: str | None, kernel_id: str) -> str:
    """``sessions/<notebook stem>-<kernel id>``: one per kernel, so a restarted kernel
    starts fresh (as Jupyter users expect) while its predecessor's stays restorable."""
    stem = PurePath(notebook).stem if notebook else "notebook"
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", stem).strip("-._")[:60] or "notebook"
    return f"{CHECKPOINT_PREFIX}{slug}-{kernel_id}"


def _public_names(namespace: Mapping[str, Any], hidden: set[str]) -> list[str]:
    return [n for n in namespace if not n.startswith("_") and n not in hidden]


@contextlib.contextmanager
def _quietly() -> Iterator[None]:
    """Pickling runs user code (``__reduce__``, ``__getstate__``); what it prints or warns
    must not land in the notebook's last cell."""
    with (
        contextlib.redirect_stdout(io.StringIO()),
        contextlib.redirect_stderr(io.StringIO()),
        warnings.catch_warnings(),
    ):
        warnings.simplefilter("ignore")
        yield


def take(
    name: str,
    namespace: Mapping[str, Any],
    *,
    hidden: Iterable[str] = (),
    **metadata: Any,
) -> dict[str, Any]:
    """Checkpoint the public variables of ``namespace`` as ``name``; a JSON-able summary:
    ``{"name", "version" (None if unchanged), "saved", "unsaved": {name: why}, "size",
    "uploaded_bytes", "seconds"}``."""
    started = time.perf_counter()
    client = storage_client()
    with _quietly():
        record = client.save_variables(
            name,
            namespace,
            _public_names(namespace, set(hidden)),
            unless_digest=_last_digest.get(name),
            **metadata,
        )
    _last_digest[name] = record.digest
    if record.version is not None:
        _prune(client, name)
        _expire_embedded(client)
    return {
        "name": name,
        "version": record.version,
        "saved": record.saved,
        "unsaved": record.failures,
        "size": record.size,
        "uploaded_bytes": record.uploaded_bytes,
        "seconds": round(time.perf_counter() - started, 3),
    }


def _prune(client: Any, name: str) -> None:
    versions = [v["version"] for v in client.versions(name)]
    for version in versions[:-KEEP_VERSIONS]:
        with contextlib.suppress(NotFound):
            client.rm(name, version)


def retention() -> float:
    """``DASH_CHECKPOINT_RETENTION`` seconds (default 30 days; 0: keep forever)."""
    value = os.environ.get(ENV_RETENTION, "")
    try:
        return float(value) if value else DEFAULT_RETENTION
    except ValueError:
        raise ValueError(f"{ENV_RETENTION}={value!r} is not a number of seconds") from None


def _expire_embedded(client: Any) -> None:
    """Embedded storage has no gateway to expire old checkpoints: once per process, the
    first checkpoint does. Through a gateway, the gateway does (checkpoint_retention)."""
    global _expired_embedded
    if _expired_embedded or not isinstance(client.transport, DirectTransport):
        return
    _expired_embedded = True
    keep = retention()
    if keep > 0:
        try:
            client.transport.expire_checkpoints(keep)
        except StorageError as exc:
            # The checkpoint itself was stored; tidying up can wait for the next process.
            log.warning("could not expire old session checkpoints: %s", exc)


def restore(
    name: str, namespace: MutableMapping[str, Any], version: int | None = None
) -> dict[str, Any]:
    """Put checkpoint ``name`` (its latest version, or ``version``) into ``namespace``; a
    JSON-able summary: ``{"name", "version", "restored", "failed": {name: why},
    "unsaved": {name: why}, "metadata", "created", "size", "seconds"}``."""
    started = time.perf_counter()
    client = storage_client()
    with _quietly():
        values, failures, summary = client.load_variables(name, version)
    namespace.update(values)
    _last_digest[name] = summary.get("digest", "")
    return {
        "name": name,
        "version": summary["version"],
        "restored": sorted(values),
        "failed": failures,
        "unsaved": summary.get("unsaved", {}),
        "metadata": summary.get("metadata", {}),
        "created": summary.get("created"),
        "size": summary.get("size", 0),
        "seconds": round(time.perf_counter() - started, 3),
    }


def list_checkpoints() -> list[dict[str, Any]]:
    """The latest version of each of this user's session checkpoints, newest first (a
    damaged one is left out: ``dk.ls("sessions/")`` names it)."""
    found = [s for s in storage_client().summaries(CHECKPOINT_PREFIX) if "damaged" not in s]
    return sorted(found, key=lambda s: s.get("created", ""), reverse=True)


def _refresh_access(access: tuple[str, str] | None) -> None:
    """Storage tokens expire; the DASH kernel hands the session a fresh one with every
    checkpoint, and ``dk.save`` in the session's cells uses it too."""
    if access is not None:
        os.environ[ENV_STORAGE_URL], os.environ[ENV_STORAGE_TOKEN] = access


def _shell() -> Any:
    from IPython import get_ipython

    return get_ipython()


def remote_take(name: str, access: tuple[str, str] | None = None, **metadata: Any) -> str:
    """Run in a session's kernel after each cell by the DASH kernel; JSON for the caller."""
    _refresh_access(access)
    shell = _shell()
    return json.dumps(take(name, shell.user_ns, hidden=set(shell.user_ns_hidden), **metadata))


def remote_restore(
    name: str, access: tuple[str, str] | None = None, version: int | None = None
) -> str:
    """Run in a new session's kernel by the DASH kernel; JSON for the caller."""
    _refresh_access(access)
    return json.dumps(restore(name, _shell().user_ns, version))
