"""``storage``: ``dk.save``/``dk.load`` through a gateway with S3 storage vs raw boto3 on the same endpoint.

Both sides talk to one moto S3 server (a subprocess). DASH's path is the user's: the gateway
hands out presigned URLs for the user's chunks, and the client uploads and downloads them in
parallel; the baseline is boto3's ``upload_file``/``download_file`` with a tuned
``TransferConfig``. Each repetition changes every byte of the array first, so neither side
can skip work by deduplication; an unchanged re-save is measured on its own.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .harness import (
    Benchmark,
    Context,
    MiB,
    Result,
    environment,
    interleave,
    median,
    tests_module,
    timed,
)

BUCKET = "dash-bench"
CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "dash-bench",
    "AWS_SECRET_ACCESS_KEY": "dash-bench-secret",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@contextlib.contextmanager
def moto_server(log: Path) -> Iterator[str]:
    """A moto S3 server in its own process on a free loopback port; yields its URL."""
    import urllib.request

    port = tests_module("conftest").free_port()
    url = f"http://127.0.0.1:{port}"
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(url, timeout=1).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"moto did not start; see {log}") from None
                time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def run(ctx: Context) -> Result:
    import boto3
    import numpy as np
    from boto3.s3.transfer import TransferConfig

    import dash_kernel as dk

    nbytes = ctx.sizes.transfer_bytes
    workdir = ctx.directory("storage")
    with (
        moto_server(workdir / "moto.log") as endpoint,
        environment(AWS_ENDPOINT_URL=endpoint, **CREDENTIALS),
    ):
        s3 = boto3.client("s3")
        s3.create_bucket(Bucket=BUCKET)
        gateway = tests_module("conftest").launch_gateway(
            workdir / "gateway",
            local_workers=0,
            extra=[f"--DashGateway.storage_url=s3://{BUCKET}/dash"],
        )
        try:
            gateway.wait_for_workers(0)
            with environment(DASH_GATEWAY_URL=gateway.url, DASH_TOKEN=gateway.token):
                return _compare(
                    dk, s3, TransferConfig, np, nbytes, ctx.sizes.transfer_reps, workdir
                )
        finally:
            gateway.stop()


def _compare(
    dk: Any, s3: Any, transfer_config: Any, np: Any, nbytes: int, reps: int, workdir: Path
) -> Result:
    config = transfer_config(
        multipart_threshold=8 * MiB, multipart_chunksize=16 * MiB, max_concurrency=16
    )
    array = np.random.default_rng(0).integers(0, 256, size=nbytes, dtype=np.uint8)
    path, back = workdir / "array.bin", workdir / "array-back.bin"
    parts: dict[str, list[float]] = {"save": [], "load": [], "upload": [], "download": []}

    def dash() -> float:
        array[:] += 1  # every chunk is new: no deduplication
        save = timed(lambda: dk.save("bench/array", array))
        loaded: list[Any] = []
        load = timed(lambda: loaded.append(dk.load("bench/array")))
        assert loaded[0].nbytes == nbytes
        parts["save"].append(save)
        parts["load"].append(load)
        return save + load

    def boto() -> float:
        array[:] += 1
        array.tofile(path)  # boto3's file API needs a file; writing it is not timed
        upload = timed(lambda: s3.upload_file(str(path), BUCKET, "raw/array", Config=config))
        download = timed(lambda: s3.download_file(BUCKET, "raw/array", str(back), Config=config))
        parts["upload"].append(upload)
        parts["download"].append(download)
        return upload + download

    dash_values, boto_values = interleave(dash, boto, reps, warmup=0)
    first = dk.save("bench/array", array)
    unchanged = dk.save("bench/array", array)
    return Result(
        dash=median(dash_values),
        baseline=median(boto_values),
        n=len(dash_values),
        extra={
            "bytes": nbytes,
            "dash_save_s": median(parts["save"]),
            "dash_load_s": median(parts["load"]),
            "boto3_upload_s": median(parts["upload"]),
            "boto3_download_s": median(parts["download"]),
            "changed_save_uploaded_bytes": first.uploaded_bytes,
            "unchanged_resave_uploaded_bytes": unchanged.uploaded_bytes,
        },
    )


STORAGE = Benchmark(
    id="storage",
    what="dk.save then dk.load of an array through a gateway with S3 storage vs boto3 "
    "upload_file/download_file (tuned TransferConfig), same moto S3 endpoint",
    unit="s",
    baseline_name="boto3",
    run=run,
)
