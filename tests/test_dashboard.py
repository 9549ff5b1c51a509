"""The dashboard and contribute pages in real headless Chromium against a live gateway, and
the overview API and its live event stream: logins, live updates, invites that work,
actions from the page, and each user seeing only their own sessions and work.

Screenshots of each page state go to ``test-artifacts/screenshots/`` (``dashboard-*.png``,
``contribute-*.png``).
"""

from __future__ import annotations

import asyncio
import http.cookiejar
import json
import os
import re
import shlex
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import dask
import pytest
from browser import open_page, run_async, screenshot
from conftest import Gateway, launch_gateway, run_dash_worker, wait_until
from playwright.sync_api import Page, expect
from tornado.httpclient import HTTPClientError, HTTPRequest
from tornado.websocket import WebSocketClientConnection, websocket_connect

from dash_kernel.sessions import NOTEBOOK_ANNOTATION

A100 = "NVIDIA A100-SXM4-80GB:80GB"
HARDWARE = {"hostname": "box.example.org", "cpus": 8, "memory": 16 * 10**9, "gpus": []}
CAPS = {"cpus": 4, "memory": 8 * 10**9, "gpus": []}
# A change reaches open streams within this many seconds; a page, which also has to draw
# it, gets one more (the machine may be busy with the rest of the suite).
LIVE_WITHIN = 2.0
PAGE_WITHIN_MS = (LIVE_WITHIN + 1) * 1000


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    """A gateway of this module's own with two local workers: the tests add machines and
    users that other modules' gateways must not see."""
    gateway = launch_gateway(tmp_path_factory.mktemp("dashboard-gateway"), local_workers=2)
    try:
        gateway.wait_for_workers(2)
        yield gateway
    finally:
        gateway.stop()


@pytest.fixture(scope="module")
def bob(gw: Gateway) -> str:
    """An account (``dash-gateway users add bob``); its token."""
    return gw.add_users("bob")["bob"]


def enrol_machine(gw: Gateway, name: str, owner_token: str = "") -> dict[str, Any]:
    """Register a machine through the real invite and enrolment API (no agent runs)."""
    invite = gw.invite(token=owner_token)
    body = {"invite": invite["token"], "name": name, "hardware": HARDWARE, "caps": CAPS}
    code, reply = gw.call("POST", "dash/api/enrol", body, token=None)
    assert code == 201, reply
    return reply


def logged_in(browser: Any, gw: Gateway, path: str, token: str = "") -> Page:
    page = open_page(browser, f"{gw.url}{path}?token={token or gw.token}")
    expect(page.locator("#connection")).to_have_text("Live")
    return page


def overview(gw: Gateway, token: str = "") -> dict[str, Any]:
    code, body = gw.request("dash/api/overview", token=token)
    assert code == 200, body
    return body


# ----- (a) nobody logged in ---------------------------------------------------------------


def test_an_unauthenticated_visitor_sees_the_login_page_and_no_data(
    gw: Gateway, browser: Any
) -> None:
    for path in ("dash/", "dash/contribute", "dash/static/dashboard.js"):
        page = open_page(browser, gw.url + path)
        try:
            page.wait_for_url("**/login?next=*")
            expect(page.locator("input[name=password]").first).to_be_visible()
            html = page.content()
            assert "local-0" not in html and "dash-base-url" not in html
            if path == "dash/":
                screenshot(page, "dashboard-login")
        finally:
            page.context.close()
    for token in (None, "not-a-token"):
        code, body = gw.request("dash/api/overview", token=token)
        assert code == 403, body
        assert "workers" not in json.dumps(body)


def test_the_event_stream_refuses_a_connection_without_credentials(gw: Gateway) -> None:
    async def refused(request: str | HTTPRequest) -> int:
        with pytest.raises(HTTPClientError) as info:
            await websocket_connect(request)
        return info.value.code

    url = ws_url(gw)
    assert run_async(refused(url)) == 403
    assert run_async(refused(url + "?token=wrong")) == 403
    bad_header = HTTPRequest(url, headers={"Authorization": "token wrong"})
    assert run_async(refused(bad_header)) == 403
    # A page on another site cannot use the visitor's login cookie to open it.
    cookie = login_cookie(gw)
    foreign = HTTPRequest(url, headers={"Cookie": cookie, "Origin": "http://elsewhere.example"})
    assert run_async(refused(foreign)) == 403

    async def accepted() -> str:
        own = gw.url.rstrip("/")
        ws = await websocket_connect(HTTPRequest(url, headers={"Cookie": cookie, "Origin": own}))
        try:
            return (await next_overview(ws, 5))["user"]
        finally:
            ws.close()

    assert run_async(accepted()) == "operator"


