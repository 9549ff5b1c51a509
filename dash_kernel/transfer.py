"""Moving named variables between a notebook and its remote session (``%dash push/pull``).

Values travel through the cluster, not through the Jupyter relay: the sender pickles each
variable (naming those that cannot be), scatters the bundle to a worker and publishes it
under a one-time dataset name; the receiver takes it and the sender unpublishes it. The
functions here run in whichever kernel sends or receives, local or remote.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, MutableMapping
from typing import Any

from .cluster import Connection, connect
from .serialize import dumps_names, loads_names

__all__ = ["publish_names", "receive_names"]


def publish_names(
    conn: Connection, namespace: MutableMapping[str, Any], names: Iterable[str], key: str
) -> dict[str, Any]:
    """Publish ``names`` from ``namespace`` as ``key``.

    Returns ``{"sent": [...], "unpicklable": {name: why}, "missing": [...]}``.
    """
    names = list(names)
    missing = [n for n in names if n not in namespace]
    payload, unpicklable = dumps_names(namespace, names, strict=False)
    [future] = conn.client.scatter([payload], hash=False)  # one bundle, not one per name
    conn.client.publish_dataset(future, name=key)
    return {"sent": sorted(payload), "unpicklable": unpicklable, "missing": missing}


def receive_names(
    conn: Connection, namespace: MutableMapping[str, Any], key: str
) -> dict[str, Any]:
    """Take the variables published as ``key`` into ``namespace``."""
    payload = conn.client.get_dataset(key).result()
    values, failures = loads_names(payload)
    namespace.update(values)
    return {"received": sorted(values), "failed": failures}


def remote_publish(key: str, names: list[str]) -> str:
    """Run in the remote kernel by ``%dash pull``; JSON for the caller."""
    from IPython import get_ipython

    return json.dumps(publish_names(connect(), get_ipython().user_ns, names, key))


def remote_receive(key: str) -> str:
    """Run in the remote kernel by ``%dash push``; JSON for the caller."""
    from IPython import get_ipython

    return json.dumps(receive_names(connect(), get_ipython().user_ns, key))
