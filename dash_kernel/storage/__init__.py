"""DASH object storage: content-addressed chunks plus named, versioned manifests.

Layout inside a backend (a local directory or an S3 prefix)::

    users/<user>/chunks/<sha256 hex>                     raw chunk bytes
    users/<user>/objects/<name>/<version as %010d>.json  manifest

Kernels and workers reach it through a :class:`~.transport.Transport`: directly on a
backend in embedded mode (and inside the gateway), or through the gateway's HTTP API.
"""

from .backends import AlreadyExists, Backend, NotFound, StorageError, describe, open_backend

__all__ = [
    "AlreadyExists",
    "Backend",
    "NotFound",
    "StorageError",
    "describe",
    "open_backend",
]
