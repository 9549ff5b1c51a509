"""What ``dk.ls`` and ``dk.versions`` return: readable entries and tables, the manifest one call away."""

from __future__ import annotations

import html
import json
from collections.abc import Callable, Iterable
from typing import Any

__all__ = ["Listing", "ObjectEntry", "human_size"]

# The fields an entry keeps from a manifest's summary; the rest is in entry.manifest().
FIELDS = ("name", "version", "size", "type", "created", "user", "format", "metadata", "source")
COLUMNS = ("name", "version", "size", "type", "created", "metadata")
_METADATA_WIDTH = 40

Loader = Callable[[str, int], dict[str, Any]]


def human_size(n: float) -> str:
    """``1.5 MiB`` for 1572864."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover


class ObjectEntry(dict):
    """One version of a stored object: a dict of ``name``, ``version``, ``size``, ``type``,
    ``created``, ``user``, ``format``, ``metadata`` (``variables``: the names, for a session
    checkpoint; ``damaged``: why, for a version whose manifest cannot be read), also
    readable as attributes; :meth:`manifest` fetches the whole manifest."""

    def __init__(self, fields: dict[str, Any] | None = None, loader: Loader | None = None):
        super().__init__(fields or {})
        self._loader = loader

    @classmethod
    def from_summary(cls, summary: dict[str, Any], loader: Loader | None = None) -> ObjectEntry:
        """The readable fields of a manifest's summary (as transports list them)."""
        fields = {k: summary[k] for k in FIELDS if k in summary}
        variables = summary.get("variables")
        if isinstance(variables, list):
            fields["variables"] = sorted(
                str(v.get("name")) for v in variables if isinstance(v, dict)
            )
        if "damaged" in summary:
            fields["damaged"] = summary["damaged"]
        return cls(fields, loader)

    def __reduce__(self) -> tuple[Any, ...]:
        # The loader (a live storage client) stays behind: an entry sent elsewhere is data.
        return (ObjectEntry, (dict(self),))

    def __getattr__(self, key: str) -> Any:
        try:
            return self[key]
        except KeyError:
            raise AttributeError(key) from None

    @property
    def is_damaged(self) -> bool:
        return "damaged" in self

    def manifest(self) -> dict[str, Any]:
        """This version's whole manifest (its parts and chunk hashes), from storage."""
        if self._loader is None:
            raise RuntimeError("this entry was not listed from storage")
        return self._loader(self["name"], self["version"])

    def cells(self) -> dict[str, str]:
        """Each column's text, for tables."""
        if self.is_damaged:
            return {"name": self["name"], "version": str(self["version"]),
                    "size": "", "type": "DAMAGED", "created": "",
                    "metadata": f"{self['damaged']} (dk.rm removes it)"}  # fmt: skip
        metadata = json.dumps(self.get("metadata") or {}, sort_keys=True, default=str)
        if len(metadata) > _METADATA_WIDTH:
            metadata = metadata[: _METADATA_WIDTH - 1] + "…"
        return {
            "name": self["name"],
            "version": str(self["version"]),
            "size": human_size(int(self.get("size") or 0)),
            "type": str(self.get("type", "")),
            "created": str(self.get("created", ""))[:19].replace("T", " "),
            "metadata": "" if metadata == "{}" else metadata,
        }

    def __repr__(self) -> str:
        cells = self.cells()
        if self.is_damaged:
            return f"<{cells['name']} v{cells['version']}: damaged, {self['damaged']}>"
        return (
            f"<{cells['name']} v{cells['version']}: {cells['size']}, {cells['type']}, "
            f"{cells['created']}>"
        )


class Listing(list):
    """Entries (:class:`ObjectEntry`) shown as a table; ``damaged`` lists the entries whose
    manifest cannot be read, and ``manifest(name)`` fetches one entry's manifest."""

    def __init__(self, entries: Iterable[ObjectEntry] = ()):
        super().__init__(entries)

    @classmethod
    def of(cls, summaries: Iterable[dict[str, Any]], loader: Loader | None = None) -> Listing:
        return cls(ObjectEntry.from_summary(s, loader) for s in summaries)

    @property
    def damaged(self) -> list[ObjectEntry]:
        return [e for e in self if e.is_damaged]

    def manifest(self, name: str) -> dict[str, Any]:
        """The manifest of the listed version of ``name``."""
        for entry in self:
            if entry["name"] == name:
                return entry.manifest()
        raise KeyError(f"{name!r} is not in this listing")

    def _rows(self) -> list[dict[str, str]]:
        return [(e if isinstance(e, ObjectEntry) else ObjectEntry(e)).cells() for e in self]

    def __repr__(self) -> str:
        if not self:
            return "(no objects)"
        rows = self._rows()
        widths = {c: max(len(c), *(len(r[c]) for r in rows)) for c in COLUMNS}
        lines = ["  ".join(c.ljust(widths[c]) for c in COLUMNS).rstrip()]
        lines += ["  ".join(r[c].ljust(widths[c]) for c in COLUMNS).rstrip() for r in rows]
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        if not self:
            return "<p>(no objects)</p>"
        head = "".join(f"<th>{c}</th>" for c in COLUMNS)
        body = "".join(
            "<tr>" + "".join(f"<td>{html.escape(r[c])}</td>" for c in COLUMNS) + "</tr>"
            for r in self._rows()
        )
        return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
