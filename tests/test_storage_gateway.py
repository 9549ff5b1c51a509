"""The gateway's storage API against a real gateway, on a local directory and on S3 (a real
moto server): per-user namespaces, storage tokens, chunk uploads, presigned URLs, restarts."""

from __future__ import annotations

import base64
import datetime
import hashlib
import http.client
import json
import logging
import os
import stat
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests
from conftest import Gateway, free_port, launch_gateway, wait_until

from dash_kernel.errors import GatewayError
from dash_kernel.storage.backends import LocalBackend, NotFound, S3Backend
from dash_kernel.storage.client import CorruptChunk, StorageClient, StorageWarning
from dash_kernel.storage.gateway_transport import STORAGE_TOKEN_HEADER, GatewayTransport
from dash_kernel.storage.transport import (
    ChunksMissing,
    DamagedManifest,
    DirectTransport,
    manifest_key,
)

BUCKET = "dash-storage-test"
PREFIX = "team/dash"
S3_KEY, S3_SECRET = "dash-test-access-key", "dash-test-secret-0f9e8d7c6b5a"
MiB = 2**20
MAX_CHUNK = 64 * MiB


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def manifest_for(name: str, chunks: list[bytes], chunk_size: int, **extra: Any) -> dict[str, Any]:
    """A pickle-oob-1 manifest whose one 'pickle' part is ``chunks`` end to end."""
    size = sum(len(c) for c in chunks)
    return {
        "name": name,
        "size": size,
        "type": "builtins.bytes",
        "created": "2025-01-01T00:00:00Z",
        "metadata": extra.pop("metadata", {}),
        "format": "pickle-oob-1",
        "chunk_size": chunk_size,
        "parts": [{"role": "pickle", "size": size, "chunks": [sha(c) for c in chunks]}],
        **extra,
    }


# ----- the two backends -----------------------------------------------------------------


@dataclass
class S3:
    endpoint: str

    def client(self) -> Any:
        import boto3

        return boto3.session.Session().client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=S3_KEY,
            aws_secret_access_key=S3_SECRET,
            region_name="us-east-1",
        )

    def keys(self, under: str) -> list[str]:
        reply = self.client().list_objects_v2(Bucket=BUCKET, Prefix=f"{PREFIX}/{under}")
        return [item["Key"][len(PREFIX) + 1 :] for item in reply.get("Contents", ())]


@pytest.fixture(scope="module")
def moto() -> Iterator[S3]:
    """A real S3 endpoint: moto's server in this process on a free loopback port, one bucket."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        s3 = S3(f"http://127.0.0.1:{port}")
        s3.client().create_bucket(Bucket=BUCKET)
        yield s3
    finally:
        server.stop()


def s3_env(moto: S3) -> dict[str, str]:
    return {
        "AWS_ENDPOINT_URL": moto.endpoint,
        "AWS_ACCESS_KEY_ID": S3_KEY,
        "AWS_SECRET_ACCESS_KEY": S3_SECRET,
        "AWS_DEFAULT_REGION": "us-east-1",
    }


@pytest.fixture(scope="module")
def s3_gateway(moto: S3, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    """A gateway whose storage is s3://BUCKET/PREFIX on the moto server."""
    with pytest.MonkeyPatch.context() as patch:
        for name, value in s3_env(moto).items():
            patch.setenv(name, value)
        gw = launch_gateway(
            tmp_path_factory.mktemp("s3-gateway"),
            local_workers=0,
            extra=[f"--DashGateway.storage_url=s3://{BUCKET}/{PREFIX}"],
        )
    try:
        gw.wait_for_workers(0)
        yield gw
    finally:
        gw.stop()


