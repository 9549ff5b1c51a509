"""The wheel: every module, the pages' assets, the kernelspec and the JupyterLab extension,
where an installed Python and Jupyter look for them (tests otherwise use the source tree)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("dash_kernel", "dash_gateway", "dash_worker", "dash_nbext")


LEFTOVERS = (
    "build",
    "*.egg-info",
    ".venv",
    ".git",
    "node_modules",
    "test-artifacts",
    "__pycache__",
)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A wheel built from a copy of this checkout's sources (a build/ directory left in
    the checkout by an earlier build would hide what pyproject.toml leaves out)."""
    source = tmp_path_factory.mktemp("source") / "dash"
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(*LEFTOVERS))
    out = tmp_path_factory.mktemp("wheel")
    command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(source)]
    subprocess.run(command, check=True, capture_output=True)
    [path] = out.glob("dash_distributed-*.whl")
    return path


@pytest.fixture(scope="module")
def wheel(built: Path) -> list[str]:
    """The names in the wheel."""
    with zipfile.ZipFile(built) as archive:
        return archive.namelist()


def test_every_module_is_in_the_wheel(wheel: list[str]) -> None:
    expected = {
        f"{name}/{path.relative_to(REPO / name).as_posix()}"
        for name in PACKAGES
        for path in (REPO / name).rglob("*.py")
        if "node_modules" not in path.parts
    }
    missing = sorted(expected - set(wheel))
    assert not missing, f"pyproject.toml leaves these out of the wheel: {missing}"


def test_the_pages_and_the_lab_extension_are_in_the_wheel(wheel: list[str]) -> None:
    static = {p.name for p in (REPO / "dash_nbext" / "static").iterdir()}
    assert static == {n.rpartition("/")[2] for n in wheel if n.startswith("dash_nbext/static/")}
    prebuilt = REPO / "dash_nbext" / "labextension" / "prebuilt"
    for path in prebuilt.rglob("*"):
        if path.is_file():
            name = f"share/jupyter/labextensions/{path.relative_to(prebuilt).as_posix()}"
            assert any(n.endswith(name) for n in wheel), name


def test_the_wheel_installs_the_kernelspec(built: Path, wheel: list[str]) -> None:
    [spec_path] = [n for n in wheel if n.endswith("share/jupyter/kernels/dash/kernel.json")]
    for logo in ("logo-32x32.png", "logo-64x64.png", "logo-svg.svg"):
        assert any(n.endswith(f"share/jupyter/kernels/dash/{logo}") for n in wheel)
    with zipfile.ZipFile(built) as archive:
        spec = json.loads(archive.read(spec_path))
    assert spec["display_name"] == "DASH distributed"
    assert spec["language"] == "python"
    assert spec["interrupt_mode"] == "signal"
    # VS Code accepts python kernels whose argv is [python, -m, module, ...]
    assert spec["argv"][:3] == ["python", "-m", "dash_kernel"]


def _jupyter(*args: str) -> str:
    """What a ``jupyter`` subcommand of this environment prints (``--json`` output alone on
    stdout; the extension lists print to stderr)."""
    done = subprocess.run(
        [sys.executable, "-m", "jupyter", *args], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    return done.stdout if "--json" in args else done.stdout + done.stderr


def test_this_install_is_visible_to_every_jupyter_tool() -> None:
    """The environment the tests run in is the README's development install
    (``pip install -e``): Jupyter must find DASH's kernelspec, server extension and Lab
    extension there exactly as in a wheel install, with no JUPYTER_PATH help."""
    assert "JUPYTER_PATH" not in os.environ
    specs = json.loads(_jupyter("kernelspec", "list", "--json"))["kernelspecs"]
    assert specs["dash"]["spec"]["display_name"] == "DASH distributed"
    assert re.search(r"dash_gateway\s+\S*enabled", _jupyter("server", "extension", "list"))
    assert re.search(
        r"dash-distributed-jupyterlab v\S+\s+\S*enabled", _jupyter("labextension", "list")
    )


def test_dash_itself_is_never_shipped_as_user_code() -> None:
    """Functions from the user's own modules travel by value; DASH's, which every worker
    has, never do, however it was installed (an editable install's metadata names only
    a .pth file)."""
    done = subprocess.run(
        [sys.executable, "-c", "import benchmarks.tasks, dash_gateway, dash_worker\n"
         "from dash_kernel.serialize import _user_modules\n"
         "print(sorted(m.__name__ for m in _user_modules()))"],
        capture_output=True, text=True, cwd=REPO, timeout=120, check=True,
    )  # fmt: skip
    assert done.stdout.strip() == "['benchmarks']", done.stdout + done.stderr
