"""Session checkpoints: the DASH kernel's remote namespace kept in storage after cells and
restored into a new session (after a lost session, ``%dash use``, a gateway restart, or on
request in another kernel)."""

from __future__ import annotations

import re
import time

import pytest
from kernels import KernelDriver

ARRAY_BYTES = 32 * 2**20

NAMESPACE = f"""
import threading
import numpy as np

class Point:
    def __init__(self, x, y):
        self.x, self.y = x, y
    def norm2(self):
        return self.x ** 2 + self.y ** 2

def scale(values, k):
    return [k * v for v in values]

point = Point(3, 4)
weights = np.arange({ARRAY_BYTES // 8}, dtype=np.float64)
notes = {{"epoch": 7}}
lock = threading.Lock()
"""

USE_NAMESPACE = (
    "print(point.norm2(), scale([1, 2], 3), weights[-1], weights.flags.writeable, notes['epoch'])"
)
EXPECTED = f"25 [3, 6] {float(ARRAY_BYTES // 8 - 1)} True 7\n"


def local(kernel: KernelDriver, expression: str) -> str:
    """Evaluate ``expression`` in the DASH kernel's own process (a ``%%local`` cell)."""
    run = kernel.execute(f"%%local\nprint({expression})")
    assert run.status == "ok", run.traceback_text()
    return run.stream().strip()


@pytest.fixture
def kernel(gateway, tmp_path):
    env = dict(gateway.env, JPY_SESSION_NAME=str(tmp_path / "Training run.ipynb"))
    with KernelDriver(kernel_name="dash", env=env, cwd=str(tmp_path)) as driver:
        yield driver


def test_checkpoints_are_incremental_and_say_what_they_hold(kernel):
    # only the checkpoints this test takes, so that each one's upload can be counted
    assert "Checkpoints are off" in kernel.execute("%dash checkpoint off").stream()
    setup = kernel.execute(NAMESPACE, timeout=120)
    assert setup.status == "ok", setup.traceback_text()
    # every reply says where the session runs, for front ends
    dash = setup.reply["metadata"]["dash"]
    assert dash["worker"].startswith("local-") and dash["where"].startswith("worker local-")

    taken = kernel.execute("%dash checkpoint", timeout=60)
    assert taken.status == "ok", taken.traceback_text()
    text = taken.stream()
    assert "Checkpointed Point, notes, np, point, scale, threading, weights as " in text
    assert "sessions/Training-run-" in text
    assert "Not saved: lock (_thread.lock: cannot pickle" in text
    assert int(local(kernel, "get_ipython().kernel.last_checkpoint['uploaded_bytes']")) > (
        ARRAY_BYTES
    )
    # Pickling an instance caches __slotnames__ on its class (copyreg), so a class defined
    # in the notebook changes once after its first checkpoint; then nothing changes, and
    # the next checkpoint stores nothing.
    kernel.execute("%dash checkpoint", timeout=60)
    unchanged = kernel.execute("%dash checkpoint", timeout=60).stream()
    assert "unchanged since the last checkpoint" in unchanged

    kernel.execute("notes['epoch'] = 8")
    again = kernel.execute("%dash checkpoint", timeout=60)
    assert "unchanged" not in again.stream()
    uploaded = int(local(kernel, "get_ipython().kernel.last_checkpoint['uploaded_bytes']"))
    size = int(local(kernel, "get_ipython().kernel.last_checkpoint['size']"))
    assert size > ARRAY_BYTES
    assert 0 < uploaded < 64 * 2**10  # the small values, not the array

    status = kernel.execute("%dash status").displays()[0]["data"]["text/plain"]
    assert "checkpoint: off (%dash checkpoint on)" in status
    kernel.execute("%dash checkpoint on", timeout=60)
    status = kernel.execute("%dash status").displays()[0]["data"]["text/plain"]
    assert re.search(r"checkpoint: after cell \[\d+\]: 7 variables, 1 not picklable", status)


def test_use_carries_functions_classes_and_arrays_to_the_new_session(kernel):
    assert kernel.execute(NAMESPACE, timeout=120).status == "ok"
    before = kernel.execute("import os\nprint(os.getpid())").stream()
    moved = kernel.execute("%dash use cpu=1", timeout=120)
    assert moved.status == "ok", moved.traceback_text()
    text = moved.stream()
    assert "The session moved to worker local-" in text
    assert "Carried over: Point, notes, np, os, point, scale, threading, weights" in text
    assert "Not restored: lock (could not be pickled: _thread.lock" in text
    after = kernel.execute("print(os.getpid())").stream()
    assert after != before
    assert kernel.execute(USE_NAMESPACE).stream() == EXPECTED


