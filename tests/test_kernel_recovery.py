"""The DASH kernel when its session, its worker or its gateway goes away, or stops answering."""

from __future__ import annotations

import os
import signal
import time

import psutil
from kernels import KernelDriver


def _remote_pid(kernel: KernelDriver) -> int:
    run = kernel.execute("import os\nprint(os.getpid())", timeout=120)
    return int(run.stream().splitlines()[-1])  # after the notice of the first cell, if any


def test_a_gateway_restart_is_named_and_dask_logs_stay_out_of_the_notebook(
    gateway_factory, tmp_path
):
    first = gateway_factory(local_workers=1)
    first.wait_for_workers(1)
    port = int(first.url.rsplit(":", 1)[1].strip("/"))
    with KernelDriver(kernel_name="dash", env=first.env, cwd=str(tmp_path)) as kernel:
        assert kernel.execute("survivor = 41", timeout=120).status == "ok"
        kernel.execute("%dash checkpoint", timeout=60)
        first.stop()
        second = gateway_factory(
            local_workers=1, data_dir=first.data_dir, port=port, token=first.token
        )
        second.wait_for_workers(1)
        # The first cell may still meet the old session (gone quiet, not yet declared
        # lost); the next one certainly gets a new session with the checkpoint.
        runs = []
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            runs.append(kernel.execute("print(survivor + 1)", timeout=120))
            if runs[-1].status == "ok":
                break
            assert runs[-1].error["ename"] in ("SessionLost", "GatewayError"), runs[-1].error
        said = "".join(run.stream("stderr") + run.traceback_text() for run in runs)
        assert runs[-1].status == "ok" and runs[-1].stream() == "42\n", said
        assert "distributed" not in said and "Failed to reconnect" not in said, said
        assert "died" not in said, said
        assert "the DASH gateway restarted" in said, said
        assert "Restored its variables as they were after cell [" in said, said


def test_a_worker_dying_while_the_notebook_is_idle_costs_no_cell(gateway, tmp_path):
    with KernelDriver(kernel_name="dash", env=gateway.env, cwd=str(tmp_path)) as kernel:
        assert kernel.execute("state = 'kept'", timeout=120).status == "ok"
        remote_kernel = psutil.Process(_remote_pid(kernel))
        kernel.execute("%dash checkpoint", timeout=60)
        remote_kernel.parent().kill()  # the session's Dask worker; nothing is running
        run = kernel.execute("print(state, os.getpid())", timeout=120)
        assert run.status == "ok", run.traceback_text()
        state, pid = run.stream().split()[-2:]
        assert state == "kept" and int(pid) != remote_kernel.pid
        notice = run.stream("stderr")
        assert "a new session started" in notice
        assert "Restored its variables as they were after cell [" in notice
    gateway.wait_for_workers(2)  # the nanny brought the worker back


def _reply(kernel: KernelDriver, msg_id: str, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        reply = kernel.client.get_shell_msg(timeout=max(deadline - time.monotonic(), 0.01))
        if reply["parent_header"].get("msg_id") == msg_id:
            return reply


def test_an_unresponsive_session_leaves_the_kernel_answering_within_its_deadline(gateway, tmp_path):
    with KernelDriver(
        kernel_name="dash",
        env=gateway.env,
        cwd=str(tmp_path),
        extra_arguments=["--DashKernel.request_timeout=3"],
    ) as kernel:
        pid = _remote_pid(kernel)
        kernel.execute("frozen_variable_xyz = 1")
        time.sleep(2)  # the checkpoint after that cell is done
        os.kill(pid, signal.SIGSTOP)
        try:
            asked = {
                "is_complete": (kernel.client.is_complete("for i in range(3):"), 10),
                "complete": (kernel.client.complete("frozen_var", 10), 10),
                "inspect": (kernel.client.inspect("frozen_variable_xyz", 19), 10),
                "history": (kernel.client.history(hist_access_type="tail", n=3), 10),
            }
            started = time.monotonic()
            replies = {
                name: _reply(kernel, msg_id, t)["content"] for name, (msg_id, t) in asked.items()
            }
            # each waits its deadline, one after the other
            assert time.monotonic() - started < 4 * 3 + 5
            assert replies["is_complete"]["status"] == "unknown"
            assert replies["complete"]["matches"] == []
            assert replies["inspect"]["found"] is False
            assert replies["history"]["history"] == []
            info = _reply(kernel, kernel.client.kernel_info(), 5)
            assert info["content"]["status"] == "ok"
        finally:
            os.kill(pid, signal.SIGCONT)
        # answers that come late are dropped; the session works as before
        assert kernel.execute("print(frozen_variable_xyz + 1)").stream() == "2\n"
        msg_id = kernel.client.is_complete("for i in range(3):")
        assert _reply(kernel, msg_id, 10)["content"]["status"] == "incomplete"
