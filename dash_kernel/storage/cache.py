"""A local chunk cache with a size cap: LRU by mtime, verified reads, atomic writes."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import tempfile
import threading
from pathlib import Path

from dask.utils import parse_bytes

__all__ = ["ChunkCache", "default_cache_dir", "default_cache_size", "parse_size"]

log = logging.getLogger(__name__)

DEFAULT_SIZE = 10 * 10**9
# Evict down to this fraction of the cap, so that eviction does not run on every write.
_LOW_WATER = 0.9


def parse_size(text: str | int) -> int:
    """Bytes in ``"10GB"``, ``"512MiB"``, ``"1e9"`` or ``1000``; ValueError naming the text."""
    try:
        return parse_bytes(text)
    except (ValueError, TypeError):
        raise ValueError(
            f"cannot read {text!r} as a size: use e.g. 10GB, 512MiB or bytes"
        ) from None


def default_cache_size() -> int:
    """``DASH_CACHE_SIZE`` (e.g. ``10GB``), else 10 GB."""
    value = os.environ.get("DASH_CACHE_SIZE")
    return parse_size(value) if value else DEFAULT_SIZE


def default_cache_dir() -> Path:
    """``<worker local directory>/dash-chunks`` inside a Dask worker, else
    ``~/.cache/dash/chunks`` (``$XDG_CACHE_HOME`` respected)."""
    try:
        from distributed import get_worker

        return Path(get_worker().local_directory) / "dash-chunks"
    except (ImportError, ValueError):
        pass
    import platformdirs

    return platformdirs.user_cache_path("dash") / "chunks"


class ChunkCache:
    """Chunks by sha256 under ``directory``, at most ``max_bytes`` in all.

    Reads verify the hash (a damaged file is dropped and counted as a miss); writes go to
    a temporary file and are renamed into place, so concurrent processes sharing the
    directory never see half a chunk. A hit refreshes the file's mtime; eviction removes
    the least recently used. ``hits``, ``misses``, ``evictions`` and ``corrupt`` count
    what happened in this process.
    """

    def __init__(self, directory: str | os.PathLike[str], max_bytes: int | None = None):
        self.directory = Path(directory).expanduser().absolute()
        self.max_bytes = default_cache_size() if max_bytes is None else int(max_bytes)
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.hits = self.misses = self.evictions = self.corrupt = 0
        self._lock = threading.Lock()
        self._size: int | None = None  # bytes on disk, counted lazily

    def _path(self, sha: str) -> Path:
        if not re.fullmatch(r"[0-9a-f]{64}", sha):
            raise ValueError(f"invalid chunk hash {sha!r}")
        return self.directory / sha[:2] / sha

    def _count(self, **deltas: int) -> None:
        with self._lock:
            for name, delta in deltas.items():
                setattr(self, name, getattr(self, name) + delta)

    def get(self, sha: str) -> bytes | None:
        """The chunk's bytes if cached and intact, else None."""
        path = self._path(sha)
        try:
            data = path.read_bytes()
        except OSError:
            self._count(misses=1)
            return None
        if hashlib.sha256(data).hexdigest() != sha:
            log.warning("dropping damaged cached chunk %s", path)
            self._remove(path)
            self._count(misses=1, corrupt=1)
            return None
        with contextlib.suppress(OSError):
            os.utime(path)
        self._count(hits=1)
        return data

    def __contains__(self, sha: str) -> bool:
        return self._path(sha).is_file()

    def put(self, sha: str, data: bytes | bytearray | memoryview) -> None:
        """Cache a chunk the caller has verified; no-op if it is there or could never fit."""
        size = memoryview(data).nbytes
        if self.max_bytes <= 0 or size > self.max_bytes:
            return
        path = self._path(sha)
        if path.exists():
            return
        try:
            path.parent.mkdir(mode=0o700, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                os.replace(tmp, path)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
        except OSError as exc:
            # A full or read-only disk must not fail the load that feeds the cache.
            log.warning("could not cache chunk %s: %s", sha, exc)
            return
        with self._lock:
            if self._size is not None:
                self._size += size
        if self.size() > self.max_bytes:
            self.evict()

    def _remove(self, path: Path) -> int:
        try:
            size = path.stat().st_size
            path.unlink()
        except OSError:
            return 0
        with self._lock:
            if self._size is not None:
                self._size -= size
        return size

    def _entries(self) -> list[tuple[float, int, Path]]:
        entries = []
        for sub in self.directory.iterdir():
            if not sub.is_dir():
                continue
            for path in sub.iterdir():
                if path.name.startswith(".tmp-"):
                    continue
                with contextlib.suppress(OSError):
                    st = path.stat()
                    entries.append((st.st_mtime, st.st_size, path))
        return entries

    def size(self) -> int:
        """Bytes of chunks in the cache (scanned once, then tracked)."""
        with self._lock:
            if self._size is not None:
                return self._size
        total = sum(size for _, size, _ in self._entries())
        with self._lock:
            self._size = total
        return total

    def evict(self) -> int:
        """Remove least recently used chunks until the cache is below its cap; returns
        the bytes removed. Rescans the directory, which other processes may share."""
        entries = sorted(self._entries())
        total = sum(size for _, size, _ in entries)
        with self._lock:
            self._size = total
        target = int(self.max_bytes * _LOW_WATER)
        removed = 0
        for _, _, path in entries:
            if total - removed <= target:
                break
            freed = self._remove(path)
            removed += freed
            if freed:
                self._count(evictions=1)
        return removed

    def clear(self) -> None:
        for _, _, path in self._entries():
            self._remove(path)

    def __repr__(self) -> str:
        return f"ChunkCache({str(self.directory)!r}, max_bytes={self.max_bytes})"
