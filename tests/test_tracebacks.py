"""Cleaning and rendering remote tracebacks never replaces the user's error with its own."""

from __future__ import annotations

from dash_kernel.tracebacks import attach_renderer, clean_traceback, render_traceback


def test_an_exception_without_user_frames_is_kept_as_it_is():
    exc = RuntimeError("the worker died")  # as Dask's KilledWorker arrives: no traceback
    assert clean_traceback(exc) is exc
    assert render_traceback(exc)[-1].endswith("RuntimeError\x1b[0m: the worker died")


class Unprintable(Exception):
    def __str__(self) -> str:
        raise TypeError("no str for you")


def test_a_failure_to_render_falls_back_to_the_plain_traceback():
    try:
        raise Unprintable()
    except Unprintable as caught:
        exc = caught
    lines = attach_renderer(clean_traceback(exc))._render_traceback_()
    assert any("Unprintable" in line for line in lines), lines
    assert any("test_tracebacks.py" in line for line in lines), lines