def test_with_checkpoints_off_a_lost_session_says_its_variables_are_gone(kernel):
    kernel.execute("kept = 1", timeout=120)
    off = kernel.execute("%dash checkpoint off")
    assert "Checkpoints are off" in off.stream()
    kernel.execute("import os\nos._exit(1)", timeout=60)
    after = kernel.execute("print('kept' in globals())", timeout=120)
    assert after.stream() == "False\n"
    assert "Checkpoints are off (%dash checkpoint on)" in after.stream("stderr")
    on = kernel.execute("%dash checkpoint on", timeout=60)
    assert on.status == "ok" and "Checkpointed " in on.stream()


def test_a_new_kernel_lists_and_restores_an_earlier_kernels_checkpoint(gateway, tmp_path):
    env = dict(gateway.env, JPY_SESSION_NAME=str(tmp_path / "render.ipynb"))
    with KernelDriver(kernel_name="dash", env=env, cwd=str(tmp_path)) as first:
        assert first.execute(NAMESPACE, timeout=120).status == "ok"
        name = local(first, "get_ipython().kernel.checkpoint_name")
        first.execute("%dash checkpoint", timeout=60)
    assert name.startswith("sessions/render-")

    with KernelDriver(kernel_name="dash", env=env, cwd=str(tmp_path)) as second:
        listing = second.execute("%dash restore", timeout=60).stream()
        assert re.search(rf"{re.escape(name)}: 7 variables, .* after cell \[\d+\] ", listing)
        assert "render.ipynb" in listing
        restored = second.execute(f"%dash restore {name}", timeout=120)
        assert restored.status == "ok", restored.traceback_text()
        # After the new session's placement notice (its first cell), the restore's summary.
        assert restored.stream().splitlines()[-1].startswith(f"Restored from {name} version ")
        assert second.execute(USE_NAMESPACE).stream() == EXPECTED
        wrong = second.execute("%dash restore sessions/no-such-thing")
        assert wrong.status == "error" and "no-such-thing" in wrong.error["evalue"]


def test_another_user_cannot_see_or_restore_my_checkpoints(gateway, tmp_path):
    with KernelDriver(kernel_name="dash", env=gateway.env, cwd=str(tmp_path)) as mine:
        mine.execute("secret = 42", timeout=120)
        mine.execute("%dash checkpoint", timeout=60)
        name = local(mine, "get_ipython().kernel.checkpoint_name")
    token = gateway.add_users("mallory")["mallory"]
    env = dict(gateway.env, DASH_TOKEN=token)
    with KernelDriver(kernel_name="dash", env=env, cwd=str(tmp_path)) as theirs:
        listing = theirs.execute("%dash restore", timeout=120).stream()
        assert name not in listing
        refused = theirs.execute(f"%dash restore {name}", timeout=60)
        assert refused.status == "error"
        assert theirs.execute("print('secret' in globals())").stream() == "False\n"


def test_a_session_on_a_draining_machine_moves_with_its_variables(
    gateway_factory, contributors, tmp_path
):
    gw = gateway_factory(local_workers=0)
    gw.wait_for_workers(0)
    caps = ("--cpus", "1", "--memory", "1.5GB", "--gpus", "none")
    agents = {name: contributors(gw, "--name", name, *caps) for name in ("north", "south")}
    gw.wait_for_workers(2)
    with KernelDriver(kernel_name="dash", env=gw.env, cwd=str(tmp_path)) as kernel:
        first = kernel.execute("kept = 41", timeout=120)
        assert first.status == "ok", first.traceback_text()
        machine = first.reply["metadata"]["dash"]["worker"].removesuffix("-cpu")
        other = ({"north", "south"} - {machine}).pop()
        code, body = gw.call("POST", f"dash/api/workers/{machine}/drain")
        assert code == 200, body
        # The drain waits for the session; the notebook's next cell moves it elsewhere.
        deadline = time.monotonic() + 30
        while True:
            run = kernel.execute("print(kept + 1)", timeout=120)
            assert run.status == "ok", run.traceback_text()
            if "is draining" in run.stream("stderr") or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        notice = run.stream("stderr")
        assert f"DASH: machine {machine} is draining. The session moved to worker {other}-cpu" in (
            notice
        )
        assert "Carried over: kept" in notice and run.stream() == "42\n"
        assert run.reply["metadata"]["dash"]["worker"] == f"{other}-cpu"
        assert agents[machine].wait_exit(60) == 0  # drained: nothing runs there any more
