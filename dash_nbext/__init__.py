"""What a person sees: the gateway's web pages and the JupyterLab extension (assets only)."""

from __future__ import annotations

from pathlib import Path

__all__ = ["static_dir"]


def static_dir() -> Path:
    """The directory of the gateway's page assets (HTML, ES modules, CSS), served at ``/dash/static/``."""
    return Path(__file__).resolve().parent / "static"
