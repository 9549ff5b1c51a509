"""``dk.save``/``dk.load`` where users call them: a kernel, ``%%dash`` cells, remote functions,
the DASH kernel's remote session, and an embedded kernel with no gateway."""

from __future__ import annotations

import os

from kernels import KernelDriver


def test_objects_saved_anywhere_load_everywhere(ipython_kernel):
    saved = ipython_kernel.execute(
        "import numpy as np, dash_kernel as dk\n"
        "record = dk.save('kernel/table', {'rows': [1, 2, 3]}, source='kernel')\n"
        "print(record.name, record.version)"
    )
    assert saved.status == "ok", saved.traceback_text()
    assert saved.stream() == "kernel/table 1\n"

    # A %%dash cell runs on a worker, with the kernel user's storage.
    cell = ipython_kernel.execute(
        "%%dash\n"
        "import dash_kernel as dk, numpy as np\n"
        "rows = dk.load('kernel/table')['rows']\n"
        "dk.save('worker/array', np.arange(sum(rows) * 1000), source='worker')\n"
        "remote_pid = __import__('os').getpid()"
    )
    assert cell.status == "ok", cell.traceback_text()

    # A remote function reads what the cell wrote; the kernel reads it too.
    check = ipython_kernel.execute(
        "total = dk.remote(lambda: int(dk.load('worker/array').sum()))()\n"
        "local = dk.load('worker/array')\n"
        "meta = {o['name']: o['metadata']['source'] for o in dk.ls('')\n"
        "        if not o['name'].startswith('sessions/')}  # DASH kernels' checkpoints\n"
        "print(total, local.shape, remote_pid != __import__('os').getpid(), sorted(meta.items()))"
    )
    assert check.status == "ok", check.traceback_text()
    assert check.stream() == (
        f"{sum(range(6000))} (6000,) True [('kernel/table', 'kernel'), ('worker/array', 'worker')]\n"
    )
    # Work that a task fans out keeps its caller's storage access.
    nested = ipython_kernel.execute(
        "pick = lambda i: int(dk.load('worker/array')[i])\n"
        "print(dk.remote(lambda: sum(dk.map(pick, [1, 2, 3], progress=False)))())"
    )
    assert nested.status == "ok", nested.traceback_text()
    assert nested.stream() == "6\n"


def test_the_dash_kernels_session_uses_the_same_storage(gateway, tmp_path):
    with KernelDriver("dash", env=gateway.env, cwd=str(tmp_path)) as kernel:
        remote = kernel.execute(
            "import dash_kernel as dk\nprint(dk.save('session/value', 41 + 1).version >= 1)",
            timeout=120,
        )
        assert remote.status == "ok", remote.traceback_text()
        assert remote.stream().endswith("True\n")
        local = kernel.execute("%%local\nimport dash_kernel as dk\nprint(dk.load('session/value'))")
        assert local.status == "ok", local.traceback_text()
        assert local.stream() == "42\n"


def test_embedded_storage_without_a_gateway(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("DASH_")}
    env["JUPYTER_DATA_DIR"] = str(tmp_path / "data")
    with KernelDriver(env=env, cwd=str(tmp_path)) as kernel:
        run = kernel.execute(
            "import dash_kernel as dk\n"
            "dk.save('notes', 'first')\n"
            "dk.save('notes', 'second')\n"
            "print(dk.load('notes'), dk.load('notes', version=1),"
            " [v['version'] for v in dk.versions('notes')])",
            timeout=120,
        )
        assert run.status == "ok", run.traceback_text()
        assert run.stream() == "second first [1, 2]\n"
    assert (tmp_path / "data" / "dash" / "storage" / "users" / "local").is_dir()
