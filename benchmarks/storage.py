"""``storage``: ``dk.save``/``dk.load`` of a dataset against plain object-store puts and gets."""

from __future__ import annotations

from .harness import Benchmark

STORAGE = Benchmark(
    id="storage",
    what="dk.save then dk.load of a dataset vs boto3 put_object/get_object on the same store",
    unit="s",
    baseline_name="boto3 put/get",
    missing="object storage (dk.save / dk.load) is not built yet; it comes with a later issue",
)
