"""JupyterLab with DASH's prebuilt extension, in real headless Chromium against a live gateway:
the launcher offers "DASH distributed", the status bar names the worker a notebook's session
runs on, the side panel lists the workers, and Lab keeps working when the DASH API is gone.
Also checks that the built assets are in the repository, current, and shipped in the wheel.

Screenshots go to ``test-artifacts/screenshots/lab-*.png``.
"""

from __future__ import annotations

import html
import json
import re
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from browser import open_page, screenshot
from conftest import Gateway, launch_gateway, wait_until
from playwright.sync_api import Browser, Page, expect

from dash_kernel._version import __version__

ROOT = Path(__file__).resolve().parent.parent
SOURCE = ROOT / "dash_nbext" / "labextension"
NAME = json.loads((SOURCE / "package.json").read_text())["name"]
PREBUILT = SOURCE / "prebuilt" / NAME
# Lab starts slowly on a small machine; the first DASH cell starts a remote session.
LAB_LOADS_MS = 45_000
CELL_RUNS_MS = 60_000
STATUS = "#jp-main-statusbar .dash-StatusItem-button"
PANEL = "#dash-distributed-panel"


@pytest.fixture(scope="module")
def lab_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    """A gateway of this module's own, with two local workers. It is given nothing about
    the kernelspec or the Lab extension: it must find what the install put in place."""
    gateway = launch_gateway(tmp_path_factory.mktemp("lab-gateway"), local_workers=2)
    try:
        gateway.wait_for_workers(2)
        yield gateway
    finally:
        gateway.stop()


def page_config(gw: Gateway) -> dict[str, Any]:
    """The ``jupyter-config-data`` JSON that /lab hands to the page."""
    code, text = gw.request(f"lab?token={gw.token}")
    assert code == 200, text
    found = re.search(
        r'<script id="jupyter-config-data" type="application/json">(.*?)</script>', text, re.S
    )
    assert found, text[:2000]
    return json.loads(html.unescape(found.group(1)))


def open_lab(browser: Browser, gw: Gateway, page: Page | None = None) -> Page:
    """Lab in a fresh page and a workspace of its own (no layout left by another test),
    once its launcher shows."""
    url = f"{gw.url}lab/workspaces/{uuid.uuid4().hex}?token={gw.token}"
    if page is None:
        page = open_page(browser, url)
    else:
        page.goto(url)
    expect(page.locator(".jp-Launcher")).to_be_visible(timeout=LAB_LOADS_MS)
    return page


# ----- the built assets -------------------------------------------------------------------


def test_the_prebuilt_extension_is_complete_and_matches_its_source() -> None:
    built = json.loads((PREBUILT / "package.json").read_text())
    source = json.loads((SOURCE / "package.json").read_text())
    assert built["name"] == NAME == "dash-distributed-jupyterlab"
    # The builder copies package.json: a stale build shows as a difference here.
    for key in ("version", "dependencies", "main", "style"):
        assert built.get(key) == source.get(key), f"{key}: rebuild with `npm run build`"
    assert built["version"] == __version__
    build = built["jupyterlab"]["_build"]
    assert re.fullmatch(r"static/remoteEntry\.[0-9a-f]+\.js", build["load"]), build
    assert (PREBUILT / build["load"]).is_file()
    assert build["extension"] == "./extension" and build["style"] == "./style"
    # One remoteEntry: a leftover from an older build would mean the directory is stale.
    assert len(list((PREBUILT / "static").glob("remoteEntry.*.js"))) == 1
    # No CDN: nothing in the bundle points outside the server (XML namespaces are names).
    for js in (PREBUILT / "static").glob("*.js"):
        urls = set(re.findall(r"https?://[^\s\"'`)]+", js.read_text(errors="replace")))
        assert {u for u in urls if not u.startswith("http://www.w3.org/")} == set(), js.name
    # `npm ci` reproduces the build: the lock file is there and pins the builder.
    lock = json.loads((SOURCE / "package-lock.json").read_text())
    assert "node_modules/@jupyter/builder" in lock["packages"]


# ----- a live gateway ---------------------------------------------------------------------


def test_the_gateway_serves_the_prebuilt_extension_with_no_build_step(
    lab_gateway: Gateway,
) -> None:
    extensions = {e["name"]: e for e in page_config(lab_gateway)["federated_extensions"]}
    assert NAME in extensions, (
        f"JupyterLab does not list {NAME}: the gateway must add dash_nbext's prebuilt "
        f"directory to Lab's labextensions paths (found: {sorted(extensions)})"
    )
    load = extensions[NAME]["load"]
    code, body = lab_gateway.request(f"lab/extensions/{NAME}/{load}")
    assert code == 200 and "dash-distributed-jupyterlab" in body, (code, str(body)[:500])


