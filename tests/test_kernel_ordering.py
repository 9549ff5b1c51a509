"""Everything a cell published reaches the front end before that cell's ``status: idle``
(nbclient and papermill drop what comes after), even with several DASH kernels busy."""

from __future__ import annotations

import queue
import time
from concurrent.futures import ThreadPoolExecutor

from kernels import KernelDriver

KERNELS = 4
CELLS = 40
# prints right before the cell finishes, and so races the cell's reply
CELL = "import sys\nprint('cell', {n}, 'starts')\nsys.stdout.write('cell {n} ends\\n')"


def _run_cells(kernel: KernelDriver) -> list[str]:
    """Run the cells one after another; say what arrived late or went missing."""
    client = kernel.client
    problems = []
    for n in range(CELLS):
        msg_id = client.execute(CELL.format(n=n))
        texts = []
        while True:
            msg = client.get_iopub_msg(timeout=60)
            if msg["parent_header"].get("msg_id") != msg_id:
                if msg["msg_type"] == "stream":
                    problems.append(f"after idle: {msg['content']['text']!r}")
                continue
            if msg["msg_type"] == "stream":
                texts.append(msg["content"]["text"])
            if msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
                break
        reply = client.get_shell_msg(timeout=60)
        assert reply["parent_header"]["msg_id"] == msg_id
        if "".join(texts) != f"cell {n} starts\ncell {n} ends\n":
            problems.append(f"cell {n} before idle: {texts!r}")
    # anything still on its way belongs to a cell already idle
    deadline = time.monotonic() + 2
    while time.monotonic() < deadline:
        try:
            msg = client.get_iopub_msg(timeout=0.2)
        except queue.Empty:
            continue
        if msg["msg_type"] == "stream":
            problems.append(f"after idle: {msg['content']['text']!r}")
    return problems


def test_every_output_of_a_cell_comes_before_its_idle(gateway_factory, tmp_path):
    # a session holds a worker for its whole life: one worker per kernel
    gateway = gateway_factory(local_workers=KERNELS)
    gateway.wait_for_workers(KERNELS)

    def start(i: int) -> KernelDriver:
        kernel = KernelDriver(kernel_name="dash", env=gateway.env, cwd=str(tmp_path))
        first = kernel.execute(f"kernel_number = {i}", timeout=180)
        assert first.status == "ok", first.traceback_text()
        return kernel

    with ThreadPoolExecutor(KERNELS) as pool:
        kernels = list(pool.map(start, range(KERNELS)))
        try:
            problems = list(pool.map(_run_cells, kernels))
        finally:
            list(pool.map(KernelDriver.shutdown, kernels))
    assert problems == [[]] * KERNELS