@dataclass
class Storage:
    """A gateway with accounts alice and bob, and a look at its backend from outside."""

    kind: str
    gw: Gateway
    tokens: dict[str, str]
    s3: S3 | None = None

    def transport(self, user: str) -> GatewayTransport:
        return GatewayTransport(self.gw.url, token=self.tokens[user])

    def direct(self, user: str) -> DirectTransport:
        """The same namespace straight on the backend, as the gateway itself reaches it."""
        if self.s3 is None:
            return DirectTransport(LocalBackend(self.gw.data_dir / "storage"), user)
        backend = S3Backend(
            BUCKET,
            PREFIX,
            endpoint_url=self.s3.endpoint,
            aws_access_key_id=S3_KEY,
            aws_secret_access_key=S3_SECRET,
            region_name="us-east-1",
        )
        return DirectTransport(backend, user)

    def stored_keys(self, under: str) -> list[str]:
        if self.s3 is not None:
            return self.s3.keys(under)
        root = self.gw.data_dir / "storage"
        return sorted(p.relative_to(root).as_posix() for p in (root / under).rglob("*"))

    def call(self, user: str, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        return self.gw.call(method, path, body, token=self.tokens[user])

    def put_raw(self, user: str, digest: str, data: bytes, **headers: str) -> requests.Response:
        return requests.put(
            f"{self.gw.url}dash/api/storage/chunks/{digest}",
            data=data,
            headers={"Authorization": f"token {self.tokens[user]}", **headers},
            timeout=60,
        )


@pytest.fixture(scope="module", params=["local", "s3"])
def storage(request: pytest.FixtureRequest) -> Storage:
    if request.param == "local":
        gw: Gateway = request.getfixturevalue("bare_gateway")
        s3 = None
    else:
        gw = request.getfixturevalue("s3_gateway")
        s3 = request.getfixturevalue("moto")
    return Storage(request.param, gw, gw.add_users("alice", "bob"), s3)


def save(storage: Storage, user: str, name: str, chunks: list[bytes], **extra: Any) -> dict:
    transport = storage.transport(user)
    transport.put_chunks(
        (sha(c), c) for c in chunks if sha(c) in transport.missing_chunks([sha(c)])
    )
    return transport.put_manifest(manifest_for(name, chunks, max(map(len, chunks)), **extra))


# ----- status --------------------------------------------------------------------------


def test_status_shows_the_storage_without_secrets(storage: Storage) -> None:
    status = storage.gw.status()
    if storage.kind == "local":
        assert status["storage"] == {
            "backend": "local",
            "location": str(storage.gw.data_dir / "storage"),
        }
    else:
        assert status["storage"]["backend"] == "s3"
        assert status["storage"]["location"].startswith(f"s3://{BUCKET}/{PREFIX}")
        assert S3_SECRET not in json.dumps(status) and S3_KEY not in json.dumps(status)
    # Accounts see it too.
    code, body = storage.call("alice", "GET", "dash/api/status")
    assert code == 200 and body["storage"] == status["storage"], body
    code, body = storage.call("alice", "GET", "dash/api/storage")
    assert code == 200 and body["user"] == "alice", body


# ----- the transport round trip ------------------------------------------------------------


def test_gateway_transport_round_trip(storage: Storage) -> None:
    alice = storage.transport("alice")
    assert alice.user == "alice"
    # Above Jupyter's and tornado's usual request limits, below the 64 MiB chunk cap.
    chunks = [os.urandom(12 * MiB), os.urandom(12 * MiB), b"tail"]
    hashes = [sha(c) for c in chunks]
    assert alice.missing_chunks(hashes + hashes[:1]) == hashes
    alice.put_chunks(zip(hashes, [memoryview(c) for c in chunks], strict=True))
    assert alice.missing_chunks(hashes) == []
    for digest in hashes:
        assert f"users/alice/chunks/{digest}" in storage.stored_keys("users/alice/chunks/")

    manifest = manifest_for("runs/model.bin", chunks, 12 * MiB, metadata={"epoch": 3})
    stored = alice.put_manifest(manifest)
    assert stored["version"] == 1 and stored["user"] == "alice"
    again = alice.put_manifest(manifest)
    assert again["version"] == 2

    got = alice.get_manifest("runs/model.bin")
    assert got == again
    assert alice.get_manifest("runs/model.bin", 1) == stored
    # The gateway's layout is DirectTransport's: the same manifests, read from the backend.
    assert storage.direct("alice").get_manifest("runs/model.bin") == got

    fetched = dict(alice.get_chunks(hashes))
    assert fetched == dict(zip(hashes, chunks, strict=True))

    listed = alice.list_objects("runs/")
    assert [(o["name"], o["version"]) for o in listed] == [("runs/model.bin", 2)]
    assert "parts" not in listed[0] and listed[0]["metadata"] == {"epoch": 3}
    assert alice.list_objects("nothing-here") == []
    assert [v["version"] for v in alice.versions("runs/model.bin")] == [1, 2]

    assert alice.delete("runs/model.bin", 1) == [1]
    assert [v["version"] for v in alice.versions("runs/model.bin")] == [2]
    assert alice.delete("runs/model.bin") == [2]
    with pytest.raises(NotFound, match="no object named 'runs/model.bin'"):
        alice.get_manifest("runs/model.bin")
    with pytest.raises(NotFound):
        alice.versions("runs/model.bin")
    with pytest.raises(NotFound):
        alice.delete("runs/model.bin")
    # Chunks stay (other objects may share them).
    assert alice.missing_chunks(hashes) == []
    alice.close()


def test_a_manifest_with_a_missing_chunk_is_refused(storage: Storage) -> None:
    absent = sha(os.urandom(64))
    manifest = manifest_for("broken", [b"x"], 1)
    manifest["parts"][0]["chunks"] = [absent]
    code, body = storage.call("alice", "POST", "dash/api/storage/objects/broken", manifest)
    assert code == 409 and body["message"] == f"chunk {absent} was not uploaded", body
    with pytest.raises(ChunksMissing, match=f"chunk {absent} was not uploaded"):
        storage.transport("alice").put_manifest(manifest)

    cases = {
        "objects/other": (manifest_for("broken", [b"x"], 1), "the URL names 'other'"),
        "objects/..%2Fbob": (manifest_for("x", [b"x"], 1), "invalid object name"),
        "objects/a/.hidden": (manifest_for("a/.hidden", [b"x"], 1), "invalid object name"),
        "objects/ok": ({"name": "ok", "parts": "no"}, "manifest"),
    }
    for path, (body_in, error) in cases.items():
        code, body = storage.call("alice", "POST", f"dash/api/storage/{path}", body_in)
        assert code == 400 and error in body["message"], (path, body)
    for path, error in {
        "objects?prefix=../bob": "invalid prefix",
        "objects/x?version=0": "version must be a whole number from 1",
        "objects/x?version=abc": "version must be a whole number from 1",
        "versions/a//b": "invalid object name",
    }.items():
        code, body = storage.call("alice", "GET", f"dash/api/storage/{path}")
        assert code == 400 and error in body["message"], (path, body)
    code, body = storage.call(
        "alice", "POST", "dash/api/storage/chunks/missing", {"chunks": ["A" * 64]}
    )
    assert code == 400 and "is not a chunk hash" in body["message"], body


# ----- users ---------------------------------------------------------------------------


def test_a_user_cannot_reach_another_users_objects(storage: Storage) -> None:
    secret = os.urandom(4096)
    stored = save(storage, "alice", "private/notes", [secret])
    digest = sha(secret)

    for who in ("bob", None):  # an account, and the operator (the server's token)

        def call(
            method: str, path: str, body: Any = None, who: str | None = who
        ) -> tuple[int, Any]:
            token = storage.tokens[who] if who else ""
            return storage.gw.call(method, f"dash/api/storage/{path}", body, token=token)

        code, body = call("GET", "objects")
        assert code == 200 and all(o["name"] != "private/notes" for o in body["objects"]), body
        code, body = call("GET", "objects?prefix=private")
        assert code == 200 and body["objects"] == [], body
        for method, path in [
            ("GET", "objects/private/notes"),
            ("GET", "objects/private/notes?version=1"),
            ("GET", "versions/private/notes"),
            ("DELETE", "objects/private/notes"),
            ("DELETE", "objects/private/notes?version=1"),
        ]:
            code, body = call(method, path)
            assert code == 404 and "no object named 'private/notes'" in body["message"], (
                method,
                path,
                body,
            )
        # Alice's chunk is not bob's: he is told to upload it, to his own namespace.
        code, body = call("POST", "chunks/missing", {"chunks": [digest]})
        assert code == 200 and body["missing"] == [digest], body
        code, body = call("POST", "chunks/download", {"chunks": [digest]})
        assert code == 200, body
        url = body["download"][digest]["url"]
        assert "users/alice" not in urllib.parse.unquote(url), url
        full = url if url.startswith("http") else storage.gw.url + url
        headers = (
            {}
            if url.startswith("http")
            else {"Authorization": f"token {storage.tokens[who] if who else storage.gw.token}"}
        )
        response = requests.get(full, headers=headers, timeout=30)
        assert response.status_code == 404 and secret not in response.content

    # A user name in the URL or the body changes nothing: the namespace is the caller's.
    forged = manifest_for("private/notes", [secret], 4096)
    forged["user"] = "alice"
    code, body = storage.call("bob", "POST", "dash/api/storage/objects/private/notes", forged)
    assert code == 409 and "was not uploaded" in body["message"], body
    code, body = storage.call(
        "bob", "GET", "dash/api/storage/objects/users/alice/objects/private/notes"
    )
    assert code == 404, body

    # Alice's object is intact.
    assert storage.transport("alice").get_manifest("private/notes") == stored
    assert dict(storage.transport("alice").get_chunks([digest])) == {digest: secret}


def test_no_credentials_no_storage(storage: Storage) -> None:
    for method, path in [
        ("GET", "dash/api/storage/objects"),
        ("GET", "dash/api/storage/objects/x"),
        ("POST", "dash/api/storage/chunks/missing"),
        ("PUT", f"dash/api/storage/chunks/{sha(b'x')}"),
        ("GET", f"dash/api/storage/chunks/{sha(b'x')}"),
        ("POST", "dash/api/storage/token"),
    ]:
        for token in (None, "not-a-token"):
            code, body = storage.gw.call(method, path, {}, token=token)
            assert code == 403 and "token" in body["message"], (method, path, token, body)
    transport = GatewayTransport(storage.gw.url, token="not-a-token")
    with pytest.raises(GatewayError, match="refused"):
        transport.list_objects()


# ----- storage tokens ------------------------------------------------------------------------


def mint(storage: Storage, user: str, **body: Any) -> dict[str, Any]:
    code, reply = storage.call(user, "POST", "dash/api/storage/token", body)
    assert code == 201, reply
    return reply


def test_a_storage_token_reaches_only_its_users_storage(storage: Storage) -> None:
    save(storage, "alice", "for-tasks", [b"payload for a task"])
    reply = mint(storage, "alice")
    assert reply["user"] == "alice" and reply["url"] == storage.gw.url
    token = reply["token"]
    header = {STORAGE_TOKEN_HEADER: token}

    transport = GatewayTransport(reply["url"], storage_token=token)
    assert transport.user == "alice"
    assert "for-tasks" in [o["name"] for o in transport.list_objects()]
    manifest = transport.get_manifest("for-tasks")
    digest = manifest["parts"][0]["chunks"][0]
    assert dict(transport.get_chunks([digest])) == {digest: b"payload for a task"}

    # Nowhere else: not as a header, not as an API token.
    gw = storage.gw
    for path in (
        "dash/api/status",
        "dash/api/cluster",
        "dash/api/workers",
        "api/contents",
        "api/me",
    ):
        code, body = gw.call("GET", path, token=None, headers=header)
        assert code in (401, 403), (path, body)
        code, body = gw.call("GET", path, token=token)
        assert code in (401, 403), (path, body)
    code, body = gw.call("POST", "dash/api/invites", {}, token=None, headers=header)
    assert code == 403, body
    # A storage token cannot mint another (which would outlive it).
    code, body = gw.call("POST", "dash/api/storage/token", {}, token=None, headers=header)
    assert code == 403 and "API token" in body["message"], body

    # Forgeries: bob's name under alice's signature; a signature from elsewhere.
    version, payload, signature = token.split(".")
    user_expiry = base64.urlsafe_b64decode(payload + "==").decode()
    bob_payload = base64.urlsafe_b64encode(user_expiry.replace("alice", "bob").encode()).decode()
    for forged in (
        f"{version}.{bob_payload.rstrip('=')}.{signature}",
        f"{version}.{payload}.{'0' * 64}",
        "garbage",
    ):
        code, body = gw.call(
            "GET", "dash/api/storage/objects", token=None, headers={STORAGE_TOKEN_HEADER: forged}
        )
        assert code == 403 and "storage token" in body["message"], (forged, body)

    # Bad lifetimes.
    for expires_in in (0, -5, "soon", 31 * 86400):
        code, body = storage.call(
            "alice", "POST", "dash/api/storage/token", {"expires_in": expires_in}
        )
        assert code == 400 and "expires_in" in body["message"], body

    key = gw.data_dir / "storage-secret"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert token not in key.read_text()


def test_a_storage_token_expires(storage: Storage) -> None:
    reply = mint(storage, "bob", expires_in=1)
    header = {STORAGE_TOKEN_HEADER: reply["token"]}
    code, body = storage.gw.call("GET", "dash/api/storage/objects", token=None, headers=header)
    assert code == 200, body
    time.sleep(2.1)
    code, body = storage.gw.call("GET", "dash/api/storage/objects", token=None, headers=header)
    assert code == 403 and "expired" in body["message"], body
    with pytest.raises(GatewayError, match="expired"):
        GatewayTransport(storage.gw.url, storage_token=reply["token"]).list_objects()


# ----- chunk uploads through the gateway ------------------------------------------------------


def test_a_chunk_with_the_wrong_hash_is_refused(storage: Storage) -> None:
    data = os.urandom(1000)
    wrong = sha(b"something else")
    response = storage.put_raw("alice", wrong, data)
    assert response.status_code == 400, response.text
    assert f"hash to {sha(data)}, not {wrong}" in response.json()["message"]
    assert wrong in storage.transport("alice").missing_chunks([wrong])

    response = storage.put_raw("alice", "not-a-hash", data)
    assert response.status_code == 400 and "is not a chunk hash" in response.json()["message"]

    response = storage.put_raw("alice", sha(data), data)
    assert response.status_code == 201, response.text
    got = requests.get(
        f"{storage.gw.url}dash/api/storage/chunks/{sha(data)}",
        headers={"Authorization": f"token {storage.tokens['alice']}"},
        timeout=30,
    )
    assert got.status_code == 200 and got.content == data


def test_an_oversized_chunk_is_refused_before_it_is_read(storage: Storage) -> None:
    url = urllib.parse.urlsplit(storage.gw.url)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=30)
    try:
        conn.putrequest("PUT", f"/dash/api/storage/chunks/{sha(b'big')}")
        conn.putheader("Authorization", f"token {storage.tokens['alice']}")
        conn.putheader("Content-Length", str(MAX_CHUNK + 1))
        conn.endheaders()
        conn.send(b"x" * 1024)
        response = conn.getresponse()
        body = json.loads(response.read())
    finally:
        conn.close()
    assert response.status == 413 and "at most" in body["message"], body


