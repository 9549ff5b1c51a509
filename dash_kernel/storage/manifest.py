"""Manifest validation: a JSON Schema for every field's type, then the rules a schema cannot say."""

from __future__ import annotations

import functools
from typing import Any

__all__ = ["FORMATS", "check_manifest", "check_stored_manifest"]

FORMATS = {
    "pickle-oob-1": ("pickle", "buffer"),
    "files-1": ("file",),
    "variables-1": ("pack", "pickle", "buffer"),
}
_SHA = {"type": "string", "pattern": "^[0-9a-f]{64}$"}
_COUNT = {"type": "integer", "minimum": 0}
_PART = {
    "type": "object",
    "required": ["role", "size", "chunks"],
    "properties": {
        "role": {"type": "string"},
        "path": {"type": "string", "minLength": 1},
        "size": _COUNT,
        "chunks": {"type": "array", "items": _SHA},
    },
}
_VARIABLE = {
    "type": "object",
    "required": ["name"],
    "properties": {
        "name": {"type": "string"},
        "type": {"type": "string"},
        "pack": {"type": "array", "items": _COUNT, "minItems": 2, "maxItems": 2},
        "parts": {"type": "array", "items": _COUNT, "minItems": 1},
    },
}
SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "required": ["name", "format", "size", "chunk_size", "parts"],
    "properties": {
        "name": {"type": "string"},
        "version": {"type": "integer", "minimum": 1},
        "format": {"type": "string", "enum": list(FORMATS)},
        "size": _COUNT,
        "chunk_size": {"type": "integer", "minimum": 1},
        "type": {"type": "string"},
        "created": {"type": "string"},
        "user": {"type": "string"},
        "metadata": {"type": "object"},
        "source": {"type": "string"},
        "digest": {"type": "string"},
        "unsaved": {"type": "object", "additionalProperties": {"type": "string"}},
        "variables": {"type": "array", "items": _VARIABLE},
        "parts": {"type": "array", "items": _PART},
    },
}
# Stored manifests also carry what the store assigned.
STORED_SCHEMA: dict[str, Any] = {
    **SCHEMA,
    "required": [*SCHEMA["required"], "version", "user", "created"],
}


@functools.cache
def _validator(stored: bool) -> Any:
    # Imported on first use: jsonschema (a jupyter_server dependency) is slow to import.
    from jsonschema import Draft202012Validator, validators

    # JSON Schema counts true and 1.0 as integers; sizes and indices must be Python ints.
    checker = Draft202012Validator.TYPE_CHECKER.redefine(
        "integer", lambda _, value: isinstance(value, int) and not isinstance(value, bool)
    )
    cls = validators.extend(Draft202012Validator, type_checker=checker)
    return cls(STORED_SCHEMA if stored else SCHEMA)


def _field(path: Any) -> str:
    """``parts[0].size`` for the JSON path ``["parts", 0, "size"]``."""
    text = ""
    for step in path:
        text += f"[{step}]" if isinstance(step, int) else (f".{step}" if text else str(step))
    return text


def _check_schema(manifest: Any, stored: bool) -> None:
    from jsonschema.exceptions import best_match

    error = best_match(_validator(stored).iter_errors(manifest))
    if error is None:
        return
    where = _field(error.absolute_path)
    if error.validator == "required" and isinstance(error.instance, dict):
        missing = [k for k in error.validator_value if k not in error.instance]
        where = ".".join(filter(None, [where, missing[0] if missing else ""]))
        raise ValueError(f"manifest field {where!r} is missing")
    if not where:
        raise ValueError(f"a manifest is a JSON object, not {type(manifest).__name__}")
    raise ValueError(f"manifest field {where!r} is invalid: {error.message}")


def check_manifest(manifest: Any, *, stored: bool = False) -> dict[str, Any]:
    """``manifest`` if it is valid (as sent to ``put_manifest``, or as ``stored``);
    ValueError naming the first bad field otherwise."""
    _check_schema(manifest, stored)
    from .transport import check_name

    check_name(manifest["name"])
    fmt, parts = manifest["format"], manifest["parts"]
    total = 0
    for i, part in enumerate(parts):
        _check_part(i, part, fmt, manifest["chunk_size"])
        total += part["size"]
    if fmt == "pickle-oob-1" and (not parts or parts[0]["role"] != "pickle"):
        raise ValueError("a pickle-oob-1 manifest starts with its pickle part")
    if total != manifest["size"]:
        raise ValueError(
            f"manifest size {manifest['size']} is not the sum of its parts' sizes ({total})"
        )
    if fmt == "variables-1":
        _check_variables(manifest.get("variables"), parts)
    return manifest


def check_stored_manifest(manifest: Any) -> dict[str, Any]:
    """``manifest`` if it is a valid stored manifest (with version, user and created)."""
    return check_manifest(manifest, stored=True)


def _check_part(i: int, part: dict[str, Any], fmt: str, chunk_size: int) -> None:
    if part["role"] not in FORMATS[fmt]:
        raise ValueError(f"manifest part {i} must have a role among {FORMATS[fmt]}")
    if len(part["chunks"]) != -(-part["size"] // chunk_size):
        raise ValueError(
            f"manifest part {i} has {len(part['chunks'])} chunks for {part['size']} bytes "
            f"in chunks of {chunk_size}"
        )
    if part["role"] == "file":
        path = part.get("path")
        if not path:
            raise ValueError(f"manifest part {i} (a file) needs a relative path")
        if path.startswith("/") or any(s in ("", ".", "..") for s in path.split("/")):
            raise ValueError(f"manifest part {i} has an unsafe path {path!r}")


def _check_variables(variables: Any, parts: list[dict[str, Any]]) -> None:
    """A variables-1 manifest's index: each variable is a slice of the pack (part 0) or a
    pickle part followed by its buffer parts."""
    if variables is None:
        raise ValueError("a variables-1 manifest needs a list of variables")
    for i, variable in enumerate(variables):
        if "pack" in variable:
            start, length = variable["pack"]
            ok = bool(parts) and parts[0]["role"] == "pack" and start + length <= parts[0]["size"]
        else:
            indices = variable.get("parts")
            ok = (
                bool(indices)
                and all(n < len(parts) for n in indices)
                and parts[indices[0]]["role"] == "pickle"
                and all(parts[n]["role"] == "buffer" for n in indices[1:])
            )
        if not ok:
            raise ValueError(f"manifest variable {i} ({variable['name']!r}) has a bad layout")