def login_cookie(gw: Gateway) -> str:
    """The ``Cookie`` header of a browser that logged in with the token in the URL."""
    jar = http.cookiejar.CookieJar()
    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar))
    with opener.open(f"{gw.url}dash/?token={gw.token}", timeout=30) as reply:
        assert reply.status == 200
    cookies = "; ".join(f"{c.name}={c.value}" for c in jar)
    assert "username-" in cookies, cookies
    return cookies


# ----- (b) the dashboard -------------------------------------------------------------------


def test_the_dashboard_lists_the_local_workers_with_their_columns(
    gw: Gateway, browser: Any
) -> None:
    page = logged_in(browser, gw, "dash/")
    try:
        headers = page.locator("#workers thead th").all_inner_texts()
        assert headers[:8] == [
            "Name", "Owner", "CPUs", "RAM", "GPU model", "VRAM", "Utilisation", "State"
        ]  # fmt: skip
        row = page.locator('#workers tbody tr[data-machine="local"]')
        expect(row).to_be_visible()
        cells = row.locator("th, td").all_inner_texts()
        assert "local-0" in cells[0] and "local-1" in cells[0] and "2 workers" in cells[0]
        assert cells[1:4] == ["operator", "2", "2.0 GB"]
        assert "CPU" in cells[6] and cells[7] == "active"
        expect(page.locator('[data-total="workers"]')).to_have_text("2")
        expect(page.locator('[data-storage="objects"]')).to_have_text("0")
        # Landmarks and headings a screen reader navigates by.
        assert page.locator("main#main h1").inner_text() == "Cluster dashboard"
        assert page.locator("nav[aria-label=Pages]").count() == 1
        assert page.locator("#connection[aria-live=polite]").count() == 1
        screenshot(page, "dashboard-local-workers")
        # Everything the page loads comes from the gateway (no CDN, no network).
        fetched: list[str] = []
        page.on("request", lambda request: fetched.append(request.url))
        page.reload()
        expect(page.locator('#workers tbody tr[data-machine="local"]')).to_be_visible()
        assert any(url.endswith(".js?v=" + gw.status()["version"]) for url in fetched), fetched
        assert all(url.startswith(gw.url) for url in fetched), fetched
    finally:
        page.context.close()


# ----- (c) live updates ----------------------------------------------------------------------


def test_a_joining_machine_appears_on_the_open_dashboard_without_a_reload(
    gw: Gateway, browser: Any, tmp_path: Path
) -> None:
    page = logged_in(browser, gw, "dash/")
    agent = None
    try:
        page.evaluate("window.notReloaded = true")
        invite = gw.invite()
        agent = run_dash_worker(
            tmp_path, "join", gw.url, "--token", invite["token"], "--name", "rig",
            "--cpus", "0", "--memory", "1GB", "--declare-gpu", A100, name="rig",
        )  # fmt: skip
        # Once the API lists the machine's worker, the open page shows it within seconds.
        wait_until(
            lambda: (gw.machines().get("rig") or {}).get("workers"),
            60,
            f"rig's worker in the API; agent log:\n{agent.log()[-3000:]}",
        )
        row = page.locator('#workers tbody tr[data-machine="rig"]')
        expect(row).to_contain_text("rig-gpu0", timeout=PAGE_WITHIN_MS)
        cells = row.locator("th, td").all_inner_texts()
        assert cells[1] == "operator"
        assert cells[4] == "NVIDIA A100-SXM4-80GB" and cells[5] == "80.0 GB"
        assert cells[7] == "active"
        assert page.evaluate("window.notReloaded") is True
        expect(page.locator('[data-total="workers"]')).to_have_text("3")
        expect(page.locator('[data-total="cpus"]')).to_have_text("2")
        expect(page.locator('[data-total="gpus"]')).to_have_text("1 / 1")
        screenshot(page, "dashboard-machine-joined")
    finally:
        page.context.close()
        if agent is not None:
            agent.stop()


# ----- (d) the contribute page --------------------------------------------------------------