# ----- presigned URLs (S3) -------------------------------------------------------------------


def test_presigned_urls_are_for_the_callers_keys_only(storage: Storage) -> None:
    if storage.kind != "s3":
        # The local directory has no presigned URLs: everything goes through the gateway.
        code, body = storage.call(
            "alice", "POST", "dash/api/storage/chunks/missing", {"chunks": [sha(b"q")]}
        )
        assert body["upload"][sha(b"q")] == {
            "url": f"dash/api/storage/chunks/{sha(b'q')}",
            "method": "PUT",
            "headers": {},
        }
        return
    data = os.urandom(5 * MiB)
    digest = sha(data)
    code, body = storage.call(
        "alice", "POST", "dash/api/storage/chunks/missing", {"chunks": [digest]}
    )
    assert code == 200 and body["missing"] == [digest], body
    entry = body["upload"][digest]
    assert entry["method"] == "PUT" and entry["headers"] == {}
    url = urllib.parse.urlsplit(entry["url"])
    assert entry["url"].startswith(storage.s3.endpoint)
    assert url.path == f"/{BUCKET}/{PREFIX}/users/alice/chunks/{digest}"
    query = urllib.parse.parse_qs(url.query)
    assert query["X-Amz-Expires"] == ["3600"]
    assert S3_SECRET not in entry["url"]

    # Uploaded straight to S3, without DASH credentials.
    response = requests.put(entry["url"], data=data, timeout=60)
    assert response.status_code == 200, response.text
    assert f"users/alice/chunks/{digest}" in storage.s3.keys("users/alice/chunks/")
    code, body = storage.call(
        "alice", "POST", "dash/api/storage/chunks/missing", {"chunks": [digest]}
    )
    assert body == {"missing": [], "upload": {}}, body

    code, body = storage.call(
        "alice", "POST", "dash/api/storage/chunks/download", {"chunks": [digest]}
    )
    down = body["download"][digest]["url"]
    assert urllib.parse.urlsplit(down).path == f"/{BUCKET}/{PREFIX}/users/alice/chunks/{digest}"
    assert requests.get(down, timeout=60).content == data

    # Bob asking for alice's chunk gets URLs for his own key, however he asks.
    for path in ("chunks/missing", "chunks/download"):
        code, body = storage.call("bob", "POST", f"dash/api/storage/{path}", {"chunks": [digest]})
        entries = body.get("upload") or body.get("download")
        for entry in entries.values():
            assert f"/users/bob/chunks/{digest}" in entry["url"], entry
            assert "alice" not in entry["url"]


