"""``dash-worker`` without a gateway: the worker plan, the credential store, the command line,
and the agent's control flow against a stub gateway (no scheduler, no workers)."""

from __future__ import annotations

import datetime
import json
import os
import signal
import socket
import ssl
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from dash_gateway.tls import CertificateAuthority
from dash_kernel.resources import worker_resources
from dash_worker import cli
from dash_worker.credentials import (
    CredentialStore,
    MachineConfig,
    default_config_dir,
    new_key_and_csr,
)
from dash_worker.gateway_client import GatewayClient, GatewayError, GatewayUnreachable
from dash_worker.plan import (
    CapsError,
    affinity_cores,
    default_machine_name,
    gpu_identities,
    match_gpus,
    parse_declared_gpu,
    parse_gpu_selection,
    plan_workers,
    resolve_caps,
    with_gpu_locks,
)

GiB = 2**30
H200 = 150754820096
UUID0 = "GPU-5d8c6f5e-3f0b-2a1c-9e7b-1f2d3c4b5a69"
UUID1 = "GPU-0a7e2b94-61c3-4f8d-b2e5-7c9a1d3e5f20"
AGENT_TIMEOUT = 60


def _gpu(index: int, name: str, vram: int, uuid: str | None) -> dict[str, Any]:
    return {
        "index": index,
        "name": name,
        "uuid": uuid,
        "vram": vram,
        "driver": "550.54.15" if uuid else None,
        "compute_capability": "9.0" if uuid else None,
        "declared": uuid is None,
    }


def _hardware(gpus: list[dict[str, Any]] | None = None, cpus: int = 16, memory: int = 64 * GiB):
    return {
        "hostname": "box",
        "cpus": cpus,
        "cpus_physical": cpus // 2,
        "memory": memory,
        "gpus": gpus if gpus is not None else [],
        "gpu_probe": "ok" if gpus else "no NVIDIA driver (libnvidia-ml.so.1 not found)",
    }


def _two_h200() -> dict[str, Any]:
    return _hardware([_gpu(0, "NVIDIA H200", H200, UUID0), _gpu(1, "NVIDIA H200", H200, UUID1)])


# -- the worker plan ---------------------------------------------------------------------------


def test_plan_shares_everything_by_default() -> None:
    hardware = _two_h200()
    caps = resolve_caps(hardware)
    assert caps == {"cpus": 16, "memory": 64 * GiB, "gpus": [0, 1]}
    workers = plan_workers("box", hardware, caps, gpu_threads=2)
    assert [w.name for w in workers] == ["box-gpu0", "box-gpu1", "box-gpu0+1", "box-cpu"]
    assert [w.nthreads for w in workers] == [2, 2, 2, 16]
    # An equal share each, rounded down to a MiB.
    share = 64 * GiB // 4 // 2**20 * 2**20
    assert [w.memory_limit for w in workers] == [share] * 4
    assert [w.env for w in workers] == [
        {"CUDA_VISIBLE_DEVICES": UUID0},
        {"CUDA_VISIBLE_DEVICES": UUID1},
        {"CUDA_VISIBLE_DEVICES": f"{UUID0},{UUID1}"},
        {"CUDA_VISIBLE_DEVICES": ""},
    ]
    assert workers[0].resources == worker_resources(2, share, gpu_model="NVIDIA H200", vram=H200)
    assert workers[0].resources["GPU"] == 1 and workers[0].resources["gpu:h200"] == 1
    assert workers[2].resources == worker_resources(
        2, share, gpu_model="NVIDIA H200", vram=H200, gpus=2
    )
    assert workers[3].resources == worker_resources(16, share)
    assert "GPU" not in workers[3].resources
    assert affinity_cores(caps, workers, range(16)) == list(range(16))


def test_plan_with_caps() -> None:
    hardware = _two_h200()
    caps = resolve_caps(hardware, cpus=4, memory="16GiB", gpus="1")
    workers = plan_workers("box", hardware, caps, gpu_threads=3)
    assert [(w.name, w.nthreads, w.memory_limit) for w in workers] == [
        ("box-gpu1", 3, 8 * GiB),
        ("box-cpu", 4, 8 * GiB),
    ]
    # The highest-numbered cores of those this process may use.
    assert affinity_cores(caps, workers, range(16)) == [12, 13, 14, 15]


def test_plan_gpus_none() -> None:
    hardware = _two_h200()
    caps = resolve_caps(hardware, cpus=8, gpus="none")
    workers = plan_workers("box", hardware, caps)
    assert [(w.name, w.nthreads, w.memory_limit) for w in workers] == [("box-cpu", 8, 64 * GiB)]


