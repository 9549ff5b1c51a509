"""``dk.remote`` and ``dk.map`` against a real gateway: results, order, errors, output."""

from __future__ import annotations

import os
import time
import traceback

import pytest

import dash_kernel as dk


@pytest.fixture(scope="module")
def conn(gateway):
    connection = dk.connect(gateway.url, gateway.token)
    yield connection
    dk.disconnect()


def square(x):
    return x * x


def fails_on_three(x):
    if x == 3:
        raise ValueError(f"item {x} is bad")
    return x


def test_connect_uses_the_gateways_tls_scheduler(conn, gateway):
    assert conn.mode == "gateway"
    assert conn.scheduler_address == gateway.status()["scheduler"]
    assert conn.scheduler_address.startswith("tls://")


def test_remote_runs_elsewhere_and_submit_returns_a_future(conn):
    @dk.remote(cpu=1)
    def where(x):
        return os.getpid(), x + 1

    pid, value = where(41)
    assert value == 42 and pid != os.getpid()

    @dk.remote
    def keywords(priority, key="k"):
        return priority, key

    assert keywords(priority="user's own", key="also theirs") == ("user's own", "also theirs")
    future = where.submit(1)
    assert future.result(timeout=30)[1] == 2


def test_map_returns_a_thousand_results_in_input_order(conn):
    results = dk.map(square, range(1000), progress=False)
    assert results == [x * x for x in range(1000)]


def test_map_return_exceptions_puts_failures_in_place(conn):
    results = dk.map(fails_on_three, range(6), return_exceptions=True, progress=False)
    assert results[:3] == [0, 1, 2] and results[4:] == [4, 5]
    assert isinstance(results[3], ValueError) and str(results[3]) == "item 3 is bad"


def test_map_failure_is_raised_with_the_users_remote_frame(conn):
    with pytest.raises(ValueError, match="item 3 is bad") as info:
        dk.map(fails_on_three, range(6), progress=False)
    frames = traceback.extract_tb(info.value.__traceback__)
    assert frames[-1].name == "fails_on_three"
    assert frames[-1].line == 'raise ValueError(f"item {x} is bad")'
    assert not any("dash_kernel/tasks.py" in f.filename for f in frames)


def test_impossible_spec_fails_within_seconds(conn):
    started = time.monotonic()
    with pytest.raises(dk.ResourceUnavailable, match="Closest worker: local-"):
        dk.remote(gpu=1, vram="80GB")(square)(2)
    assert time.monotonic() - started < 10


def test_retries_rerun_a_failing_function(conn, tmp_path):
    attempts = tmp_path / "attempts"

    @dk.remote(retries=2)
    def flaky():
        with open(attempts, "a") as f:
            f.write("x")
        if os.path.getsize(attempts) < 3:
            raise RuntimeError("not yet")
        return "done"

    assert flaky() == "done"
    assert attempts.read_text() == "xxx"


def test_remote_print_streams_into_the_calling_cell(ipython_kernel):
    run = ipython_kernel.execute(
        "import dash_kernel as dk, time, sys\n"
        "@dk.remote\n"
        "def chatty(n):\n"
        "    print('working on', n, flush=True)\n"
        "    print('warning!', file=sys.stderr, flush=True)\n"
        "    time.sleep(1.5)\n"
        "    return n * 2\n"
        "print('result', chatty(21))"
    )
    assert run.status == "ok", run.traceback_text()
    assert run.stream() == "working on 21\nresult 42\n"
    assert run.stream("stderr") == "warning!\n"
    stream_times = [
        t
        for m, t in zip(run.messages, run.arrivals, strict=True)
        if m["msg_type"] == "stream" and "working" in m["content"]["text"]
    ]
    result_times = [
        t
        for m, t in zip(run.messages, run.arrivals, strict=True)
        if m["msg_type"] == "stream" and "result" in m["content"]["text"]
    ]
    assert result_times[0] - stream_times[0] > 1.0, "remote print arrived only at the end"


def test_map_in_a_kernel_shows_results_and_failure_traceback(ipython_kernel):
    run = ipython_kernel.execute(
        "import dash_kernel as dk\n"
        "def bad(x):\n"
        "    return 10 // (x - 2)\n"
        "dk.map(bad, range(4), progress=False)"
    )
    assert run.error["ename"] == "ZeroDivisionError"
    assert "return 10 // (x - 2)" in run.traceback_text()


def test_functions_from_the_users_own_module_travel_by_value(conn):
    import cloudpickle

    # `square` lives in this test module, which workers cannot import.
    assert dk.remote(square)(7) == 49
    assert cloudpickle.list_registry_pickle_by_value() == set(), "registration leaked"


