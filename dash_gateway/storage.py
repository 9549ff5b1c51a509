"""Object storage over HTTP: each user's objects and chunks, storage tokens, presigned transfers."""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import datetime
import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from tornado import web

from dash_gateway.auth import is_operator, username
from dash_gateway.handlers import AUTH_NEEDED, AUTH_RESOURCE, JSONAPIHandler, http_error
from dash_gateway.registry import OPERATOR, Registry, iso
from dash_kernel.storage.backends import Backend, NotFound, StorageError, describe, open_backend
from dash_kernel.storage.gateway_transport import DAMAGED_STATUS
from dash_kernel.storage.transport import (
    ChunksMissing,
    DamagedManifest,
    DirectTransport,
    chunk_key,
)
from dash_kernel.storage.transport import check_name as transport_check_name
from dash_kernel.storage.transport import check_sha as transport_check_sha

try:
    from jupyter_server.auth.decorator import allow_unauthenticated
except ImportError:  # jupyter_server < 2.13: every handler is reachable without a login anyway

    def allow_unauthenticated(method: Any) -> Any:  # type: ignore[no-redef]
        return method


log = logging.getLogger(__name__)

T = TypeVar("T")

STORAGE_TOKEN_HEADER = "X-Dash-Storage-Token"
TOKEN_VERSION = "dst1"
DEFAULT_TOKEN_LIFETIME = 86400.0
MAX_TOKEN_LIFETIME = 30 * 86400.0
# Chunks are 8 MiB by default (DASH_CHUNK_SIZE may raise it); nothing legitimate is bigger.
MAX_CHUNK_SIZE = 64 * 1024 * 1024
# Presigned URLs are used at once by the client that asked; an hour covers a slow transfer.
PRESIGN_LIFETIME = 3600
MAX_HASHES_PER_REQUEST = 10_000
MAX_PREFIX_LENGTH = 200
# A prefix of some valid name: whole segments, then possibly the start of one.
PREFIX_RE = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*/)*([A-Za-z0-9][A-Za-z0-9._-]*)?$")
CHUNK_PATH = "dash/api/storage/chunks/"
DEFAULT_CHECKPOINT_RETENTION = 30 * 86400.0
# How often expired session checkpoints are looked for (and once at start).
CHECKPOINT_EXPIRY_INTERVAL = 3600.0


class TokenError(Exception):
    """A storage token that is malformed, forged, expired or names no account."""


