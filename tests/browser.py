"""Real headless Chromium for browser tests: a browser per module, fresh pages, screenshots.

``tests/conftest.py`` registers it as a plugin (the ``browser`` fixture); test modules
import the helpers::

    from browser import open_page, screenshot

The browser is Debian's ``chromium`` package at ``/usr/bin/chromium``, driven by
Playwright's Python package; Playwright never downloads a browser of its own. Without
that executable the ``browser`` fixture fails (it does not skip): install it with
``apt-get install -y --no-install-recommends chromium``.

The fixture is module-scoped, not session-wide: while Playwright's synchronous API is
open it leaves its event loop marked as running in the main thread, so ``asyncio.run``
in that thread fails. Closing the browser after each module keeps other modules
unaffected; inside a browser test, run asyncio code in another thread (:func:`run_async`).

Screenshots land in ``<repository>/test-artifacts/screenshots/<name>.png``.
"""

from __future__ import annotations

import asyncio
import os
import re
from collections.abc import Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import pytest

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Page

CHROMIUM = "/usr/bin/chromium"
SCREENSHOTS = Path(__file__).resolve().parent.parent / "test-artifacts" / "screenshots"
# Playwright (actions and expect()) waits this long (ms) unless a test says otherwise.
DEFAULT_TIMEOUT_MS = 10_000
T = TypeVar("T")


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    """One headless Chromium per test module; closed (and its processes gone) after."""
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(
            f"{CHROMIUM} is missing: the browser tests need Debian's chromium package "
            "(apt-get install -y --no-install-recommends chromium)"
        )
    # Never let Playwright fetch a browser: the one above is the one under test.
    os.environ.setdefault("PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD", "1")
    from playwright.sync_api import expect, sync_playwright

    # expect() has a timeout of its own (5 s): give it the pages' one.
    expect.set_options(timeout=DEFAULT_TIMEOUT_MS)
    with sync_playwright() as playwright:
        instance = playwright.chromium.launch(
            executable_path=CHROMIUM,
            headless=True,
            # Containers often lack a usable /dev/shm and user namespaces for the sandbox.
            args=["--disable-dev-shm-usage", "--no-sandbox"],
        )
        try:
            yield instance
        finally:
            instance.close()


def open_page(browser: Browser, url: str, *, viewport: tuple[int, int] = (1366, 768)) -> Page:
    """A page in a fresh browser context (no cookies shared with other pages) at ``url``.

    The page closes with its context: call ``page.context.close()`` when done, or let the
    module's browser close it.
    """
    width, height = viewport
    context = browser.new_context(viewport={"width": width, "height": height})
    context.set_default_timeout(DEFAULT_TIMEOUT_MS)
    page = context.new_page()
    page.goto(url)
    return page


def screenshot(page: Page, name: str) -> Path:
    """Save a full-page PNG of ``page`` as ``test-artifacts/screenshots/<name>.png``."""
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-") or "page"
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / f"{safe}.png"
    page.screenshot(path=str(path), full_page=True)
    return path


def run_async(coroutine: Coroutine[Any, Any, T], timeout: float = 60) -> T:
    """``asyncio.run(coroutine)`` in a thread of its own (see the module's docstring)."""
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coroutine).result(timeout)
