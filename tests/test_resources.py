"""The one resource-spec parser, and the feasibility check built on it."""

import pytest

from dash_kernel.resources import (
    ResourceSpec,
    ResourceSpecError,
    ResourceUnavailable,
    check_satisfiable,
    describe_wait,
    gpu_model_tokens,
    placement_restrictions,
    worker_resources,
)

GiB = 2**30


def test_counts_sizes_and_models_become_dask_resources():
    assert ResourceSpec.parse(gpu=1).to_dask() == {"GPU": 1}
    assert ResourceSpec.parse(gpu="2").to_dask() == {"GPU": 2}
    assert ResourceSpec.parse(cpu=4, memory="16GB").to_dask() == {"CPU": 4, "MEMORY": 16 * 10**9}
    assert ResourceSpec.parse(vram="24GiB").to_dask() == {"VRAM": 24 * GiB}
    assert ResourceSpec.parse(gpu="A100").to_dask() == {"GPU": 1, "gpu:a100": 1}
    assert ResourceSpec.parse(gpu="RTX 4090").to_dask() == {"GPU": 1, "gpu:rtx": 1, "gpu:4090": 1}
    assert not ResourceSpec.parse()


def test_string_form_is_the_same_parser():
    assert ResourceSpec.from_string("gpu=1 memory=16GB") == ResourceSpec.parse(gpu=1, memory="16GB")
    assert ResourceSpec.from_string("cpu=2, vram=8GB") == ResourceSpec.parse(cpu=2, vram="8GB")
    assert ResourceSpec.coerce({"gpu": "A100"}) == ResourceSpec.parse(gpu="A100")


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"gpu": -1}, "gpu must not be negative"),
        ({"gpu": 1.5}, "gpu must be a count"),
        ({"cpu": 0}, "cpu must be a positive"),
        ({"cpu": "many"}, "cpu must be a number"),
        ({"memory": "lots"}, "memory must be a size"),
        ({"vram": 0}, "vram must be positive"),
    ],
)
def test_malformed_specs_name_the_field(kwargs, fragment):
    with pytest.raises(ResourceSpecError, match=fragment):
        ResourceSpec.parse(**kwargs)


def test_unknown_keys_are_refused():
    with pytest.raises(ResourceSpecError, match="cannot read 'gpus=1'"):
        ResourceSpec.from_string("gpus=1")
    with pytest.raises(ResourceSpecError, match="unknown resource 'disk'"):
        ResourceSpec.coerce({"disk": "1TB"})


def test_model_tokens_drop_vendor_words():
    assert gpu_model_tokens("NVIDIA A100-SXM4-80GB") == ["a100", "sxm4", "80gb"]


def test_a_worker_with_a_gpu_declares_what_a_model_spec_asks_for():
    declared = worker_resources(1, 8 * GiB, gpu_model="NVIDIA GeForce RTX 4090", vram=24 * GiB)
    spec = ResourceSpec.parse(gpu="RTX 4090", vram="20GiB")
    check_satisfiable(spec, [("box", declared)])  # does not raise
    for key, amount in spec.to_dask().items():
        assert declared[key] >= amount


def test_impossible_spec_names_the_closest_worker_and_what_it_has():
    workers = [
        ("cpu-only", worker_resources(4, 16 * GiB)),
        ("small-gpu", worker_resources(1, 8 * GiB, gpu_model="NVIDIA T4", vram=16 * GiB)),
    ]
    with pytest.raises(ResourceUnavailable) as info:
        check_satisfiable(ResourceSpec.parse(gpu=1, vram="40GB"), workers)
    message = str(info.value)
    assert "Closest worker: small-gpu" in message
    assert "VRAM 37.25 GiB asked, it has 16.00 GiB" in message
    assert "2 worker(s) connected" in message


def test_no_workers_at_all_is_reported():
    with pytest.raises(ResourceUnavailable, match="no workers are connected"):
        check_satisfiable(ResourceSpec.parse(cpu=1), [])


def test_work_without_a_gpu_is_placed_on_cpu_workers_only():
    assert placement_restrictions(None) == {"pool:cpu": 1}
    assert placement_restrictions({"CPU": 4}) == {"CPU": 4, "pool:cpu": 1}
    for gpu_work in ({"GPU": 1}, {"VRAM": 20 * GiB}, {"GPU": 1, "gpu:a100": 1}):
        assert placement_restrictions(gpu_work) == gpu_work
    assert "pool:cpu" in worker_resources(2, 4 * GiB)
    assert "pool:cpu" not in worker_resources(2, 4 * GiB, gpu_model="NVIDIA A100", vram=GiB)


def test_a_cluster_of_gpu_workers_cannot_run_cpu_work():
    gpu_only = [("m-gpu0", worker_resources(2, 8 * GiB, gpu_model="NVIDIA L4", vram=24 * GiB))]
    check_satisfiable(ResourceSpec.parse(gpu=1), gpu_only)
    with pytest.raises(ResourceUnavailable, match="GPU workers take only work that asks for a GPU"):
        check_satisfiable(ResourceSpec.parse(), gpu_only)


def _row(name, resources, used=None, status="running", processing=0, nthreads=2):
    return {
        "name": name,
        "status": status,
        "nthreads": nthreads,
        "processing": processing,
        "resources": resources,
        "used_resources": used or {},
    }


def test_describe_wait_names_the_busy_workers_and_why():
    l4 = worker_resources(2, 8 * GiB, gpu_model="NVIDIA L4", vram=24 * GiB)
    cpu = worker_resources(4, 16 * GiB)
    spec = ResourceSpec.parse(vram="16GiB")
    free = [_row("m-gpu0", l4), _row("m-cpu", cpu)]
    assert describe_wait(spec, free) is None
    vram_full = [_row("m-gpu0", l4, used={"VRAM": 16 * GiB}, processing=1), _row("m-cpu", cpu)]
    reason = describe_wait(spec, vram_full)
    assert reason.startswith("queued: it needs vram=16.00 GiB")
    assert "m-gpu0 has 8.00 GiB of 24.00 GiB VRAM free" in reason
    paused = [_row("m-gpu0", l4, status="paused"), _row("n-gpu0", l4, processing=2)]
    reason = describe_wait(ResourceSpec.parse(gpu=1), paused)
    assert "all 2 workers that can run it are busy" in reason
    assert "m-gpu0 is paused" in reason and "n-gpu0 is busy with 2 task(s)" in reason
    # Dask counts a waiting task's resources on the worker it is assigned to: not ours.
    held = [_row("m-gpu0", l4, used={"VRAM": 32 * GiB}, processing=2)]
    reason = describe_wait(spec, held, waiting_on={"m-gpu0": 1})
    assert "m-gpu0 has 8.00 GiB of 24.00 GiB VRAM free" in reason
    # Nothing fits at all: that is check_satisfiable's error, not a queue.
    assert describe_wait(ResourceSpec.parse(gpu="H100"), free) is None