class StorageTokens:
    """Mints and checks storage tokens: ``dst1.<base64url "user|expiry">.<hex HMAC-SHA256>``.

    The key is 32 random bytes in ``secret_path`` (mode 0600), made on first use, so tokens
    survive a gateway restart and die with that file.
    """

    def __init__(self, secret_path: str):
        self.secret_path = secret_path
        self._key: bytes | None = None
        self._lock = threading.Lock()

    def key(self) -> bytes:
        with self._lock:
            if self._key is None:
                self._key = self._load_or_create()
            return self._key

    def _load_or_create(self) -> bytes:
        directory = os.path.dirname(self.secret_path) or "."
        os.makedirs(directory, mode=0o700, exist_ok=True)
        # Written aside, then linked into place: a reader never sees a half-written key,
        # and link() refuses to replace a key another process made meanwhile.
        fd, tmp = tempfile.mkstemp(prefix=".storage-secret-", dir=directory)
        try:
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_hex(32) + "\n")
            os.link(tmp, self.secret_path)
            log.info("Created the storage token key %s", self.secret_path)
        except FileExistsError:
            pass
        finally:
            os.unlink(tmp)
        with open(self.secret_path) as f:
            text = f.read().strip()
        try:
            key = bytes.fromhex(text)
        except ValueError:
            key = b""
        if len(key) < 32:
            raise RuntimeError(
                f"{self.secret_path} does not hold a storage token key (64 hex digits); "
                "remove it and the gateway makes a new one (existing storage tokens stop working)"
            )
        if os.stat(self.secret_path).st_mode & 0o077:
            log.warning("%s was readable by others; made it 0600", self.secret_path)
            os.chmod(self.secret_path, 0o600)
        return key

    def _sign(self, payload: bytes) -> str:
        return hmac.new(self.key(), payload, hashlib.sha256).hexdigest()

    def mint(self, user: str, lifetime: float, now: float | None = None) -> tuple[str, int]:
        """A token for ``user`` valid for ``lifetime`` seconds; returns it and its expiry
        (Unix seconds)."""
        expires = int((time.time() if now is None else now) + lifetime)
        payload = f"{user}|{expires}".encode()
        encoded = base64.urlsafe_b64encode(payload).decode().rstrip("=")
        return f"{TOKEN_VERSION}.{encoded}.{self._sign(payload)}", expires

    def verify(self, token: str, now: float | None = None) -> str:
        """The user a genuine, unexpired token was minted for; ``TokenError`` otherwise."""
        parts = token.split(".")
        if len(parts) != 3 or parts[0] != TOKEN_VERSION:
            raise TokenError("this is not a DASH storage token")
        try:
            payload = base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4))
        except (binascii.Error, ValueError):
            raise TokenError("this is not a DASH storage token") from None
        if not hmac.compare_digest(self._sign(payload).encode(), parts[2].encode()):
            raise TokenError("invalid storage token (not issued by this gateway)")
        user, _, expires_text = payload.decode(errors="replace").rpartition("|")
        try:
            expires = int(expires_text)
        except ValueError:
            raise TokenError("this is not a DASH storage token") from None
        if (time.time() if now is None else now) >= expires:
            when = iso(datetime.datetime.fromtimestamp(expires, datetime.timezone.utc))
            raise TokenError(
                f"this storage token expired at {when}; "
                "ask for a new one (POST /dash/api/storage/token)"
            )
        return user


def check_name(name: str) -> str:
    """``name`` if it is a valid object name; a 400 saying why otherwise."""
    try:
        return transport_check_name(name)
    except ValueError as exc:
        raise http_error(400, str(exc)) from None


def check_sha(sha: str) -> str:
    """``sha`` if it is a chunk hash (64 lowercase hex digits); 400 otherwise."""
    try:
        return transport_check_sha(sha)
    except ValueError:
        raise http_error(
            400, f"{sha[:80]!r} is not a chunk hash: sha256 as 64 lowercase hex digits"
        ) from None


def check_hashes(value: Any) -> list[str]:
    """A list of chunk hashes; 400 otherwise."""
    if not isinstance(value, list) or not all(isinstance(h, str) for h in value):
        raise http_error(400, "'chunks' must be a list of chunk hashes (sha256, lowercase hex)")
    if len(value) > MAX_HASHES_PER_REQUEST:
        raise http_error(
            400, f"at most {MAX_HASHES_PER_REQUEST} chunks per request; send them in batches"
        )
    for sha in value:
        check_sha(sha)
    return value


def client_manifest(body: dict[str, Any], name: str, user: str) -> dict[str, Any]:
    """The manifest to store: the client's (its shape is checked when stored), with the
    URL's name and the caller's user whatever the body says; the store assigns the version."""
    if body.get("name", name) != name:
        raise http_error(400, f"the manifest names {body['name']!r}, but the URL names {name!r}")
    manifest = {k: v for k, v in body.items() if k != "version"}
    manifest["name"] = name
    manifest["user"] = user
    return manifest


