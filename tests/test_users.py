"""Accounts against a real gateway: ``dash-gateway users`` (the real CLI), tokens, logins, permissions."""

from __future__ import annotations

import http.cookiejar
import urllib.error
import urllib.parse
import urllib.request

import pytest
from conftest import Gateway, token_from

CLI_TIMEOUT = 120


@pytest.fixture(scope="module")
def gw(bare_gateway: Gateway) -> Gateway:
    return bare_gateway


@pytest.fixture(scope="module")
def accounts(gw: Gateway) -> dict[str, str]:
    return gw.add_users("alice", "bob", "dave", "erin")


# ----- the CLI -------------------------------------------------------------------------


def test_users_add_prints_the_token_once(gw: Gateway, accounts: dict[str, str]) -> None:
    result = gw.cli("users", "add", "carol")
    assert result.returncode == 0, result.stderr
    assert "only" in result.stdout and "once" in result.stdout
    token = token_from(result.stdout)
    assert token not in (accounts["alice"], accounts["bob"])
    # Only its hash is kept.
    assert token.encode() not in (gw.data_dir / "registry.sqlite3").read_bytes()

    listing = gw.cli("users", "list")
    assert listing.returncode == 0, listing.stderr
    names = [line.split()[0] for line in listing.stdout.splitlines()[1:]]
    assert {"alice", "bob", "carol"} <= set(names)
    assert token not in listing.stdout


def test_users_errors_say_what_is_wrong(gw: Gateway, accounts: dict[str, str]) -> None:
    cases = {
        ("users", "add", "alice"): "a user named 'alice' already exists",
        ("users", "add", "operator"): "'operator' is reserved",
        ("users", "add", "Not_A_Name"): "invalid user name 'Not_A_Name'",
        ("users", "remove", "nobody"): "no user named 'nobody'",
        ("users", "add"): "expected NAME",
        ("users",): "give a subcommand",
    }
    for (args, error), result in zip(cases.items(), gw.cli_many(*cases), strict=True):
        assert result.returncode != 0, args
        assert error in result.stderr, (args, result.stderr)
        assert "Traceback" not in result.stderr, result.stderr


# ----- tokens against the gateway --------------------------------------------------------


def test_an_account_token_is_that_account(gw: Gateway, accounts: dict[str, str]) -> None:
    code, body = gw.call("GET", "dash/api/status", token=accounts["alice"])
    assert code == 200, body
    # Jupyter's own "who am I" (open to every authenticated user) names the account.
    code, body = gw.call("GET", "api/me", token=accounts["alice"])
    assert code == 200 and body["identity"]["username"] == "alice", body
    code, body = gw.call("GET", "api/me")
    assert code == 200 and body["identity"]["username"] == "operator", body


@pytest.mark.parametrize("token", [None, "not-a-token"])
def test_a_wrong_token_is_refused_with_a_clear_message(gw: Gateway, token: str | None) -> None:
    code, body = gw.call("GET", "dash/api/status", token=token)
    assert code in (401, 403), body
    assert "token" in body["message"], body
    code, body = gw.call("POST", "dash/api/invites", {}, token=token)
    assert code in (401, 403), body
    assert "token" in body["message"], body


def test_an_account_cannot_run_code_on_the_gateway(gw: Gateway, accounts: dict[str, str]) -> None:
    for method, path in [
        ("GET", "api/kernels"),
        ("POST", "api/kernels"),
        ("GET", "api/terminals"),
        ("GET", "api/contents"),
    ]:
        code, body = gw.call(method, path, {} if method == "POST" else None, token=accounts["bob"])
        assert code == 403, (method, path, body)
    code, body = gw.call("GET", "api/kernels")
    assert code == 200, body


def test_a_removed_users_token_is_refused(gw: Gateway, accounts: dict[str, str]) -> None:
    token = accounts["dave"]
    assert gw.call("GET", "dash/api/status", token=token)[0] == 200
    result = gw.cli("users", "remove", "dave")
    assert result.returncode == 0, result.stderr
    code, body = gw.call("GET", "dash/api/status", token=token)
    assert code == 403, body


def test_the_login_form_takes_account_tokens(gw: Gateway, accounts: dict[str, str]) -> None:
    token = accounts["erin"]
    jar = http.cookiejar.CookieJar()
    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar))
    with opener.open(gw.url + "login", timeout=30) as resp:
        assert resp.status == 200
    xsrf = next(c.value for c in jar if c.name == "_xsrf")

    def login(password: str) -> int:
        form = urllib.parse.urlencode({"password": password, "_xsrf": xsrf}).encode()
        try:
            with opener.open(gw.url + "login?next=%2Fdash%2Fapi%2Fstatus", form, timeout=30) as r:
                return r.status
        except urllib.error.HTTPError as exc:
            return exc.code

    def get(path: str) -> int:
        try:
            with opener.open(gw.url + path, timeout=30) as resp:
                return resp.status
        except urllib.error.HTTPError as exc:
            return exc.code

    assert login("wrong") == 401
    assert login(token) == 200  # redirected to the status, with the login cookie
    assert get("dash/api/status") == 200
    assert get("api/kernels") == 403
    # The cookie names the account: it dies with the account.
    assert gw.cli("users", "remove", "erin").returncode == 0
    assert get("dash/api/status") == 403
