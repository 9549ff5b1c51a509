"""``cell_roundtrip`` and ``startup``: the DASH distributed kernel against a local ipykernel."""

from __future__ import annotations

from .harness import Benchmark

_NOT_BUILT = (
    "the DASH distributed kernel (cells relayed to a remote session on a worker) is not "
    "built yet; it comes with a later issue"
)

CELL_ROUNDTRIP = Benchmark(
    id="cell_roundtrip",
    what="a trivial cell in the DASH kernel (remote session) vs in a local ipykernel, "
    "execute_request to idle",
    unit="ms",
    baseline_name="local ipykernel",
    missing=_NOT_BUILT,
)

STARTUP = Benchmark(
    id="startup",
    what="kernel start to the first cell's result: DASH kernel (remote session) vs a local "
    "ipykernel",
    unit="s",
    baseline_name="local ipykernel",
    missing=_NOT_BUILT,
)
