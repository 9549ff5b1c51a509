"""The Jupyter project's kernel protocol conformance suite, run against the DASH kernel.

It runs with no gateway configured, so the kernel starts its embedded cluster: the path a
notebook in a bare VS Code or JupyterLab takes.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import jupyter_kernel_test

REPO = Path(__file__).resolve().parent.parent
# The longest the kernel may take to answer a request here (its own deadline for relayed
# questions is DashKernel.request_timeout).
REPLY_TIMEOUT = 60


class DashKernelConformance(jupyter_kernel_test.KernelTests):
    kernel_name = "dash"
    language_name = "python"
    file_extension = ".py"

    code_hello_world = "print('hello, world')"
    code_stderr = "import sys; print('test', file=sys.stderr)"
    completion_samples = [{"text": "zi", "matches": {"zip"}}]
    complete_code_samples = ["1", "print('hello, world')", "def f(x):\n  return x*2\n\n\n"]
    incomplete_code_samples = ["print('''hello", "def f(x):\n  x*2"]
    invalid_code_samples = ["import = 7q"]
    code_page_something = "zip?"
    code_generate_error = "raise ValueError('conformance')"
    code_execute_result = [
        {"code": "1+2+3", "result": "6"},
        {"code": "[n*n for n in range(3)]", "result": "[0, 1, 4]"},
    ]
    code_display_data = [
        {
            "code": "from IPython.display import HTML, display; display(HTML('<b>test</b>'))",
            "mime": "text/html",
        },
    ]
    code_history_pattern = "1?2*"
    # as for ipykernel itself: IPython answers a range in the current session as session 0
    supported_history_operations = ("tail", "search")
    code_inspect_sample = "zip"
    code_clear_output = "from IPython.display import clear_output; clear_output()"

    def get_non_kernel_info_reply(self, timeout: float | None = None) -> dict[str, Any] | None:
        # jupyter_kernel_test waits forever for most replies: one that never comes must
        # fail its test, not hang the suite.
        return super().get_non_kernel_info_reply(timeout=timeout or REPLY_TIMEOUT)

    @classmethod
    def setUpClass(cls) -> None:
        cls._saved_env = dict(os.environ)
        for name in ("DASH_GATEWAY_URL", "DASH_TOKEN"):
            os.environ.pop(name, None)
        os.environ.update(DASH_LOCAL_WORKERS="1")
        super().setUpClass()

    @classmethod
    def tearDownClass(cls) -> None:
        super().tearDownClass()
        os.environ.clear()
        os.environ.update(cls._saved_env)