# ----- restarts ------------------------------------------------------------------------------


# ----- garbage ------------------------------------------------------------------------------


def test_garbage_collection_deletes_only_chunks_no_version_names(storage: Storage) -> None:
    kept, shared, dropped = os.urandom(1000), os.urandom(2000), os.urandom(3000)
    save(storage, "alice", "gc/kept", [kept, shared])
    save(storage, "alice", "gc/dropped", [shared, dropped])
    save(storage, "bob", "gc/bobs", [dropped])  # bob's own copy: chunks are per user
    storage.transport("alice").delete("gc/dropped")

    code, body = storage.call("alice", "POST", "dash/api/storage/gc", {"older_than": 0})
    assert code == 403 and "only the operator" in body["message"], body
    code, body = storage.gw.call("POST", "dash/api/storage/gc", {"older_than": "now"})
    assert code == 400 and "older_than" in body["message"], body

    def alice_chunks() -> set[str]:
        return {k.rpartition("/")[2] for k in storage.stored_keys("users/alice/chunks/")}

    # Young unreferenced chunks stay: a save may be about to name them.
    code, body = storage.gw.call("POST", "dash/api/storage/gc", {"older_than": 3600})
    assert code == 200 and sha(dropped) in alice_chunks(), body
    code, body = storage.gw.call("POST", "dash/api/storage/gc", {"older_than": 0})
    assert code == 200 and body["users"]["alice"]["bytes_freed"] >= len(dropped), body
    assert sha(dropped) not in alice_chunks()
    assert {sha(kept), sha(shared)} <= alice_chunks()
    assert sha(dropped) in {k.rpartition("/")[2] for k in storage.stored_keys("users/bob/")}
    client = StorageClient(storage.transport("alice"), None, progress=False)
    assert client.transport.get_manifest("gc/kept")["version"] == 1
    assert dict(client.transport.get_chunks([sha(kept)])) == {sha(kept): kept}