class SweepGate:
    """Per user, manifest commits run side by side and a garbage sweep runs alone: it waits
    for the commits in flight, and new ones wait for it. So no manifest can name a chunk
    between the sweep's reading of the manifests and its deleting of unnamed chunks."""

    def __init__(self) -> None:
        self._condition = asyncio.Condition()
        self._commits: dict[str, int] = {}
        self._sweeping: set[str] = set()

    @contextlib.asynccontextmanager
    async def commit(self, user: str) -> AsyncIterator[None]:
        async with self._condition:
            await self._condition.wait_for(lambda: user not in self._sweeping)
            self._commits[user] = self._commits.get(user, 0) + 1
        try:
            yield
        finally:
            async with self._condition:
                self._commits[user] -= 1
                if not self._commits[user]:
                    del self._commits[user]
                self._condition.notify_all()

    @contextlib.asynccontextmanager
    async def sweep(self, user: str) -> AsyncIterator[None]:
        async with self._condition:
            await self._condition.wait_for(lambda: user not in self._sweeping)
            # Claimed first, so new commits wait behind the sweep instead of starving it.
            self._sweeping.add(user)
            await self._condition.wait_for(lambda: not self._commits.get(user))
        try:
            yield
        finally:
            async with self._condition:
                self._sweeping.discard(user)
                self._condition.notify_all()


