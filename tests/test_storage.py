"""Storage: chunks, manifests, versions, dedup, verification, cache and datasets on a local
directory and on real S3 servers (moto, rclone serve s3)."""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import pickle
import re
import threading
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from s3servers import S3Server, moto_server, rclone_server  # noqa: F401  (fixtures)

import dash_kernel as dk
from dash_kernel.serialize import SerializationError, dumps_oob, loads_oob
from dash_kernel.storage import api
from dash_kernel.storage.backends import (
    LocalBackend,
    NotFound,
    S3Backend,
    StorageError,
    describe,
    open_backend,
)
from dash_kernel.storage.cache import ChunkCache, parse_size
from dash_kernel.storage.client import CorruptChunk, StorageClient, StorageWarning
from dash_kernel.storage.listing import Listing
from dash_kernel.storage.transport import (
    DamagedManifest,
    DirectTransport,
    check_manifest,
    chunk_key,
    manifest_key,
)

MiB = 2**20
CHUNK = 8 * MiB
BIG = 64 * MiB


class Counting:
    """A real backend, with its calls counted."""

    def __init__(self, backend: Any):
        self.backend = backend
        self.kind = backend.kind
        self.calls: dict[str, int] = {}
        self._lock = threading.Lock()

    def __getattr__(self, name: str) -> Any:
        method = getattr(self.backend, name)

        def counted(*args: Any, **kwargs: Any) -> Any:
            with self._lock:
                self.calls[name] = self.calls.get(name, 0) + 1
            return method(*args, **kwargs)

        return counted

    def count(self, name: str) -> int:
        return self.calls.get(name, 0)


