"""A malformed resource spec in a real IPython kernel: ``%%dash`` and ``%dash``-style specs
are refused before anything is sent, with the one parser's message."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from kernels import KernelDriver, dash_ipython_kernel, without_dash_env


@pytest.fixture(scope="module")
def kernel(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KernelDriver]:
    """An IPython kernel with ``%load_ext dash_kernel`` and no gateway: a spec error must
    come before any connection is tried."""
    with dash_ipython_kernel(without_dash_env(), str(tmp_path_factory.mktemp("spec"))) as kernel:
        yield kernel


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ("--gpu -1", "gpu must be a whole number of GPUs ≥ 1 or a model name; got -1"),
        ("--gpu 1.5", "gpu must be a whole number of GPUs ≥ 1 or a model name; got 1.5"),
        ("--gpu 0", "gpu must be a whole number of GPUs ≥ 1 or a model name; got 0"),
        ("--cpu -2", "cpu must be a positive number of cores (such as 4 or 0.5); got -2"),
        ("--memory=-1GB", "memory must be a size above zero, such as '16GB' or '512MiB'; got -1GB"),
        ("--vram abc", "vram must be a size above zero, such as '16GB' or '512MiB'; got abc"),
    ],
)
def test_a_malformed_spec_in_a_dash_cell_is_refused(kernel: KernelDriver, options, message):
    result = kernel.execute(f"%%dash {options}\nx = 1\n", timeout=60)
    assert result.status == "error"
    assert result.error["ename"] == "ResourceSpecError", result.traceback_text()
    assert result.error["evalue"] == message
    # Refused before running anything: the cell's assignment did not happen anywhere.
    assert kernel.execute("print('x' in dir())").stream() == "False\n"