class StorageService:
    """The gateway's storage: one backend, a transport per user, the token key, a thread pool
    for the backend's blocking calls."""

    def __init__(
        self,
        storage_url: str,
        data_dir: str,
        *,
        registry: Registry | None = None,
        public_url: str = "",
        workers: int = 16,
        checkpoint_retention: float = DEFAULT_CHECKPOINT_RETENTION,
    ):
        self.url = storage_url or os.path.join(data_dir, "storage")
        self.checkpoint_retention = checkpoint_retention
        self._expiry: asyncio.Task[None] | None = None
        self.backend: Backend = open_backend(self.url)
        self.description = describe(self.url)
        self.tokens = StorageTokens(os.path.join(data_dir, "storage-secret"))
        self.registry = registry
        self.public_url = public_url
        self.executor = ThreadPoolExecutor(workers, thread_name_prefix="dash-storage")
        self._transports: dict[str, DirectTransport] = {}
        # (user, name) -> [lock, holders and waiters]; dropped when nobody uses it.
        self._manifest_locks: dict[tuple[str, str], list[Any]] = {}
        self.gate = SweepGate()

    def transport(self, user: str) -> DirectTransport:
        """``user``'s namespace (kept: each has a thread pool for parallel backend calls)."""
        transport = self._transports.get(user)
        if transport is None:
            transport = self._transports[user] = DirectTransport(self.backend, user)
        return transport

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` on the storage threads: file and S3 calls block."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    @contextlib.asynccontextmanager
    async def manifest_lock(self, user: str, name: str) -> AsyncIterator[None]:
        """One save at a time per object through this gateway: the version numbers stay
        unique even on S3 servers without conditional writes."""
        entry = self._manifest_locks.setdefault((user, name), [asyncio.Lock(), 0])
        entry[1] += 1
        try:
            async with entry[0]:
                yield
        finally:
            entry[1] -= 1
            if not entry[1]:
                del self._manifest_locks[(user, name)]

    def presign(self, method: str, user: str, sha: str) -> str | None:
        """A short-lived URL for one of ``user``'s chunks (S3), or None (proxy through us).
        The key is built here from the caller's own name and a checked hash: never another's."""
        return self.backend.presign(method, chunk_key(user, sha), PRESIGN_LIFETIME)

    def usage(self, user: str) -> dict[str, int]:
        """``user``'s stored objects: how many, and the bytes of their latest versions
        (blocking: lists the backend; call it through :meth:`run`)."""
        objects = self.transport(user).list_objects()
        return {"objects": len(objects), "bytes": sum(int(o.get("size") or 0) for o in objects)}

    def user_for_token(self, token: str) -> str:
        user = self.tokens.verify(token)
        if user != OPERATOR and self.registry is not None and self.registry.get_user(user) is None:
            raise TokenError(f"this storage token's account {user!r} no longer exists")
        return user

    def storage_users(self) -> list[str]:
        """Everyone who may have objects: the operator and each account."""
        accounts = [u.name for u in self.registry.list_users()] if self.registry else []
        return [OPERATOR, *accounts]

    async def collect_garbage(self, older_than: float) -> dict[str, dict[str, int]]:
        """Delete every user's chunks that no object version refers to and that are older
        than ``older_than`` seconds; what was deleted, by user."""
        report = {}
        for user in self.storage_users():
            async with self.gate.sweep(user):
                report[user] = await self.run(self.transport(user).collect_garbage, older_than)
        return report

    async def expire_checkpoints(self) -> dict[str, dict[str, Any]]:
        """Delete every user's session checkpoints not saved for ``checkpoint_retention``
        seconds (never other objects); what was deleted, by user."""
        report = {}
        for user in self.storage_users():
            expire = self.transport(user).expire_checkpoints
            report[user] = await self.run(expire, self.checkpoint_retention)
        return report

    def start(self) -> None:
        """Expire old session checkpoints now and every hour (if a retention is set)."""
        if self.checkpoint_retention > 0 and self._expiry is None:
            self._expiry = asyncio.create_task(self._expire_periodically())

    async def _expire_periodically(self) -> None:
        while True:
            try:
                report = await self.expire_checkpoints()
            except Exception:
                log.exception("Expiring old session checkpoints failed; trying again later")
            else:
                expired = sum(len(r["deleted"]) for r in report.values())
                if expired:
                    log.info("Storage: expired %d old session checkpoints", expired)
            await asyncio.sleep(CHECKPOINT_EXPIRY_INTERVAL)

    def close(self) -> None:
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None
        for transport in self._transports.values():
            transport.close()
        self.executor.shutdown(wait=False, cancel_futures=True)


# ----- handlers --------------------------------------------------------------------------


class DamagedError(web.HTTPError):
    """A stored manifest that cannot be read: 422, with the object's name and version so
    that the client can say which, and how to remove it."""

    def __init__(self, exc: DamagedManifest):
        super().__init__(DAMAGED_STATUS, "%s", str(exc))
        self.details = {"name": exc.name, "version": exc.version, "damaged": exc.reason}


class StorageHandler(JSONAPIHandler):
    """Base of the storage API: a Jupyter login or a storage token; acts in the caller's own
    ``users/<user>/`` namespace only, whatever the URL or body say."""

    auth_resource = AUTH_RESOURCE
    # May a storage token authenticate this handler? (Not the one that mints them.)
    accepts_storage_token = True

    def initialize(self, storage: StorageService) -> None:
        self.storage = storage
        self.storage_user: str | None = None

    def storage_token(self) -> str:
        return self.request.headers.get(STORAGE_TOKEN_HEADER, "")

    async def prepare(self) -> None:  # type: ignore[override]
        await super().prepare()
        if self.request.method == "OPTIONS":
            return
        token = self.storage_token()
        if token:
            if not self.accepts_storage_token:
                raise http_error(
                    403, "a storage token cannot do this; use your API token (Authorization header)"
                )
            try:
                self.storage_user = self.storage.user_for_token(token)
            except TokenError as exc:
                raise http_error(403, str(exc)) from None
            return
        user = self.current_user
        if not user:
            raise http_error(
                403, f"{AUTH_NEEDED}, or a storage token in the {STORAGE_TOKEN_HEADER} header"
            )
        action = "read" if self.request.method in ("GET", "HEAD") else "write"
        if not self.authorizer.is_authorized(self, user, action, self.auth_resource):
            raise http_error(403, f"{user.username} may not use the DASH storage")
        self.storage_user = username(self)

    def check_xsrf_cookie(self) -> None:
        # A storage token is a header, never a cookie: a cross-site request cannot carry it.
        if self.storage_token():
            return None
        # Nobody logged in: prepare() refuses the request and says why.
        if hasattr(self, "_jupyter_current_user") and not self.current_user:
            return None
        return super().check_xsrf_cookie()

    def get_login_url(self) -> str:
        raise http_error(403, AUTH_NEEDED)

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        exc = (kwargs.get("exc_info") or (None, None, None))[1]
        if isinstance(exc, DamagedError):
            self.set_header("Content-Type", "application/json")
            self.finish(json.dumps({"message": exc.args[0], "reason": exc.reason, **exc.details}))
            return
        super().write_error(status_code, **kwargs)

    @property
    def user(self) -> str:
        assert self.storage_user is not None
        return self.storage_user

    def transport(self) -> DirectTransport:
        try:
            return self.storage.transport(self.user)
        except ValueError:
            raise http_error(403, f"user name {self.user!r} cannot have storage") from None

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` on the storage threads, its failures as HTTP errors: not found 404,
        bad input 400, chunks a manifest names but storage lacks 409, the backend failing
        502."""
        try:
            return await self.storage.run(fn, *args)
        except NotFound as exc:
            raise http_error(404, str(exc)) from None
        except ValueError as exc:
            raise http_error(400, str(exc)) from None
        except ChunksMissing as exc:
            # Not uploaded, or collected since the client asked: it uploads them and retries.
            raise http_error(409, str(exc)) from None
        except DamagedManifest as exc:
            raise DamagedError(exc) from None
        except StorageError as exc:
            log.warning("Storage failed for %s: %s", self.user, exc)
            raise http_error(502, f"the storage backend failed: {exc}") from None

    def version_argument(self) -> int | None:
        text = self.get_query_argument("version", None)
        if text is None or text == "":
            return None
        try:
            version = int(text)
        except ValueError:
            version = 0
        if version < 1:
            raise http_error(400, f"version must be a whole number from 1, not {text[:40]!r}")
        return version

    def gateway_url(self) -> str:
        if self.storage.public_url:
            return self.storage.public_url
        return f"{self.request.protocol}://{self.request.host}{self.base_url}"


class StorageTokenHandler(StorageHandler):
    """``POST /dash/api/storage/token``: a token for the caller's storage, for tasks and workers."""

    accepts_storage_token = False

    @allow_unauthenticated
    async def post(self) -> None:
        lifetime = self.json_body().get("expires_in", DEFAULT_TOKEN_LIFETIME)
        if (
            isinstance(lifetime, bool)
            or not isinstance(lifetime, (int, float))
            or not 1 <= lifetime <= MAX_TOKEN_LIFETIME
        ):
            raise http_error(
                400,
                f"expires_in must be a number of seconds from 1 to {int(MAX_TOKEN_LIFETIME)} "
                "(30 days)",
            )
        token, expires = await self.storage.run(self.storage.tokens.mint, self.user, lifetime)
        when = datetime.datetime.fromtimestamp(expires, datetime.timezone.utc)
        self.set_header("Cache-Control", "no-store")
        self.write_json(
            {"token": token, "expires": iso(when), "url": self.gateway_url(), "user": self.user},
            status=201,
        )


