"""With no gateway configured, ``dk`` and ``%%dash`` start an embedded cluster in the kernel."""

from __future__ import annotations

import os
import time

import psutil
import pytest
from conftest import wait_gone
from kernels import KernelDriver, dash_ipython_kernel, without_dash_env


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


# ----- work slower than the queue notice, on a cluster without DASH's scheduler plugin -----

SLOW = 5  # seconds: past the 3 s after which DASH looks for why work waits


def _bare_env(tmp_path, workers: int) -> dict[str, str]:
    """A bare Python kernel's environment: no DASH_* variable, and no ipywidgets (an
    ``ipywidgets`` that fails to import, as in an environment that lacks it)."""
    env = without_dash_env()
    env["DASH_LOCAL_WORKERS"] = str(workers)
    shadow = tmp_path / "no-ipywidgets" / "ipywidgets"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('No module named ipywidgets')\n")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(shadow.parent), env.get("PYTHONPATH")]))
    return env


@pytest.fixture(scope="module")
def bare_kernel(tmp_path_factory):
    """A plain IPython kernel with no gateway, its embedded cluster of two workers started."""
    tmp = tmp_path_factory.mktemp("bare")
    setup = "%load_ext dash_kernel\nimport time\nimport dash_kernel as dk\ndk.connect()"
    with dash_ipython_kernel(_bare_env(tmp, 2), str(tmp), setup, timeout=120) as kernel:
        yield kernel


def _ok(run) -> None:
    assert run.status == "ok", run.traceback_text()
    assert run.stream("stderr") == "", run.stream("stderr")


def test_slow_remote_call_in_a_bare_kernel(bare_kernel):
    run = bare_kernel.execute(f"dk.remote(time.sleep)({SLOW})\nprint('done')", timeout=120)
    _ok(run)
    assert run.stream() == "done\n"


def test_slow_dash_cell_in_a_bare_kernel(bare_kernel):
    run = bare_kernel.execute(f"%%dash\nimport time\ntime.sleep({SLOW})\nslept = True", timeout=120)
    _ok(run)
    assert bare_kernel.execute("print(slept)").stream() == "True\n"


def test_slow_map_in_a_bare_kernel_shows_a_text_bar_without_warning_twice(bare_kernel):
    for _ in range(2):
        run = bare_kernel.execute(f"print(dk.map(time.sleep, [{SLOW}, 1]))", timeout=120)
        _ok(run)  # no "IProgress not found" / TqdmWarning, the first time nor the second
        assert run.stream().startswith("\rsleep:"), run.stream()  # the text bar, on stdout
        assert run.stream().endswith("[None, None]\n")


def test_queued_work_says_why_on_stdout_in_a_bare_kernel(bare_kernel):
    run = bare_kernel.execute(
        "blockers = [dk.remote(time.sleep).submit(8) for _ in range(2)]\n"
        "time.sleep(1)\n"
        "print(dk.remote(abs)(-7))",
        timeout=120,
    )
    _ok(run)
    out = run.stream()
    assert out.startswith("DASH: queued: it needs any worker, and all 2 workers that can run"), out
    assert out.endswith("\n7\n") and out.count("DASH:") == 1


def test_dask_collections_compute_on_the_embedded_cluster(bare_kernel):
    run = bare_kernel.execute(
        "import dask, distributed\n"
        "import dask.array as da\n"
        "where = dask.delayed(lambda: distributed.get_worker().name)().compute()\n"
        "names = [name for name, _ in dk.connect().workers()]\n"
        "print(str(where) in names, int(da.ones((400, 400), chunks=100).sum().compute()))",
        timeout=120,
    )
    _ok(run)
    assert run.stream() == "True 160000\n"


def test_a_dask_collection_passed_to_a_remote_function_arrives_computed(bare_kernel):
    run = bare_kernel.execute(
        "import dask\n"
        "import dask.array as da\n"
        "lazy = dask.delayed(sum)([20, 21])\n"
        "print(dk.remote(lambda x, total: (x + 1, int(total)))(lazy, da.ones(8, chunks=2).sum()))",
        timeout=120,
    )
    _ok(run)
    assert run.stream() == "(42, 8)\n"


def test_disconnect_resets_dasks_default(bare_kernel):
    run = bare_kernel.execute(
        "dk.disconnect()\n"
        "try:\n"
        "    distributed.default_client()\n"
        "except ValueError:\n"
        "    print('no default client')\n"
        "print(dask.config.get('scheduler', None), int(da.ones(10).sum().compute()))",
        timeout=120,
    )
    _ok(run)
    assert run.stream() == "no default client\nNone 10\n"


def test_dash_kernel_without_a_gateway_starts_a_session_that_waits(tmp_path):
    """The "DASH distributed" kernel with no gateway at all: its session waits for a
    worker (both are busy), says so, starts, and the kernel keeps answering."""
    kernel = KernelDriver(kernel_name="dash", env=_bare_env(tmp_path, 2), cwd=str(tmp_path))
    try:
        busy = kernel.execute(
            "%%local\nimport time\nimport dash_kernel as dk\n"
            "blockers = [dk.remote(time.sleep).submit(8) for _ in range(2)]",
            timeout=120,
        )
        assert busy.status == "ok", busy.traceback_text()
        started = time.monotonic()
        first = kernel.execute("import os\nprint('in session', os.getpid())", timeout=120)
        _ok(first)
        assert time.monotonic() - started > 3  # slow enough to be asked why it waits
        out = first.stream()
        assert out.startswith("DASH: the session is queued: it needs any worker"), out
        assert "DASH: this notebook runs on worker " in out and "in session" in out
        # Dask collections in the session run on the notebook's (embedded) cluster.
        where = kernel.execute(
            "import dask, distributed\n"
            "print(dask.delayed(lambda: distributed.get_worker().name)().compute())",
            timeout=120,
        )
        _ok(where)
        names = kernel.execute("%%local\nprint(sorted(n for n, _ in dk.connect().workers()))")
        assert where.stream().strip() in names.stream(), (where.stream(), names.stream())
        assert kernel.execute("1 + 1", timeout=30).displays()[0]["data"]["text/plain"] == "2"
    finally:
        kernel.shutdown()
