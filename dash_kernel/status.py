"""A readable picture of the cluster: text for terminals, HTML for notebooks."""

from __future__ import annotations

import html
from dataclasses import dataclass
from typing import Any

from dask.utils import format_bytes

from .cluster import Connection
from .resources import counted_gpus, format_resources

__all__ = ["ClusterStatus", "WorkersTable", "cluster_status"]

_COLUMNS = ("name", "status", "threads", "memory", "resources", "address")


@dataclass
class WorkersTable:
    rows: list[dict[str, str]]

    def __str__(self) -> str:
        if not self.rows:
            return "no workers connected"
        widths = {c: max(len(c), *(len(r[c]) for r in self.rows)) for c in _COLUMNS}
        lines = ["  ".join(c.ljust(widths[c]) for c in _COLUMNS)]
        lines.append("  ".join("-" * widths[c] for c in _COLUMNS))
        lines += ["  ".join(r[c].ljust(widths[c]) for c in _COLUMNS) for r in self.rows]
        return "\n".join(lines)

    __repr__ = __str__

    def _repr_html_(self) -> str:
        if not self.rows:
            return "<p>no workers connected</p>"
        head = "".join(f"<th>{c}</th>" for c in _COLUMNS)
        body = "".join(
            "<tr>" + "".join(f"<td>{html.escape(r[c])}</td>" for c in _COLUMNS) + "</tr>"
            for r in self.rows
        )
        return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


@dataclass
class ClusterStatus:
    mode: str
    gateway: str | None
    scheduler: str
    workers: WorkersTable
    totals: dict[str, Any]
    session: str | None = None
    checkpoint: str | None = None

    def workers_table(self) -> WorkersTable:
        return self.workers

    def _summary(self) -> list[tuple[str, str]]:
        where = self.gateway or {
            "embedded": "embedded cluster (this process)",
            "cluster": "its notebook's cluster",
        }.get(self.mode, self.mode)
        rows = [("this session", self.session)] if self.session else []
        if self.checkpoint:
            rows.append(("checkpoint", self.checkpoint))
        if self.gateway:
            rows.append(("dashboard", self.gateway.rstrip("/") + "/dash/"))
        return rows + [
            ("connected to", where),
            ("scheduler", self.scheduler),
            ("workers", str(len(self.workers.rows))),
            ("threads", str(self.totals["threads"])),
            ("memory", format_bytes(self.totals["memory"])),
            ("GPUs", str(self.totals["gpus"])),
        ]

    def __str__(self) -> str:
        summary = "\n".join(f"{k:>13}: {v}" for k, v in self._summary())
        return f"DASH cluster\n{summary}\n\n{self.workers}"

    __repr__ = __str__

    def _repr_html_(self) -> str:
        rows = "".join(
            f"<tr><th style='text-align:left'>{k}</th><td>{html.escape(v)}</td></tr>"
            for k, v in self._summary()
        )
        return f"<h4>DASH cluster</h4><table>{rows}</table>{self.workers._repr_html_()}"


def cluster_status(conn: Connection) -> ClusterStatus:
    """Ask the scheduler for its workers and summarize them."""
    info = conn.client.scheduler_info(n_workers=-1)
    rows, threads, memory, gpus = [], 0, 0, 0
    for address, worker in sorted(info["workers"].items(), key=lambda kv: str(kv[1].get("name"))):
        resources = worker.get("resources") or {}
        threads += worker.get("nthreads", 0)
        memory += worker.get("memory_limit") or 0
        gpus += counted_gpus(resources)
        rows.append(
            {
                "name": str(worker.get("name", address)),
                "status": str(worker.get("status", "running")),
                "threads": str(worker.get("nthreads", "")),
                "memory": format_bytes(worker.get("memory_limit") or 0),
                "resources": format_resources(resources),
                "address": address,
            }
        )
    return ClusterStatus(
        mode=conn.mode,
        gateway=conn.gateway_url,
        scheduler=info.get("address", conn.scheduler_address),
        workers=WorkersTable(rows),
        totals={"threads": threads, "memory": memory, "gpus": gpus},
    )
