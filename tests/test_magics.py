"""``%%dash`` and ``%dash`` in a real IPython kernel, against a real gateway and workers."""

from __future__ import annotations

import os
import re
import threading
import time

import pytest


def test_cell_reads_inputs_and_assigns_outputs_remotely(ipython_kernel):
    ipython_kernel.execute("import os\ndata = [1, 2, 3]\nscale = 2\nunused = object()")
    run = ipython_kernel.execute(
        "%%dash\nimport os\ntotal = sum(data) * scale\nremote_pid = os.getpid()"
    )
    assert run.status == "ok", run.traceback_text()
    check = ipython_kernel.execute("print(total, remote_pid != os.getpid())")
    assert check.stream() == "12 True\n"


def test_in_and_out_override_the_analysis(ipython_kernel):
    ipython_kernel.execute("a = 5\nb = 7")
    run = ipython_kernel.execute(
        "%%dash --in a --out c\nc = a * 2\nd = globals().get('b', 'absent')\nprint(d)"
    )
    assert run.status == "ok", run.traceback_text()
    assert run.stream() == "absent\n"  # b was not sent
    check = ipython_kernel.execute("print(c, 'd' in globals())")
    assert check.stream() == "10 False\n"  # d was not brought back


def test_print_streams_while_the_cell_runs(ipython_kernel):
    run = ipython_kernel.execute(
        "%%dash\nimport time\nprint('before', flush=True)\ntime.sleep(2)\nprint('after')"
    )
    assert run.status == "ok", run.traceback_text()
    streams = [
        (m["content"]["text"], t)
        for m, t in zip(run.messages, run.arrivals, strict=True)
        if m["msg_type"] == "stream"
    ]
    texts = "".join(text for text, _ in streams)
    assert texts == "before\nafter\n"
    before_at = next(t for text, t in streams if "before" in text)
    after_at = next(t for text, t in streams if "after" in text)
    assert after_at - before_at > 1.5, "the first print arrived only when the cell ended"


def test_display_rich_reprs_figures_and_last_value(ipython_kernel):
    run = ipython_kernel.execute(
        "%%dash\n"
        "from IPython.display import HTML, display\n"
        "display(HTML('<b>remote bold</b>'))\n"
        "import matplotlib\nmatplotlib.use('Agg')\nimport matplotlib.pyplot as plt\n"
        "plt.plot([1, 2, 3])\n"
        "6 * 7\n"
    )
    assert run.status == "ok", run.traceback_text()
    displays = run.of_type("display_data")
    assert displays[0]["content"]["data"]["text/html"] == "<b>remote bold</b>"
    assert displays[1]["content"]["data"]["image/png"].startswith("iVBOR")  # a PNG, base64
    [result] = run.of_type("execute_result")
    assert result["content"]["data"]["text/plain"] == "42"


def test_remote_error_shows_the_cells_own_lines(ipython_kernel):
    run = ipython_kernel.execute("%%dash\ndef f(y):\n    return 1 / y\nz = f(0)")
    assert run.status == "error"
    assert run.error["ename"] == "ZeroDivisionError"
    text = run.traceback_text()
    cell = f"Cell In[{run.reply['content']['execution_count']}]"
    assert f"{cell}, line 3" in text and f"{cell}, line 2, in f()" in text
    assert "----> 3 z = f(0)" in text
    assert "----> 2     return 1 / y" in text
    assert "dash_kernel" not in text and "distributed" not in text


def test_unpicklable_input_is_named_and_nothing_runs(ipython_kernel, tmp_path):
    marker = tmp_path / "ran"
    ipython_kernel.execute(f"import threading\nlock = threading.Lock()\nmarker = {str(marker)!r}")
    run = ipython_kernel.execute("%%dash\nopen(marker, 'w').write('x')\nprint(lock)")
    assert run.status == "error"
    assert run.error["ename"] == "SerializationError"
    assert "lock (_thread.lock" in run.error["evalue"]
    assert not marker.exists()


def test_unpicklable_output_is_named_and_the_rest_comes_back(ipython_kernel):
    run = ipython_kernel.execute("%%dash\nimport threading\nheld = threading.Lock()\nkept = 41 + 1")
    assert run.status == "ok", run.traceback_text()
    assert "held (_thread.lock" in run.stream("stderr")
    assert ipython_kernel.execute("print(kept)").stream() == "42\n"


def test_impossible_spec_fails_at_once_naming_what_exists(ipython_kernel):
    started = time.monotonic()
    run = ipython_kernel.execute("%%dash --gpu A100\nprint('never')")
    assert time.monotonic() - started < 10
    assert run.status == "error"
    assert run.error["ename"] == "ResourceUnavailable"
    assert "Closest worker: local-" in run.error["evalue"]
    assert "no GPU model matching 'a100'" in run.error["evalue"]
    assert run.stream() == ""


