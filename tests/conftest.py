"""Shared fixtures: a real ``dash-gateway`` (scheduler and local workers included) for the tests."""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import pytest

# Headless Chromium for the browser tests (the ``browser`` fixture; helpers in browser.py).
pytest_plugins = ("browser",)

START_TIMEOUT = 60.0
STOP_TIMEOUT = 30.0
CLI_TIMEOUT = 120.0


def free_port() -> int:
    """A TCP port on the loopback interface that is free right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def alive(procs: list[psutil.Process]) -> list[psutil.Process]:
    """Those of ``procs`` still running (a zombie has exited; it only awaits reaping)."""
    out = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except psutil.NoSuchProcess:
            pass
    return out


def wait_gone(procs: list[psutil.Process], timeout: float) -> list[psutil.Process]:
    """Wait up to ``timeout`` seconds for ``procs`` to exit; return those still running."""
    deadline = time.monotonic() + timeout
    while alive(procs) and time.monotonic() < deadline:
        time.sleep(0.1)
    return alive(procs)


def _cmdline(proc: psutil.Process) -> str:
    try:
        return " ".join(proc.cmdline())
    except psutil.Error:
        return f"pid {proc.pid} (gone)"


def wait_until(condition: Callable[[], Any], timeout: float = 30, what: str = "") -> Any:
    """Poll ``condition`` until it returns something true (returned), or fail the test
    after ``timeout`` seconds saying what was awaited."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    pytest.fail(f"timed out after {timeout:.0f}s waiting for {what or condition}")


def token_from(output: str) -> str:
    """The token ``dash-gateway users add`` prints on a line of its own."""
    found = re.findall(r"^\s+([A-Za-z0-9_-]{40,})\s*$", output, re.MULTILINE)
    assert len(found) == 1, output
    return found[0]