@pytest.fixture(params=["local", "moto", "rclone"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Counting:
    if request.param == "local":
        return Counting(LocalBackend(tmp_path / "storage"))
    server: S3Server = request.getfixturevalue(f"{request.param}_server")
    return Counting(S3Backend(server.bucket, server.fresh_prefix(), **server.client_kwargs()))


@pytest.fixture
def client(backend: Counting, tmp_path: Path) -> Iterator[StorageClient]:
    transport = DirectTransport(backend, "alice")
    cache = ChunkCache(tmp_path / "cache" / "dash-chunks", 10 * 2**30)
    storage = StorageClient(transport, cache, chunk_size=CHUNK, progress=False)
    yield storage
    storage.close()


def big_array(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 2**62, BIG // 8, dtype=np.int64)


# round trips, versions, listing


def test_dict_round_trip(client: StorageClient) -> None:
    value = {"a": 1, "b": [1.5, "x", None], "nested": {"t": (1, 2)}}
    record = client.save("config", value, epoch=3, tag="first")
    assert (record.name, record.version, record.type) == ("config", 1, "builtins.dict")
    assert record.size > 0 and record.uploaded_bytes == record.size
    assert record.metadata == {"epoch": 3, "tag": "first"}
    assert client.load("config") == value


def test_numpy_round_trip_without_copies(client: StorageClient) -> None:
    array = big_array()
    record = client.save("arr", array)
    assert record.type == "numpy.ndarray"
    assert record.size >= array.nbytes and record.uploaded_bytes == record.size
    loaded = client.load("arr")
    assert loaded.dtype == array.dtype and loaded.shape == array.shape
    assert np.array_equal(loaded, array)
    assert loaded.flags.writeable  # backed by the load's own buffer, not a read-only copy


def test_versions_and_load_by_version(client: StorageClient) -> None:
    assert client.save("model", {"w": 1}).version == 1
    assert client.save("model", {"w": 2}, note="better").version == 2
    assert client.load("model") == {"w": 2}
    assert client.load("model", version=1) == {"w": 1}
    listed = client.versions("model")
    assert [v["version"] for v in listed] == [1, 2]
    assert listed[1]["metadata"] == {"note": "better"}
    assert all("parts" not in v for v in listed)
    with pytest.raises(NotFound, match=r"'model' has no version 7 \(versions: 1, 2\)"):
        client.load("model", version=7)
    with pytest.raises(NotFound, match="no object named 'nothing'"):
        client.load("nothing")


def test_ls_by_prefix(client: StorageClient) -> None:
    for name in ("runs/a", "runs/b", "runs/b", "results", "other/x"):
        client.save(name, name)
    assert [(o["name"], o["version"]) for o in client.ls("runs/")] == [
        ("runs/a", 1),
        ("runs/b", 2),
    ]
    assert [o["name"] for o in client.ls("r")] == ["results", "runs/a", "runs/b"]
    assert [o["name"] for o in client.ls()] == ["other/x", "results", "runs/a", "runs/b"]
    assert client.ls("zzz") == []
    summary = client.ls("results")[0]
    assert summary["user"] == "alice" and summary["type"] == "builtins.str"
    assert "parts" not in summary


def test_rm_one_version_then_all(client: StorageClient) -> None:
    for i in range(3):
        client.save("ckpt", i)
    assert client.rm("ckpt", 2) == [2]
    assert [v["version"] for v in client.versions("ckpt")] == [1, 3]
    with pytest.raises(NotFound, match="has no version 2"):
        client.load("ckpt", 2)
    assert client.save("ckpt", 9).version == 4
    assert client.rm("ckpt") == [1, 3, 4]
    assert client.ls() == []
    with pytest.raises(NotFound, match="no object named 'ckpt'"):
        client.rm("ckpt")


def test_invalid_names_and_metadata(client: StorageClient) -> None:
    for bad in ("", "../x", "a/../b", "/abs", "a//b", ".hidden", "x" * 201, "a/0000000001.json"):
        with pytest.raises(ValueError, match="invalid object name"):
            client.save(bad, 1)
    with pytest.raises(ValueError, match="metadata must be JSON"):
        client.save("ok", 1, tags={1, 2})


# dedup, counted in bytes


def test_dedup_counted_in_bytes(client: StorageClient, backend: Counting) -> None:
    array = big_array(1)
    first = client.save("data", array)
    assert first.uploaded_bytes >= array.nbytes
    puts = backend.count("put")

    again = client.save("data", array)
    assert again.version == 2
    assert again.uploaded_bytes == 0
    assert backend.count("put") == puts + 1  # the manifest only

    array[len(array) // 2] += 1  # one chunk changes
    changed = client.save("data", array)
    assert changed.uploaded_bytes == CHUNK
    assert np.array_equal(client.load("data"), array)
    assert client.load("data", 1)[len(array) // 2] == array[len(array) // 2] - 1


# saved variables (session checkpoints)


def _refuse_to_load(why: str) -> None:
    raise RuntimeError(why)


class LoadsNowhere:
    """Pickles fine; unpickling fails, as an object needing a missing module would."""

    def __reduce__(self) -> tuple[Any, ...]:
        return (_refuse_to_load, ("this machine lacks what it needs",))


def test_variables_round_trip_name_failures_and_skip_unchanged(
    client: StorageClient, backend: Counting
) -> None:
    array = big_array(3)
    namespace = {
        "small": {"a": 1},
        "text": "hello",
        "array": array,
        "lock": threading.Lock(),
        "stranger": LoadsNowhere(),
    }
    first = client.save_variables("sessions/nb-1", namespace, namespace)
    assert first.version == 1
    assert first.saved == ["array", "small", "stranger", "text"]
    assert list(first.failures) == ["lock"] and "cannot pickle" in first.failures["lock"]
    assert first.uploaded_bytes == first.size >= array.nbytes

    values, failures, summary = client.load_variables("sessions/nb-1")
    assert values["small"] == {"a": 1} and values["text"] == "hello"
    assert np.array_equal(values["array"], array) and values["array"].flags.writeable
    assert failures == {"stranger": "RuntimeError: this machine lacks what it needs"}
    assert summary["unsaved"] == first.failures and summary["version"] == 1

    puts = backend.count("put")
    same = client.save_variables("sessions/nb-1", namespace, namespace, unless_digest=first.digest)
    assert same.version is None and same.uploaded_bytes == 0 and same.digest == first.digest
    assert backend.count("put") == puts  # nothing written at all

    namespace["text"] = "changed"
    changed = client.save_variables(
        "sessions/nb-1", namespace, namespace, unless_digest=first.digest
    )
    assert changed.version == 2
    assert 0 < changed.uploaded_bytes < 4096  # the small values' pack, not the array
    assert client.load_variables("sessions/nb-1")[0]["text"] == "changed"
    assert client.load_variables("sessions/nb-1", 1)[0]["text"] == "hello"

    # dk.load of saved variables is a dict of them, and names what cannot be loaded
    with pytest.raises(SerializationError, match="stranger .RuntimeError"):
        client.load("sessions/nb-1")
    del namespace["stranger"], namespace["lock"]
    client.save_variables("sessions/nb-2", namespace, namespace)
    assert set(client.load("sessions/nb-2")) == {"array", "small", "text"}
    with pytest.raises(StorageError, match="not a set of saved variables"):
        client.load_variables(client.save("plain", 1).name)


def test_variables_manifest_layout_is_checked() -> None:
    sha = hashlib.sha256(b"x").hexdigest()
    manifest = {
        "name": "sessions/bad",
        "size": 1,
        "format": "variables-1",
        "chunk_size": CHUNK,
        "parts": [{"role": "pack", "size": 1, "chunks": [sha]}],
        "variables": [{"name": "a", "pack": [0, 1]}],
    }
    assert check_manifest(manifest) is manifest
    for variables in (
        [{"name": "a", "pack": [0, 2]}],  # beyond the pack
        [{"name": "a", "parts": [0]}],  # a pack is not a pickle part
        [{"name": "a", "parts": [3]}],
        [{"pack": [0, 1]}],
        "a",
    ):
        with pytest.raises(ValueError, match="variable|variables"):
            check_manifest({**manifest, "variables": variables})


# verification


def test_corrupted_chunk_is_detected(backend: Counting, tmp_path: Path) -> None:
    # no cache: the load must read the damaged copy from the backend
    storage = StorageClient(DirectTransport(backend, "alice"), None, chunk_size=MiB)
    storage.save("weights", np.arange(MiB, dtype=np.float32))
    manifest = storage.transport.get_manifest("weights")
    sha = manifest["parts"][1]["chunks"][2]
    key = chunk_key("alice", sha)
    data = bytearray(backend.get(key))
    data[100] ^= 0xFF
    backend.put(key, bytes(data))
    with pytest.raises(CorruptChunk) as caught:
        storage.load("weights")
    message = str(caught.value)
    assert "object 'weights' version 1 is corrupt" in message
    assert f"chunk {sha} has sha256 {hashlib.sha256(data).hexdigest()}" in message
    assert (caught.value.name, caught.value.version, caught.value.sha) == ("weights", 1, sha)

    backend.delete(key)
    with pytest.raises(StorageError, match=f"'weights' version 1: chunk {sha} is missing"):
        storage.load("weights")


def test_manifest_refused_when_a_chunk_was_not_uploaded(client: StorageClient) -> None:
    sha = hashlib.sha256(b"never uploaded").hexdigest()
    manifest = {
        "name": "ghost",
        "size": 14,
        "type": "files",
        "metadata": {},
        "format": "files-1",
        "chunk_size": CHUNK,
        "parts": [{"role": "file", "path": "g.txt", "size": 14, "chunks": [sha]}],
    }
    with pytest.raises(StorageError, match=f"chunk {sha} was not uploaded"):
        client.transport.put_manifest(manifest)
    with pytest.raises(ValueError, match="unsafe path"):
        client.transport.put_manifest(
            {**manifest, "parts": [{**manifest["parts"][0], "path": "../../etc/passwd"}]}
        )


# cache


def test_second_load_is_a_cache_hit(client: StorageClient, backend: Counting) -> None:
    array = big_array(2)
    client.save("cached", array)
    assert client.cache is not None
    gets = backend.count("get")
    assert np.array_equal(client.load("cached"), array)
    chunk_gets = backend.count("get") - gets - 1  # minus the manifest
    assert chunk_gets == BIG // CHUNK + 1
    hits = client.cache.hits

    gets = backend.count("get")
    assert np.array_equal(client.load("cached"), array)
    assert client.cache.hits - hits == BIG // CHUNK + 1
    assert backend.count("get") - gets == 1  # the manifest only


def test_cache_cap_evicts_least_recently_used(tmp_path: Path) -> None:
    cache = ChunkCache(tmp_path / "c", max_bytes=10 * 1000)
    blobs = [os.urandom(1000) for _ in range(12)]
    shas = [hashlib.sha256(b).hexdigest() for b in blobs]
    for i, (sha, blob) in enumerate(zip(shas, blobs, strict=True)):
        cache.put(sha, blob)
        os.utime(cache._path(sha), (1000 + i, 1000 + i))
        if i == 0:
            continue
        cache.get(shas[0])  # keep the first one in use
        os.utime(cache._path(shas[0]), (2000 + i, 2000 + i))
    assert cache.size() <= 10 * 1000
    assert cache.evictions >= 2
    assert shas[0] in cache and shas[-1] in cache
    assert shas[1] not in cache

    # a damaged file is dropped, not served
    path = cache._path(shas[-1])
    path.write_bytes(b"garbage")
    assert cache.get(shas[-1]) is None and cache.corrupt == 1
    assert not path.exists()
    # bigger than the whole cap: not cached
    cache.put(hashlib.sha256(b"x" * 20000).hexdigest(), b"x" * 20000)
    assert cache.size() <= 10 * 1000


def test_parse_size() -> None:
    assert parse_size("10GB") == 10 * 10**9
    assert parse_size("512MiB") == 512 * MiB
    assert parse_size("1000") == 1000
    with pytest.raises(ValueError, match="cannot read 'lots' as a size"):
        parse_size("lots")


# datasets


def make_tree(root: Path) -> dict[str, bytes]:
    files = {
        "README.txt": b"hello\n",
        "empty.bin": b"",
        "data/part-0.bin": os.urandom(3 * MiB + 17),
        "data/nested/deep.csv": b"a,b\n1,2\n",
    }
    for rel, content in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(content)
    return files


def read_tree(root: Path) -> dict[str, bytes]:
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_datasets_upload_tree_and_path(
    client: StorageClient, backend: Counting, tmp_path: Path
) -> None:
    client.chunk_size = MiB
    files = make_tree(tmp_path / "tree")
    record = client.upload_files(tmp_path / "tree", "corpus", source="test")
    assert record.type == "files" and record.size == sum(map(len, files.values()))
    manifest = client.transport.get_manifest("corpus")
    assert manifest["format"] == "files-1"
    assert sorted(p["path"] for p in manifest["parts"]) == sorted(files)

    path = client.materialise("corpus")
    assert path.is_dir() and path.is_relative_to(client.files_dir)
    assert read_tree(path) == files

    gets = backend.count("get")
    assert client.materialise("corpus") == path  # reused, nothing fetched
    assert backend.count("get") - gets == 1  # the manifest

    # unchanged tree: nothing uploaded; one file changed: only its chunk
    assert client.upload_files(tmp_path / "tree", "corpus").uploaded_bytes == 0
    (tmp_path / "tree" / "README.txt").write_bytes(b"changed\n")
    assert client.upload_files(tmp_path / "tree", "corpus").uploaded_bytes == 8
    newest = client.materialise("corpus")
    assert newest != path and (newest / "README.txt").read_bytes() == b"changed\n"
    assert (client.materialise("corpus", 1) / "README.txt").read_bytes() == b"hello\n"

    # a damaged materialised copy is rebuilt
    (path / "data" / "part-0.bin").write_bytes(b"short")
    assert read_tree(client.materialise("corpus", 1)) == files


def test_datasets_single_file_and_wrong_kinds(client: StorageClient, tmp_path: Path) -> None:
    source = tmp_path / "weights.bin"
    source.write_bytes(os.urandom(1000))
    client.upload_files(source, "weights")
    path = client.materialise("weights")
    assert path.name == "weights.bin" and path.read_bytes() == source.read_bytes()
    with pytest.raises(StorageError, match=r"holds files, not a Python object: use dk.datasets"):
        client.load("weights")
    client.save("obj", [1, 2])
    with pytest.raises(StorageError, match=r"is a Python object, not files: use dk.load"):
        client.materialise("obj")
    with pytest.raises(FileNotFoundError, match="no file or directory at"):
        client.upload_files(tmp_path / "missing", "m")


# users and credentials


def test_users_do_not_see_each_other(backend: Counting) -> None:
    alice = StorageClient(DirectTransport(backend, "alice"), None)
    bob = StorageClient(DirectTransport(backend, "bob"), None)
    alice.save("secret", {"k": 1})
    sha = alice.transport.get_manifest("secret")["parts"][0]["chunks"][0]
    assert bob.ls() == []
    with pytest.raises(NotFound, match="no object named 'secret'"):
        bob.load("secret")
    with pytest.raises(NotFound):
        bob.rm("secret")
    # chunks are per user: bob cannot read or dedup against alice's
    assert bob.transport.missing_chunks([sha]) == [sha]
    with pytest.raises(NotFound, match=f"chunk {sha} is missing"):
        list(bob.transport.get_chunks([sha]))
    assert bob.save("secret", {"mine": True}).uploaded_bytes > 0
    assert alice.load("secret") == {"k": 1}
    assert bob.load("secret") == {"mine": True}
    with pytest.raises(ValueError, match="invalid storage user"):
        DirectTransport(backend, "../alice")


def test_rclone_refuses_wrong_credentials(rclone_server: S3Server) -> None:  # noqa: F811
    wrong = S3Backend(
        rclone_server.bucket,
        "x",
        **rclone_server.client_kwargs(secret_key="not-the-secret"),
    )
    storage = StorageClient(DirectTransport(wrong, "alice"), None)
    with pytest.raises(StorageError, match="refused the credentials for bucket 'dash-test'"):
        storage.save("x", 1)
    with pytest.raises(StorageError, match="refused the credentials"):
        storage.ls()
    unknown = S3Backend(
        rclone_server.bucket, "x", **rclone_server.client_kwargs(access_key="nobody")
    )
    with pytest.raises(StorageError, match="refused the credentials"):
        unknown.get("users/alice/objects/x/0000000001.json")


def test_rclone_keeps_chunks_on_disk(rclone_server: S3Server) -> None:  # noqa: F811
    prefix = rclone_server.fresh_prefix()
    backend = S3Backend(rclone_server.bucket, prefix, **rclone_server.client_kwargs())
    StorageClient(DirectTransport(backend, "alice"), None).save("on-disk", b"payload")
    assert rclone_server.data_dir is not None
    stored = rclone_server.data_dir / rclone_server.bucket / prefix / "users" / "alice"
    assert (stored / "objects" / "on-disk" / "0000000001.json").is_file()
    assert len(list((stored / "chunks").iterdir())) == 1


# versions under concurrency


@pytest.mark.parametrize("where", ["local", "moto"])
def test_concurrent_saves_get_distinct_versions(
    where: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    if where == "local":
        backend: Any = LocalBackend(tmp_path / "s")
    else:
        server = request.getfixturevalue("moto_server")
        backend = S3Backend(server.bucket, server.fresh_prefix(), **server.client_kwargs())
    barrier = threading.Barrier(6)
    versions: list[int] = []

    def save(i: int) -> None:
        storage = StorageClient(DirectTransport(backend, "alice"), None)
        barrier.wait()
        versions.append(storage.save("race", i).version)

    threads = [threading.Thread(target=save, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(versions) == [1, 2, 3, 4, 5, 6]
    storage = StorageClient(DirectTransport(backend, "alice"), None)
    assert [v["version"] for v in storage.versions("race")] == [1, 2, 3, 4, 5, 6]


# backends


def test_local_backend_layout_and_modes(tmp_path: Path) -> None:
    backend = LocalBackend(tmp_path / "s")
    storage = StorageClient(DirectTransport(backend, "local"), None)
    storage.save("a/b", 1)
    path = tmp_path / "s" / manifest_key("local", "a/b", 1)
    assert path.is_file() and oct(path.stat().st_mode & 0o777) == "0o600"
    assert oct(path.parent.stat().st_mode & 0o777) == "0o700"
    assert list(backend.list("users/local/objects/a")) == [
        "users/local/objects/a/b/0000000001.json"
    ]
    for bad in ("../x", "a/../../b", "/etc/passwd", "a//b"):
        with pytest.raises(ValueError, match="invalid storage key"):
            backend.get(bad)
    with pytest.raises(NotFound):
        backend.get("users/none")
    storage.rm("a/b")
    assert not (tmp_path / "s" / "users" / "local" / "objects").exists()


def test_open_backend_and_describe(tmp_path: Path, moto_server: S3Server) -> None:  # noqa: F811
    assert isinstance(open_backend(tmp_path / "x"), LocalBackend)
    assert isinstance(open_backend(f"file://{tmp_path}/y"), LocalBackend)
    s3 = open_backend("s3://dash-test/some/prefix", **moto_server.client_kwargs())
    assert isinstance(s3, S3Backend) and s3.prefix == "some/prefix/"
    s3.put("k", b"v")
    assert s3.get("k") == b"v"
    assert describe("s3://user:secret@bucket/p") == {"backend": "s3", "location": "s3://bucket/p"}
    assert describe(str(tmp_path)) == {"backend": "local", "location": str(tmp_path)}
    with pytest.raises(ValueError, match="unsupported storage URL"):
        open_backend("gs://bucket/x")


def test_presigned_urls_move_chunks(moto_server: S3Server, tmp_path: Path) -> None:  # noqa: F811
    import urllib.request

    backend = S3Backend(
        moto_server.bucket, moto_server.fresh_prefix(), **moto_server.client_kwargs()
    )
    assert LocalBackend(tmp_path).presign("GET", "k", 60) is None
    put = urllib.request.Request(
        backend.presign("PUT", "users/a/chunks/x", 60),
        data=b"chunk bytes",
        method="PUT",
        headers={"Content-Type": "application/octet-stream"},
    )
    urllib.request.urlopen(put, timeout=10).close()
    with urllib.request.urlopen(backend.presign("GET", "users/a/chunks/x", 60), timeout=10) as r:
        assert r.read() == b"chunk bytes"


# serializer


def test_dumps_oob_shares_memory() -> None:
    array = np.arange(1000, dtype=np.float64)
    pickled, buffers = dumps_oob({"a": array, "strided": array[::2]})
    assert len(buffers) == 1 and buffers[0].nbytes == array.nbytes
    assert np.shares_memory(np.frombuffer(buffers[0], dtype=np.float64), array)
    restored = loads_oob(pickled, [bytearray(b) for b in buffers])
    assert np.array_equal(restored["a"], array)
    assert np.array_equal(restored["strided"], array[::2])


# dk.* in embedded mode


def test_dk_api_embedded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("DASH_STORAGE_URL", "DASH_STORAGE_TOKEN", "DASH_GATEWAY_URL", "DASH_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("JUPYTER_DATA_DIR", str(tmp_path / "jupyter"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(api, "_clients", OrderedDict())
    record = dk.save("exp/one", {"x": np.ones(3)}, lr=0.1)
    assert (record.name, record.version) == ("exp/one", 1)
    assert np.array_equal(dk.load("exp/one")["x"], np.ones(3))
    assert [o["name"] for o in dk.ls("exp")] == ["exp/one"]
    assert dk.ls()[0]["user"] == "local" and dk.ls()[0]["metadata"] == {"lr": 0.1}
    assert (tmp_path / "jupyter" / "dash" / "storage" / "users" / "local").is_dir()
    (tmp_path / "f.txt").write_text("data")
    dk.datasets.upload(tmp_path / "f.txt", "files/f")
    assert dk.datasets.path("files/f").read_text() == "data"
    assert [v["version"] for v in dk.versions("exp/one")] == [1]
    assert dk.rm("exp/one") == [1]

    other = StorageClient(DirectTransport(LocalBackend(tmp_path / "other"), "bob"), None)
    with api.use_storage(other):
        dk.save("elsewhere", 1)
        assert [o["user"] for o in dk.ls()] == ["bob"]
    assert dk.ls("elsewhere") == []


def test_gateway_selection(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("DASH_STORAGE_URL", "DASH_STORAGE_TOKEN", "DASH_GATEWAY_URL", "DASH_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    assert api._selection()[0] == "embedded"
    monkeypatch.setenv("DASH_GATEWAY_URL", "http://127.0.0.1:1/")
    monkeypatch.setenv("DASH_TOKEN", "t")
    assert api._selection() == ("gateway", "http://127.0.0.1:1/", "t")
    monkeypatch.setenv("DASH_STORAGE_URL", "http://127.0.0.1:2/")
    monkeypatch.setenv("DASH_STORAGE_TOKEN", "st")
    assert api._selection() == ("storage", "http://127.0.0.1:2/", "st")
    with api.use_storage("http://127.0.0.1:3/", "ctx"):
        assert api._selection() == ("storage", "http://127.0.0.1:3/", "ctx")


# damaged storage, manifest types, listings, checkpoint expiry (issue #12)


def age_manifest(backend: Any, user: str, name: str, version: int, days: float) -> None:
    """Set a stored manifest's ``created`` ``days`` into the past, in the store itself."""
    key = manifest_key(user, name, version)
    manifest = json.loads(backend.get(key))
    when = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(days=days)
    manifest["created"] = when.isoformat(timespec="milliseconds")
    backend.put(key, json.dumps(manifest).encode())


def test_a_damaged_manifest_is_listed_by_name_and_removable(client: StorageClient) -> None:
    client.save("damage/good", 1)
    client.save("damage/bad", 2)
    client.save("damage/bad", 3)
    backend = client.transport.backend
    backend.put(manifest_key("alice", "damage/bad", 2), b'{"name": "damage/b')

    with pytest.warns(StorageWarning, match=r"'damage/bad' version 2 is damaged.*dk.rm"):
        listing = client.ls("damage/")
    assert [(e["name"], e["version"]) for e in listing] == [("damage/bad", 2), ("damage/good", 1)]
    assert [e.name for e in listing.damaged] == ["damage/bad"]
    assert "not valid JSON" in listing[0]["damaged"] and "DAMAGED" in repr(listing)
    with pytest.raises(DamagedManifest, match=r"dk.rm\('damage/bad', version=2\)"):
        client.load("damage/bad")
    assert client.load("damage/bad", 1) == 2  # the other versions stay readable
    with pytest.warns(StorageWarning):
        assert [v.get("damaged") is None for v in client.versions("damage/bad")] == [True, False]

    # A manifest that parses but is not one is damaged too.
    backend.put(manifest_key("alice", "damage/good", 1), b'{"name": "damage/good", "parts": 7}')
    with pytest.warns(StorageWarning, match="'damage/good' version 1 is damaged"):
        assert len(client.ls("damage/").damaged) == 2
    assert client.rm("damage/bad", 2) == [2] and client.rm("damage/good") == [1]
    assert [(e.name, e.version) for e in client.ls("damage/")] == [("damage/bad", 1)]
    client.transport.collect_garbage(0)  # no damaged manifest left to stumble on


def test_garbage_collection_keeps_the_chunks_a_damaged_manifest_names(
    client: StorageClient,
) -> None:
    client.save("damage/kept", os.urandom(1000))
    manifest = client.transport.get_manifest("damage/kept")
    sha = manifest["parts"][0]["chunks"][0]
    key = manifest_key("alice", "damage/kept", 1)
    client.transport.backend.put(key, client.transport.backend.get(key)[:-2])
    client.transport.collect_garbage(0)
    assert client.transport.missing_chunks([sha]) == []


def test_a_damaged_chunk_is_dropped_so_that_saving_again_repairs_it(backend: Counting) -> None:
    storage = StorageClient(DirectTransport(backend, "alice"), None, chunk_size=MiB)
    array = np.arange(MiB, dtype=np.float32)
    storage.save("weights", array)
    sha = storage.transport.get_manifest("weights")["parts"][1]["chunks"][2]
    key = chunk_key("alice", sha)
    data = bytearray(backend.get(key))
    data[100] ^= 0xFF
    backend.put(key, bytes(data))
    with pytest.raises(CorruptChunk, match="saving the object again stores the chunk") as caught:
        storage.load("weights")
    assert caught.value.removed and storage.transport.missing_chunks([sha]) == [sha]

    again = storage.save("weights", array)
    assert again.uploaded_bytes == MiB  # the damaged chunk, and only it
    assert np.array_equal(storage.load("weights"), array)
    assert np.array_equal(storage.load("weights", 1), array)  # it shared the chunk
    # Storage checks for itself: an intact chunk is never dropped on a reader's word.
    assert storage.transport.discard_damaged([sha]) == []
    assert storage.transport.missing_chunks([sha]) == []


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"format": []}, "format"),
        ({"format": {"a": 1}}, "format"),
        ({"size": "3"}, "size"),
        ({"size": True}, "size"),
        ({"chunk_size": 1.5}, "chunk_size"),
        ({"metadata": []}, "metadata"),
        ({"type": 3}, "type"),
        ({"name": ["x"]}, "name"),
        ({"parts": {}}, "parts"),
        ({"parts": [{"role": "pickle", "size": 3, "chunks": [1]}]}, "parts[0].chunks[0]"),
        ({"parts": [{"role": [], "size": 3, "chunks": []}]}, "parts[0].role"),
        ({"parts": [{"role": "pickle", "chunks": []}]}, "parts[0].size"),
        ({"variables": [{"name": "v", "pack": ["a", 1]}]}, "variables[0].pack[0]"),
        ({"unsaved": {"v": 1}}, "unsaved.v"),
    ],
)
def test_manifest_fields_are_checked_by_type(change: dict[str, Any], field: str) -> None:
    sha = hashlib.sha256(b"abc").hexdigest()
    manifest = {
        "name": "typed",
        "size": 3,
        "format": "pickle-oob-1",
        "chunk_size": CHUNK,
        "parts": [{"role": "pickle", "size": 3, "chunks": [sha]}],
    }
    assert check_manifest(manifest) is manifest
    with pytest.raises(ValueError, match=re.escape(f"manifest field {field!r}")):
        check_manifest({**manifest, **change})
    with pytest.raises(ValueError, match="a manifest is a JSON object"):
        check_manifest([manifest])


def test_ls_is_a_readable_table_with_the_manifest_one_call_away(client: StorageClient) -> None:
    client.save("table/model", {"w": np.ones(4)}, epoch=3)
    client.save_variables("sessions/nb-9", {"a": 1, "b": np.zeros(3)}, ["a", "b"])
    listing = client.ls()
    assert isinstance(listing, Listing) and all(isinstance(e, dict) for e in listing)
    model, checkpoint = listing[1], listing[0]
    assert (model.name, model["version"], model.metadata) == ("table/model", 1, {"epoch": 3})
    assert model.type == "builtins.dict" and model.size > 32 and model.created
    assert set(model) <= {"name", "version", "size", "type", "created", "user", "format",
                          "metadata"}  # fmt: skip
    assert checkpoint["variables"] == ["a", "b"]  # names, not part numbers
    assert model.manifest()["parts"] == client.manifest("table/model")["parts"]
    assert listing.manifest("sessions/nb-9")["format"] == "variables-1"
    text = repr(listing)
    assert text.splitlines()[0].split() == ["name", "version", "size", "type", "created",
                                            "metadata"]  # fmt: skip
    assert "table/model" in text and '{"epoch": 3}' in text and "chunks" not in text
    assert "<table>" in listing._repr_html_() and "table/model" in listing._repr_html_()
    assert repr(client.ls("nothing")) == "(no objects)" and client.ls("nothing") == []
    # Entries travel as plain data (to and from tasks), without the client behind them.
    copy = pickle.loads(pickle.dumps(listing))
    assert copy == listing and repr(copy) == text


def test_old_checkpoints_expire_and_user_objects_never_do(client: StorageClient) -> None:
    transport = client.transport
    client.save_variables("sessions/old-1", {"x": 1}, ["x"])
    client.save_variables("sessions/old-1", {"x": 2}, ["x"])
    client.save_variables("sessions/fresh-2", {"x": 3}, ["x"])
    client.save("sessions/mine", "a user object under sessions/")
    client.save("models/old", "a user object")
    for name, version in [("sessions/old-1", 1), ("sessions/old-1", 2),
                          ("sessions/mine", 1), ("models/old", 1)]:  # fmt: skip
        age_manifest(transport.backend, "alice", name, version, days=40)
    age_manifest(transport.backend, "alice", "sessions/fresh-2", 1, days=20)

    report = transport.expire_checkpoints(30 * 86400)
    assert report == {"deleted": ["sessions/old-1"], "kept": 2}
    assert [e.name for e in client.ls()] == ["models/old", "sessions/fresh-2", "sessions/mine"]
    assert transport.expire_checkpoints(10 * 86400)["deleted"] == ["sessions/fresh-2"]


def test_without_a_gateway_the_first_checkpoint_expires_old_ones(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from dash_kernel import checkpoints

    backend = LocalBackend(tmp_path / "embedded")
    storage = StorageClient(DirectTransport(backend, "local"), None, progress=False)
    storage.save_variables("sessions/gone-1", {"x": 1}, ["x"])
    storage.save("models/kept", 1)
    age_manifest(backend, "local", "sessions/gone-1", 1, days=2)
    age_manifest(backend, "local", "models/kept", 1, days=2)
    monkeypatch.setattr(checkpoints, "_expired_embedded", False)
    monkeypatch.setenv("DASH_CHECKPOINT_RETENTION", "86400")
    with api.use_storage(storage):
        checkpoints.take("sessions/now-2", {"y": 2})
    assert [e.name for e in storage.ls()] == ["models/kept", "sessions/now-2"]