class CollectedWhileSaving:
    """Alice's transport, with the operator's sweep run right after the client learns which
    chunks storage already holds: the race a save can lose to garbage collection."""

    def __init__(self, storage: Storage):
        self.inner = storage.transport("alice")
        self.gw = storage.gw

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def missing_chunks(self, hashes: Any) -> list[str]:
        missing = self.inner.missing_chunks(hashes)
        code, body = self.gw.call("POST", "dash/api/storage/gc", {"older_than": 0})
        assert code == 200, body
        return missing


def test_a_save_whose_chunks_were_collected_meanwhile_uploads_them_again(
    storage: Storage,
) -> None:
    value = os.urandom(3 * MiB)
    plain = StorageClient(storage.transport("alice"), None, chunk_size=MiB, progress=False)
    plain.save("gc/victim", value)
    plain.rm("gc/victim")  # its chunks are still stored, named by nothing

    racing = StorageClient(CollectedWhileSaving(storage), None, chunk_size=MiB, progress=False)
    record = racing.save("gc/victim", value)
    assert record.uploaded_bytes >= len(value)  # sent again after the sweep took them
    assert plain.load("gc/victim") == value


def test_objects_and_tokens_survive_a_restart(gateway_factory: Any, tmp_path: Path) -> None:
    data_dir = tmp_path / "kept"
    first = gateway_factory(local_workers=0, data_dir=data_dir)
    first.wait_for_workers(0)
    tokens = first.add_users("carol")
    chunk = os.urandom(10 * MiB)
    transport = GatewayTransport(first.url, token=tokens["carol"])
    transport.put_chunks([(sha(chunk), chunk)])
    stored = transport.put_manifest(manifest_for("kept", [chunk], 10 * MiB))
    code, reply = first.call("POST", "dash/api/storage/token", {}, token=tokens["carol"])
    assert code == 201, reply
    first.stop()

    second = gateway_factory(local_workers=0, data_dir=data_dir)
    second.wait_for_workers(0)
    for again in (
        GatewayTransport(second.url, token=tokens["carol"]),
        GatewayTransport(second.url, storage_token=reply["token"]),
    ):
        assert again.get_manifest("kept") == stored
        assert dict(again.get_chunks([sha(chunk)])) == {sha(chunk): chunk}
        assert [o["name"] for o in again.list_objects()] == ["kept"]


