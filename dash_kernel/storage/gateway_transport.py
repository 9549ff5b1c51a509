"""The storage Transport over a DASH gateway's HTTP API: JSON for manifests, chunks moved in
parallel straight to the URLs the gateway hands out (presigned S3 URLs, or its own)."""

from __future__ import annotations

import json
import logging
import re
import threading
import time
import urllib.parse
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import requests
import urllib3
from requests.adapters import HTTPAdapter

from ..errors import GatewayError
from .backends import Data, NotFound, StorageError
from .transport import (
    ChunksMissing,
    DamagedManifest,
    bounded_map,
    check_name,
    check_sha,
    default_threads,
)

__all__ = ["DAMAGED_STATUS", "STORAGE_TOKEN_HEADER", "GatewayTransport"]

log = logging.getLogger(__name__)

STORAGE_TOKEN_HEADER = "X-Dash-Storage-Token"
API = "dash/api/storage"
# Hashes per request for upload or download URLs (the gateway takes up to 10000).
URL_BATCH = 256
MISSING_BATCH = 1000
# The gateway presigns for an hour: older URLs are asked for again before use.
URL_MAX_AGE = 1800.0
MAX_CACHED_URLS = 100_000
ATTEMPTS = 4
API_TIMEOUT = (10.0, 120.0)
CHUNK_TIMEOUT = (10.0, 300.0)
_RETRY_STATUS = {429, 500, 502, 503, 504}
# What the gateway answers for a version whose stored manifest is damaged.
DAMAGED_STATUS = 422


class _Refused(Exception):
    """A presigned URL was refused (expired, most likely): ask the gateway for a new one."""


def _no_netrc(request: Any) -> Any:
    # A session auth (that does nothing) stops requests from adding ~/.netrc credentials,
    # which would break a presigned URL's signature.
    return request


def _display(url: str) -> str:
    """``url`` without its query: a presigned URL's signature has no place in a message."""
    return urllib.parse.urlsplit(url)._replace(query="", fragment="").geturl()


def _scrub(exc: BaseException) -> str:
    """An exception's text without URL queries (requests quotes the whole URL)."""
    return re.sub(r"\?[^\s'\")]*", "", str(exc))


def _message(response: requests.Response) -> str:
    """The reason a server gave: the gateway's JSON ``message``, or S3's XML Code/Message."""
    text = response.text[:4000]
    try:
        body = json.loads(text)
        if isinstance(body, dict) and body.get("message"):
            return str(body["message"])
    except ValueError:
        pass
    code = re.search(r"<Code>(.*?)</Code>", text)
    message = re.search(r"<Message>(.*?)</Message>", text)
    if code or message:
        return ": ".join(m.group(1) for m in (code, message) if m)
    return text.strip()[:300] or response.reason or ""


def _damaged(response: requests.Response) -> StorageError:
    """The gateway's answer for a damaged manifest, as the DamagedManifest it reports."""
    try:
        body = response.json()
        return DamagedManifest(str(body["name"]), int(body["version"]), str(body["damaged"]))
    except (ValueError, KeyError, TypeError):
        return StorageError(_message(response))


