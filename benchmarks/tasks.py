"""The work the benchmarks send to workers and engines: no-ops, an echo, a CPU-bound frame."""

from __future__ import annotations

from typing import Any


def noop(item: Any) -> Any:
    """Return ``item``: a task that costs only its scheduling."""
    return item


def identity(value: Any) -> Any:
    """Return ``value`` unchanged, so a transfer goes there and back."""
    return value


def spin(iterations: int) -> int:
    """Busy-loop ``iterations`` times: CPU work that a sleep could not stand in for."""
    total = 0
    for i in range(iterations):
        total += i
    return total
