"""The report's three forms: a table for the terminal, JSON, and a bar chart of ratios."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# Other processes and the hypervisor taking more than this many cores during a row make
# its numbers suspect.
NOISY_CORES = 0.3


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


def table(report: dict[str, Any]) -> str:
    """A plain-text table: one line per comparison, then the reasons for the ones not run."""
    machine, run = report["machine"], report.get("run", {})
    header = ["id", "dash", "baseline", "unit", "ratio", "n", "others", "steal", "baseline is"]
    lines = [header]
    notes = []
    for row in report["comparisons"]:
        if row["dash"] is None:
            label = "FAILED" if row.get("failed") else "missing"
            lines.append([row["id"], "-", "-", row["unit"], "-", "-", "-", "-", label])
            notes.append(f"  {row['id']}: {row.get('reason', '')}")
            continue
        others, steal = row.get("others_cpu_cores"), row.get("steal_cpu_cores")
        flag = "" if (others or 0) + (steal or 0) < NOISY_CORES else " !"
        lines.append(
            [
                row["id"],
                _number(row["dash"]),
                _number(row["baseline"]),
                row["unit"],
                _number(row["ratio"]),
                str(row["n"]),
                _number(others),
                _number(steal) + flag,
                row["baseline_name"],
            ]
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    body = [
        "  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip()
        for line in lines
    ]
    body.insert(1, "  ".join("-" * w for w in widths))
    intro = (
        f"DASH benchmarks ({run.get('mode', '?')}) on {machine['cpu_count']} x "
        f"{machine['cpu_model']}, {machine['ram_gib']} GiB, Python {machine['python']}, "
        f"dask {machine['dask']}, distributed {machine['distributed']}, {machine['date']}\n"
        "ratio = DASH / baseline (below 1: DASH is cheaper); others = CPU cores used by "
        "processes outside this run meanwhile, steal = cores the hypervisor took "
        f"(! when together above {NOISY_CORES}: noisy)"
    )
    out = [intro, "", *body]
    if notes:
        out += ["", "not measured:", *notes]
    return "\n".join(out)


def write_json(report: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")


def plot(report: dict[str, Any], path: Path) -> None:
    """A horizontal bar chart of the ratios, with the break-even line at 1."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [row for row in report["comparisons"] if row["ratio"] is not None]
    figure, axes = plt.subplots(figsize=(8, 0.6 * max(len(rows), 1) + 1.5))
    if rows:
        labels = [row["id"] for row in rows]
        ratios = [row["ratio"] for row in rows]
        colors = ["tab:green" if r <= 1 else "tab:red" for r in ratios]
        axes.barh(labels, ratios, color=colors)
        for y, ratio in enumerate(ratios):
            axes.annotate(
                f"{ratio:.2f}", (ratio, y), xytext=(4, 0), textcoords="offset points", va="center"
            )
        axes.invert_yaxis()
    axes.axvline(1.0, color="black", linewidth=1)
    axes.set_xlabel("DASH cost / baseline cost (below 1: DASH is cheaper)")
    axes.set_title(f"DASH benchmarks ({report.get('run', {}).get('mode', '?')})")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)
