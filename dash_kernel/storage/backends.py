"""Where storage bytes live: a local directory or an S3 bucket prefix, behind one small interface."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import tempfile
import threading
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from ..errors import DashError

__all__ = [
    "AlreadyExists",
    "Backend",
    "LocalBackend",
    "NotFound",
    "S3Backend",
    "StorageError",
    "describe",
    "open_backend",
]

log = logging.getLogger(__name__)

Data = bytes | bytearray | memoryview

# A key is a relative, slash-separated path with no empty, "." or ".." segment.
_KEY_SEGMENT = re.compile(r"^[A-Za-z0-9._-]+$")
_TEMP_PREFIX = ".tmp-"


class StorageError(DashError):
    """Storage could not do what was asked (unreachable, refused, inconsistent)."""


class NotFound(StorageError, KeyError):
    """No such key, object or version."""

    def __str__(self) -> str:
        # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class AlreadyExists(StorageError):
    """An exclusive write found the key already there."""


def check_key(key: str) -> str:
    """``key`` if it is a safe relative path; ValueError otherwise."""
    parts = key.split("/")
    if not key or any(p in ("", ".", "..") or not _KEY_SEGMENT.match(p) for p in parts):
        raise ValueError(f"invalid storage key {key!r}")
    if parts[-1].startswith(_TEMP_PREFIX):
        raise ValueError(f"invalid storage key {key!r}: {_TEMP_PREFIX}* names are reserved")
    return key


@runtime_checkable
class Backend(Protocol):
    """Bytes by key. Keys are relative paths like ``users/alice/chunks/<sha>``."""

    kind: str

    def put(self, key: str, data: Data, *, exclusive: bool = False) -> None:
        """Store ``data`` at ``key``, replacing it; with ``exclusive``, raise
        :class:`AlreadyExists` instead if the key exists (atomically where the backend can)."""

    def get(self, key: str) -> bytes:
        """The bytes at ``key``; :class:`NotFound` if there are none."""

    def exists(self, key: str) -> bool: ...

    def delete(self, key: str) -> None:
        """Remove ``key``; no error if it is already gone."""

    def list(self, prefix: str) -> Iterator[str]:
        """Every key that starts with ``prefix`` (a plain string prefix, not only whole
        segments), sorted."""

    def list_details(self, prefix: str) -> Iterator[tuple[str, int, float]]:
        """``(key, size, modified as a Unix time)`` for every key :meth:`list` gives."""

    def presign(self, method: str, key: str, expires_s: int) -> str | None:
        """A URL through which anyone holding it can ``GET`` or ``PUT`` ``key`` until it
        expires; None where the backend has no such thing (local directories)."""


class LocalBackend:
    """Keys as files under ``root``: directories 0700, files 0600, writes atomic
    (temporary file + rename), exclusive writes by ``link()``, which refuses to replace."""

    kind = "local"

    def __init__(self, root: str | os.PathLike[str]):
        self.root = Path(root).expanduser().absolute()
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        return self.root.joinpath(*check_key(key).split("/"))

    def put(self, key: str, data: Data, *, exclusive: bool = False) -> None:
        path = self._path(key)
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=_TEMP_PREFIX, dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            if exclusive:
                try:
                    os.link(tmp, path)
                except FileExistsError:
                    raise AlreadyExists(f"{key} already exists") from None
            else:
                os.replace(tmp, path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)

    def get(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            raise NotFound(f"{key} not found") from None

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def delete(self, key: str) -> None:
        path = self._path(key)
        with contextlib.suppress(FileNotFoundError, NotADirectoryError):
            path.unlink()
        # Prune emptied directories so that listings of deleted objects stay empty.
        parent = path.parent
        while parent != self.root:
            try:
                parent.rmdir()
            except OSError:
                break
            parent = parent.parent

    def list(self, prefix: str) -> Iterator[str]:
        directory, _, _ = prefix.rpartition("/")
        base = self.root.joinpath(*directory.split("/")) if directory else self.root
        if not base.is_dir():
            return iter(())
        keys = []
        for dirpath, dirnames, filenames in os.walk(base):
            rel = Path(dirpath).relative_to(self.root).as_posix()
            rel = "" if rel == "." else rel + "/"
            # Skip whole directories that cannot hold matching keys.
            dirnames[:] = [
                d
                for d in dirnames
                if (rel + d + "/").startswith(prefix) or prefix.startswith(rel + d + "/")
            ]
            keys.extend(
                rel + f
                for f in filenames
                if not f.startswith(_TEMP_PREFIX) and (rel + f).startswith(prefix)
            )
        return iter(sorted(keys))

    def list_details(self, prefix: str) -> Iterator[tuple[str, int, float]]:
        for key in self.list(prefix):
            with contextlib.suppress(FileNotFoundError):  # deleted meanwhile
                st = self._path(key).stat()
                yield key, st.st_size, st.st_mtime

    def presign(self, method: str, key: str, expires_s: int) -> str | None:
        return None

    def __repr__(self) -> str:
        return f"LocalBackend({str(self.root)!r})"


class _ViewReader(io.RawIOBase):
    """A seekable file over a memoryview, so that botocore streams a buffer's slice
    without first copying it into ``bytes``."""

    def __init__(self, view: memoryview):
        self._view = view.cast("B") if view.format != "B" or view.ndim != 1 else view
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: len(self._view)}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def readinto(self, buffer: Any) -> int:
        chunk = self._view[self._pos : self._pos + len(buffer)]
        n = len(chunk)
        memoryview(buffer).cast("B")[:n] = chunk
        self._pos += n
        return n

    def read(self, size: int = -1) -> bytes:
        end = len(self._view) if size is None or size < 0 else self._pos + size
        data = self._view[self._pos : end].tobytes()
        self._pos += len(data)
        return data

    def __len__(self) -> int:
        return len(self._view)


# S3 error codes that mean "these credentials are not accepted here".
_AUTH_CODES = {
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "AccessDenied",
    "InvalidToken",
    "ExpiredToken",
    "AuthorizationHeaderMalformed",
    "InvalidClientTokenId",
    "403",
}
_NOT_FOUND_CODES = {"NoSuchKey", "404", "NotFound"}


class S3Backend:
    """Keys as S3 objects under ``s3://bucket/prefix``.

    The boto3 client comes from boto3's standard chain (environment, shared config and
    credentials files, instance roles), which honours ``AWS_ENDPOINT_URL`` for MinIO, Ceph,
    R2 and the like; ``client_kwargs`` (``endpoint_url``, ``aws_access_key_id``, ...)
    override it. Checksums are computed only where S3 requires them: DASH verifies every
    chunk by its sha256 anyway, and many S3-compatible servers reject the newer ones.
    """

    kind = "s3"

    def __init__(self, bucket: str, prefix: str = "", **client_kwargs: Any):
        import boto3
        from botocore.config import Config

        if not bucket:
            raise ValueError("an S3 storage URL needs a bucket: s3://bucket/prefix")
        self.bucket = bucket
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        config = Config(
            max_pool_connections=int(os.environ.get("DASH_STORAGE_THREADS", "16")) * 2,
            retries={"max_attempts": 5, "mode": "standard"},
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
            signature_version="s3v4",
            connect_timeout=10,
            read_timeout=120,
        )
        config = config.merge(client_kwargs.pop("config")) if "config" in client_kwargs else config
        self.client = boto3.session.Session().client("s3", config=config, **client_kwargs)
        self.endpoint = self.client.meta.endpoint_url
        # None until an exclusive write shows whether the server honours If-None-Match.
        self.conditional_writes: bool | None = None
        self._lock = threading.Lock()

    def _key(self, key: str) -> str:
        return self.prefix + check_key(key)

    def _where(self) -> str:
        return f"s3://{self.bucket}/{self.prefix} at {self.endpoint}"

    def _error(self, exc: Exception, key: str, action: str) -> StorageError:
        """A clear StorageError for a botocore failure."""
        from botocore.exceptions import (
            ClientError,
            EndpointConnectionError,
            NoCredentialsError,
        )

        if isinstance(exc, NoCredentialsError):
            return StorageError(
                f"no S3 credentials for {self._where()}: set AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY, or configure an AWS profile"
            )
        if isinstance(exc, EndpointConnectionError):
            return StorageError(f"cannot reach the S3 endpoint {self.endpoint}: {exc}")
        if isinstance(exc, ClientError):
            error = exc.response.get("Error", {})
            code = str(error.get("Code", ""))
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            message = error.get("Message") or code
            if code in _NOT_FOUND_CODES:
                return NotFound(f"{key} not found")
            if code == "NoSuchBucket":
                return StorageError(
                    f"the S3 bucket {self.bucket!r} does not exist at {self.endpoint}"
                )
            if code in _AUTH_CODES or status == 403:
                return StorageError(
                    f"the S3 endpoint {self.endpoint} refused the credentials for bucket "
                    f"{self.bucket!r} ({code}: {message}); check AWS_ACCESS_KEY_ID, "
                    "AWS_SECRET_ACCESS_KEY or the AWS profile"
                )
            return StorageError(f"S3 {action} {key} in {self._where()} failed: {code}: {message}")
        return StorageError(f"S3 {action} {key} in {self._where()} failed: {exc}")

    def put(self, key: str, data: Data, *, exclusive: bool = False) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        args: dict[str, Any] = {"Bucket": self.bucket, "Key": self._key(key)}
        body = data if isinstance(data, bytes) else _ViewReader(memoryview(data))
        if exclusive:
            # Until the server has shown that it honours If-None-Match (some, like rclone,
            # ignore it), check first: best effort, since a racing writer that puts between
            # this check and our put is overwritten.
            if self.conditional_writes is not True and self.exists(key):
                raise AlreadyExists(f"{key} already exists")
            if self.conditional_writes is not False:
                args["IfNoneMatch"] = "*"
        try:
            self.client.put_object(Body=body, **args)
        except ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if exclusive and (code in ("PreconditionFailed", "ConditionalRequestConflict")):
                self.conditional_writes = True
                raise AlreadyExists(f"{key} already exists") from None
            if exclusive and (code == "NotImplemented" or status == 501):
                log.warning(
                    "%s does not support conditional writes (If-None-Match); "
                    "versions are assigned on a best-effort basis",
                    self.endpoint,
                )
                self.conditional_writes = False
                if isinstance(body, io.IOBase):
                    body.seek(0)
                return self.put(key, data, exclusive=True)
            raise self._error(exc, key, "put") from None
        except BotoCoreError as exc:
            raise self._error(exc, key, "put") from None

    def get(self, key: str) -> bytes:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            response = self.client.get_object(Bucket=self.bucket, Key=self._key(key))
            return response["Body"].read()
        except (ClientError, BotoCoreError) as exc:
            raise self._error(exc, key, "get") from None

    def exists(self, key: str) -> bool:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self.client.head_object(Bucket=self.bucket, Key=self._key(key))
            return True
        except (ClientError, BotoCoreError) as exc:
            error = self._error(exc, key, "head")
            if isinstance(error, NotFound):
                return False
            raise error from None

    def delete(self, key: str) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self.client.delete_object(Bucket=self.bucket, Key=self._key(key))
        except (ClientError, BotoCoreError) as exc:
            error = self._error(exc, key, "delete")
            if not isinstance(error, NotFound):
                raise error from None

    def list(self, prefix: str) -> Iterator[str]:
        return (key for key, _, _ in self.list_details(prefix))

    def list_details(self, prefix: str) -> Iterator[tuple[str, int, float]]:
        from botocore.exceptions import BotoCoreError, ClientError

        found = []
        try:
            paginator = self.client.get_paginator("list_objects_v2")
            for page in paginator.paginate(Bucket=self.bucket, Prefix=self.prefix + prefix):
                found.extend(
                    (
                        item["Key"][len(self.prefix) :],
                        int(item.get("Size", 0)),
                        item["LastModified"].timestamp(),
                    )
                    for item in page.get("Contents", ())
                )
        except (ClientError, BotoCoreError) as exc:
            raise self._error(exc, prefix, "list") from None
        return iter(sorted(found))

    def presign(self, method: str, key: str, expires_s: int) -> str | None:
        operation = {"GET": "get_object", "PUT": "put_object"}[method.upper()]
        return self.client.generate_presigned_url(
            operation,
            Params={"Bucket": self.bucket, "Key": self._key(key)},
            ExpiresIn=int(expires_s),
            HttpMethod=method.upper(),
        )

    def __repr__(self) -> str:
        return f"S3Backend({self.bucket!r}, {self.prefix!r}, endpoint={self.endpoint!r})"


def open_backend(url: str | os.PathLike[str], **client_kwargs: Any) -> Backend:
    """The backend for a storage URL: a path or ``file://`` URL is a local directory,
    ``s3://bucket/prefix`` an S3 prefix (``client_kwargs`` go to the boto3 client)."""
    text = os.fspath(url)
    parsed = urllib.parse.urlparse(text)
    if parsed.scheme == "s3":
        # netloc may carry user:password@ in a careless URL; the bucket is the host part
        return S3Backend(parsed.hostname or "", parsed.path, **client_kwargs)
    if parsed.scheme == "file":
        return LocalBackend(urllib.parse.unquote(parsed.path))
    if parsed.scheme and len(parsed.scheme) > 1:
        raise ValueError(
            f"unsupported storage URL {describe(text)['location']!r}: use a path or s3://"
        )
    return LocalBackend(text)


def describe(url: str | os.PathLike[str]) -> dict[str, str]:
    """``{"backend": "local"|"s3", "location": ...}`` for a storage URL, with no secrets:
    user info and query strings are dropped, and the S3 endpoint is named by host only."""
    text = os.fspath(url)
    parsed = urllib.parse.urlparse(text)
    if parsed.scheme == "s3":
        location = f"s3://{parsed.hostname or ''}{parsed.path}"
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        if endpoint:
            ep = urllib.parse.urlparse(endpoint)
            host = ep.hostname or ""
            if ep.port:
                host += f":{ep.port}"
            location += f" at {ep.scheme}://{host}"
        return {"backend": "s3", "location": location}
    if parsed.scheme == "file":
        return {"backend": "local", "location": urllib.parse.unquote(parsed.path)}
    if parsed.scheme and len(parsed.scheme) > 1:
        return {"backend": parsed.scheme, "location": f"{parsed.scheme}://{parsed.hostname or ''}"}
    return {"backend": "local", "location": str(Path(text).expanduser().absolute())}