def test_malformed_spec_is_a_clear_error(ipython_kernel):
    run = ipython_kernel.execute("%%dash --memory lots\n1")
    assert run.error["ename"] == "ResourceSpecError"
    assert "memory must be a size" in run.error["evalue"]


def test_interrupt_stops_the_remote_cell_and_the_kernel_carries_on(ipython_kernel, tmp_path):
    marker = tmp_path / "ticks"
    ipython_kernel.execute(f"marker = {str(marker)!r}")
    started = threading.Event()

    def interrupt_once_running(msg):
        if (
            msg["msg_type"] == "stream"
            and "running" in msg["content"]["text"]
            and not started.is_set()
        ):
            started.set()
            threading.Timer(0.5, ipython_kernel.interrupt).start()

    run = ipython_kernel.execute(
        "%%dash\nimport time\nprint('running', flush=True)\n"
        "while True:\n    open(marker, 'a').write('x')\n    time.sleep(0.05)",
        on_message=interrupt_once_running,
        timeout=60,
    )
    assert started.is_set()
    assert run.status == "error"
    assert run.error["ename"] == "KeyboardInterrupt"
    size = os.path.getsize(marker)
    time.sleep(1)
    assert os.path.getsize(marker) == size, "the remote loop kept running after the interrupt"
    assert ipython_kernel.execute("%%dash\nprint('still here')").stream() == "still here\n"


def test_dash_status_and_workers_tables(ipython_kernel, gateway):
    run = ipython_kernel.execute("%dash status")
    assert run.status == "ok", run.traceback_text()
    [result] = run.of_type("execute_result")
    text = result["content"]["data"]["text/plain"]
    assert f"connected to: {gateway.url}" in text
    assert f"dashboard: {gateway.url}dash/" in text
    assert "scheduler: tls://" in text
    assert "local-0" in text and "local-1" in text
    assert "<table>" in result["content"]["data"]["text/html"]
    workers = ipython_kernel.execute("%dash workers").of_type("execute_result")[0]
    assert "local-1" in workers["content"]["data"]["text/plain"]


@pytest.mark.parametrize("line", ["%dash nonsense"])
def test_unknown_dash_command_says_what_exists(ipython_kernel, line):
    run = ipython_kernel.execute(line)
    assert run.error["ename"] == "DashError"
    assert "%dash status" in run.error["evalue"]


def interrupt_after(kernel, marker: str, delay: float, fired: threading.Event):
    """An ``on_message`` callback: interrupt ``kernel`` ``delay`` s after ``marker`` prints."""

    def watch(msg):
        if msg["msg_type"] == "stream" and marker in msg["content"]["text"] and not fired.is_set():
            fired.set()
            threading.Timer(delay, kernel.interrupt).start()

    return watch


def assert_one_line_interrupt(run) -> str:
    assert run.status == "error"
    assert run.error["ename"] == "KeyboardInterrupt"
    text = run.traceback_text()
    assert len(text.splitlines()) == 1, text
    assert "File " not in text and "distributed" not in text and "dash_kernel" not in text
    assert run.stream("stderr") == ""
    return text


def assert_next_map_is_quick(kernel) -> None:
    started = time.monotonic()
    follow = kernel.execute(
        "import dash_kernel as dk\nprint(dk.map(abs, range(-3, 3), progress=False))", timeout=30
    )
    assert follow.stream() == "[3, 2, 1, 0, 1, 2]\n", follow.traceback_text()
    assert time.monotonic() - started < 8, "the next work waited behind the interrupted one"


@pytest.mark.timeout(120)
def test_interrupting_a_cell_stuck_in_c_code_restarts_its_worker(ipython_kernel):
    fired = threading.Event()
    run = ipython_kernel.execute(
        "%%dash\nimport time\nprint('sleeping', flush=True)\ntime.sleep(40)",
        on_message=interrupt_after(ipython_kernel, "sleeping", 0.5, fired),
        timeout=60,
    )
    assert fired.is_set()
    text = assert_one_line_interrupt(run)
    assert re.fullmatch(
        r"KeyboardInterrupt: the remote work was stopped \(worker local-\d restarted\)", text
    ), text
    assert_next_map_is_quick(ipython_kernel)


@pytest.mark.timeout(120)
def test_interrupting_a_map_of_sleeps_stops_all_of_them(ipython_kernel):
    fired = threading.Event()
    run = ipython_kernel.execute(
        "import dash_kernel as dk, time\nprint('mapping', flush=True)\n"
        "dk.map(time.sleep, [40] * 6, progress=False)",
        on_message=interrupt_after(ipython_kernel, "mapping", 2.0, fired),
        timeout=60,
    )
    assert fired.is_set()
    text = assert_one_line_interrupt(run)
    assert "the remote work was stopped (workers local-0, local-1 restarted)" in text, text
    assert_next_map_is_quick(ipython_kernel)
