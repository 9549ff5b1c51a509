"""``dk.save``, ``dk.load``, ``dk.ls``, ``dk.rm``, ``dk.versions`` and ``dk.datasets``, on the storage this process may use."""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .backends import LocalBackend, StorageError
from .cache import ChunkCache, default_cache_dir, default_cache_size
from .client import SaveRecord, StorageClient
from .listing import Listing
from .transport import DirectTransport

__all__ = [
    "datasets",
    "load",
    "ls",
    "manifest",
    "rm",
    "save",
    "storage_client",
    "use_storage",
    "versions",
]

log = logging.getLogger(__name__)

# Set for tasks and sessions: the gateway's storage API and a storage token.
ENV_STORAGE_URL, ENV_STORAGE_TOKEN = "DASH_STORAGE_URL", "DASH_STORAGE_TOKEN"
# Set for a kernel the gateway started (as in dash_kernel.cluster).
ENV_GATEWAY_URL, ENV_TOKEN = "DASH_GATEWAY_URL", "DASH_TOKEN"
EMBEDDED_USER = "local"

# What storage code running in this context uses, ahead of the environment: a client, or
# {"url", "token"} of the gateway's storage API (a task running for some user).
_current: contextvars.ContextVar[StorageClient | dict[str, str | None] | None] = (
    contextvars.ContextVar("dash_storage", default=None)
)
# Clients by selection, most recent last. A worker serves tasks of many users, each with
# its own storage token, and tokens are renewed: the oldest clients are let go (not closed,
# as a task may still use one; their idle threads end when they are collected).
_clients: OrderedDict[tuple[Any, ...], StorageClient] = OrderedDict()
_MAX_CLIENTS = 16
_caches: dict[Path, ChunkCache] = {}
_clients_lock = threading.Lock()


@contextlib.contextmanager
def use_storage(target: StorageClient | str, token: str | None = None) -> Iterator[None]:
    """Within the block, ``dk.save`` and friends use ``target``: a :class:`StorageClient`,
    or the gateway URL with a storage token (as a task runs for its user)."""
    value = target if isinstance(target, StorageClient) else {"url": target, "token": token}
    reset = _current.set(value)
    try:
        yield
    finally:
        _current.reset(reset)


def current_access() -> tuple[str, str] | None:
    """``(gateway URL, storage token)`` that storage code in this context uses, if it was
    handed some (a task running for its user), to pass on to work it submits."""
    current = _current.get()
    if isinstance(current, dict) and current.get("url") and current.get("token"):
        return str(current["url"]), str(current["token"])
    return None


def embedded_storage_dir() -> Path:
    """``<jupyter data dir>/dash/storage``: the gateway's default storage as well."""
    from jupyter_core.paths import jupyter_data_dir

    return Path(jupyter_data_dir()) / "dash" / "storage"


def _gateway_transport(url: str, token: str | None, storage_token: str | None) -> Any:
    try:
        from .gateway_transport import GatewayTransport
    except ModuleNotFoundError as exc:
        if exc.name != f"{__package__}.gateway_transport":
            raise
        raise StorageError(
            f"cannot use the DASH gateway's storage at {url}: this installation of "
            "dash_kernel has no gateway transport (dash_kernel.storage.gateway_transport)"
        ) from None
    return GatewayTransport(url, token=token, storage_token=storage_token)


def _connected_gateway() -> tuple[str, str] | None:
    """``(gateway URL, storage token)`` of the gateway this process connected to with
    ``dk.connect(url, token)``, if it did: storage follows the connection the user made."""
    from ..cluster import current_connection  # cluster imports this module

    connection = current_connection()
    if connection is None or not connection.gateway_url:
        return None
    return connection.storage_access()


def _selection() -> tuple[Any, ...]:
    """Which storage this context uses, as a hashable key."""
    current = _current.get()
    if isinstance(current, dict):
        return ("storage", current["url"], current["token"])
    connected = _connected_gateway()
    if connected is not None:
        return ("storage", *connected)
    if os.environ.get(ENV_STORAGE_URL):
        return ("storage", os.environ[ENV_STORAGE_URL], os.environ.get(ENV_STORAGE_TOKEN))
    if os.environ.get(ENV_GATEWAY_URL):
        return ("gateway", os.environ[ENV_GATEWAY_URL], os.environ.get(ENV_TOKEN))
    return ("embedded", str(embedded_storage_dir()))


