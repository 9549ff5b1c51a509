"""The "DASH distributed" kernel through jupyter_client: cells run in a remote session."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import psutil
import pytest
from conftest import wait_gone
from kernels import KernelDriver

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def dash(gateway, tmp_path_factory):
    """One "DASH distributed" kernel for the module, with its first (session-opening) cell run."""
    kernel = KernelDriver(
        kernel_name="dash", env=gateway.env, cwd=str(tmp_path_factory.mktemp("dash"))
    )
    try:
        first = kernel.execute("import os\nsession_pid = os.getpid()", timeout=120)
        assert first.status == "ok", first.traceback_text()
        kernel.first = first
        yield kernel
    finally:
        kernel.shutdown()


def _remote_pid(kernel: KernelDriver) -> int:
    return int(kernel.execute("print(os.getpid())").stream())


def test_first_cell_says_where_the_session_runs(dash):
    notice = dash.first.stream()  # news, not an error: on stdout
    assert notice.startswith("DASH: this notebook runs on worker local-")
    assert "(CPU: 1 CPU, 0.93 GiB RAM; asked for any worker)" in notice
    assert notice.count("DASH:") == 1
    assert "DASH:" not in dash.execute("1").stream()  # said once


def test_cells_run_remotely_and_keep_their_state(dash):
    kernel_pid = dash.manager.provisioner.pid
    dash.execute("x = 41")
    run = dash.execute("x + 1")
    [result] = run.of_type("execute_result")
    assert result["content"]["data"]["text/plain"] == "42"
    assert result["content"]["execution_count"] == run.reply["content"]["execution_count"]
    remote_pid = _remote_pid(dash)
    assert remote_pid != kernel_pid
    assert psutil.Process(remote_pid).ppid() != kernel_pid  # a worker's child, not ours


def test_output_streams_while_the_cell_runs(dash):
    run = dash.execute("import time\nprint('before', flush=True)\ntime.sleep(1.5)\nprint('after')")
    assert run.status == "ok"
    times = {
        m["content"]["text"].strip(): t
        for m, t in zip(run.messages, run.arrivals, strict=True)
        if m["msg_type"] == "stream"
    }
    assert times["after"] - times["before"] > 1.0


def test_displays_updates_and_clear_output_are_relayed(dash):
    run = dash.execute(
        "from IPython.display import HTML, display, clear_output, update_display\n"
        "display(HTML('<i>one</i>'), display_id='d1')\n"
        "update_display(HTML('<i>two</i>'), display_id='d1')\n"
        "clear_output(wait=True)\n"
    )
    relayed = [m for m in run.messages if m["msg_type"] != "execute_input"]
    assert [m["msg_type"] for m in relayed] == [
        "display_data",
        "update_display_data",
        "clear_output",
    ]
    assert relayed[1]["content"]["data"]["text/html"] == "<i>two</i>"
    assert relayed[1]["content"]["transient"]["display_id"] == "d1"


def test_errors_carry_the_remote_traceback_with_this_notebooks_cell_numbers(dash):
    dash.execute("%%local\nlocal_only = 1")  # a local cell moves the count on here only
    run = dash.execute("def f():\n    return undefined_name\nf()")
    assert run.status == "error"
    assert run.error["ename"] == "NameError"
    text = run.traceback_text()
    assert f"Cell In[{run.reply['content']['execution_count']}], line 3" in text
    assert "return undefined_name" in text


def test_local_cells_run_here_and_dash_status_shows_the_session(dash):
    run = dash.execute("%%local\nimport os\nprint(os.getpid(), 'x' in globals())")
    assert run.stream() == f"{dash.manager.provisioner.pid} False\n"
    status = dash.execute("%dash status")
    assert status.status == "ok", status.traceback_text()
    text = status.of_type("execute_result")[0]["content"]["data"]["text/plain"]
    assert "this session: worker local-" in text and "asked for any worker" in text


def test_completion_inspection_and_is_complete_come_from_the_session(dash):
    dash.execute("remote_only_variable_xyz = [1, 2, 3]")
    client = dash.client
    client.complete("remote_only_var", 15)
    reply = client.get_shell_msg(timeout=30)
    assert "remote_only_variable_xyz" in reply["content"]["matches"]
    client.inspect("remote_only_variable_xyz", 24)
    reply = client.get_shell_msg(timeout=30)
    assert reply["content"]["found"] is True
    assert "list" in reply["content"]["data"]["text/plain"]
    client.is_complete("for i in range(3):")
    reply = client.get_shell_msg(timeout=30)
    assert reply["content"]["status"] == "incomplete"


def test_input_is_answered_by_the_user_through_this_kernel(dash):
    run = dash.execute("name = input('Your name? ')\nprint('hello', name)", stdin="Ada")
    assert run.status == "ok", run.traceback_text()
    assert run.input_prompts == ["Your name? "]
    assert run.stream().endswith("hello Ada\n")


def test_widgets_display_and_front_end_updates_reach_the_remote_kernel(dash):
    run = dash.execute("import ipywidgets as w\nslider = w.IntSlider(value=3)\ndisplay(slider)")
    assert run.status == "ok", run.traceback_text()
    [model] = [
        m["content"]
        for m in run.of_type("comm_open")
        if m["content"]["data"]["state"].get("_model_name") == "IntSliderModel"
    ]
    [view] = run.of_type("display_data")
    assert (
        view["content"]["data"]["application/vnd.jupyter.widget-view+json"]["model_id"]
        == model["comm_id"]
    )
    # what JupyterLab sends when the user drags the slider to 7
    update = dash.client.session.msg(
        "comm_msg",
        {
            "comm_id": model["comm_id"],
            "data": {"method": "update", "state": {"value": 7}, "buffer_paths": []},
        },
    )
    dash.client.shell_channel.send(update)
    assert dash.execute("print(slider.value)").stream() == "7\n"


def test_interrupt_stops_the_remote_cell_and_its_state_survives(dash):
    dash.execute("kept = 'still here'")
    started = threading.Event()
    interrupted_at: list[float] = []

    def interrupt_when_running(msg):
        if (
            msg["msg_type"] == "stream"
            and "spinning" in msg["content"]["text"]
            and not started.is_set()
        ):
            started.set()
            interrupted_at.append(time.monotonic())
            dash.interrupt()

    run = dash.execute(
        "print('spinning', flush=True)\nwhile True:\n    pass", on_message=interrupt_when_running
    )
    assert started.is_set()
    assert run.error["ename"] == "KeyboardInterrupt"
    assert run.arrivals[-1] - interrupted_at[0] < 3
    assert dash.execute("print(kept)").stream() == "still here\n"


@pytest.mark.parametrize(
    ("death", "reason"),
    [
        ("os._exit(3)", "exited with status 3"),
        ("import ctypes\nctypes.string_at(0)", "killed by SIGSEGV"),
        # the test workers' limit is 1 GB (0.93 GiB)
        (
            "hog = b'x' * (1536 * 2**20)\nimport time\ntime.sleep(10)",
            "over the session's memory limit of 0.93 GiB",
        ),
    ],
    ids=["exit", "segfault", "memory-limit"],
)
def test_a_dying_session_is_reported_and_the_next_cell_gets_a_new_one(
    gateway, tmp_path, death, reason
):
    with KernelDriver(kernel_name="dash", env=gateway.env, cwd=str(tmp_path)) as kernel:
        first_pid = _remote_pid(kernel) if kernel.execute("import os").status == "ok" else None
        run = kernel.execute(death, timeout=60)
        assert run.status == "error"
        assert run.error["ename"] == "SessionLost"
        assert reason in run.error["evalue"]
        again = kernel.execute("import os\nprint(os.getpid())", timeout=120)
        assert again.status == "ok", again.traceback_text()
        assert "a new session started" in again.stream("stderr")
        assert int(again.stream()) != first_pid


def test_restart_gives_a_fresh_session_and_ends_the_old_one(gateway, tmp_path):
    import dash_kernel as dk

    conn = dk.connect(gateway.url, gateway.token)

    def sessions_running() -> set[str]:
        return {key for keys in conn.client.processing().values() for key in keys}

    before = sessions_running()  # e.g. the module's own kernel
    kernel = KernelDriver(kernel_name="dash", env=gateway.env, cwd=str(tmp_path))
    try:
        kernel.execute("import os\nvalue = 1", timeout=120)
        old_process = psutil.Process(_remote_pid(kernel))
        old_directory = Path(old_process.cwd())
        assert old_directory.name.startswith("dash-session-")
        kernel.manager.restart_kernel()
        kernel.client.wait_for_ready(timeout=60)
        run = kernel.execute("import os\nprint(os.getpid(), 'value' in globals())", timeout=120)
        new_pid, had_value = run.stream().split()[-2:]  # after the new session's notice
        assert had_value == "False" and int(new_pid) != old_process.pid
        assert not wait_gone([old_process], timeout=20), (
            "the old remote kernel outlived the restart"
        )
        deadline = time.monotonic() + 10
        while old_directory.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not old_directory.exists(), "the old session's directory was left on the worker"
    finally:
        kernel.shutdown()
    # shutting down frees the session's worker slot
    deadline = time.monotonic() + 20
    while sessions_running() - before and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not sessions_running() - before
    dk.disconnect()


def test_the_quickstart_notebook_runs_on_the_dash_kernel(gateway, tmp_path, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    for name in ("DASH_GATEWAY_URL", "DASH_TOKEN"):
        monkeypatch.setenv(name, gateway.env[name])
    notebook = nbformat.read(REPO / "examples" / "notebooks" / "01-quickstart.ipynb", as_version=4)
    NotebookClient(
        notebook, kernel_name="dash", timeout=180, resources={"metadata": {"path": str(tmp_path)}}
    ).execute()
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    outputs = {cell.source.splitlines()[0]: cell.outputs for cell in code}
    assert "running on" in outputs["import os"][-1]["text"]
    assert outputs["sum(x * x for x in data)"][0]["data"]["text/plain"] == "285"
    assert any(
        "image/png" in out.get("data", {}) for out in outputs["import matplotlib.pyplot as plt"]
    )
    assert outputs["%%local"][0]["text"] == "local cell; sees data: False\n"
    assert "local-" in outputs["%dash status"][0]["data"]["text/plain"]


def test_dk_and_dash_magics_work_inside_the_remote_session(dash):
    run = dash.execute(
        "import dash_kernel as dk\n"
        "print(dk.map(abs, [-1, -2, -3], progress=False), dk.connect().mode)"
    )
    assert run.status == "ok", run.traceback_text()
    # joined with the notebook's credentials, not a new embedded cluster of its own
    assert run.stream() == "[1, 2, 3] cluster\n"
    session_pid = _remote_pid(dash)
    dash.execute("base = 20")
    nested = dash.execute("%%dash\nimport os\nresult = base + 1\ncell_pid = os.getpid()")
    assert nested.status == "ok", nested.traceback_text()
    check = dash.execute(f"print(result, cell_pid != {session_pid})")
    assert check.stream() == "21 True\n"


def test_push_pull_and_use_move_variables_and_name_what_cannot_move(dash):
    dash.execute("%%local\nimport threading\nlocal_list = [1, 2, 3]\nlocal_lock = threading.Lock()")
    pushed = dash.execute("%dash push local_list")
    assert pushed.status == "ok", pushed.traceback_text()
    assert pushed.stream() == "Sent to the session: local_list\n"
    assert dash.execute("print(sum(local_list))").stream() == "6\n"
    refused = dash.execute("%dash push local_lock")
    assert refused.error["ename"] == "SerializationError"
    assert "local_lock (_thread.lock" in refused.error["evalue"]

    dash.execute("import threading\nremote_dict = {'a': 1}\nremote_lock = threading.Lock()")
    pulled = dash.execute("%dash pull remote_dict remote_lock not_there")
    assert pulled.status == "ok", pulled.traceback_text()
    text = pulled.stream()
    assert text.startswith("Fetched from the session: remote_dict\n")
    assert "Not moved: remote_lock (_thread.lock" in text
    assert "Not moved: not_there (no such variable in the session)" in text
    assert dash.execute("%%local\nprint(remote_dict)").stream() == "{'a': 1}\n"

    old_pid = _remote_pid(dash)
    moved = dash.execute("%dash use cpu=1", timeout=120)
    assert moved.status == "ok", moved.traceback_text()
    assert "The session moved to worker local-" in moved.stream()
    assert "Carried over: " in moved.stream() and "remote_dict" in moved.stream()
    assert "Not restored: remote_lock (could not be pickled: _thread.lock" in moved.stream()
    assert dash.execute("print(remote_dict['a'] + 1)").stream() == "2\n"
    assert _remote_pid(dash) != old_pid

    impossible = dash.execute("%dash use gpu=1")
    assert impossible.error["ename"] == "ResourceUnavailable"
    assert dash.execute("print(remote_dict)").stream() == "{'a': 1}\n"  # the session stayed


def test_a_worker_dying_under_a_session_is_reported_and_its_checkpoint_restored(gateway, tmp_path):
    with KernelDriver(kernel_name="dash", env=gateway.env, cwd=str(tmp_path)) as kernel:
        kernel.execute("import os, time\nstate = 'kept by the checkpoint'", timeout=120)
        remote_kernel = psutil.Process(_remote_pid(kernel))
        worker = remote_kernel.parent()
        assert "multiprocessing" in " ".join(worker.cmdline())  # a Dask worker process
        threading.Timer(1.0, worker.kill).start()
        run = kernel.execute(
            "lost = 'set by the cell that was running'\nprint('working', flush=True)\n"
            "time.sleep(30)",
            timeout=90,
        )
        assert run.status == "error"
        assert run.error["ename"] == "SessionLost"
        assert "worker" in run.error["evalue"]
        assert not wait_gone([remote_kernel], timeout=20), "the remote kernel outlived its worker"
        again = kernel.execute("print(state, 'lost' in globals(), os.getpid())", timeout=120)
        assert again.status == "ok", again.traceback_text()
        state, lost, pid = again.stream().rsplit(maxsplit=2)
        assert (state, lost) == ("kept by the checkpoint", "False")
        assert int(pid) != remote_kernel.pid
        notice = again.stream("stderr")
        assert "a new session started" in notice
        assert "Restored its variables as they were after cell [2]: os, state, time" in notice
    gateway.wait_for_workers(2)  # the nanny brought the worker back