# ----- the storage client over the gateway --------------------------------------------------


def test_storage_client_saves_and_loads_through_the_gateway(
    storage: Storage, tmp_path: Path
) -> None:
    np = pytest.importorskip("numpy")
    from dash_kernel.storage.client import StorageClient

    reply = mint(storage, "alice")
    for seed, transport in enumerate(
        (storage.transport("alice"), GatewayTransport(reply["url"], storage_token=reply["token"]))
    ):
        client = StorageClient(transport, None, files_dir=tmp_path / "files", progress=False)
        array = np.random.default_rng(seed).standard_normal(3 * MiB)  # 24 MiB: 3 chunks
        first = client.save("arrays/weights", {"w": array, "step": 7}, note="first")
        assert first.size >= array.nbytes and first.uploaded_bytes >= array.nbytes
        loaded = client.load("arrays/weights")
        assert loaded["step"] == 7 and np.array_equal(loaded["w"], array)
        # Unchanged data uploads almost nothing: only the (small) pickle part at most.
        second = client.save("arrays/weights", {"w": array, "step": 7})
        assert second.version == first.version + 1
        assert second.uploaded_bytes < 64 * 1024, second
        assert client.versions("arrays/weights")[-1]["version"] == second.version
        assert client.rm("arrays/weights") == [v for v in range(1, second.version + 1)]
        client.close()