def _open(selection: tuple[Any, ...]) -> StorageClient:
    kind = selection[0]
    if kind == "embedded":
        # Chunks are already on this disk: a cache would only hold second copies.
        transport = DirectTransport(LocalBackend(selection[1]), EMBEDDED_USER)
        return StorageClient(transport, None)
    url = selection[1]
    if kind == "storage":
        transport = _gateway_transport(url, None, selection[2])
    else:
        transport = _gateway_transport(url, selection[2], None)
    directory = default_cache_dir()
    # One cache object per directory, so that its size and counters cover every client.
    cache = _caches.get(directory)
    if cache is None:
        cache = _caches[directory] = ChunkCache(directory, default_cache_size())
    return StorageClient(transport, cache)


def storage_client() -> StorageClient:
    """The storage client for this context: one set with :func:`use_storage`; else the
    gateway this process connected to with ``dk.connect(url, token)``; else the
    gateway's storage API when ``DASH_STORAGE_URL`` (with ``DASH_STORAGE_TOKEN``, set for
    tasks and sessions) or ``DASH_GATEWAY_URL`` (with ``DASH_TOKEN``, for kernels) is set;
    else embedded storage in ``<jupyter data dir>/dash/storage`` as user ``local``."""
    current = _current.get()
    if isinstance(current, StorageClient):
        return current
    selection = _selection()
    with _clients_lock:
        client = _clients.get(selection)
        if client is None:
            client = _clients[selection] = _open(selection)
            log.debug("storage for this process: %s", selection[:2])
            while len(_clients) > _MAX_CLIENTS:
                _clients.popitem(last=False)
        else:
            _clients.move_to_end(selection)
        return client


def save(name: str, obj: Any, /, **metadata: Any) -> SaveRecord:
    """Store ``obj`` as the next version of ``name``, with JSON ``metadata``.

    >>> dk.save("model", model, epoch=3)          # doctest: +SKIP
    SaveRecord(name='model', version=1, size=..., uploaded=..., type='...')
    """
    return storage_client().save(name, obj, **metadata)


def load(name: str, version: int | None = None) -> Any:
    """The object saved as ``name``: its latest version, or ``version``."""
    return storage_client().load(name, version)


def ls(prefix: str = "") -> Listing:
    """The latest version of each of your objects whose name starts with ``prefix``: a
    table (name, version, size, type, created, metadata) of dict-like entries, each with
    ``.manifest()``; a damaged object is listed (and warned about) so that ``dk.rm`` can
    remove it."""
    return storage_client().ls(prefix)


def manifest(name: str, version: int | None = None) -> dict[str, Any]:
    """The whole manifest of ``name`` (its latest version, or ``version``): its parts,
    chunk hashes and everything ``dk.ls`` leaves out."""
    return storage_client().manifest(name, version)


def rm(name: str, version: int | None = None) -> list[int]:
    """Delete one version of ``name``, or every version; returns the versions deleted."""
    return storage_client().rm(name, version)


def versions(name: str) -> Listing:
    """Every version of ``name``, oldest first, as in :func:`ls`."""
    return storage_client().versions(name)


class Datasets:
    """``dk.datasets``: files and directory trees in storage, used as local paths."""

    def upload(self, path: str | os.PathLike[str], name: str, /, **metadata: Any) -> SaveRecord:
        """Store the file or directory tree at ``path`` as the next version of ``name``."""
        return storage_client().upload_files(path, name, **metadata)

    def path(self, name: str, version: int | None = None) -> Path:
        """A local path to dataset ``name`` (a directory, or the file for a single-file
        upload), fetched into the local cache on first use."""
        return storage_client().materialise(name, version)

    def __repr__(self) -> str:
        return "<dk.datasets: upload(path, name), path(name)>"


datasets = Datasets()
