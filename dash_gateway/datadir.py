"""One gateway per data directory: a lock file, held while the gateway runs, naming it."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from pathlib import Path
from typing import Any

LOCK_FILE = "gateway.lock"
# A gateway that has just taken the lock writes its pid and URL a moment later.
HOLDER_WAIT = 2.0


class DataDirInUse(Exception):
    """Another gateway holds the data directory; the message names it."""


class DataDirLock:
    """The lock on a data directory, held by this process until :meth:`release` or its death.

    A POSIX record lock (``lockf``), not ``flock``: the kernel drops it when the process
    dies, however it dies, and a child forked without exec does not inherit it, so no
    orphaned worker can keep a dead gateway's directory locked.
    """

    def __init__(self, data_dir: str | os.PathLike[str]):
        self.data_dir = Path(data_dir)
        self.path = self.data_dir / LOCK_FILE
        self._fd: int | None = None

    def acquire(self, url: str) -> None:
        """Take the lock and record this process's pid and ``url``; :class:`DataDirInUse` if
        another gateway holds it."""
        self.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = _wait_for_holder(fd)
            os.close(fd)
            raise DataDirInUse(in_use_message(self.data_dir, holder)) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "url": url}).encode(), 0)
        self._fd = fd

    def release(self) -> None:
        """Let the next gateway have the directory (the lock file stays: removing it would race)."""
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            os.ftruncate(self._fd, 0)
        os.close(self._fd)
        self._fd = None


def _read_holder(fd: int) -> dict[str, Any] | None:
    try:
        holder = json.loads(os.pread(fd, 4096, 0) or b"null")
    except ValueError:
        return None
    return holder if isinstance(holder, dict) else None


def _wait_for_holder(fd: int) -> dict[str, Any] | None:
    deadline = time.monotonic() + HOLDER_WAIT
    while (holder := _read_holder(fd)) is None and time.monotonic() < deadline:
        time.sleep(0.1)
    return holder


def in_use_message(data_dir: Path, holder: dict[str, Any] | None) -> str:
    """What a second gateway says before it exits."""
    who = "another DASH gateway"
    if holder:
        who += f" (pid {holder.get('pid', '?')}, {holder.get('url') or 'URL unknown'})"
    return (
        f"{who} is already running on the data directory {data_dir}: stop it first, "
        "or give this gateway a data directory of its own (--data-dir)"
    )