class StorageInfoHandler(StorageHandler):
    """``GET /dash/api/storage``: whose namespace the caller reaches, and where it lives."""

    @allow_unauthenticated
    async def get(self) -> None:
        self.write_json(
            {
                "user": self.user,
                "storage": self.storage.description,
                "max_chunk_size": MAX_CHUNK_SIZE,
            }
        )


class ObjectsHandler(StorageHandler):
    """``GET /dash/api/storage/objects?prefix=P``: the latest version of each object."""

    @allow_unauthenticated
    async def get(self) -> None:
        prefix = self.get_query_argument("prefix", "")
        if len(prefix) > MAX_PREFIX_LENGTH or not PREFIX_RE.match(prefix):
            raise http_error(
                400,
                f"invalid prefix {prefix[: MAX_PREFIX_LENGTH + 1]!r}: it must begin an object name",
            )
        self.write_json({"objects": await self.call(self.transport().list_objects, prefix)})


class ObjectHandler(StorageHandler):
    """``GET|POST|DELETE /dash/api/storage/objects/<name>``: a manifest; save; remove."""

    @allow_unauthenticated
    async def get(self, name: str) -> None:
        check_name(name)
        manifest = await self.call(self.transport().get_manifest, name, self.version_argument())
        self.write_json(manifest)

    @allow_unauthenticated
    async def post(self, name: str) -> None:
        check_name(name)
        manifest = client_manifest(self.json_body(), name, self.user)
        async with (
            self.storage.gate.commit(self.user),
            self.storage.manifest_lock(self.user, name),
        ):
            stored = await self.call(self.transport().put_manifest, manifest)
        log.info("%s saved %s version %s", self.user, name, stored.get("version"))
        self.write_json(stored, status=201)

    @allow_unauthenticated
    async def delete(self, name: str) -> None:
        check_name(name)
        deleted = await self.call(self.transport().delete, name, self.version_argument())
        log.info("%s deleted %s versions %s", self.user, name, deleted)
        # Chunks stay: other versions and objects may share them (no garbage collection yet).
        self.write_json({"deleted": deleted})


