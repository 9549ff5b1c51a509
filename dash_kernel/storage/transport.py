"""How a storage client reaches one user's namespace: the Transport interface, and DirectTransport on a backend."""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import Any, Protocol, TypeVar, runtime_checkable

from .backends import AlreadyExists, Backend, Data, NotFound, StorageError
from .manifest import check_manifest, check_stored_manifest

__all__ = [
    "ChunksMissing",
    "DamagedManifest",
    "DirectTransport",
    "Transport",
    "bounded_map",
    "check_manifest",
    "check_name",
    "check_user",
    "chunk_key",
    "manifest_key",
    "summary",
]

log = logging.getLogger(__name__)

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)*$")
NAME_MAX = 200
USER_PATTERN = re.compile(r"^[a-z0-9][a-z0-9-]{0,39}$")
SHA_PATTERN = re.compile(r"^[0-9a-f]{64}$")
# A manifest's file name; a name segment like this would collide with one on a local disk.
_VERSION_FILE = re.compile(r"^(\d{10})\.json$")
# Session checkpoints (dash_kernel.checkpoints) live under this prefix.
CHECKPOINT_PREFIX = "sessions/"
# Exclusive-create retries when concurrent saves of one name race for a version number.
_VERSION_ATTEMPTS = 20

T = TypeVar("T")
R = TypeVar("R")


def default_threads() -> int:
    return max(1, int(os.environ.get("DASH_STORAGE_THREADS", "16")))


def check_name(name: str) -> str:
    """``name`` if it is a valid object name; ValueError naming the rule otherwise."""
    if not isinstance(name, str) or not NAME_PATTERN.match(name) or len(name) > NAME_MAX:
        raise ValueError(
            f"invalid object name {name!r}: use letters, digits, '.', '_' and '-', with '/' "
            f"between parts that each start with a letter or digit, at most {NAME_MAX} characters"
        )
    if any(_VERSION_FILE.match(part) for part in name.split("/")):
        raise ValueError(f"invalid object name {name!r}: a part may not look like 0000000001.json")
    return name


class ChunksMissing(StorageError):
    """A manifest names chunks storage does not hold: never uploaded, or collected as
    garbage after the client found them present. Uploading them again fixes it."""

    def __init__(self, hashes: list[str], message: str | None = None):
        self.hashes = list(hashes)
        if message is None:
            more = f" (and {len(hashes) - 1} more)" if len(hashes) > 1 else ""
            message = f"chunk {hashes[0]} was not uploaded{more}"
        super().__init__(message)


class DamagedManifest(StorageError):
    """A stored manifest that cannot be read (not JSON, or not a valid manifest): the
    object's version is unusable, and removing it is the way out."""

    def __init__(self, name: str, version: int, reason: str):
        self.name, self.version, self.reason = name, version, reason
        super().__init__(
            f"object {name!r} version {version} is damaged: {reason}; remove it with "
            f"dk.rm({name!r}, version={version})"
        )


def damaged_entry(name: str, version: int, reason: str) -> dict[str, Any]:
    """What listings show for a version whose manifest is damaged."""
    return {"name": name, "version": version, "damaged": reason}


def check_user(user: str) -> str:
    if not isinstance(user, str) or not USER_PATTERN.match(user):
        raise ValueError(f"invalid storage user {user!r}")
    return user


def check_sha(sha: str) -> str:
    if not isinstance(sha, str) or not SHA_PATTERN.match(sha):
        raise ValueError(f"invalid chunk hash {sha!r}: expected 64 lowercase hex digits")
    return sha


def chunk_key(user: str, sha: str) -> str:
    return f"users/{user}/chunks/{check_sha(sha)}"


def objects_prefix(user: str) -> str:
    return f"users/{user}/objects/"


def manifest_key(user: str, name: str, version: int) -> str:
    return f"{objects_prefix(user)}{check_name(name)}/{version:010d}.json"


def summary(manifest: dict[str, Any]) -> dict[str, Any]:
    """A manifest without its parts: what listings show."""
    return {k: v for k, v in manifest.items() if k != "parts"}


def created_at(entry: dict[str, Any]) -> float:
    """A manifest's ``created`` as a Unix time (0 if it has none that parses)."""
    try:
        text = str(entry["created"]).replace("Z", "+00:00")
        return datetime.datetime.fromisoformat(text).timestamp()
    except (KeyError, ValueError):
        return 0.0


def now_iso() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds")