def test_concurrent_saves_of_one_name_get_distinct_versions(storage: Storage) -> None:
    from concurrent.futures import ThreadPoolExecutor

    chunk = os.urandom(1024)
    transport = storage.transport("bob")
    transport.put_chunks([(sha(chunk), chunk)])
    manifest = manifest_for("raced", [chunk], 1024)
    with ThreadPoolExecutor(8) as pool:
        stored = list(pool.map(lambda _: transport.put_manifest(manifest), range(8)))
    assert sorted(m["version"] for m in stored) == list(range(1, 9))
    assert transport.delete("raced") == list(range(1, 9))


def test_a_removed_accounts_storage_token_stops_working(storage: Storage) -> None:
    tokens = storage.gw.add_users("dave")
    code, reply = storage.gw.call("POST", "dash/api/storage/token", {}, token=tokens["dave"])
    assert code == 201, reply
    header = {STORAGE_TOKEN_HEADER: reply["token"]}
    code, body = storage.gw.call("GET", "dash/api/storage", token=None, headers=header)
    assert code == 200 and body["user"] == "dave", body
    result = storage.gw.cli("users", "remove", "dave")
    assert result.returncode == 0, result.stderr
    code, body = storage.gw.call("GET", "dash/api/storage", token=None, headers=header)
    assert code == 403 and "'dave' no longer exists" in body["message"], body


# ----- damaged storage, typed manifests, connections, checkpoint expiry (issue #12) --------


def test_a_damaged_manifest_is_listed_and_removable_through_the_gateway(storage: Storage) -> None:
    save(storage, "alice", "hurt/fine", [b"fine"])
    save(storage, "alice", "hurt/broken", [b"broken"])
    storage.direct("alice").backend.put(
        manifest_key("alice", "hurt/broken", 1), b'{"name": "hurt/broken", "size": 1'
    )

    code, body = storage.call("alice", "GET", "dash/api/storage/objects?prefix=hurt/")
    assert code == 200, body
    broken, fine = body["objects"]
    assert (fine["name"], fine["size"]) == ("hurt/fine", 4)
    assert (broken["name"], broken["version"]) == ("hurt/broken", 1)
    assert "the manifest is not valid JSON" in broken["damaged"], broken
    code, body = storage.call("alice", "GET", "dash/api/storage/objects/hurt/broken")
    assert code == 422 and "dk.rm('hurt/broken', version=1)" in body["message"], body
    assert (body["name"], body["version"]) == ("hurt/broken", 1)
    alice = StorageClient(storage.transport("alice"), None, progress=False)
    with pytest.raises(DamagedManifest, match="'hurt/broken' version 1 is damaged") as caught:
        alice.load("hurt/broken")
    assert (caught.value.name, caught.value.version) == ("hurt/broken", 1)
    with pytest.warns(StorageWarning, match="'hurt/broken' version 1 is damaged"):
        assert [e.name for e in alice.ls("hurt/").damaged] == ["hurt/broken"]
    code, body = storage.gw.call("POST", "dash/api/storage/gc", {"older_than": 3600})
    assert code == 200, body  # a collection stumbles over it no more than a listing does

    assert alice.rm("hurt/broken") == [1]
    assert [e.name for e in alice.ls("hurt/")] == ["hurt/fine"]
    assert alice.rm("hurt/fine") == [1]


