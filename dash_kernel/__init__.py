"""DASH on the user's side: ``import dash_kernel as dk`` and ``%load_ext dash_kernel``.

>>> import dash_kernel as dk
>>> @dk.remote(gpu=1)
... def train(epochs): ...
>>> dk.map(render, frames)               # doctest: +SKIP
"""

from ._version import __version__
from .cluster import Connection, connect, disconnect
from .errors import DashError, GatewayError, NoWorkersError
from .magics import load_ipython_extension
from .remote import RemoteFunction, map, remote
from .resources import ResourceSpec, ResourceSpecError, ResourceUnavailable
from .serialize import SerializationError
from .status import cluster_status

__all__ = [
    "Connection",
    "DashError",
    "GatewayError",
    "NoWorkersError",
    "RemoteFunction",
    "ResourceSpec",
    "ResourceSpecError",
    "ResourceUnavailable",
    "SerializationError",
    "__version__",
    "cluster_status",
    "connect",
    "disconnect",
    "load_ipython_extension",
    "map",
    "remote",
]
