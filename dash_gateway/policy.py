"""The cluster policy file: which machines may have workers in the cluster, and in what state.

The gateway writes it (atomically) whenever the worker registry changes; the scheduler's
:mod:`dash_gateway.scheduler_plugin` re-reads it within a second and enforces it. A file,
rather than a message, so the policy survives a scheduler or gateway restart by itself.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dash_kernel.files import write_atomic

__all__ = ["LOCAL_MACHINE", "MACHINE_STATES", "ClusterPolicy", "read_policy", "write_policy"]

POLICY_FILE = "cluster-policy.json"
# The certificate common name, and worker-name prefix, of the gateway's own local workers.
LOCAL_MACHINE = "local"
MACHINE_STATES = ("pending", "active", "paused", "draining", "offline", "revoked")
# Machines in these states may keep workers in the cluster (paused and draining ones take
# no new work); any other state, or a machine missing from the policy, may not.
ADMITTED_STATES = ("active", "paused", "draining", "offline")
NO_NEW_WORK_STATES = ("paused", "draining")


@dataclass(frozen=True)
class ClusterPolicy:
    """``machines`` maps a machine name to its state; ``revoked_serials`` holds the serial
    numbers (upper-case hex, as ``ssl.getpeercert()`` writes them) of revoked certificates."""

    machines: Mapping[str, str] = field(default_factory=dict)
    revoked_serials: frozenset[str] = frozenset()

    def admits(self, machine: str) -> bool:
        """May a worker of ``machine`` be in the cluster at all?"""
        return machine == LOCAL_MACHINE or self.machines.get(machine) in ADMITTED_STATES

    def takes_new_work(self, machine: str) -> bool:
        return self.admits(machine) and self.machines.get(machine) not in NO_NEW_WORK_STATES

    def to_json(self) -> dict[str, Any]:
        return {"machines": dict(self.machines), "revoked_serials": sorted(self.revoked_serials)}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ClusterPolicy:
        machines = {str(k): str(v) for k, v in (data.get("machines") or {}).items()}
        serials = frozenset(normalize_serial(s) for s in data.get("revoked_serials") or ())
        return cls(machines=machines, revoked_serials=serials)


def normalize_serial(serial: int | str) -> str:
    """A certificate serial number as upper-case hex without leading zeros."""
    if isinstance(serial, int):
        return format(serial, "X")
    return serial.strip().upper().lstrip("0") or "0"


def policy_path(data_dir: str | os.PathLike[str]) -> Path:
    return Path(data_dir) / POLICY_FILE


def write_policy(
    path: str | os.PathLike[str], machines: Mapping[str, str], revoked_serials: Iterable[int | str]
) -> None:
    """Atomically replace the policy file (readers never see half of it)."""
    path = Path(path)
    policy = ClusterPolicy(
        machines=dict(machines),
        revoked_serials=frozenset(normalize_serial(s) for s in revoked_serials),
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps(policy.to_json()))


def read_policy(path: str | os.PathLike[str]) -> ClusterPolicy:
    """The policy in ``path``; a missing file admits only the gateway's local workers."""
    try:
        return ClusterPolicy.from_json(json.loads(Path(path).read_text()))
    except FileNotFoundError:
        return ClusterPolicy()