class VersionsHandler(StorageHandler):
    """``GET /dash/api/storage/versions/<name>``: every version of an object, oldest first."""

    @allow_unauthenticated
    async def get(self, name: str) -> None:
        check_name(name)
        self.write_json({"versions": await self.call(self.transport().versions, name)})


class MissingChunksHandler(StorageHandler):
    """``POST /dash/api/storage/chunks/missing``: which chunks to upload, and where to."""

    @allow_unauthenticated
    async def post(self) -> None:
        hashes = check_hashes(self.json_body().get("chunks"))
        missing = await self.call(self.transport().missing_chunks, hashes)
        upload = await self.call(self.transfer_urls, "PUT", missing)
        self.write_json({"missing": missing, "upload": upload})

    def transfer_urls(self, method: str, hashes: list[str]) -> dict[str, dict[str, Any]]:
        return {sha: chunk_transfer(self.storage, self.user, method, sha) for sha in hashes}


class DownloadChunksHandler(MissingChunksHandler):
    """``POST /dash/api/storage/chunks/download``: where to fetch each chunk from."""

    @allow_unauthenticated
    async def post(self) -> None:
        hashes = check_hashes(self.json_body().get("chunks"))
        self.write_json({"download": await self.call(self.transfer_urls, "GET", hashes)})


class DamagedChunksHandler(StorageHandler):
    """``POST /dash/api/storage/chunks/damaged``: a reader found these chunks failing their
    hash; each is checked here and deleted if it does, so that a save uploads it again."""

    @allow_unauthenticated
    async def post(self) -> None:
        hashes = check_hashes(self.json_body().get("chunks"))
        deleted = await self.call(self.transport().discard_damaged, hashes)
        if deleted:
            log.warning("%s: deleted damaged chunks %s", self.user, ", ".join(deleted))
        self.write_json({"deleted": deleted})


def chunk_transfer(storage: StorageService, user: str, method: str, sha: str) -> dict[str, Any]:
    """Where one chunk goes or comes from: a presigned URL (absolute, to be used without
    DASH credentials), else the gateway's own chunk URL relative to the gateway's URL (to be
    used with the caller's API or storage token)."""
    url = storage.presign(method, user, sha)
    entry: dict[str, Any] = {"url": url or CHUNK_PATH + sha, "headers": {}}
    if method == "PUT":
        entry["method"] = "PUT"
    return entry