@dataclass
class Gateway:
    """A running ``dash-gateway`` subprocess and how to talk to it."""

    url: str
    token: str
    data_dir: Path
    log_path: Path
    process: subprocess.Popen[bytes]
    env: dict[str, str] = field(default_factory=dict)

    def call(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        token: str | None = "",
        headers: dict[str, str] | None = None,
    ) -> tuple[int, Any]:
        """``method path`` (relative to the server URL) with a JSON ``body``, as the operator
        (``token=""``), with another token, or with none (``token=None``).

        Returns ``(status code, parsed JSON or text)``.
        """
        headers = {"Content-Type": "application/json", **(headers or {})}
        if token is not None:
            headers["Authorization"] = f"token {token or self.token}"
        data = None if body is None else json.dumps(body).encode()
        if data is None and method in ("POST", "PUT", "PATCH"):
            data = b""
        req = urllib.request.Request(
            self.url + path.lstrip("/"), data=data, headers=headers, method=method
        )
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                code, text = resp.status, resp.read().decode()
        except urllib.error.HTTPError as exc:
            code, text = exc.code, exc.read().decode()
        try:
            return code, json.loads(text)
        except ValueError:
            return code, text

    def request(self, path: str, token: str | None = "") -> tuple[int, Any]:
        """``GET path``; see :meth:`call`."""
        return self.call("GET", path, token=token)

    def status(self) -> dict[str, Any]:
        """``GET /dash/api/status`` with the right token."""
        code, body = self.request("dash/api/status")
        assert code == 200, (code, body)
        return body

    def cluster(self) -> dict[str, Any]:
        """``GET /dash/api/cluster`` with the right token."""
        code, body = self.request("dash/api/cluster")
        assert code == 200, (code, body)
        return body

    def invite(self, token: str | None = "", **body: Any) -> dict[str, Any]:
        """A fresh invite (``POST /dash/api/invites``) made by the operator or ``token``'s user."""
        code, reply = self.call("POST", "dash/api/invites", body, token=token)
        assert code == 201, (code, reply)
        return reply

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        """Run ``dash-gateway ARGS`` against this gateway's data directory."""
        return self.cli_many(args)[0]

    def cli_many(self, *commands: tuple[str, ...]) -> list[subprocess.CompletedProcess[str]]:
        """Run ``dash-gateway`` commands (``("users", "add", "bob")``, ...) against this
        gateway's data directory, concurrently (each starts slowly)."""
        env = dict(os.environ, JUPYTER_CONFIG_DIR=str(self.log_path.parent / "jupyter-config"))
        procs = [
            (
                argv := [
                    sys.executable,
                    "-m",
                    "dash_gateway",
                    *args,
                    f"--data-dir={self.data_dir}",
                ],
                subprocess.Popen(
                    argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
                ),
            )
            for args in commands
        ]
        results = []
        for argv, proc in procs:
            out, err = proc.communicate(timeout=CLI_TIMEOUT)
            results.append(subprocess.CompletedProcess(argv, proc.returncode, out, err))
        return results

    def add_users(self, *names: str) -> dict[str, str]:
        """Create accounts with ``dash-gateway users add``; return their tokens."""
        tokens = {}
        for name, result in zip(
            names, self.cli_many(*(("users", "add", n) for n in names)), strict=True
        ):
            assert result.returncode == 0, result.stderr
            tokens[name] = token_from(result.stdout)
        return tokens

    def machines(self) -> dict[str, dict[str, Any]]:
        """``GET /dash/api/workers`` by machine name."""
        code, reply = self.request("dash/api/workers")
        assert code == 200, (code, reply)
        return {m["name"]: m for m in reply["workers"]}

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def descendants(self) -> list[psutil.Process]:
        try:
            return psutil.Process(self.process.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []

    def wait_for_workers(self, n: int, timeout: float = START_TIMEOUT) -> dict[str, Any]:
        """Poll the status until the cluster is running with ``n`` workers; fail with the log if not."""
        deadline = time.monotonic() + timeout
        last: Any = None
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(
                    f"dash-gateway exited with {self.process.returncode}:\n{self.log()[-8000:]}"
                )
            try:
                code, last = self.request("dash/api/status")
            except OSError as exc:  # not listening yet
                code, last = 0, repr(exc)
            if code == 200 and len(last["workers"]) >= n and last.get("state") == "running":
                return last
            time.sleep(0.2)
        pytest.fail(
            f"dash-gateway did not list {n} workers within {timeout:.0f}s "
            f"(last status: {last!r}):\n{self.log()[-8000:]}"
        )

    def stop(
        self, sig: int = signal.SIGTERM, timeout: float = STOP_TIMEOUT, *, keeps: bool = False
    ) -> None:
        """Send ``sig``, wait for the gateway to exit, and assert no descendant is left
        (unless it ``keeps`` users' clusters running for the next gateway to adopt)."""
        procs = [] if keeps else self.descendants()
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
                pytest.fail(
                    f"dash-gateway ignored {sig!r} for {timeout:.0f}s:\n{self.log()[-8000:]}"
                )
        left = wait_gone(procs, timeout=15)
        described = [_cmdline(p) for p in left]
        for p in left:
            with contextlib.suppress(psutil.Error):
                p.kill()
        assert not left, f"processes left behind: {described}"


def _default_sigint() -> None:
    # As from a terminal: Ctrl-C stops the gateway, even when the test process ignores
    # SIGINT (a child inherits an ignored signal, and Python then keeps it ignored).
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def launch_gateway(
    tmp: Path,
    *,
    local_workers: int = 2,
    worker_memory_limit: str = "1GB",
    data_dir: Path | None = None,
    extra: list[str] = (),
    port: int | None = None,
    token: str | None = None,
) -> Gateway:
    """Start ``dash-gateway`` on a loopback port (a free one unless given) with a random
    token (unless given); don't wait."""
    tmp.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    token = token or secrets.token_hex(16)
    data_dir = data_dir or tmp / "data"
    log_path = tmp / "gateway.log"
    argv = [
        sys.executable, "-m", "dash_gateway",
        "--no-browser",
        "--ip=127.0.0.1",
        f"--port={port}",
        "--ServerApp.port_retries=0",
        f"--IdentityProvider.token={token}",
        f"--ServerApp.root_dir={tmp}",
        f"--local-workers={local_workers}",
        f"--data-dir={data_dir}",
        f"--worker-memory-limit={worker_memory_limit}",
        *extra,
    ]  # fmt: skip
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        argv.append("--allow-root")
    env = dict(os.environ)
    # Keep the user's Jupyter config and runtime files out of the test.
    env["JUPYTER_CONFIG_DIR"] = str(tmp / "jupyter-config")
    env["JUPYTER_RUNTIME_DIR"] = str(tmp / "jupyter-runtime")
    for name in ("DASH_GATEWAY_URL", "DASH_TOKEN"):
        env.pop(name, None)
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(
            argv,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            preexec_fn=_default_sigint,
        )
    url = f"http://127.0.0.1:{port}/"
    kernel_env = dict(os.environ, DASH_GATEWAY_URL=url, DASH_TOKEN=token)
    return Gateway(
        url=url, token=token, data_dir=data_dir, log_path=log_path, process=process, env=kernel_env
    )


@pytest.fixture(scope="session")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    """One real gateway for the session: 2 local workers, random token, its own data dir.

    Teardown stops it with SIGTERM and asserts that it and all its descendants are gone.
    """
    gw = launch_gateway(tmp_path_factory.mktemp("gateway"), local_workers=2)
    try:
        gw.wait_for_workers(2)
        yield gw
    finally:
        gw.stop()


@pytest.fixture(scope="module")
def bare_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    """A gateway without local workers, one per test module: every worker is a joined one."""
    gw = launch_gateway(tmp_path_factory.mktemp("bare-gateway"), local_workers=0)
    try:
        gw.wait_for_workers(0)
        yield gw
    finally:
        gw.stop()


@pytest.fixture(scope="module")
def by_value(request: pytest.FixtureRequest) -> Iterator[None]:
    """Ship the test module's own functions by value while it runs (and only then: other
    modules check that the registry is left empty)."""
    import cloudpickle

    cloudpickle.register_pickle_by_value(request.module)
    yield
    cloudpickle.unregister_pickle_by_value(request.module)


# A per-user gateway's pool: two local worker slots (and 8 session slots) for two users.
TENANT_SLOTS = 2


@pytest.fixture(scope="module")
def tenant_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    """A gateway with a cluster per user on workers leased from its local slots, one per
    test module; leases idle for 3 s go back to the pool."""
    gw = launch_gateway(
        tmp_path_factory.mktemp("tenant-gateway"),
        local_workers=TENANT_SLOTS,
        worker_memory_limit="768MB",
        extra=["--tenancy=per-user", "--DashGateway.lease_idle_timeout=3"],
    )
    try:
        gw.wait_for_workers(0)
        yield gw
    finally:
        gw.stop()


@pytest.fixture
def gateway_factory(tmp_path: Path) -> Iterator[Callable[..., Gateway]]:
    """Start extra gateways for a test (e.g. to stop them); whatever is left is stopped after."""
    started: list[Gateway] = []

    def start(**kwargs: Any) -> Gateway:
        gw = launch_gateway(tmp_path / f"gw{len(started)}", **kwargs)
        started.append(gw)
        return gw

    yield start
    for gw in started:
        gw.stop()


@pytest.fixture(scope="module")
def ipython_kernel(gateway: Gateway, tmp_path_factory: pytest.TempPathFactory):
    """A real IPython kernel started as the gateway starts kernels (DASH_* set), with
    ``%load_ext dash_kernel`` already run. One per test module, shut down after it."""
    from kernels import dash_ipython_kernel

    with dash_ipython_kernel(gateway.env, str(tmp_path_factory.mktemp("kernel"))) as kernel:
        yield kernel


@dataclass
class Contributor:
    """A ``dash-worker`` agent process (``join`` or ``start``) with its own config dir."""

    name: str
    config_dir: Path
    log_path: Path
    process: subprocess.Popen[bytes]

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_exit(self, timeout: float = 30) -> int:
        """Wait for the agent to exit by itself; return its status."""
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"dash-worker did not exit within {timeout:.0f}s:\n{self.log()[-6000:]}")

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """SIGTERM the agent and assert that it and its worker processes are gone."""
        try:
            procs = psutil.Process(self.process.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            procs = []
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
                pytest.fail(f"dash-worker ignored SIGTERM:\n{self.log()[-6000:]}")
        left = wait_gone(procs, timeout=15)
        described = [_cmdline(p) for p in left]
        for p in left:
            with contextlib.suppress(psutil.Error):
                p.kill()
        assert not left, f"processes left behind: {described}"


def run_dash_worker(tmp: Path, *args: str, name: str = "agent") -> Contributor:
    """Start ``python -m dash_worker ARGS`` with ``--config-dir`` under ``tmp``; don't wait."""
    tmp.mkdir(parents=True, exist_ok=True)
    config_dir = tmp / f"{name}-config"
    log_path = tmp / f"{name}.log"
    env = dict(os.environ, DASH_HEARTBEAT_INTERVAL="0.5")
    for var in ("DASH_GATEWAY_URL", "DASH_TOKEN"):
        env.pop(var, None)
    with open(log_path, "ab") as log_file:
        process = subprocess.Popen(
            [sys.executable, "-m", "dash_worker", *args, "--config-dir", str(config_dir)],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
        )
    return Contributor(name=name, config_dir=config_dir, log_path=log_path, process=process)


@pytest.fixture
def contributors(tmp_path: Path) -> Iterator[Callable[..., Contributor]]:
    """Start ``dash-worker`` agents for a test: ``contributors(gateway, "--name", "rig", ...)``
    joins with a fresh invite; every agent still running afterwards is stopped and checked."""
    started: list[Contributor] = []

    def join(gw: Gateway, *args: str, invite: dict[str, Any] | None = None) -> Contributor:
        invite = invite or gw.invite()
        name = args[args.index("--name") + 1] if "--name" in args else f"agent{len(started)}"
        agent = run_dash_worker(
            tmp_path, "join", gw.url, "--token", invite["token"], *args, name=name
        )
        started.append(agent)
        return agent

    yield join
    for agent in started:
        agent.stop()
