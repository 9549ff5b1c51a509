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


GPU_HINT = "gpu must be a whole number of GPUs ≥ 1 or a model name; got "


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"gpu": -1}, GPU_HINT + "-1"),
        ({"gpu": "-1"}, GPU_HINT + "-1"),
        ({"gpu": 0}, GPU_HINT + "0"),
        ({"gpu": "0"}, GPU_HINT + "0"),
        ({"gpu": 1.5}, GPU_HINT + "1.5"),
        ({"gpu": "1.5"}, GPU_HINT + "1.5"),
        ({"gpu": "1,5"}, GPU_HINT + "1,5"),
        ({"gpu": ""}, GPU_HINT + "''"),
        ({"cpu": 0}, "cpu must be a positive number of cores (such as 4 or 0.5); got 0"),
        ({"cpu": -2}, "cpu must be a positive number of cores (such as 4 or 0.5); got -2"),
        ({"cpu": "many"}, "cpu must be a positive number of cores (such as 4 or 0.5); got many"),
        ({"cpu": "inf"}, "cpu must be a positive number of cores (such as 4 or 0.5); got inf"),
        ({"cpu": True}, "cpu must be a positive number of cores (such as 4 or 0.5); got True"),
        (
            {"memory": "lots"},
            "memory must be a size above zero, such as '16GB' or '512MiB'; got lots",
        ),
        (
            {"memory": "-1GB"},
            "memory must be a size above zero, such as '16GB' or '512MiB'; got -1GB",
        ),
        ({"memory": "1e400"}, "memory must be a size above zero"),
        ({"memory": float("nan")}, "memory must be a size above zero"),
        ({"vram": 0}, "vram must be a size above zero, such as '16GB' or '512MiB'; got 0"),
        ({"vram": "abc"}, "vram must be a size above zero, such as '16GB' or '512MiB'; got abc"),
    ],
)
def test_malformed_specs_name_the_field(kwargs, message):
    with pytest.raises(ResourceSpecError) as info:
        ResourceSpec.parse(**kwargs)
    assert str(info.value).startswith(message)


def test_numeric_strings_are_counts_only_when_whole_and_positive():
    assert ResourceSpec.parse(gpu="2").to_dask() == {"GPU": 2}
    assert ResourceSpec.parse(gpu=2.0).to_dask() == {"GPU": 2}
    assert ResourceSpec.parse(gpu=" 1 ").to_dask() == {"GPU": 1}
    # Digits inside a model name are the model's.
    assert ResourceSpec.parse(gpu="RTX 4090").gpu_model == "RTX 4090"
    # The string form, as %dash use takes it, is the same parser.
    with pytest.raises(ResourceSpecError, match="got -1"):
        ResourceSpec.from_string("gpu=-1")


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
        assert placement_restrictions(gpu_work) == {**gpu_work, "pool:gpu": 1}
    assert placement_restrictions({"GPU": 2}) == {"GPU": 2}
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


def _two_gpu_machine(model="NVIDIA A100-SXM4-80GB"):
    one = worker_resources(2, 4 * GiB, gpu_model=model, vram=80 * GiB)
    both = worker_resources(2, 4 * GiB, gpu_model=model, vram=80 * GiB, gpus=2)
    return [
        ("m-gpu0", one),
        ("m-gpu1", one),
        ("m-gpu0+1", both),
        ("m-cpu", worker_resources(2, GiB)),
    ]


def test_a_multi_gpu_worker_takes_only_work_asking_for_two_or_more_gpus():
    both = dict(_two_gpu_machine())["m-gpu0+1"]
    assert both["GPU"] == 2 and both["VRAM"] == 80 * GiB and both["gpu:a100"] == 1
    assert "pool:gpu" not in both and "pool:cpu" not in both
    assert worker_resources(2, GiB, gpu_model="NVIDIA L4", vram=GiB)["pool:gpu"] > 1000
    for spec in (ResourceSpec.parse(gpu=1), ResourceSpec.parse(vram="1GB")):
        need = placement_restrictions(spec.to_dask())
        assert any(need[k] > both.get(k, 0) for k in need), spec


def test_gpu2_is_possible_only_with_two_gpus_of_the_model():
    workers = _two_gpu_machine()
    check_satisfiable(ResourceSpec.parse(gpu=2), workers)
    check_satisfiable(ResourceSpec.parse(gpu=1), workers)
    check_satisfiable(ResourceSpec.parse(gpu="A100"), workers)
    with pytest.raises(ResourceUnavailable) as info:
        check_satisfiable(ResourceSpec.parse(gpu=3), workers)
    assert "Closest worker: m-gpu0+1 (2 GPU (a100 sxm4 80gb)" in str(info.value)
    assert "GPU 3 asked, it has 2" in str(info.value)
    # Two one-GPU machines are not one two-GPU machine.
    singles = [("a-gpu0", dict(workers)["m-gpu0"]), ("b-gpu0", dict(workers)["m-gpu1"])]
    with pytest.raises(ResourceUnavailable, match="GPU 2 asked, it has 1"):
        check_satisfiable(ResourceSpec.parse(gpu=2), singles)