def test_lab_offers_dash_and_its_status_bar_names_the_sessions_worker(
    lab_gateway: Gateway, browser: Browser
) -> None:
    page = open_lab(browser, lab_gateway)
    try:
        card = page.locator(
            '.jp-LauncherCard[data-category="Notebook"]', has_text="DASH distributed"
        )
        expect(card).to_be_visible()
        status = page.locator(STATUS)
        # Live from the gateway's events: two local workers, no GPU.
        expect(status).to_have_text("DASH: 2 workers · 0 GPUs")
        screenshot(page, "lab-launcher")

        card.click()
        editor = page.locator(".jp-NotebookPanel .jp-Cell .cm-content").first
        expect(editor).to_be_visible(timeout=LAB_LOADS_MS)
        expect(page.locator(".jp-NotebookPanel-toolbar")).to_contain_text("DASH distributed")
        # Type once the kernel is up and the editor holds the text (a busy machine is slow).
        expect(page.locator("#jp-main-statusbar")).to_contain_text(
            "DASH distributed | Idle", timeout=LAB_LOADS_MS
        )
        editor.click()
        page.keyboard.type("6 * 7")
        expect(editor).to_have_text("6 * 7")
        page.keyboard.press("Shift+Enter")
        result = page.locator(".jp-OutputArea-executeResult .jp-OutputArea-output")
        expect(result).to_have_text("42", timeout=CELL_RUNS_MS)

        # The worker the gateway says this session runs on is the one the status bar names.
        def session_worker() -> str | None:
            code, body = lab_gateway.request("dash/api/overview")
            assert code == 200, body
            workers = [s["worker"] for s in body["sessions"] if s.get("worker")]
            return workers[0] if len(workers) == 1 else None

        worker = wait_until(session_worker, 30, "the overview to list the notebook's session")
        assert re.fullmatch(r"local-[01]", worker), worker
        expect(status).to_have_text(f"DASH: 2 workers · 0 GPUs · this notebook: {worker}")
        expect(status).to_have_attribute("title", re.compile(f"runs on worker {worker}"))
        screenshot(page, "lab-status-bar")

        # The status item is a button (keyboard-reachable) that opens the side panel.
        status.focus()
        page.keyboard.press("Enter")
        panel = page.locator(PANEL)
        expect(panel).to_be_visible()
        expect(panel.get_by_role("heading", name="Workers")).to_be_visible()
        table = panel.get_by_role("region", name="Workers").get_by_role("table")
        expect(table).to_contain_text("local-0")
        expect(table).to_contain_text("local-1")
        expect(panel.get_by_role("status")).to_have_text(re.compile("^Live"))
        expect(panel.locator(".dash-Panel-placement")).to_have_attribute("data-worker", worker)
        sessions = panel.get_by_role("region", name="Sessions").get_by_role("table")
        expect(sessions.locator("tbody th", has_text="this notebook")).to_contain_text(worker)
        screenshot(page, "lab-panel")

        # After a page reload, the live session is still this notebook's, before any cell.
        page.reload()
        expect(page.locator(".jp-NotebookPanel-toolbar")).to_contain_text(
            "DASH distributed", timeout=LAB_LOADS_MS
        )
        expect(status).to_have_text(
            f"DASH: 2 workers · 0 GPUs · this notebook: {worker}", timeout=CELL_RUNS_MS
        )
        status.click()
        expect(page.locator(PANEL).locator(".dash-Panel-placement")).to_have_attribute(
            "data-worker", worker
        )

        # A restarted kernel has no session until its next cell: the status bar says so.
        page.locator(".jp-NotebookPanel").click()
        page.get_by_role("menuitem", name="Kernel").click()
        page.get_by_role("menuitem", name=re.compile("^Restart Kernel…")).click()
        page.get_by_role("button", name="Confirm Kernel Restart").click()
        expect(status).to_have_text("DASH: 2 workers · 0 GPUs", timeout=CELL_RUNS_MS)
    except BaseException:
        screenshot(page, "lab-failed-status-bar")
        raise
    finally:
        page.context.close()


def test_lab_keeps_working_and_says_so_when_the_dash_api_is_gone(
    lab_gateway: Gateway, browser: Browser
) -> None:
    page = open_page(browser, "about:blank")
    try:
        # A server without DASH's API: every endpoint 404s and the event stream closes.
        page.route(
            "**/dash/api/**",
            lambda route: route.fulfill(
                status=404, content_type="application/json", body='{"message": "Not Found"}'
            ),
        )
        page.route_web_socket("**/dash/api/events*", lambda ws: ws.close())
        open_lab(browser, lab_gateway, page)
        status = page.locator(STATUS)
        expect(status).to_have_text("DASH gateway not reachable")
        expect(
            page.locator('.jp-LauncherCard[data-category="Notebook"]', has_text="DASH distributed")
        ).to_be_visible()
        status.click()
        panel = page.locator(PANEL)
        expect(panel.get_by_role("status")).to_have_text(
            re.compile("^DASH gateway not reachable: 404")
        )
        # Nothing from the cluster leaks in from elsewhere.
        expect(panel).not_to_contain_text("local-0")
        screenshot(page, "lab-unreachable")
    except BaseException:
        screenshot(page, "lab-failed-unreachable")
        raise
    finally:
        page.context.close()