def test_plan_cpus_zero_shares_gpus_only() -> None:
    hardware = _two_h200()
    caps = resolve_caps(hardware, cpus=0)
    workers = plan_workers("box", hardware, caps)
    assert [w.name for w in workers] == ["box-gpu0", "box-gpu1", "box-gpu0+1"]
    assert [w.memory_limit for w in workers] == [64 * GiB // 3 // 2**20 * 2**20] * 3
    # A GPU worker's threads still need a core: one per GPU (the 2-GPU worker uses theirs).
    assert affinity_cores(caps, workers, range(16)) == [14, 15]


def test_plan_declared_gpu() -> None:
    declared = parse_declared_gpu("NVIDIA A100-SXM4-80GB:80GB")
    assert declared == {"name": "NVIDIA A100-SXM4-80GB", "vram": 80 * 10**9}
    hardware = _hardware(
        [
            _gpu(0, "NVIDIA H200", H200, UUID0),
            _gpu(1, "NVIDIA A100-SXM4-80GB", 80 * 10**9, None),
        ]
    )
    caps = resolve_caps(hardware, cpus=2, memory="12GiB")
    workers = plan_workers("lab-7", hardware, caps)
    gpu1 = workers[1]
    assert gpu1.name == "lab-7-gpu1"
    assert gpu1.env == {"CUDA_VISIBLE_DEVICES": "1"}  # no UUID: the index
    assert gpu1.resources["VRAM"] == 80 * 10**9
    assert {k for k in gpu1.resources if k.startswith("gpu:")} == {
        "gpu:a100",
        "gpu:sxm4",
        "gpu:80gb",
    }


def test_plan_a_multi_gpu_worker_per_model_with_locks_on_its_gpus() -> None:
    a100 = "NVIDIA A100-SXM4-80GB"
    hardware = _hardware(
        [
            _gpu(0, "NVIDIA H200", H200, UUID0),
            _gpu(1, a100, 80 * 10**9, None),
            _gpu(2, a100, 40 * 10**9, None),
        ]
    )
    workers = plan_workers("lab", hardware, resolve_caps(hardware, cpus=2, memory="10GiB"))
    by_name = {w.name: w for w in workers}
    assert list(by_name) == ["lab-gpu0", "lab-gpu1", "lab-gpu2", "lab-gpu1+2", "lab-cpu"]
    both = by_name["lab-gpu1+2"]
    assert both.env == {"CUDA_VISIBLE_DEVICES": "1,2"}
    assert both.resources["GPU"] == 2 and both.resources["VRAM"] == 40 * 10**9  # of each
    assert both.gpu is None and [g["index"] for g in both.gpus] == [1, 2]
    # The lone H200 needs no lock: no other worker sees it.
    assert by_name["lab-gpu0"].gpu_locks == ()
    assert by_name["lab-gpu1"].gpu_locks == ("declared-0",)
    assert both.gpu_locks == ("declared-0", "declared-1") and both.reserves_gpus
    assert not by_name["lab-gpu2"].reserves_gpus

    located = {w.name: w for w in with_gpu_locks(workers, "/run/locks")}
    assert json.loads(located["lab-gpu1+2"].env["DASH_GPU_LOCKS"]) == {
        "dir": "/run/locks",
        "gpus": ["declared-0", "declared-1"],
        "reserve": True,
    }
    assert json.loads(located["lab-gpu2"].env["DASH_GPU_LOCKS"])["reserve"] is False
    assert located["lab-gpu0"].env == {"CUDA_VISIBLE_DEVICES": UUID0}
    assert "DASH_GPU_LOCKS" not in located["lab-cpu"].env


def test_caps_larger_than_the_machine() -> None:
    hardware = _two_h200()
    with pytest.raises(CapsError, match="--cpus 32 is more than this machine's 16 CPU cores"):
        resolve_caps(hardware, cpus=32)
    with pytest.raises(
        CapsError, match=r"--memory 128.00 GiB is more than this machine's 64.00 GiB"
    ):
        resolve_caps(hardware, memory="128GiB")
    with pytest.raises(CapsError, match=r"there is no GPU 2; its GPUs are 0 \(NVIDIA H200\), 1"):
        resolve_caps(hardware, gpus="0,2")
    no_gpus = _hardware()
    with pytest.raises(CapsError, match=r"no GPUs \(no NVIDIA driver"):
        resolve_caps(no_gpus, gpus="0")
    with pytest.raises(CapsError, match="nothing to share"):
        resolve_caps(no_gpus, cpus=0)
    with pytest.raises(CapsError, match="CPU cores this process may use"):
        affinity_cores({"cpus": 8}, [], range(4))


def test_memory_too_small_to_split() -> None:
    hardware = _two_h200()
    caps = resolve_caps(hardware, memory="600MiB")
    with pytest.raises(CapsError, match=r"split over 4 worker\(s\) leaves 150.00 MiB each"):
        plan_workers("box", hardware, caps)


def test_gpus_are_found_again_by_uuid() -> None:
    at_join = _hardware(
        [
            _gpu(0, "NVIDIA H200", H200, UUID0),
            _gpu(1, "NVIDIA H200", H200, UUID1),
            _gpu(2, "NVIDIA A100-SXM4-80GB", 80 * 10**9, None),
        ]
    )
    identities = gpu_identities(at_join, [1, 2])
    assert identities == {"1": UUID1, "2": "declared:0"}
    # Today GPU 0 is gone: the shared H200 is now index 0, the declared GPU index 1.
    today = _hardware(
        [_gpu(0, "NVIDIA H200", H200, UUID1), _gpu(1, "NVIDIA A100-SXM4-80GB", 80 * 10**9, None)]
    )
    caps, warnings = match_gpus(today, {"cpus": 1, "memory": GiB, "gpus": [1, 2]}, identities)
    assert caps["gpus"] == [0, 1] and warnings == []
    gone = _hardware([_gpu(0, "NVIDIA H200", H200, UUID0)])
    caps, warnings = match_gpus(gone, {"cpus": 1, "memory": GiB, "gpus": [1]}, {"1": UUID1})
    assert caps["gpus"] == []
    assert warnings == [f"GPU 1 ({UUID1}) is no longer found, so it is not shared"]


def test_names_and_selections() -> None:
    assert default_machine_name("GPU_Box.lan") == "gpu-box"
    assert default_machine_name("local") == "local-machine"
    assert default_machine_name("___") == "machine"
    assert len(default_machine_name("a" * 80)) == 40
    assert parse_gpu_selection("all") == "all"
    assert parse_gpu_selection(" None ") == "none"
    assert parse_gpu_selection("1,0,1") == [0, 1]
    for bad in ("", "a", "-1", "0;1"):
        with pytest.raises(CapsError):
            parse_gpu_selection(bad)
    for bad in ("A100", ":24GB", "RTX 4090:", "RTX 4090:lots", "RTX 4090:0"):
        with pytest.raises(CapsError):
            parse_declared_gpu(bad)


# -- the credential store -------------------------------------------------------------------------


def _config(**kwargs: Any) -> MachineConfig:
    values: dict[str, Any] = {
        "gateway": "http://127.0.0.1:1",
        "name": "box",
        "owner": "alice",
        "machine_token": "secret-token",
        "caps": {"cpus": 1, "memory": GiB, "gpus": []},
        "options": {"gpu_threads": 2},
    }
    values.update(kwargs)
    return MachineConfig(**values)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_credential_store_is_private(tmp_path: Path) -> None:
    directory = tmp_path / "a" / "worker"
    store = CredentialStore(directory)
    old = os.umask(0)  # even a permissive umask must not widen anything
    try:
        store.save(_config(), ca="CA PEM\n")
        key, csr = new_key_and_csr("box")
        store.write_worker_credentials(key, "CERT PEM\n")
    finally:
        os.umask(old)
    assert _mode(directory) == 0o700
    for name in ("machine.json", "ca.pem", "worker.pem"):
        assert _mode(directory / name) == 0o600, name
    assert sorted(p.name for p in directory.iterdir()) == ["ca.pem", "machine.json", "worker.pem"]
    assert store.load() == _config()
    assert json.loads((directory / "machine.json").read_text())["machine_token"] == "secret-token"

    # A directory that exists with a loose mode is tightened.
    os.chmod(directory, 0o755)
    store.save(_config(owner="bob"))
    assert _mode(directory) == 0o700
    assert store.load().owner == "bob"
    store.remove()
    assert not directory.exists() and not store.exists()


def test_config_dir_from_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DASH_WORKER_CONFIG_DIR", str(tmp_path / "from-env"))
    assert CredentialStore().directory == tmp_path / "from-env"
    assert CredentialStore(tmp_path / "flag").directory == tmp_path / "flag"
    monkeypatch.delenv("DASH_WORKER_CONFIG_DIR")
    assert default_config_dir().parts[-2:] == ("dash", "worker")


def test_worker_key_stays_here_and_loads_with_its_certificate(tmp_path: Path) -> None:
    key_pem, csr_pem = new_key_and_csr("box")
    csr = x509.load_pem_x509_csr(csr_pem.encode())
    assert csr.is_signature_valid
    assert "PRIVATE KEY" not in csr_pem
    key = serialization.load_pem_private_key(key_pem.encode(), password=None)
    assert csr.public_key() == key.public_key()
    assert key.curve.name == "secp256r1"  # type: ignore[attr-defined]

    # A certificate for the CSR's key, as the gateway would sign it, loads from worker.pem alone.
    ca = CertificateAuthority(tmp_path / "ca")
    ca_key = serialization.load_pem_private_key(ca.key_path.read_bytes(), password=None)
    ca_cert = x509.load_pem_x509_certificate(ca.cert_pem.encode())
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(csr.subject)
        .issuer_name(ca_cert.subject)
        .public_key(csr.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(ca_key, hashes.SHA256())  # type: ignore[arg-type]
    )
    store = CredentialStore(tmp_path / "worker")
    path = store.write_worker_credentials(
        key_pem, cert.public_bytes(serialization.Encoding.PEM).decode()
    )
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    context.load_cert_chain(str(path))  # key and certificate from the one file


# -- the command line ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["join", "http://x"], "the following arguments are required: --token"),
        (["join", "http://x", "--token", "t", "--cpus", "-1"], "--cpus: must be 0 or more"),
        (["join", "http://x", "--token", "t", "--cpus", "two"], "--cpus: expected a whole number"),
        (["join", "http://x", "--token", "t", "--memory", "lots"], "--memory: expected a size"),
        (["join", "http://x", "--token", "t", "--gpus", "first"], "--gpus: expected 'all', 'none'"),
        (["join", "http://x", "--token", "t", "--declare-gpu", "A100"], "expected MODEL:VRAM"),
        (["join", "http://x", "--token", "t", "--gpu-threads", "0"], "must be 1 or more"),
        (["join", "http://x", "--token", "t", "--name", "My_Box"], "is not allowed"),
        (["join", "http://x", "--token", "t", "--name", "local"], "is reserved"),
        (["start", "--bogus"], "unrecognized arguments: --bogus"),
        ([], "the following arguments are required: COMMAND"),
    ],
)
def test_argument_errors(argv: list[str], message: str, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_caps_beyond_the_machine_are_refused_before_any_contact(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    argv = ["join", "http://127.0.0.1:1", "--token", "t", "--config-dir", str(tmp_path / "c")]
    with pytest.raises(SystemExit) as exc:
        cli.main([*argv, "--cpus", str((os.cpu_count() or 1) + 1)])
    assert exc.value.code == 2
    assert "more than this machine's" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        cli.main([*argv, "--gpus", "0"])
    assert exc.value.code == 2
    assert "there is no GPU 0" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()


def test_commands_without_credentials(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    for command in ("start", "status", "drain", "leave"):
        with pytest.raises(SystemExit) as exc:
            cli.main([command, "--config-dir", str(tmp_path)])
        assert exc.value.code == 1
        err = capsys.readouterr().err
        assert f"no machine credentials in {tmp_path}" in err and "dash-worker join" in err


def test_join_twice_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    CredentialStore(tmp_path).save(_config())
    with pytest.raises(SystemExit) as exc:
        cli.main(["join", "http://127.0.0.1:1", "--token", "t", "--config-dir", str(tmp_path)])
    assert exc.value.code == 1
    assert "already joined http://127.0.0.1:1 as box" in capsys.readouterr().err


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _dash_worker(*args: str, env: dict[str, str] | None = None, **kwargs: Any):
    return subprocess.run(
        [sys.executable, "-m", "dash_worker", *args],
        capture_output=True,
        text=True,
        timeout=AGENT_TIMEOUT,
        env={**os.environ, **(env or {})},
        **kwargs,
    )


def test_join_an_unreachable_gateway(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{_closed_port()}"
    done = _dash_worker("join", url, "--token", "x", "--config-dir", str(tmp_path / "c"))
    assert done.returncode == 1, done.stderr
    assert f"cannot reach the DASH gateway at {url}: connection refused" in done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "c").exists()


# -- the agent against a stub gateway ------------------------------------------------------------

Route = Callable[[dict[str, Any], dict[str, str]], tuple[int, Any]]


class StubGateway:
    """Answers the agent's API from ``routes`` (``(method, path) -> (status, body)`` or a
    function of the request) and records every request."""

    def __init__(self) -> None:
        self.routes: dict[tuple[str, str], tuple[int, Any] | Route] = {}
        self.requests: list[tuple[str, str, dict[str, str], Any]] = []
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length)) if length else None
                headers = dict(self.headers)
                stub.requests.append((self.command, self.path, headers, body))
                route = stub.routes.get((self.command, self.path))
                if route is None:
                    status, reply = 404, {"message": "not found"}
                elif callable(route):
                    status, reply = route(body, headers)
                else:
                    status, reply = route
                data = json.dumps(reply).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_DELETE = _handle

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def paths(self, method: str, path: str) -> list[Any]:
        return [body for m, p, _, body in self.requests if (m, p) == (method, path)]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def stub() -> Iterator[StubGateway]:
    gateway = StubGateway()
    yield gateway
    gateway.close()


HEARTBEAT = "/dash/api/agent/heartbeat"
FAST = {"DASH_HEARTBEAT_INTERVAL": "0.2"}


def _beat(state: str) -> tuple[int, Any]:
    return 200, {
        "name": "box",
        "owner": "alice",
        "state": state,
        "scheduler": None,
        "heartbeat_interval": 5,
    }


def test_gateway_client_errors(stub: StubGateway) -> None:
    tls_url = stub.url.replace("http://", "https://")
    with pytest.raises(
        GatewayUnreachable, match=f"cannot reach the DASH gateway at {tls_url}: TLS"
    ):
        GatewayClient(tls_url).get("dash/api/agent")
    stub.routes[("GET", "/dash/api/agent")] = (403, {"message": "unknown machine token"})
    with pytest.raises(GatewayError) as exc:
        GatewayClient(stub.url + "/", machine_token="t").get("dash/api/agent")
    assert (exc.value.status, str(exc.value)) == (403, "unknown machine token")
    with pytest.raises(GatewayError) as exc:
        GatewayClient(stub.url).get("nothing/here")
    assert str(exc.value) == "not found"
    assert GatewayClient("gw.example:8888/").url == "http://gw.example:8888"


def test_join_prints_the_gateways_refusal(stub: StubGateway, tmp_path: Path) -> None:
    sentence = "this invite was already used (machine gpu-1, at 2026-01-02T03:04:05Z)"
    stub.routes[("POST", "/dash/api/enrol")] = (403, {"message": sentence})
    done = _dash_worker(
        "join", stub.url + "/", "--token", "tok", "--cpus", "1", "--name", "box",
        "--declare-gpu", "NVIDIA GeForce RTX 4090:24GB", "--config-dir", str(tmp_path / "c"),
    )  # fmt: skip
    assert done.returncode == 1, done.stderr
    assert sentence in done.stderr
    [body] = stub.paths("POST", "/dash/api/enrol")
    assert body["invite"] == "tok" and body["name"] == "box"
    assert body["caps"]["cpus"] == 1
    assert body["hardware"]["gpus"][-1]["declared"] is True
    assert body["caps"]["gpus"] == [len(body["hardware"]["gpus"]) - 1]
    assert not (tmp_path / "c").exists()


def test_start_when_revoked(stub: StubGateway, tmp_path: Path) -> None:
    CredentialStore(tmp_path).save(_config(gateway=stub.url))
    sentence = "this machine was revoked by alice at 2026-01-02T03:04:05Z"
    stub.routes[("POST", HEARTBEAT)] = (403, {"message": sentence})
    done = _dash_worker("start", "--config-dir", str(tmp_path), env=FAST)
    assert done.returncode == 3, done.stderr
    assert sentence in done.stderr
    [(_, _, headers, body)] = stub.requests
    assert headers["X-Dash-Machine-Token"] == "secret-token"
    assert set(body) == {"utilisation", "workers", "starting"}
    assert set(body["utilisation"]) == {"cpu_percent", "memory_used", "memory_total", "gpus"}


def test_pending_then_revoked_while_running(stub: StubGateway, tmp_path: Path) -> None:
    """Waiting for approval, the agent keeps asking; a revocation then stops it (exit 3)."""
    CredentialStore(tmp_path).save(_config(gateway=stub.url))
    beats = {"n": 0}

    def heartbeat(body: Any, headers: dict[str, str]) -> tuple[int, Any]:
        beats["n"] += 1
        if beats["n"] < 4:
            return _beat("pending")
        return 403, {"message": "this machine was revoked by the operator"}

    stub.routes[("POST", HEARTBEAT)] = heartbeat
    stub.routes[("POST", "/dash/api/agent/certificate")] = (
        409,
        {"message": "waiting for an operator to approve this machine"},
    )
    done = _dash_worker("start", "--config-dir", str(tmp_path), env=FAST)
    assert done.returncode == 3, done.stderr
    assert "waiting for an operator to approve this machine" in done.stderr
    assert "revoked by the operator" in done.stderr
    csrs = stub.paths("POST", "/dash/api/agent/certificate")
    assert csrs and all("BEGIN CERTIFICATE REQUEST" in b["csr"] for b in csrs)


def test_drained_agent_exits_cleanly(stub: StubGateway, tmp_path: Path) -> None:
    CredentialStore(tmp_path).save(_config(gateway=stub.url))
    stub.routes[("POST", HEARTBEAT)] = _beat("draining")
    stub.routes[("GET", "/dash/api/agent")] = (200, {"name": "box", "current_work": 0})
    stub.routes[("POST", "/dash/api/agent/certificate")] = (409, {"message": "not yet"})
    done = _dash_worker("start", "--config-dir", str(tmp_path), env=FAST)
    assert done.returncode == 0, done.stderr
    assert "drained: machine box has no running work left" in done.stderr
    assert len(stub.paths("GET", "/dash/api/agent")) >= 2


def test_sigterm_stops_the_agent(stub: StubGateway, tmp_path: Path) -> None:
    CredentialStore(tmp_path).save(_config(gateway=stub.url))
    stub.routes[("POST", HEARTBEAT)] = _beat("pending")
    stub.routes[("POST", "/dash/api/agent/certificate")] = (409, {"message": "not yet"})
    proc = subprocess.Popen(
        [sys.executable, "-m", "dash_worker", "start", "--config-dir", str(tmp_path)],
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **FAST},
    )
    deadline = time.monotonic() + AGENT_TIMEOUT
    while len(stub.paths("POST", HEARTBEAT)) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=AGENT_TIMEOUT)
    assert proc.returncode == 0, err
    assert "stopped: the workers of box left the cluster" in err


