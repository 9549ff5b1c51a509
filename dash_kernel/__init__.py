"""DASH on the user's side: ``import dash_kernel as dk`` and ``%load_ext dash_kernel``.

>>> import dash_kernel as dk
>>> @dk.remote(gpu=1)
... def train(epochs): ...
>>> dk.map(render, frames)               # doctest: +SKIP
>>> dk.save("frames", frames); dk.load("frames")   # doctest: +SKIP
"""

from typing import Any

from ._version import __version__
from .cluster import Connection, connect, disconnect
from .errors import DashError, GatewayError, NoWorkersError
from .remote import RemoteFunction, map, remote
from .resources import ResourceSpec, ResourceSpecError, ResourceUnavailable
from .serialize import SerializationError
from .status import cluster_status
from .storage.api import datasets, load, ls, manifest, rm, save, versions
from .storage.client import CorruptChunk, SaveRecord


def load_ipython_extension(ipython: Any) -> None:
    """``%load_ext dash_kernel``: the ``%%dash`` and ``%dash`` magics."""
    # Imported here: IPython is heavy, and workers import this package without a shell.
    from .cluster import join_handed_down_cluster
    from .magics import load_ipython_extension as load

    load(ipython)
    join_handed_down_cluster()


__all__ = [
    "Connection",
    "CorruptChunk",
    "DashError",
    "GatewayError",
    "NoWorkersError",
    "RemoteFunction",
    "ResourceSpec",
    "ResourceSpecError",
    "ResourceUnavailable",
    "SaveRecord",
    "SerializationError",
    "__version__",
    "cluster_status",
    "connect",
    "datasets",
    "disconnect",
    "load",
    "load_ipython_extension",
    "ls",
    "manifest",
    "map",
    "remote",
    "rm",
    "save",
    "versions",
]