@pytest.mark.timeout(90)
def test_remote_functions_can_fan_out_without_starving_the_workers(ipython_kernel):
    # Three outer tasks on two single-thread workers: each waits on inner tasks, which
    # would never get a thread unless waiting tasks give theirs back.
    run = ipython_kernel.execute(
        "import dash_kernel as dk\n"
        "def inner(x):\n"
        "    print('inner', x)\n"
        "    return x + 1\n"
        "def outer(n):\n"
        "    return sum(dk.map(inner, range(n), progress=False))\n"
        "print(dk.map(outer, [2, 3, 4], progress=False))",
        timeout=80,
    )
    assert run.status == "ok", run.traceback_text()
    assert run.stream().endswith("[3, 6, 10]\n")
    inner_lines = sorted(line for line in run.stream().splitlines() if line.startswith("inner"))
    assert inner_lines == sorted(f"inner {x}" for n in (2, 3, 4) for x in range(n))


def test_no_workers_at_all_is_reported_not_waited_on_forever(gateway_factory, tmp_path):
    from kernels import KernelDriver

    empty = gateway_factory(local_workers=0)
    empty.wait_for_workers(0)
    with KernelDriver(env=empty.env, cwd=str(tmp_path)) as kernel:
        run = kernel.execute(
            "import dash_kernel as dk\ndk.connect(worker_wait=2)\ndk.remote(abs)(-1)", timeout=60
        )
    assert run.error["ename"] == "NoWorkersError"
    assert "no worker joined the cluster at tls://" in run.error["evalue"]
    assert "within 2s" in run.error["evalue"]


def test_map_shows_a_progress_bar_in_a_notebook(ipython_kernel):
    run = ipython_kernel.execute(
        "import dash_kernel as dk, time\n"
        "def slow(x):\n"
        "    time.sleep(0.05)\n"
        "    return x\n"
        "print(len(dk.map(slow, range(40))))"
    )
    assert run.status == "ok", run.traceback_text()
    assert run.stream() == "40\n"
    # tqdm.auto draws a widget where ipywidgets is installed, text on stderr otherwise
    widget_values = [
        m["content"]["data"].get("state", {}).get("value")
        for m in run.of_type("comm_msg")
        if m["content"]["data"].get("method") == "update"
    ]
    assert 40 in widget_values or "40/40" in run.stream("stderr")


def test_large_arguments_go_straight_to_a_worker(conn):
    import warnings

    import numpy as np

    big = np.ones(4 * 2**20)  # 32 MiB

    @dk.remote
    def weighted(values, weights=None):
        return float((values * weights).sum())

    with warnings.catch_warnings():
        # Dask warns when a task graph is large, i.e. when data travels inside it.
        warnings.simplefilter("error")
        assert weighted(big, weights=big) == float(big.size)
        assert dk.map(np.sum, [big, big[:10]], progress=False) == [big.size, 10]


def test_remote_error_in_a_notebook_shows_the_cells_own_line(ipython_kernel):
    run = ipython_kernel.execute(
        "import dash_kernel as dk\n"
        "@dk.remote\n"
        "def risky(x):\n"
        "    y = x + 1\n"
        "    raise KeyError(f'missing {y}')\n"
        "risky(1)"
    )
    assert run.error["ename"] == "KeyError"
    text = run.traceback_text()
    cell = f"Cell In[{run.reply['content']['execution_count']}]"
    assert f"{cell}, line 5, in risky()" in text, text
    assert "----> 5     raise KeyError(f'missing {y}')" in text, text
    assert "<dynamic-code>" not in text


def test_a_scheduler_without_dashs_plugin_still_says_why_work_waits():
    """A plain Dask scheduler (as behind ``--scheduler-address``) lacks the plugin's
    ``dash_workers``: why work waits is then told from what the workers say."""
    from distributed import Client, LocalCluster

    with (
        LocalCluster(
            n_workers=2, threads_per_worker=1, processes=False, dashboard_address=":0"
        ) as cluster,
        Client(cluster, set_as_default=False) as client,
    ):
        plain = dk.Connection(client, owns_client=False)
        blockers = client.map(time.sleep, [6, 6], pure=False)
        deadline = time.monotonic() + 10
        while sum(len(keys) for keys in client.processing().values()) < 2:
            assert time.monotonic() < deadline, "the blockers did not start"
            time.sleep(0.05)
        waiting = client.submit(abs, -1, pure=False)
        reason = plain.waiting_reason(dk.ResourceSpec(), [waiting.key])
        assert reason is not None and reason.startswith(
            "queued: it needs any worker, and all 2 workers that can run it are busy"
        ), reason
        assert plain.waiting_reason(dk.ResourceSpec(), [waiting.key]) == reason  # asked again
        assert waiting.result(timeout=30) == 1
        client.cancel(blockers)