def test_status_drain_leave(stub: StubGateway, tmp_path: Path) -> None:
    CredentialStore(tmp_path).save(_config(gateway=stub.url))
    record = {
        "name": "box",
        "owner": "alice",
        "state": "active",
        "caps": {"cpus": 4, "memory": 8 * GiB, "gpus": [0]},
        "hardware": {"gpus": [{"index": 0, "name": "NVIDIA H200"}]},
        "last_heartbeat": "2026-01-02T03:04:05Z",
        "utilisation": {"cpu_percent": 12.0, "memory_used": GiB, "memory_total": 8 * GiB},
        "workers": [
            {
                "name": "box-gpu0",
                "address": "tls://10.0.0.2:4000",
                "status": "running",
                "processing": 2,
                "resources": {"GPU": 1, "VRAM": H200, "CPU": 2, "gpu:h200": 1},
            }
        ],
        "current_work": 2,
    }
    stub.routes[("GET", "/dash/api/agent")] = (200, record)
    done = _dash_worker("status", "--config-dir", str(tmp_path))
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "box (owner alice)" in out and "active" in out
    assert "4 CPU cores, 8.00 GiB memory, GPU 0 (NVIDIA H200)" in out
    assert "2026-01-02T03:04:05Z" in out
    assert "  box-gpu0  running  2 task(s)  tls://10.0.0.2:4000  1 GPU (h200)" in out
    done = _dash_worker("status", "--json", "--config-dir", str(tmp_path))
    assert json.loads(done.stdout) == record

    stub.routes[("POST", "/dash/api/agent/drain")] = (200, {**record, "state": "draining"})
    done = _dash_worker("drain", "--config-dir", str(tmp_path))
    assert done.returncode == 0, done.stderr
    assert "Machine box is draining" in done.stderr
    assert "its 2 running task(s) finish" in done.stderr

    stub.routes[("DELETE", "/dash/api/agent")] = (200, {"name": "box", "state": "removed"})
    done = _dash_worker("leave", "--config-dir", str(tmp_path))
    assert done.returncode == 0, done.stderr
    assert "Machine box left the cluster" in done.stderr
    assert not tmp_path.exists()
