"""Informational notices go to stdout, and warnings are said once, in a real kernel."""

from __future__ import annotations

import os

from kernels import KernelDriver


def test_a_version_mismatch_is_one_line_once_per_process(gateway, tmp_path):
    # This kernel's environment has another toolz (by its installed metadata) than the
    # gateway's scheduler and workers: a real mismatch, as Dask sees it.
    site = tmp_path / "site"
    (site / "toolz-0.0.1.dist-info").mkdir(parents=True)
    (site / "toolz-0.0.1.dist-info" / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: toolz\nVersion: 0.0.1\n"
    )
    env = dict(
        gateway.env,
        PYTHONPATH=os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")])),
    )
    kernel = KernelDriver(env=env, cwd=str(tmp_path))
    try:
        first = kernel.execute("import dash_kernel as dk\nprint(dk.connect().mode)", timeout=120)
        assert first.status == "ok", first.traceback_text()
        assert first.stream() == "gateway\n"
        [note] = first.stream("stderr").splitlines()
        assert note.startswith("DASH: package versions differ between this process and its cluster")
        assert "toolz 0.0.1 (scheduler " in note
        again = kernel.execute(
            "dk.disconnect()\nprint(dk.connect().mode, sum(dk.map(abs, [-1, -2], progress=False)))",
            timeout=120,
        )
        assert again.status == "ok", again.traceback_text()
        assert again.stream() == "gateway 3\n"
        assert again.stream("stderr") == ""  # once per process
    finally:
        kernel.shutdown()
