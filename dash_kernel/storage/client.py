"""The storage client: objects and file trees as hashed chunks plus a manifest, over a Transport."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
import threading
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..serialize import SerializationError, describe_failure, dumps_oob, loads_oob
from .backends import Data, NotFound, StorageError
from .cache import ChunkCache, parse_size
from .listing import Listing, human_size
from .transport import (
    ChunksMissing,
    Transport,
    bounded_map,
    check_name,
    default_threads,
    now_iso,
    summary,
)

__all__ = [
    "CorruptChunk",
    "SaveRecord",
    "StorageClient",
    "StorageWarning",
    "VariablesRecord",
    "default_chunk_size",
]

log = logging.getLogger(__name__)

DEFAULT_CHUNK_SIZE = 8 * 2**20
# Transfers at least this big show a progress bar (tqdm.auto).
PROGRESS_MIN_BYTES = 64 * 2**20
# Variables pickled smaller than this (with no out-of-band buffers) share one part, so a
# namespace of many small values is a few chunks, not one per value.
PACK_BELOW = 256 * 2**10
# Hashes per missing-chunks question: bounds a gateway request's size.
_MISSING_BATCH = 1000


def default_chunk_size() -> int:
    """``DASH_CHUNK_SIZE`` (e.g. ``16MiB``), else 8 MiB."""
    value = os.environ.get("DASH_CHUNK_SIZE")
    size = parse_size(value) if value else DEFAULT_CHUNK_SIZE
    if size < 4096:
        raise ValueError(f"DASH_CHUNK_SIZE={value!r} is too small; use at least 4096 bytes")
    return size


class CorruptChunk(StorageError):
    """A chunk read from storage does not match its sha256: the stored copy is damaged."""

    def __init__(self, name: str, version: int, sha: str, detail: str, *, removed: bool = False):
        self.name, self.version, self.sha, self.removed = name, version, sha, removed
        if removed:
            advice = (
                "the damaged copy was removed from storage: saving the object again stores "
                "the chunk afresh (and repairs every version that shares it)"
            )
        else:
            advice = "the stored copy is damaged (delete this version and save it again)"
        super().__init__(
            f"object {name!r} version {version} is corrupt: chunk {sha} {detail}; {advice}"
        )


@dataclass(frozen=True)
class SaveRecord:
    """What a save stored: ``uploaded_bytes`` counts the chunks that were not stored yet."""

    name: str
    version: int
    size: int
    uploaded_bytes: int
    type: str
    created: str
    metadata: dict[str, Any] = field(default_factory=dict, compare=False)

    @classmethod
    def from_manifest(cls, manifest: dict[str, Any], uploaded_bytes: int) -> SaveRecord:
        return cls(
            manifest["name"],
            manifest["version"],
            manifest["size"],
            uploaded_bytes,
            manifest.get("type", ""),
            manifest.get("created", ""),
            manifest.get("metadata", {}),
        )

    def __repr__(self) -> str:
        return (
            f"SaveRecord(name={self.name!r}, version={self.version}, size={human_size(self.size)}, "
            f"uploaded={human_size(self.uploaded_bytes)}, type={self.type!r})"
        )


@dataclass(frozen=True)
class VariablesRecord:
    """What :meth:`StorageClient.save_variables` did: ``version`` is None when the content
    was unchanged (its ``digest`` equal to the previous save's) and nothing was written;
    ``failures`` names each variable that could not be pickled, and why."""

    name: str
    version: int | None
    saved: list[str]
    failures: dict[str, str]
    size: int
    uploaded_bytes: int
    digest: str


def _type_name(obj: Any) -> str:
    kind = type(obj)
    return f"{kind.__module__}.{kind.__qualname__}"


def _json_metadata(metadata: dict[str, Any]) -> dict[str, Any]:
    try:
        return json.loads(json.dumps(metadata, allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"metadata must be JSON (strings, numbers, lists, dicts): {exc}") from None


@dataclass
class _Source:
    """One part being stored: its bytes, read by ``(offset, length)``."""

    role: str
    size: int
    read: Callable[[int, int], Data]
    path: str | None = None
    verify: bool = False  # re-hash when read again for upload (files may change)


def _view_source(role: str, view: memoryview) -> _Source:
    flat = view.cast("B") if view.format != "B" or view.ndim != 1 else view
    return _Source(role, flat.nbytes, lambda offset, length: flat[offset : offset + length])


def _file_source(relpath: str, path: Path, size: int) -> _Source:
    def read(offset: int, length: int) -> bytes:
        with open(path, "rb") as f:
            data = os.pread(f.fileno(), length, offset)
        if len(data) != length:
            raise StorageError(f"file {path} changed while it was being uploaded")
        return data

    return _Source("file", size, read, path=relpath, verify=True)


def _pieces(size: int, chunk_size: int) -> list[tuple[int, int]]:
    return [(o, min(chunk_size, size - o)) for o in range(0, size, chunk_size)]


class _Progress:
    """A tqdm.auto bar for transfers of at least PROGRESS_MIN_BYTES, else nothing."""

    def __init__(self, total: int, description: str, enabled: bool | None):
        self.bar = None
        if enabled or (enabled is None and total >= PROGRESS_MIN_BYTES):
            from tqdm.auto import tqdm

            self.bar = tqdm(
                total=total, desc=description, unit="B", unit_scale=True, unit_divisor=1024
            )
        self._lock = threading.Lock()

    def update(self, n: int) -> None:
        if self.bar is not None:
            with self._lock:
                self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class StorageClient:
    """Save and load Python objects and file trees in one user's storage namespace.

    ``cache`` (optional) keeps verified chunks locally, so a second load reads nothing
    from storage; ``files_dir`` is where datasets are materialised as real files (by
    default beside the cache, or ``~/.cache/dash/datasets``). ``progress``: None shows a
    tqdm.auto bar for transfers of 64 MiB or more, True always, False never.
    """

    def __init__(
        self,
        transport: Transport,
        cache: ChunkCache | None = None,
        *,
        chunk_size: int | None = None,
        files_dir: str | os.PathLike[str] | None = None,
        threads: int | None = None,
        progress: bool | None = None,
    ):
        self.transport = transport
        self.cache = cache
        self.chunk_size = chunk_size or default_chunk_size()
        if files_dir is None:
            if cache is not None:
                files_dir = cache.directory.parent / "dash-datasets"
            else:
                import platformdirs

                files_dir = platformdirs.user_cache_path("dash") / "datasets"
        self.files_dir = Path(files_dir)
        self.threads = threads or default_threads()
        self.progress = progress
        self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="dash-storage-client")

    @property
    def user(self) -> str:
        return self.transport.user

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        close = getattr(self.transport, "close", None)
        if close is not None:
            close()

    # saving

    def save(self, name: str, obj: Any, /, **metadata: Any) -> SaveRecord:
        """Store ``obj`` as the next version of ``name``; large buffers (numpy arrays) are
        hashed and uploaded in place, and chunks storage already has are not sent again."""
        check_name(name)
        metadata = _json_metadata(metadata)
        pickled, buffers = dumps_oob(obj)
        sources = [_view_source("pickle", memoryview(pickled))]
        sources += [_view_source("buffer", b) for b in buffers]
        return self._store(name, "pickle-oob-1", _type_name(obj), sources, metadata)

    def upload_files(
        self, path: str | os.PathLike[str], name: str, /, **metadata: Any
    ) -> SaveRecord:
        """Store a file, or a directory tree (regular files, symlinks followed), as the next
        version of ``name``; unchanged files are not sent again."""
        check_name(name)
        metadata = _json_metadata(metadata)
        root = Path(path).expanduser()
        if root.is_file():
            source, entries = "file", [(root.name, root)]
        elif root.is_dir():
            source, entries = "directory", list(_walk(root))
        else:
            raise FileNotFoundError(f"no file or directory at {root}")
        sources = [_file_source(rel, p, p.stat().st_size) for rel, p in entries]
        return self._store(name, "files-1", "files", sources, metadata, source=source)

    def save_variables(
        self,
        name: str,
        namespace: Mapping[str, Any],
        names: Iterable[str],
        /,
        *,
        unless_digest: str | None = None,
        **metadata: Any,
    ) -> VariablesRecord:
        """Store ``namespace[n]`` for each of ``names`` as the next version of ``name``,
        each pickled separately, so that one that cannot be pickled is named and skipped
        and one that did not change is not sent again. Small pickles share one packed
        part. If the content's digest equals ``unless_digest`` (the previous save's),
        nothing is written."""
        check_name(name)
        metadata = _json_metadata(metadata)
        failures: dict[str, str] = {}
        small: list[tuple[str, str, bytes]] = []
        large: list[tuple[str, str, bytes, list[memoryview]]] = []
        for var in sorted(names):
            if var not in namespace:
                continue
            value = namespace[var]
            try:
                pickled, buffers = dumps_oob(value)
            except Exception as exc:
                failures[var] = describe_failure(value, exc)
                continue
            if not buffers and len(pickled) < PACK_BELOW:
                small.append((var, _type_name(value), pickled))
            else:
                large.append((var, _type_name(value), pickled, buffers))
        sources: list[_Source] = []
        variables: list[dict[str, Any]] = []
        if small:
            pack = b"".join(p for _, _, p in small)
            sources.append(_view_source("pack", memoryview(pack)))
            offset = 0
            for var, type_name, pickled in small:
                variables.append({"name": var, "type": type_name, "pack": [offset, len(pickled)]})
                offset += len(pickled)
        for var, type_name, pickled, buffers in large:
            first = len(sources)
            sources.append(_view_source("pickle", memoryview(pickled)))
            sources += [_view_source("buffer", b) for b in buffers]
            variables.append(
                {"name": var, "type": type_name, "parts": list(range(first, len(sources)))}
            )
        parts, uploaded = self._upload(name, sources)
        content = json.dumps([variables, [p["chunks"] for p in parts]], sort_keys=True)
        digest = hashlib.sha256(content.encode()).hexdigest()
        size = sum(s.size for s in sources)
        saved = sorted(v["name"] for v in variables)
        if digest == unless_digest:
            return VariablesRecord(name, None, saved, failures, size, uploaded, digest)
        stored, again = self._commit(
            name,
            sources,
            parts,
            "variables-1",
            "variables",
            metadata,
            variables=variables,
            unsaved=failures,
            digest=digest,
        )
        return VariablesRecord(
            name, stored["version"], saved, failures, size, uploaded + again, digest
        )

    def _store(
        self,
        name: str,
        fmt: str,
        type_name: str,
        sources: list[_Source],
        metadata: dict[str, Any],
        **extra: Any,
    ) -> SaveRecord:
        parts, uploaded = self._upload(name, sources)
        stored, again = self._commit(name, sources, parts, fmt, type_name, metadata, **extra)
        return SaveRecord.from_manifest(stored, uploaded + again)

    def _upload(self, name: str, sources: list[_Source]) -> tuple[list[dict[str, Any]], int]:
        """Hash every chunk of ``sources`` and upload those storage does not hold; returns
        the manifest parts and the bytes uploaded."""
        chunk_size = self.chunk_size
        jobs = [(i, o, n) for i, s in enumerate(sources) for o, n in _pieces(s.size, chunk_size)]

        def digest(job: tuple[int, int, int]) -> str:
            i, offset, length = job
            return hashlib.sha256(sources[i].read(offset, length)).hexdigest()

        hashes = list(self._pool.map(digest, jobs))
        where: dict[str, tuple[int, int, int]] = {}
        for sha, job in zip(hashes, jobs, strict=True):
            where.setdefault(sha, job)
        unique = list(where)
        missing: list[str] = []
        for start in range(0, len(unique), _MISSING_BATCH):
            missing += self.transport.missing_chunks(unique[start : start + _MISSING_BATCH])
        uploaded = sum(where[sha][2] for sha in missing)

        progress = _Progress(uploaded, f"saving {name}", self.progress)
        try:

            def read(sha: str) -> tuple[str, Data]:
                i, offset, length = where[sha]
                data = sources[i].read(offset, length)
                if sources[i].verify and hashlib.sha256(data).hexdigest() != sha:
                    raise StorageError(
                        f"file {sources[i].path} changed while it was being uploaded"
                    )
                progress.update(length)
                return sha, data

            self.transport.put_chunks(bounded_map(self._pool, read, missing, self.threads))
        finally:
            progress.close()

        parts, position = [], 0
        for source in sources:
            count = len(_pieces(source.size, chunk_size))
            part: dict[str, Any] = {"role": source.role}
            if source.path is not None:
                part["path"] = source.path
            part["size"] = source.size
            part["chunks"] = hashes[position : position + count]
            position += count
            parts.append(part)
        return parts, uploaded

    def _commit(
        self,
        name: str,
        sources: list[_Source],
        parts: list[dict[str, Any]],
        fmt: str,
        type_name: str,
        metadata: dict[str, Any],
        **extra: Any,
    ) -> tuple[dict[str, Any], int]:
        """Record a manifest for uploaded ``parts`` as the next version; the stored one,
        and the bytes uploaded again if storage had meanwhile collected some chunks that
        were there when asked (they are sent once more, and the manifest retried)."""
        manifest = {
            "name": name,
            "size": sum(p["size"] for p in parts),
            "type": type_name,
            "created": now_iso(),
            "metadata": metadata,
            "user": self.user,
            "format": fmt,
            "chunk_size": self.chunk_size,
            **extra,
            "parts": parts,
        }
        again = 0
        try:
            stored = self.transport.put_manifest(manifest)
        except ChunksMissing as exc:
            log.info("%s: %s; uploading again", name, exc)
            manifest["parts"], again = self._upload(name, sources)
            stored = self.transport.put_manifest(manifest)
        log.info("saved %s version %s (%d bytes)", name, stored["version"], manifest["size"])
        return stored, again

    # loading

    def _fetch(self, manifest: dict[str, Any], write: Callable[[int, int, bytes], None]) -> None:
        """Every chunk of ``manifest`` through ``write(part, offset, data)``: from the cache
        where it is there, else from storage, each verified against its sha256."""
        name, version, chunk_size = manifest["name"], manifest["version"], manifest["chunk_size"]
        where: dict[str, list[tuple[int, int, int]]] = {}
        for i, part in enumerate(manifest["parts"]):
            for (offset, length), sha in zip(
                _pieces(part["size"], chunk_size), part["chunks"], strict=True
            ):
                where.setdefault(sha, []).append((i, offset, length))
        total = sum(where[sha][0][2] for sha in where)

        def place(sha: str, data: bytes) -> None:
            for i, offset, length in where[sha]:
                if len(data) != length:
                    raise CorruptChunk(
                        name, version, sha, f"has {len(data)} bytes instead of {length}"
                    )
                write(i, offset, data)

        remaining = list(where)
        if self.cache is not None:
            cache = self.cache

            def from_cache(sha: str) -> tuple[str, bool]:
                data = cache.get(sha)
                if data is None:
                    return sha, False
                place(sha, data)
                return sha, True

            found = dict(bounded_map(self._pool, from_cache, remaining, self.threads))
            remaining = [sha for sha in remaining if not found[sha]]

        progress = _Progress(
            sum(where[sha][0][2] for sha in remaining), f"loading {name}", self.progress
        )

        def verify(item: tuple[str, bytes]) -> None:
            sha, data = item
            actual = hashlib.sha256(data).hexdigest()
            if actual != sha:
                removed = self._discard_damaged(sha)
                raise CorruptChunk(name, version, sha, f"has sha256 {actual}", removed=removed)
            place(sha, data)
            if self.cache is not None:
                self.cache.put(sha, data)
            progress.update(len(data))

        try:
            for _ in bounded_map(
                self._pool, verify, self.transport.get_chunks(remaining), self.threads
            ):
                pass
        except NotFound as exc:
            raise StorageError(f"object {name!r} version {version}: {exc}") from None
        finally:
            progress.close()
        log.debug("fetched %s version %s (%d bytes)", name, version, total)

    def _discard_damaged(self, sha: str) -> bool:
        """Have storage drop a chunk that failed its hash, so that it no longer counts as
        present and the next save uploads it; whether it is gone."""
        try:
            return sha in self.transport.discard_damaged([sha])
        except Exception as exc:
            # The damage is what the user must hear about, not this.
            log.warning("could not remove the damaged chunk %s: %s", sha, exc)
            return False

    def load(self, name: str, version: int | None = None) -> Any:
        """The object saved as ``name`` (its latest version, or ``version``)."""
        manifest = self.transport.get_manifest(check_name(name), version)
        if manifest.get("format") == "variables-1":
            values, failures = self._load_variables(manifest)
            if failures:
                raise SerializationError("load", failures)
            return values
        if manifest.get("format") != "pickle-oob-1":
            raise StorageError(
                f"object {name!r} version {manifest['version']} holds files, not a Python "
                f"object: use dk.datasets.path({name!r})"
            )
        # Writable buffers: arrays come back writable and backed by them, with no copy.
        buffers = [bytearray(part["size"]) for part in manifest["parts"]]
        views = [memoryview(b) for b in buffers]

        def write(i: int, offset: int, data: bytes) -> None:
            views[i][offset : offset + len(data)] = data

        self._fetch(manifest, write)
        return loads_oob(buffers[0], buffers[1:])

    def load_variables(
        self, name: str, version: int | None = None
    ) -> tuple[dict[str, Any], dict[str, str], dict[str, Any]]:
        """The variables saved by :meth:`save_variables` as ``name`` (the latest version,
        or ``version``): ``(values, failures, summary)``, where ``failures`` names each one
        that could not be unpickled here (a module this machine lacks, say) and why."""
        manifest = self.transport.get_manifest(check_name(name), version)
        if manifest.get("format") != "variables-1":
            raise StorageError(
                f"object {name!r} version {manifest['version']} is not a set of saved "
                f"variables: use dk.load({name!r})"
            )
        values, failures = self._load_variables(manifest)
        return values, failures, summary(manifest)

    def _load_variables(self, manifest: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
        buffers = [bytearray(part["size"]) for part in manifest["parts"]]
        views = [memoryview(b) for b in buffers]

        def write(i: int, offset: int, data: bytes) -> None:
            views[i][offset : offset + len(data)] = data

        self._fetch(manifest, write)
        values: dict[str, Any] = {}
        failures: dict[str, str] = {}
        for variable in manifest.get("variables", []):
            var = variable["name"]
            try:
                if "pack" in variable:
                    offset, length = variable["pack"]
                    values[var] = loads_oob(views[0][offset : offset + length], [])
                else:
                    first, *rest = variable["parts"]
                    values[var] = loads_oob(buffers[first], [buffers[i] for i in rest])
            except Exception as exc:
                failures[var] = f"{type(exc).__name__}: {exc}"
        return values, failures

    def materialise(self, name: str, version: int | None = None) -> Path:
        """A local directory holding the files of dataset ``name`` (the latest version, or
        ``version``), fetched once into ``files_dir`` and reused while it is intact. For a
        dataset uploaded from a single file, the path of that file."""
        manifest = self.transport.get_manifest(check_name(name), version)
        if manifest.get("format") != "files-1":
            raise StorageError(
                f"object {name!r} version {manifest['version']} is a Python object, not "
                f"files: use dk.load({name!r})"
            )
        # The digest tells apart a version number reused after its object was deleted.
        identity = json.dumps([manifest.get("created"), manifest["parts"]], sort_keys=True)
        digest = hashlib.sha256(identity.encode()).hexdigest()[:12]
        # '@' cannot occur in a name, so "a@1-…" never collides with object "a/…".
        target = self.files_dir / self.user / f"{name}@{manifest['version']}-{digest}"
        files = [(part["path"], part["size"]) for part in manifest["parts"]]
        if not _complete(target, files):
            target.parent.mkdir(parents=True, exist_ok=True)
            building = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target.parent))
            try:
                self._write_files(manifest, building)
                if target.exists() and not _complete(target, files):
                    shutil.rmtree(target, ignore_errors=True)  # damaged
                # Fails if another process finished it meanwhile; theirs is as good.
                with contextlib.suppress(OSError):
                    os.rename(building, target)
            finally:
                shutil.rmtree(building, ignore_errors=True)
            if not _complete(target, files):
                raise StorageError(f"could not materialise {name!r} in {target}")
        if manifest.get("source") == "file" and len(files) == 1:
            return target / files[0][0]
        return target

    def _write_files(self, manifest: dict[str, Any], directory: Path) -> None:
        fds = []
        try:
            for part in manifest["parts"]:
                path = directory.joinpath(*part["path"].split("/"))
                path.parent.mkdir(parents=True, exist_ok=True)
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                fds.append(fd)
                os.ftruncate(fd, part["size"])

            def write(i: int, offset: int, data: bytes) -> None:
                os.pwrite(fds[i], data, offset)

            self._fetch(manifest, write)
        finally:
            for fd in fds:
                os.close(fd)

    # listing

    def ls(self, prefix: str = "") -> Listing:
        """The latest version of each object whose name starts with ``prefix``, as a table
        of entries; a version whose manifest is damaged is listed as such (and warned
        about), never fatal to the listing."""
        listing = Listing.of(self.summaries(prefix), self.manifest)
        _warn_damaged(listing)
        return listing

    def summaries(self, prefix: str = "") -> list[dict[str, Any]]:
        """The transport's summaries (manifests without parts) behind :meth:`ls`."""
        return self.transport.list_objects(prefix)

    def versions(self, name: str) -> Listing:
        """Every version of ``name``, oldest first, as in :meth:`ls`."""
        listing = Listing.of(self.transport.versions(check_name(name)), self.manifest)
        _warn_damaged(listing)
        return listing

    def manifest(self, name: str, version: int | None = None) -> dict[str, Any]:
        """The whole manifest of ``name`` (its latest version, or ``version``)."""
        return self.transport.get_manifest(check_name(name), version)

    def rm(self, name: str, version: int | None = None) -> list[int]:
        """Delete one version of ``name``, or all; returns the versions deleted. Chunks
        stay in storage (other versions may share them); nothing collects them yet."""
        return self.transport.delete(check_name(name), version)


def _warn_damaged(listing: Listing) -> None:
    for entry in listing.damaged:
        warnings.warn(
            f"object {entry['name']!r} version {entry['version']} is damaged: "
            f"{entry['damaged']}; dk.rm({entry['name']!r}, version={entry['version']}) "
            "removes it",
            StorageWarning,
            stacklevel=3,
        )


class StorageWarning(UserWarning):
    """Something in storage needs the user's attention (a damaged object, say)."""


def _walk(root: Path) -> Iterator[tuple[str, Path]]:
    """``(relative posix path, path)`` of every regular file under ``root``, sorted."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for filename in sorted(filenames):
            path = Path(dirpath) / filename
            if path.is_file():
                yield path.relative_to(root).as_posix(), path


def _complete(target: Path, files: Iterable[tuple[str, int]]) -> bool:
    if not target.is_dir():
        return False
    for relpath, size in files:
        try:
            if target.joinpath(*relpath.split("/")).stat().st_size != size:
                return False
        except OSError:
            return False
    return True
