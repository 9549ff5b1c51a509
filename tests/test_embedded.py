"""With no gateway configured, ``dk`` and ``%%dash`` start an embedded cluster in the kernel."""

from __future__ import annotations

import os

import psutil
from conftest import wait_gone
from kernels import KernelDriver


def test_embedded_cluster_runs_magics_and_map_and_leaves_nothing_behind(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("DASH_")}
    env["DASH_LOCAL_WORKERS"] = "2"
    kernel = KernelDriver(env=env, cwd=str(tmp_path))
    try:
        setup = kernel.execute(
            "%load_ext dash_kernel\nimport dash_kernel as dk\nx = 20", timeout=120
        )
        assert setup.status == "ok", setup.traceback_text()
        run = kernel.execute(
            "%%dash\nimport os\ny = x + 1\nprint('remote', os.getpid() != parent)".replace(
                "parent", str(kernel.manager.provisioner.pid)
            ),
            timeout=120,
        )
        assert run.status == "ok", run.traceback_text()
        assert run.stream() == "remote True\n"
        check = kernel.execute("print(y, dk.connect().mode, len(dk.connect().workers()))")
        assert check.stream() == "21 embedded 2\n"
        mapped = kernel.execute("print(sum(dk.map(abs, range(-50, 50), progress=False)))")
        assert mapped.stream() == "2500\n"
        status = kernel.execute("%dash status").of_type("execute_result")[0]["content"]["data"]
        assert "embedded cluster (this process)" in status["text/plain"]
        workers = psutil.Process(kernel.manager.provisioner.pid).children(recursive=True)
        assert len(workers) >= 2  # the embedded cluster's worker processes
    finally:
        kernel.shutdown()
    assert not wait_gone(workers, timeout=20), "embedded workers outlived their kernel"
