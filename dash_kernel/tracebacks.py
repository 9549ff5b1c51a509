"""Remote tracebacks: drop Dask's and DASH's frames, and show the rest as IPython would.

A remote exception arrives with a traceback rebuilt by tblib. IPython 9 renders frames
through ``stack_data``, which misplaces the lines of such rebuilt frames; Python's own
``traceback.extract_tb`` reads ``tb_lineno`` and ``linecache`` and is right, so remote
errors carry a ``_render_traceback_`` built on it.
"""

from __future__ import annotations

import linecache
import logging
import os
import sys
import traceback
from collections.abc import Callable
from types import TracebackType

from .errors import DashError

__all__ = ["attach_renderer", "clean_traceback", "render_traceback"]

CodeNamer = Callable[[str], "tuple[str, str] | None"]

_OWN_DIR = os.path.dirname(os.path.abspath(__file__))
_INTERNAL_PARTS = (f"{os.sep}distributed{os.sep}", f"{os.sep}dash_kernel{os.sep}")
_RED, _GREEN, _CYAN, _RESET = "\x1b[0;31m", "\x1b[0;32m", "\x1b[0;36m", "\x1b[0m"
_CONTEXT = 2

log = logging.getLogger(__name__)


def _is_internal(filename: str) -> bool:
    if filename.startswith(_OWN_DIR) or any(part in filename for part in _INTERNAL_PARTS):
        return True
    ipython = sys.modules.get("IPython")
    return ipython is not None and filename.startswith(os.path.dirname(ipython.__file__))


def _kept(tb: TracebackType | None) -> list[TracebackType]:
    kept = []
    while tb is not None:
        if not _is_internal(tb.tb_frame.f_code.co_filename):
            kept.append(tb)
        tb = tb.tb_next
    return kept


def _chain(exc: BaseException) -> list[BaseException]:
    """``exc`` and the exceptions it was raised from, oldest first."""
    chain, seen, current = [], set(), exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        chain.append(current)
        current = current.__cause__ or (
            None if current.__suppress_context__ else current.__context__
        )
    return chain[::-1]


def _relinked(tb: TracebackType | None) -> TracebackType | None:
    """``tb`` with Dask's, IPython's and DASH's own frames unlinked."""
    kept = _kept(tb)
    if not kept:
        return None
    for this, following in zip(kept, [*kept[1:], None], strict=True):
        this.tb_next = following
    return kept[0]


def clean_traceback(exc: BaseException) -> BaseException:
    """Unlink Dask's and DASH's own frames from ``exc``'s traceback (and its causes').

    Never raises: on any failure ``exc`` is returned as it is, since the user's error
    matters more than a tidy traceback.
    """
    try:
        for current in _chain(exc):
            current.__traceback__ = _relinked(current.__traceback__)
    except Exception:
        log.debug("could not clean the traceback of %r", exc, exc_info=True)
    return exc


def _ipython_namer() -> CodeNamer | None:
    if "IPython" not in sys.modules:
        return None
    from IPython import get_ipython

    shell = get_ipython()
    return getattr(getattr(shell, "compile", None), "format_code_name", None)


def _frame_lines(frame: traceback.FrameSummary, namer: CodeNamer | None) -> list[str]:
    named = namer(frame.filename) if namer is not None else None
    where = f"{named[0]} {named[1]}" if named else f"File {frame.filename}"
    header = f"{_GREEN}{where}{_RESET}, line {frame.lineno}"
    if frame.name != "<module>":
        header += f", in {_CYAN}{frame.name}{_RESET}()"
    lines = [header]
    lineno = frame.lineno or 0
    source = linecache.getlines(frame.filename)
    for number in range(max(1, lineno - _CONTEXT), min(len(source), lineno + _CONTEXT) + 1):
        text = source[number - 1].rstrip("\n")
        if number == lineno:
            lines.append(f"{_GREEN}----> {number:<2}{_RESET}{text}")
        else:
            lines.append(f"      {number:<2}{text}")
    return ["\n".join(lines)]


def render_traceback(exc: BaseException, tb: TracebackType | None = None) -> list[str]:
    """IPython-style traceback lines (with colours) for ``exc``, without internal frames.

    ``tb`` overrides ``exc.__traceback__`` for the last exception of the chain. Cells are
    labelled as IPython labels them ("Cell In[3]") when running in IPython. If rendering
    fails, Python's plain traceback of ``exc`` is returned instead.
    """
    try:
        return _render(exc, tb)
    except Exception:
        log.debug("could not render the traceback of %r", exc, exc_info=True)
        return _plain(exc, tb)


def _plain(exc: BaseException, tb: TracebackType | None) -> list[str]:
    try:
        lines = traceback.format_exception(type(exc), exc, tb or exc.__traceback__)
    except Exception:
        lines = traceback.format_exception_only(type(exc), exc)
    return "".join(lines).rstrip("\n").split("\n")


def _render(exc: BaseException, tb: TracebackType | None) -> list[str]:
    out: list[str] = []
    namer = _ipython_namer()
    chain = _chain(exc)
    for position, current in enumerate(chain):
        frames = traceback.extract_tb(
            _relinked(tb if current is exc and tb is not None else current.__traceback__)
        )
        name = type(current).__name__
        out.append(_RED + "-" * 75 + _RESET)
        out.append(
            f"{_RED}{name}{_RESET}".ljust(42 + len(_RED) + len(_RESET))
            + "Traceback (most recent call last)"
        )
        for frame in frames:
            out += _frame_lines(frame, namer)
            out.append("")
        message = str(current)
        out.append(f"{_RED}{name}{_RESET}: {message}" if message else f"{_RED}{name}{_RESET}")
        if position < len(chain) - 1:
            following = chain[position + 1]
            out.append("")
            out.append(
                "The above exception was the direct cause of the following exception:"
                if following.__cause__ is current
                else "During handling of the above exception, another exception occurred:"
            )
            out.append("")
    return out


def attach_renderer(exc: BaseException, *, tb: TracebackType | None = None) -> BaseException:
    """Have IPython show ``exc`` with :func:`render_traceback`. ``_render_traceback_`` is
    IPython's hook; as an instance attribute it leaves the exception its own type, so
    ``except ValueError`` still catches a remote ``ValueError``. DASH's own errors keep
    their one-line rendering."""
    if isinstance(exc, DashError):
        return exc
    exc._render_traceback_ = lambda: render_traceback(exc, tb)  # type: ignore[attr-defined]
    return exc