class GatewayTransport:
    """One user's storage through a DASH gateway at ``url`` (its base URL, as in
    ``DASH_GATEWAY_URL``), authenticated with an API ``token`` (the server's or an
    account's) or a ``storage_token`` (``POST /dash/api/storage/token``), which reaches
    only the storage API."""

    def __init__(
        self,
        url: str,
        token: str | None = None,
        storage_token: str | None = None,
        *,
        threads: int | None = None,
    ):
        if not url or not url.startswith(("http://", "https://")):
            raise ValueError(f"the gateway URL must start with http:// or https://, not {url!r}")
        self.url = url if url.endswith("/") else url + "/"
        if storage_token:
            self._auth = {STORAGE_TOKEN_HEADER: storage_token}
        elif token:
            self._auth = {"Authorization": f"token {token}"}
        else:
            self._auth = {}
        self._token_hint = (
            "the storage token (DASH_STORAGE_TOKEN)"
            if storage_token
            else "DASH_TOKEN"
            if token
            else "no token was given: set DASH_TOKEN"
        )
        self.threads = threads or default_threads()
        self._user: str | None = None
        self._local = threading.local()
        self._sessions: list[requests.Session] = []
        self._lock = threading.Lock()
        self._executor: ThreadPoolExecutor | None = None
        # Upload URLs from the last missing-chunks answers: sha -> (entry, when).
        self._uploads: dict[str, tuple[dict[str, Any], float]] = {}

    # plumbing

    @property
    def user(self) -> str:
        """The user whose namespace this reaches, as the gateway sees the credentials."""
        if self._user is None:
            self._user = str(self._api("GET", API)["user"])
        return self._user

    @property
    def executor(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(
                    self.threads, thread_name_prefix="dash-storage-http"
                )
            return self._executor

    def _session(self) -> requests.Session:
        session = getattr(self._local, "session", None)
        if session is None:
            session = requests.Session()
            session.auth = _no_netrc
            adapter = HTTPAdapter(pool_connections=4, pool_maxsize=4)
            session.mount("http://", adapter)
            session.mount("https://", adapter)
            self._local.session = session
            with self._lock:
                self._sessions.append(session)
        return session

    def close(self) -> None:
        with self._lock:
            executor, self._executor = self._executor, None
            sessions, self._sessions = self._sessions, []
        if executor is not None:
            executor.shutdown(wait=False, cancel_futures=True)
        for session in sessions:
            session.close()

    def _refused(self, what: str, response: requests.Response) -> GatewayError:
        return GatewayError(
            f"the DASH gateway at {self.url} refused {what} (HTTP {response.status_code}): "
            f"{_message(response)}; check {self._token_hint}"
        )

    def _api(
        self, method: str, path: str, body: Any = None, *, params: dict[str, Any] | None = None
    ) -> Any:
        """A JSON call to the gateway; its errors as NotFound, GatewayError or StorageError,
        with the gateway's own message."""
        url = self.url + path
        what = f"{method} {path}"
        # Saving a manifest is not idempotent: a retry after a lost answer would add a version.
        attempts = 1 if method == "POST" and path.startswith(f"{API}/objects/") else ATTEMPTS
        for attempt in range(attempts):
            last = attempt == attempts - 1
            try:
                response = self._session().request(
                    method,
                    url,
                    json=body,
                    params=params,
                    headers={"Accept": "application/json", **self._auth},
                    timeout=API_TIMEOUT,
                )
            except requests.RequestException as exc:
                if last:
                    raise GatewayError(
                        f"cannot reach the DASH gateway at {self.url}: {exc}"
                    ) from None
                self._pause(attempt, what, exc)
                continue
            if response.status_code in _RETRY_STATUS and not last:
                self._pause(attempt, what, response.status_code)
                continue
            break
        if response.ok:
            return response.json()
        if response.status_code == 404:
            raise NotFound(_message(response))
        if response.status_code in (401, 403):
            raise self._refused(what, response)
        if response.status_code == 409:
            raise ChunksMissing([], _message(response))
        if response.status_code == DAMAGED_STATUS:
            raise _damaged(response)
        raise StorageError(
            f"the DASH gateway at {self.url} answered HTTP {response.status_code} for "
            f"{what}: {_message(response)}"
        )

    @staticmethod
    def _pause(attempt: int, what: str, why: Any) -> None:
        delay = 0.25 * 2**attempt
        log.debug("retrying %s in %.2fs after %s", what, delay, why)
        time.sleep(delay)

    def _transfer(
        self, method: str, sha: str, entry: dict[str, Any], data: Data | None = None
    ) -> bytes:
        """PUT ``data`` to or GET the bytes from one chunk URL, retrying transient failures.
        A relative URL is the gateway's own (sent with our credentials); an absolute one is
        presigned (sent with only the headers it came with)."""
        url = str(entry["url"])
        proxied = not urllib.parse.urlsplit(url).scheme
        full = self.url + url if proxied else url
        headers = {str(k): str(v) for k, v in (entry.get("headers") or {}).items()}
        if proxied:
            headers.update(self._auth)
        body: Any = None
        if data is not None:
            body = data if isinstance(data, bytes) else memoryview(data).cast("B")
        verb = "uploading" if method == "PUT" else "downloading"
        what = f"{verb} chunk {sha} {'to' if method == 'PUT' else 'from'} {_display(full)}"
        for attempt in range(ATTEMPTS):
            last = attempt == ATTEMPTS - 1
            try:
                response = self._session().request(
                    method,
                    full,
                    data=body,
                    headers=headers,
                    timeout=CHUNK_TIMEOUT,
                    stream=method == "GET",
                )
                if response.ok:
                    # One read of the whole body: requests' .content goes 10 KiB at a time.
                    with response:
                        return response.raw.read(decode_content=True) if method == "GET" else b""
            except (requests.RequestException, urllib3.exceptions.HTTPError, OSError) as exc:
                if last:
                    raise StorageError(f"{what} failed: {_scrub(exc)}") from None
                self._pause(attempt, what, exc)
                continue
            if response.status_code in _RETRY_STATUS and not last:
                response.close()
                self._pause(attempt, what, response.status_code)
                continue
            break
        if response.status_code == 404:
            raise NotFound(f"chunk {sha} is missing from storage ({_display(full)})")
        if response.status_code in (401, 403):
            if not proxied:
                raise _Refused(f"{what} failed: HTTP {response.status_code}: {_message(response)}")
            raise self._refused(what, response)
        raise StorageError(f"{what} failed: HTTP {response.status_code}: {_message(response)}")

    # chunks

    def missing_chunks(self, hashes: Iterable[str]) -> list[str]:
        unique = [check_sha(h) for h in dict.fromkeys(hashes)]
        missing: list[str] = []
        for start in range(0, len(unique), MISSING_BATCH):
            reply = self._api(
                "POST", f"{API}/chunks/missing", {"chunks": unique[start : start + MISSING_BATCH]}
            )
            missing += reply["missing"]
            now = time.monotonic()
            with self._lock:
                if len(self._uploads) > MAX_CACHED_URLS:
                    # Asked about but never uploaded (a save that failed): forget the stale.
                    self._uploads = {
                        k: v for k, v in self._uploads.items() if now - v[1] < URL_MAX_AGE
                    }
                for sha, entry in reply.get("upload", {}).items():
                    self._uploads[sha] = (entry, now)
        return missing

    def _upload_entry(self, sha: str, fresh: bool = False) -> dict[str, Any] | None:
        """Where to upload ``sha``: the URL from the last missing-chunks answer while it is
        young, else a new one; None if storage has the chunk already."""
        with self._lock:
            cached = self._uploads.get(sha)
        if cached and not fresh and time.monotonic() - cached[1] < URL_MAX_AGE:
            return cached[0]
        with self._lock:
            self._uploads.pop(sha, None)
        if not self.missing_chunks([sha]):
            return None
        with self._lock:
            cached = self._uploads.get(sha)
        if cached is None:
            raise StorageError(f"the DASH gateway at {self.url} gave no upload URL for chunk {sha}")
        return cached[0]

    def put_chunks(self, items: Iterable[tuple[str, Data]]) -> None:
        def upload(item: tuple[str, Data]) -> None:
            sha, data = item
            entry = self._upload_entry(check_sha(sha))
            if entry is None:
                return
            try:
                self._transfer("PUT", sha, entry, data)
            except _Refused:
                # An expired presigned URL, most likely: once more with a new one.
                entry = self._upload_entry(sha, fresh=True)
                if entry is not None:
                    try:
                        self._transfer("PUT", sha, entry, data)
                    except _Refused as exc:
                        raise StorageError(str(exc)) from None
            with self._lock:
                self._uploads.pop(sha, None)

        for _ in bounded_map(self.executor, upload, items, self.threads):
            pass

    def _download_entries(self, hashes: list[str]) -> dict[str, dict[str, Any]]:
        return self._api("POST", f"{API}/chunks/download", {"chunks": hashes})["download"]

    def get_chunks(self, hashes: Iterable[str]) -> Iterator[tuple[str, bytes]]:
        unique = [check_sha(h) for h in dict.fromkeys(hashes)]

        def located() -> Iterator[tuple[str, dict[str, Any]]]:
            # URLs are asked for a batch at a time, just ahead of their use.
            for start in range(0, len(unique), URL_BATCH):
                batch = unique[start : start + URL_BATCH]
                entries = self._download_entries(batch)
                for sha in batch:
                    yield sha, entries[sha]

        def download(item: tuple[str, dict[str, Any]]) -> tuple[str, bytes]:
            sha, entry = item
            try:
                return sha, self._transfer("GET", sha, entry)
            except _Refused:
                entry = self._download_entries([sha])[sha]
                try:
                    return sha, self._transfer("GET", sha, entry)
                except _Refused as exc:
                    raise StorageError(str(exc)) from None

        yield from bounded_map(self.executor, download, located(), self.threads)

    def discard_damaged(self, hashes: Iterable[str]) -> list[str]:
        unique = [check_sha(h) for h in dict.fromkeys(hashes)]
        deleted: list[str] = []
        for start in range(0, len(unique), MISSING_BATCH):
            batch = unique[start : start + MISSING_BATCH]
            deleted += self._api("POST", f"{API}/chunks/damaged", {"chunks": batch})["deleted"]
        with self._lock:
            for sha in deleted:
                self._uploads.pop(sha, None)
        return deleted

    # manifests

    def _object_path(self, kind: str, name: str) -> str:
        return f"{API}/{kind}/{urllib.parse.quote(check_name(name), safe='/')}"

    def put_manifest(self, manifest: dict[str, Any]) -> dict[str, Any]:
        body = {k: v for k, v in manifest.items() if k != "version"}
        return self._api("POST", self._object_path("objects", manifest["name"]), body)

    def get_manifest(self, name: str, version: int | None = None) -> dict[str, Any]:
        params = None if version is None else {"version": int(version)}
        return self._api("GET", self._object_path("objects", name), params=params)

    def list_objects(self, prefix: str = "") -> list[dict[str, Any]]:
        return self._api("GET", f"{API}/objects", params={"prefix": prefix})["objects"]

    def versions(self, name: str) -> list[dict[str, Any]]:
        return self._api("GET", self._object_path("versions", name))["versions"]

    def delete(self, name: str, version: int | None = None) -> list[int]:
        params = None if version is None else {"version": int(version)}
        return self._api("DELETE", self._object_path("objects", name), params=params)["deleted"]

    def __repr__(self) -> str:
        return f"GatewayTransport({self.url!r})"