def test_the_contribute_page_invite_command_works_and_the_machine_can_be_paused(
    gw: Gateway, browser: Any, tmp_path: Path
) -> None:
    page = logged_in(browser, gw, "dash/contribute")
    agent = None
    try:
        page.context.grant_permissions(["clipboard-read", "clipboard-write"])
        screenshot(page, "contribute-empty")
        page.get_by_role("button", name="Create an invite").click()
        field = page.get_by_label("Join command")
        expect(field).to_have_value(re.compile(r"^dash-worker join "))
        command = field.input_value()
        page.get_by_role("button", name="Copy").click()
        expect(page.locator("#status")).to_have_text("Command copied.")
        assert page.evaluate("navigator.clipboard.readText()") == command
        screenshot(page, "contribute-invite")

        # The copied command, run as it is (plus a name and small caps) as a real agent.
        argv = shlex.split(command)
        assert argv[:3] == ["dash-worker", "join", gw.url] and argv[3] == "--token"
        agent = run_dash_worker(
            tmp_path, *argv[1:], "--name", "box", "--cpus", "1", "--memory", "1GB", name="box"
        )
        row = page.locator('#machines tbody tr[data-machine="box"]')
        expect(row).to_be_visible(timeout=60_000)
        expect(row.locator(".state")).to_have_text("active", timeout=60_000)
        expect(row).to_contain_text("box-cpu", timeout=60_000)
        screenshot(page, "contribute-machine-joined")

        row.get_by_role("button", name="Pause box").click()
        expect(row.locator(".state")).to_have_text("paused", timeout=PAGE_WITHIN_MS)
        assert gw.machines()["box"]["state"] == "paused"
        expect(page.locator("#status")).to_have_text("box paused.")
        screenshot(page, "contribute-machine-paused")

        row.get_by_role("button", name="Resume box").click()
        expect(row.locator(".state")).to_have_text("active", timeout=PAGE_WITHIN_MS)
        assert gw.machines()["box"]["state"] == "active"

        # What ran on the machine, by kind, as its owner sees it.
        expect(row.locator(".ran")).to_have_text("nothing has run on it yet")
        with user_client(gw, gw.token) as client:
            # a builtin: the scheduler must be able to read the task, as any user's
            futures = client.map(abs, [-1, -2, -3], workers=["box-cpu"], pure=False)
            assert client.gather(futures) == [1, 2, 3]
        expect(row.locator(".ran")).to_contain_text("Ran: abs ×3", timeout=PAGE_WITHIN_MS)
        screenshot(page, "contribute-machine-ran")
    finally:
        page.context.close()
        if agent is not None:
            agent.stop()


# ----- (e) users see only their own ---------------------------------------------------------


def user_client(gw: Gateway, token: str):
    """A Dask client with the user's own certificate, as a kernel of theirs would have."""
    from distributed import Client

    from dash_gateway.tls import security_for

    code, cluster = gw.request("dash/api/cluster", token=token)
    assert code == 200, cluster
    tls = cluster["tls"]
    security = security_for("client", ca=tls["ca"], cert=tls["cert"], key=tls["key"])
    return Client(cluster["scheduler"], security=security, timeout=30)


def save_object(gw: Gateway, token: str, name: str, tmp: Path) -> int:
    """Store an object as ``token``'s user through the gateway; its size in bytes."""
    from dash_kernel.storage.client import StorageClient
    from dash_kernel.storage.gateway_transport import GatewayTransport

    client = StorageClient(GatewayTransport(gw.url, token=token), files_dir=tmp / "files")
    try:
        return client.save(name, b"x" * 5000).size
    finally:
        client.close()


def holder(flag: str) -> Callable[[Any], None]:
    """A task that runs until ``flag`` (a file) exists, so that it is seen running."""

    def hold(_: Any) -> None:
        deadline = time.monotonic() + 60
        while not os.path.exists(flag) and time.monotonic() < deadline:
            time.sleep(0.05)

    return hold


