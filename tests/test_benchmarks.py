"""``python -m benchmarks`` end to end at tiny sizes: a real gateway, a valid JSON report."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parent.parent
IDS = {
    "cell_roundtrip",
    "magic_roundtrip",
    "fanout",
    "fanout_ipyparallel",
    "frames",
    "transfer",
    "storage",
    "restore",
    "startup",
    "join",
    "gpu_slots",
    "lease",
}
# One row of each kind: on the gateway's cluster, on a joined machine, on leases.
SELECTED = {"fanout", "join", "lease"}
KEYS = {"id", "what", "dash", "baseline", "baseline_name", "unit", "ratio", "n"}


def _run_benchmarks(tmp_path: Path) -> tuple[subprocess.CompletedProcess[str], Path]:
    report = tmp_path / "report.json"
    command = [
        sys.executable, "-m", "benchmarks", "--quick", "--tiny",
        "--json", str(report), "--only", ",".join(sorted(SELECTED)),
    ]  # fmt: skip
    # The run's scratch files (gateway, kernel) go under tmp_path, so leftovers can be found.
    env = dict(os.environ, TMPDIR=str(tmp_path))
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=420)
    return done, report


def _started_under(root: Path) -> list[str]:
    """Processes still running whose command line or working directory lies under ``root``."""
    found = []
    for proc in psutil.process_iter(["cmdline", "cwd"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        if str(root) in cmdline or (proc.info["cwd"] or "").startswith(str(root)):
            found.append(cmdline)
    return found


def test_quick_run_writes_a_valid_report(tmp_path):
    done, path = _run_benchmarks(tmp_path)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    report = json.loads(path.read_text())

    machine = report["machine"]
    for key in ("cpu_count", "cpu_model", "ram_gib", "python", "dask", "distributed", "date"):
        assert machine.get(key), key

    rows = {row["id"]: row for row in report["comparisons"]}
    assert set(rows) == IDS
    for name, row in rows.items():
        assert set(row) >= KEYS, (name, row)
        if row.get("missing"):
            assert row["reason"], name
            assert row["dash"] is None and row["baseline"] is None and row["ratio"] is None, name
        else:
            assert not row.get("failed"), row
            assert row["dash"] > 0 and row["baseline"] > 0 and row["n"] > 0, row
            assert abs(row["ratio"] - row["dash"] / row["baseline"]) < 1e-3 * row["ratio"], row
    for name in SELECTED:
        assert not rows[name].get("missing"), rows[name]
    for name in IDS - SELECTED:
        assert rows[name]["missing"], name
    lease = rows["lease"]
    assert lease["granted_to_registered_p95_s"] >= lease["granted_to_registered_median_s"] > 0

    table = done.stdout
    assert all(name in table for name in IDS), table
    # The run stopped its gateway, scheduler, workers and kernel.
    assert not _started_under(tmp_path), _started_under(tmp_path)
