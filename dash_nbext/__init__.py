"""What a person sees: the gateway's web pages and the JupyterLab extension (assets only)."""

from __future__ import annotations

from pathlib import Path

__all__ = ["LABEXTENSION_NAME", "static_dir"]

# The prebuilt JupyterLab extension's package name: JupyterLab finds it as
# <labextensions path>/<name>/package.json (a wheel installs it in share/jupyter/labextensions).
LABEXTENSION_NAME = "dash-distributed-jupyterlab"


def static_dir() -> Path:
    """The directory of the gateway's page assets (HTML, ES modules, CSS), served at ``/dash/static/``."""
    return Path(__file__).resolve().parent / "static"


def _jupyter_labextension_paths() -> list[dict[str, str]]:
    # `jupyter labextension develop` links the source tree's build in from here.
    return [{"src": f"labextension/prebuilt/{LABEXTENSION_NAME}", "dest": LABEXTENSION_NAME}]