def test_each_user_sees_only_their_own_sessions_and_work(
    gw: Gateway, bob: str, browser: Any, tmp_path: Path
) -> None:
    enrol_machine(gw, "opbox")
    enrol_machine(gw, "bobbox", owner_token=bob)
    saved = save_object(gw, bob, "results/run-1", tmp_path)
    flag = str(tmp_path / "release")
    hold = holder(flag)
    operator_client = user_client(gw, gw.token)
    bob_client = user_client(gw, bob)
    session = uuid.uuid4().hex
    try:
        # Annotated as a DASH kernel annotates its session: with the notebook's name.
        with dask.annotate(**{NOTEBOOK_ANNOTATION: "renders/train.ipynb"}):
            session_future = operator_client.submit(
                hold, 0, key=f"dash-session-{session}", pure=False
            )
        futures = [
            session_future,
            *(operator_client.submit(hold, i, key=f"opwork-{i}") for i in range(2)),
            *(bob_client.submit(hold, i, key=f"bobwork-{i}") for i in range(3)),
        ]

        def all_there() -> dict[str, Any] | None:
            # Each submit reaches the scheduler on its own: wait for every task.
            seen = overview(gw)
            running = [s for s in seen["sessions"] if s["state"] == "running"]
            totals = {w["name"]: w["total"] for w in seen["work"]}
            return seen if running and totals == {"opwork": 2, "bobwork": 3} else None

        seen = wait_until(all_there, 30, "the running session and both users' work")
        [row] = seen["sessions"]
        assert (row["id"], row["user"], row["machine"]) == (session, "operator", "local")
        assert row["notebook"] == "renders/train.ipynb"
        assert row["state"] == "running" and row["worker"].startswith("local-")
        assert row["started"]
        work = {w["name"]: w for w in seen["work"]}
        assert (work["opwork"]["user"], work["opwork"]["total"]) == ("operator", 2)
        assert (work["bobwork"]["user"], work["bobwork"]["total"]) == ("bob", 3)

        # Users' clients reach the scheduler, but its summary of everyone's work is the gateway's.
        with pytest.raises(Exception, match="only the DASH gateway"):
            bob_client.sync(bob_client.scheduler.dash_work)

        mine = overview(gw, token=bob)
        assert (mine["user"], mine["operator"]) == ("bob", False)
        assert mine["sessions"] == []
        assert [w["name"] for w in mine["work"]] == ["bobwork"]
        assert {"opbox", "bobbox"} <= {m["name"] for m in mine["workers"]}
        assert (mine["storage"]["objects"], mine["storage"]["bytes"]) == (1, saved)
        assert mine["storage"]["backend"]["backend"] == "local"

        page = logged_in(browser, gw, "dash/")
        try:
            # The operator's own session is listed by its notebook's name.
            expect(page.locator(f'#sessions tr[data-session="{session}"] th')).to_have_text(
                "renders/train.ipynb"
            )
        finally:
            page.context.close()

        page = logged_in(browser, gw, "dash/", token=bob)
        try:
            expect(page.locator('#work li[data-work="bobwork"]')).to_be_visible()
            expect(page.locator("#work li")).to_have_count(1)
            expect(page.locator("#work progress")).to_have_attribute("max", "3")
            expect(page.locator("#sessions-empty")).to_be_visible()
            expect(page.locator('[data-storage="objects"]')).to_have_text("1")
            assert session not in page.content() and "train.ipynb" not in page.content()
            # Buttons only on bob's own machine.
            bobs = page.locator('#workers tr[data-machine="bobbox"]')
            expect(bobs.get_by_role("button", name="Pause bobbox")).to_be_visible()
            for other in ("opbox", "local"):
                row = page.locator(f'#workers tr[data-machine="{other}"]')
                expect(row).to_be_visible()
                expect(row.locator("button")).to_have_count(0)
            screenshot(page, "dashboard-as-bob")
        finally:
            page.context.close()

        page = logged_in(browser, gw, "dash/contribute", token=bob)
        try:
            expect(page.locator('#machines tr[data-machine="bobbox"]')).to_be_visible()
            expect(page.locator('#machines tr[data-machine="opbox"]')).to_have_count(0)
        finally:
            page.context.close()

        page = logged_in(browser, gw, "dash/")
        try:
            expect(page.locator(f'#sessions tr[data-session="{session}"]')).to_be_visible()
            expect(page.locator("#work li")).to_have_count(2)
            opbox = page.locator('#workers tr[data-machine="opbox"]')
            expect(opbox.get_by_role("button", name="Pause opbox")).to_be_visible()
            expect(page.locator('[data-storage="objects"]')).to_have_text("0")
            screenshot(page, "dashboard-as-operator-with-work")
        finally:
            page.context.close()
        del futures
    finally:
        Path(flag).touch()
        bob_client.close()
        operator_client.close()


# ----- (f) the event stream -------------------------------------------------------------------


def ws_url(gw: Gateway) -> str:
    return "ws" + gw.url[len("http") :] + "dash/api/events"


async def next_overview(ws: WebSocketClientConnection, timeout: float) -> dict[str, Any]:
    message = await asyncio.wait_for(ws.read_message(), timeout)
    assert message is not None, "the event stream closed"
    event = json.loads(message)
    assert event["type"] == "overview"
    return event["data"]


def test_the_event_stream_sends_a_change_within_two_seconds(gw: Gateway, bob: str) -> None:
    async def scenario() -> None:
        header = HTTPRequest(ws_url(gw), headers={"Authorization": f"token {gw.token}"})
        ws = await websocket_connect(header)
        try:
            first = await next_overview(ws, 5)
            assert first["user"] == "operator" and "streamed" not in first["workers"]
            changed_at = time.monotonic()
            await asyncio.to_thread(enrol_machine, gw, "streamed")
            while True:
                left = changed_at + LIVE_WITHIN - time.monotonic()
                assert left > 0, "no overview with the new machine within 2 s"
                data = await next_overview(ws, left)
                if "streamed" in {m["name"] for m in data["workers"]}:
                    break
            # An account connects with ?token= and gets its own view.
            other = await websocket_connect(ws_url(gw) + f"?token={bob}")
            try:
                assert (await next_overview(other, 5))["user"] == "bob"
            finally:
                other.close()
        finally:
            ws.close()

    run_async(scenario())