def test_a_damaged_chunk_is_dropped_so_that_saving_again_repairs_it(storage: Storage) -> None:
    np = pytest.importorskip("numpy")
    alice = StorageClient(storage.transport("alice"), None, chunk_size=MiB, progress=False)
    array = np.random.default_rng(5).standard_normal(MiB // 2)  # 4 MiB: 4 chunks
    alice.save("hurt/array", array)
    digest = alice.transport.get_manifest("hurt/array")["parts"][1]["chunks"][1]
    backend = storage.direct("alice").backend
    key = f"users/alice/chunks/{digest}"
    data = bytearray(backend.get(key))
    data[7] ^= 0x01
    backend.put(key, bytes(data))
    # Bob cannot make the gateway drop alice's chunk, nor can anyone drop an intact one.
    for who, victim in (("bob", digest), ("alice", sha(b"fine"))):
        code, body = storage.call(
            who, "POST", "dash/api/storage/chunks/damaged", {"chunks": [victim]}
        )
        assert code == 200 and body["deleted"] == [], body

    with pytest.raises(CorruptChunk, match="saving the object again") as caught:
        alice.load("hurt/array")
    assert caught.value.removed and digest not in storage.stored_keys("users/alice/chunks/")
    again = alice.save("hurt/array", array)
    assert again.uploaded_bytes == MiB, again
    assert np.array_equal(alice.load("hurt/array"), array)
    assert np.array_equal(alice.load("hurt/array", 1), array)
    assert alice.rm("hurt/array") == [1, 2]


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"format": []}, "format"),
        ({"size": "4"}, "size"),
        ({"metadata": [1]}, "metadata"),
        ({"parts": [{"role": "pickle", "size": 4, "chunks": [[]]}]}, "parts[0].chunks[0]"),
    ],
)
def test_a_manifest_with_a_wrongly_typed_field_is_refused_naming_it(
    storage: Storage, change: dict[str, Any], field: str
) -> None:
    manifest = {**manifest_for("typed", [b"data"], 4), **change}
    code, body = storage.call("alice", "POST", "dash/api/storage/objects/typed", manifest)
    assert code == 400 and f"manifest field {field!r}" in body["message"], body


def test_storage_follows_the_gateway_dk_connect_reached(storage: Storage, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DASH_")}
    env.update(JUPYTER_DATA_DIR=str(tmp_path / "data"), XDG_CACHE_HOME=str(tmp_path / "cache"))
    script = (
        "import sys, dash_kernel as dk\n"
        "dk.connect(sys.argv[1], sys.argv[2])\n"
        "print(dk.save('connected/value', 42).version)\n"
        "print(dk.load('connected/value'), [e['name'] for e in dk.ls('connected/')])\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", script, storage.gw.url, storage.tokens["alice"]],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines()[1] == "42 ['connected/value']", run.stdout
    code, body = storage.call("alice", "GET", "dash/api/storage/objects?prefix=connected/")
    assert code == 200 and [o["name"] for o in body["objects"]] == ["connected/value"], body
    assert not (tmp_path / "data" / "dash" / "storage").exists()
    assert storage.transport("alice").delete("connected/value") == [1]


def test_old_checkpoints_are_collected_at_start(gateway_factory: Any, tmp_path: Path) -> None:
    data_dir = tmp_path / "aged"
    store = StorageClient(DirectTransport(LocalBackend(data_dir / "storage"), "operator"), None)
    store.save_variables("sessions/nb-old", {"x": 1}, ["x"])
    store.save_variables("sessions/nb-fresh", {"x": 2}, ["x"])
    store.save("sessions/notes", "mine")
    store.save("models/old", "mine too")
    for name, days in [("sessions/nb-old", 3), ("sessions/nb-fresh", 0.5),
                       ("sessions/notes", 3), ("models/old", 3)]:  # fmt: skip
        key = manifest_key("operator", name, 1)
        manifest = json.loads(store.transport.backend.get(key))
        manifest["created"] = datetime.datetime.fromtimestamp(
            time.time() - days * 86400, datetime.timezone.utc
        ).isoformat()
        store.transport.backend.put(key, json.dumps(manifest).encode())

    gw = gateway_factory(
        local_workers=0, data_dir=data_dir, extra=["--DashGateway.checkpoint_retention=86400"]
    )
    gw.wait_for_workers(0)

    def names() -> list[str]:
        code, body = gw.call("GET", "dash/api/storage/objects")
        assert code == 200, body
        return [o["name"] for o in body["objects"]]

    wait_until(lambda: "sessions/nb-old" not in names(), what="the old checkpoint to expire")
    assert names() == ["models/old", "sessions/nb-fresh", "sessions/notes"]
    assert "expired 1 old session checkpoints" in gw.log()