def manifest_chunks(manifest: dict[str, Any]) -> list[str]:
    """Every distinct chunk hash a manifest refers to, in first-use order."""
    return list(dict.fromkeys(sha for part in manifest["parts"] for sha in part["chunks"]))


def bounded_map(
    executor: ThreadPoolExecutor,
    fn: Callable[[T], R],
    items: Iterable[T],
    limit: int,
) -> Iterator[R]:
    """``fn`` over ``items`` on ``executor`` with at most ``limit`` in flight, yielding
    results as they complete. Items are consumed lazily, so a generator of large buffers
    holds only ``limit`` of them at a time. The first failure cancels the rest and raises."""
    pending: set[Future[R]] = set()
    iterator = iter(items)
    try:
        exhausted = False
        while True:
            while not exhausted and len(pending) < limit:
                try:
                    item = next(iterator)
                except StopIteration:
                    exhausted = True
                    break
                pending.add(executor.submit(fn, item))
            if not pending:
                return
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                yield future.result()
    finally:
        for future in pending:
            future.cancel()


@runtime_checkable
class Transport(Protocol):
    """One user's namespace in storage. Chunk hashes are sha256 hex; callers verify
    what ``get_chunks`` returns, since only they know which object asked."""

    user: str

    def missing_chunks(self, hashes: Iterable[str]) -> list[str]:
        """The distinct ``hashes`` that storage does not hold yet, in input order."""

    def put_chunks(self, items: Iterable[tuple[str, Data]]) -> None:
        """Store each ``(sha, data)``, in parallel."""

    def get_chunks(self, hashes: Iterable[str]) -> Iterator[tuple[str, bytes]]:
        """``(sha, data)`` for each hash, fetched in parallel, in completion order;
        :class:`NotFound` if one is missing."""

    def discard_damaged(self, hashes: Iterable[str]) -> list[str]:
        """Delete those of ``hashes`` whose stored bytes fail their sha256 (storage checks
        them itself); returns the ones deleted."""

    def put_manifest(self, manifest: dict[str, Any]) -> dict[str, Any]:
        """Record a new version: checks the manifest and that every chunk it names is
        stored, then assigns the next version; returns the stored manifest."""

    def get_manifest(self, name: str, version: int | None = None) -> dict[str, Any]:
        """A version's manifest (the latest if ``version`` is None); :class:`NotFound`."""

    def list_objects(self, prefix: str = "") -> list[dict[str, Any]]:
        """Summaries of the latest version of every object whose name starts with ``prefix``."""

    def versions(self, name: str) -> list[dict[str, Any]]:
        """Summaries of every version of ``name``, oldest first; :class:`NotFound`."""

    def delete(self, name: str, version: int | None = None) -> list[int]:
        """Delete one version, or all of them; returns the deleted versions. Chunks are
        left in place (other versions and objects may share them)."""