@web.stream_request_body
class ChunkHandler(StorageHandler):
    """``PUT|GET /dash/api/storage/chunks/<sha>``: one chunk's bytes through the gateway.

    An upload is refused past ``MAX_CHUNK_SIZE`` (by its Content-Length before any byte is
    read, else as it arrives), and stored only if its sha256 is the one in the URL.
    """

    async def prepare(self) -> None:  # type: ignore[override]
        self._parts: list[bytes] = []
        self._received = 0
        self._too_big = False
        await super().prepare()
        if self.request.method == "PUT":
            length = self.request.headers.get("Content-Length", "")
            if length.isdigit() and int(length) > MAX_CHUNK_SIZE:
                raise self.too_big()
            # Tornado then bounds uploads that announce no length (chunked encoding) too.
            self.request.connection.set_max_body_size(MAX_CHUNK_SIZE + 1)  # type: ignore[union-attr]

    def data_received(self, chunk: bytes) -> None:
        # Before authentication and after a refusal the bytes go nowhere.
        if self.storage_user is None or self._finished or self._too_big:
            return
        self._received += len(chunk)
        if self._received > MAX_CHUNK_SIZE:
            self._too_big = True
            self._parts.clear()
            return
        self._parts.append(chunk)

    @staticmethod
    def too_big() -> web.HTTPError:
        return http_error(
            413,
            f"a chunk may be at most {MAX_CHUNK_SIZE} bytes; split the data into smaller chunks",
        )

    @allow_unauthenticated
    async def put(self, sha: str) -> None:
        check_sha(sha)
        if self._too_big:
            raise self.too_big()
        parts, self._parts = self._parts, []
        transport = self.transport()

        def store() -> tuple[str, int]:
            # Hashed on a storage thread (hashlib releases the GIL), not the event loop.
            data = b"".join(parts)
            digest = hashlib.sha256(data).hexdigest()
            if digest == sha:
                transport.put_chunks([(sha, data)])
            return digest, len(data)

        digest, size = await self.call(store)
        if digest != sha:
            raise http_error(
                400,
                f"the uploaded bytes hash to {digest}, not {sha}: the chunk was damaged on the "
                "way or its hash is wrong; upload it again",
            )
        self.write_json({"chunk": sha, "size": size}, status=201)

    @allow_unauthenticated
    async def get(self, sha: str) -> None:
        check_sha(sha)
        transport = self.transport()

        def read() -> bytes:
            for _, data in transport.get_chunks([sha]):
                return data
            raise NotFound(f"chunk {sha} is missing from storage")

        data = await self.call(read)
        self.set_header("Content-Type", "application/octet-stream")
        # Content-addressed: the bytes at this URL never change.
        self.set_header("Cache-Control", "private, max-age=31536000, immutable")
        self.finish(data)


class GarbageHandler(StorageHandler):
    """``POST /dash/api/storage/gc``: collect unused chunks now (the operator only);
    body ``{"older_than": seconds}`` (default: the gateway's ``storage_gc_grace``)."""

    accepts_storage_token = False

    def initialize(self, storage: StorageService, grace: float = 3600.0) -> None:  # type: ignore[override]
        super().initialize(storage)
        self.grace = grace

    @allow_unauthenticated
    async def post(self) -> None:
        if not is_operator(self):
            raise http_error(403, "only the operator collects the storage's garbage")
        older_than = self.json_body().get("older_than", self.grace)
        if (
            not isinstance(older_than, (int, float))
            or isinstance(older_than, bool)
            or older_than < 0
        ):
            raise http_error(400, "older_than must be a number of seconds, 0 or more")
        report = await self.storage.collect_garbage(float(older_than))
        self.write_json({"older_than": older_than, "users": report})


def storage_handlers(
    storage: StorageService, gc_grace: float = 3600.0
) -> list[tuple[str, type, dict[str, Any]]]:
    """The storage API's routes, for ``DashGateway.initialize_handlers``."""
    kwargs = {"storage": storage}
    name = r"(?P<name>.+)"
    base = r"/dash/api/storage"
    return [
        (base, StorageInfoHandler, kwargs),
        (rf"{base}/token", StorageTokenHandler, kwargs),
        (rf"{base}/objects", ObjectsHandler, kwargs),
        (rf"{base}/objects/{name}", ObjectHandler, kwargs),
        (rf"{base}/versions/{name}", VersionsHandler, kwargs),
        (rf"{base}/chunks/missing", MissingChunksHandler, kwargs),
        (rf"{base}/chunks/download", DownloadChunksHandler, kwargs),
        (rf"{base}/chunks/damaged", DamagedChunksHandler, kwargs),
        (rf"{base}/chunks/(?P<sha>[^/]+)", ChunkHandler, kwargs),
        (rf"{base}/gc", GarbageHandler, {**kwargs, "grace": gc_grace}),
    ]