class DirectTransport:
    """A user's namespace on a backend, used in embedded mode and by the gateway.

    Versions: the next is the highest stored + 1, written with an exclusive create, and
    retried with the following number if a concurrent save took it first. On a backend
    without exclusive creates (an S3 server that ignores If-None-Match) two saves of one
    name at the same instant may both claim one version, and the later write wins.
    Chunks are trusted as given: clients hash them, the gateway's upload handler checks
    them, and every reader verifies them.
    """

    def __init__(self, backend: Backend, user: str, *, threads: int | None = None):
        self.backend = backend
        self.user = check_user(user)
        self.threads = threads or default_threads()
        self._executor: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()

    @property
    def executor(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(
                    self.threads, thread_name_prefix=f"dash-storage-{self.user}"
                )
            return self._executor

    def close(self) -> None:
        with self._lock:
            if self._executor is not None:
                self._executor.shutdown(wait=False, cancel_futures=True)
                self._executor = None

    # chunks

    def missing_chunks(self, hashes: Iterable[str]) -> list[str]:
        # One existence check per chunk, in parallel: a listing would cost in proportion
        # to everything the user ever stored.
        unique = [check_sha(h) for h in dict.fromkeys(hashes)]

        def probe(sha: str) -> tuple[str, bool]:
            return sha, self.backend.exists(chunk_key(self.user, sha))

        found = dict(bounded_map(self.executor, probe, unique, self.threads))
        return [h for h in unique if not found[h]]

    def put_chunks(self, items: Iterable[tuple[str, Data]]) -> None:
        def put(item: tuple[str, Data]) -> None:
            sha, data = item
            self.backend.put(chunk_key(self.user, sha), data)

        for _ in bounded_map(self.executor, put, items, self.threads):
            pass

    def get_chunks(self, hashes: Iterable[str]) -> Iterator[tuple[str, bytes]]:
        def get(sha: str) -> tuple[str, bytes]:
            try:
                return sha, self.backend.get(chunk_key(self.user, sha))
            except NotFound:
                raise NotFound(f"chunk {sha} is missing from storage") from None

        yield from bounded_map(self.executor, get, dict.fromkeys(hashes), self.threads)

    def discard_damaged(self, hashes: Iterable[str]) -> list[str]:
        """Delete those of ``hashes`` whose stored bytes do not match their sha256, so that
        the next save finds them missing and uploads them again; returns those deleted.
        Each is read and hashed here: a reader's word alone deletes nothing."""

        def check(sha: str) -> str | None:
            key = chunk_key(self.user, sha)
            try:
                data = self.backend.get(key)
            except NotFound:
                return None
            if hashlib.sha256(data).hexdigest() == sha:
                return None
            self.backend.delete(key)
            log.warning("deleted damaged chunk %s of %s", sha, self.user)
            return sha

        unique = [check_sha(h) for h in dict.fromkeys(hashes)]
        return [sha for sha in bounded_map(self.executor, check, unique, self.threads) if sha]

    # manifests

    def _stored_versions(self, name: str) -> list[int]:
        prefix = f"{objects_prefix(self.user)}{check_name(name)}/"
        found = []
        for key in self.backend.list(prefix):
            match = _VERSION_FILE.match(key[len(prefix) :])
            if match:
                found.append(int(match.group(1)))
        return sorted(found)

    def _read(self, name: str, version: int) -> dict[str, Any]:
        """A stored manifest, checked; :class:`DamagedManifest` if it is not one."""
        data = self.backend.get(manifest_key(self.user, name, version))
        try:
            manifest = json.loads(data)
        except ValueError as exc:
            raise DamagedManifest(
                name, version, f"the manifest is not valid JSON ({exc})"
            ) from None
        try:
            check_stored_manifest(manifest)
        except ValueError as exc:
            raise DamagedManifest(name, version, f"the manifest is not valid ({exc})") from None
        if (manifest["name"], manifest["version"]) != (name, version):
            found = f"{manifest['name']!r} version {manifest['version']}"
            raise DamagedManifest(name, version, f"the manifest describes {found}")
        return manifest

    def put_manifest(self, manifest: dict[str, Any]) -> dict[str, Any]:
        manifest = dict(check_manifest(manifest))
        manifest.pop("version", None)
        missing = self.missing_chunks(manifest_chunks(manifest))
        if missing:
            raise ChunksMissing(missing)
        name = manifest["name"]
        manifest["user"] = self.user
        manifest.setdefault("metadata", {})
        manifest["created"] = now_iso()
        existing = self._stored_versions(name)
        version = (existing[-1] if existing else 0) + 1
        for _ in range(_VERSION_ATTEMPTS):
            stored = {"name": name, "version": version, **manifest}
            data = json.dumps(stored, separators=(",", ":")).encode()
            try:
                self.backend.put(manifest_key(self.user, name, version), data, exclusive=True)
                log.debug("stored %s version %d for %s", name, version, self.user)
                return stored
            except AlreadyExists:
                version += 1
        raise StorageError(
            f"could not assign a version to {name!r}: {_VERSION_ATTEMPTS} concurrent saves "
            "took every number tried"
        )

    def get_manifest(self, name: str, version: int | None = None) -> dict[str, Any]:
        if version is None:
            existing = self._stored_versions(name)
            if not existing:
                raise NotFound(f"no object named {name!r}")
            # A version deleted between listing and reading: take the next latest.
            for candidate in reversed(existing):
                try:
                    return self._read(name, candidate)
                except NotFound:
                    continue
            raise NotFound(f"no object named {name!r}")
        if not isinstance(version, int) or isinstance(version, bool) or version < 1:
            raise ValueError(f"invalid version {version!r}: versions are integers from 1")
        try:
            return self._read(name, version)
        except NotFound:
            existing = self._stored_versions(name)
            if not existing:
                raise NotFound(f"no object named {name!r}") from None
            listed = ", ".join(map(str, existing))
            raise NotFound(
                f"object {name!r} has no version {version} (versions: {listed})"
            ) from None

    def _summaries(self, pairs: list[tuple[str, int]]) -> list[dict[str, Any]]:
        def read(pair: tuple[str, int]) -> dict[str, Any] | None:
            try:
                return summary(self._read(*pair))
            except NotFound:
                return None  # deleted meanwhile
            except DamagedManifest as exc:
                # Named, not fatal: the rest of the namespace stays visible and removable.
                log.warning("%s (user %s)", exc, self.user)
                return damaged_entry(exc.name, exc.version, exc.reason)

        results = [r for r in bounded_map(self.executor, read, pairs, self.threads) if r]
        return sorted(results, key=lambda s: (s["name"], s["version"]))

    def list_objects(self, prefix: str = "") -> list[dict[str, Any]]:
        if prefix and not re.match(r"^[A-Za-z0-9._/-]*$", prefix):
            raise ValueError(f"invalid name prefix {prefix!r}")
        base = objects_prefix(self.user)
        latest: dict[str, int] = {}
        for key in self.backend.list(base + prefix):
            name, _, file = key[len(base) :].rpartition("/")
            match = _VERSION_FILE.match(file)
            if name and match:
                latest[name] = max(latest.get(name, 0), int(match.group(1)))
        return self._summaries(sorted(latest.items()))

    def versions(self, name: str) -> list[dict[str, Any]]:
        existing = self._stored_versions(name)
        if not existing:
            raise NotFound(f"no object named {name!r}")
        return self._summaries([(name, v) for v in existing])

    def delete(self, name: str, version: int | None = None) -> list[int]:
        existing = self._stored_versions(name)
        if not existing:
            raise NotFound(f"no object named {name!r}")
        if version is not None:
            if version not in existing:
                listed = ", ".join(map(str, existing))
                raise NotFound(f"object {name!r} has no version {version} (versions: {listed})")
            targets = [version]
        else:
            targets = existing
        for v in targets:
            self.backend.delete(manifest_key(self.user, name, v))
        return targets

    # expiry

    def expire_checkpoints(self, older_than: float) -> dict[str, Any]:
        """Delete every version of each session checkpoint (a ``variables-1`` object under
        ``sessions/``) whose latest version was created more than ``older_than`` seconds
        ago; user objects and damaged manifests are never touched. Their chunks are left
        to :meth:`collect_garbage`."""
        cutoff = time.time() - older_than
        expired: list[str] = []
        kept = 0
        for entry in self.list_objects(CHECKPOINT_PREFIX):
            if entry.get("format") != "variables-1" or created_at(entry) > cutoff:
                kept += 1
                continue
            try:
                self.delete(entry["name"])
            except NotFound:
                continue  # removed meanwhile
            expired.append(entry["name"])
        if expired:
            log.info("expired %d session checkpoints of %s", len(expired), self.user)
        return {"deleted": expired, "kept": kept}

    # garbage

    def collect_garbage(self, older_than: float) -> dict[str, int]:
        """Delete this user's chunks that no manifest refers to and that were stored more
        than ``older_than`` seconds ago (a save uploads its chunks before its manifest).

        A save that found such a chunk present and commits after it is gone fails with
        :class:`ChunksMissing` (the storage client then uploads it again): callers keep
        manifest commits out of the sweep (the gateway does), so none can name a chunk
        between the reading of the manifests and the deletion.
        """
        base = objects_prefix(self.user)
        keys = [k for k in self.backend.list(base) if _VERSION_FILE.match(k.rpartition("/")[2])]

        def chunks_of(key: str) -> list[str]:
            try:
                data = self.backend.get(key)
            except NotFound:
                return []  # deleted meanwhile
            try:
                return manifest_chunks(check_manifest(json.loads(data)))
            except ValueError:
                # A damaged manifest: keep every chunk it might still name.
                return re.findall(r"[0-9a-f]{64}", data.decode("utf-8", "replace"))

        referenced: set[str] = set()
        for found in bounded_map(self.executor, chunks_of, keys, self.threads):
            referenced.update(found)
        cutoff = time.time() - older_than
        prefix = f"users/{self.user}/chunks/"
        doomed: list[tuple[str, int]] = []
        kept = 0
        for key, size, modified in self.backend.list_details(prefix):
            if key[len(prefix) :] in referenced or modified > cutoff:
                kept += 1
            else:
                doomed.append((key, size))

        def delete(item: tuple[str, int]) -> int:
            self.backend.delete(item[0])
            return item[1]

        freed = sum(bounded_map(self.executor, delete, doomed, self.threads))
        if doomed:
            log.info("deleted %d unused chunks (%d bytes) of %s", len(doomed), freed, self.user)
        return {"deleted": len(doomed), "bytes_freed": freed, "kept": kept}

    def __repr__(self) -> str:
        return f"DirectTransport({self.backend!r}, user={self.user!r})"
