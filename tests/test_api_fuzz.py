"""The API's OpenAPI description matches the routes, and fuzzing every endpoint of a real gateway never gets a 5xx."""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from conftest import Gateway
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from tornado.web import RequestHandler

from dash_gateway.app import DashGateway
from dash_gateway.handlers import openapi_description

VERBS = [m.lower() for m in RequestHandler.SUPPORTED_METHODS]
# Per operation and caller: ~30 operations x 2 callers stay well under a minute on 2 cores.
EXAMPLES = 8
SCHEMA = schemathesis.openapi.from_dict(openapi_description())


@pytest.fixture(scope="module")
def gw(bare_gateway: Gateway) -> Gateway:
    return bare_gateway


@pytest.fixture(scope="module")
def routes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[tuple[str, type, dict]]]:
    """The routes a gateway declares, as ``(pattern, handler class, initialize kwargs)``."""
    # Not linked to a server: only the routes are wanted, not a running gateway.
    app = DashGateway(data_dir=str(tmp_path_factory.mktemp("routes")), serverapp=None)
    app.initialize_settings()
    try:
        app.initialize_handlers()
        yield [(r[0], r[1], r[2] if len(r) > 2 else {}) for r in app.handlers]
    finally:
        app.storage.close()
        app.data_dir_lock.release()


def sample_path(path: str, item: dict[str, Any]) -> str:
    """``path`` with each ``{param}`` filled with a value its schema allows."""
    params = {p["name"]: p for p in item.get("parameters", []) if p.get("in") == "path"}

    def value(match: re.Match[str]) -> str:
        schema = params.get(match[1], {}).get("schema", {})
        return str(schema.get("enum", ["x"])[0])

    return re.sub(r"\{(\w+)\}", value, path)


def resolved(item: dict[str, Any]) -> dict[str, Any]:
    parameters = []
    for p in item.get("parameters", []):
        if "$ref" in p:
            p = openapi_description()["components"]["parameters"][p["$ref"].rsplit("/", 1)[1]]
        parameters.append(p)
    return {**item, "parameters": parameters}


def documented() -> dict[str, dict[str, Any]]:
    return {path: resolved(item) for path, item in openapi_description()["paths"].items()}


def implemented_verbs(handler: type) -> set[str]:
    """The HTTP verbs ``handler`` answers with DASH code (not tornado's or Jupyter's defaults)."""
    verbs = set()
    for verb in VERBS:
        owner = next((c for c in handler.__mro__ if verb in vars(c)), None)
        if owner is not None and owner.__module__.startswith("dash_gateway"):
            verbs.add(verb)
    return verbs


# ----- the description -----------------------------------------------------------------


def test_the_description_is_served_without_a_login(gw: Gateway) -> None:
    code, served = gw.request("dash/api/openapi.json", token=None)
    assert code == 200, served
    assert served["servers"] == [{"url": gw.url.rstrip("/")}]
    assert {k: v for k, v in served.items() if k != "servers"} == openapi_description()


def test_the_description_covers_every_route(routes: list[tuple[str, type, dict]]) -> None:
    """Each documented path reaches a route (the first that matches, as in tornado) that
    answers exactly its documented verbs; and every route is reached by one."""
    reached = set()
    for path, item in documented().items():
        sample = sample_path(path, item)
        route = next((r for r in routes if re.fullmatch(r[0], sample)), None)
        assert route is not None, f"{path} in openapi.yaml: no such route"
        reached.add(route[0])
        described = {verb for verb in item if verb in VERBS}
        assert described == implemented_verbs(route[1]), (path, route[1].__name__)
    missing = [r[0] for r in routes if r[0].startswith("/dash") and r[0] not in reached]
    assert not missing, f"routes missing from openapi.yaml: {missing}"


def test_no_handler_attribute_shadows_a_method(routes: list[tuple[str, type, dict]]) -> None:
    """What ``initialize`` sets must not hide a handler method (``self.options`` once hid
    tornado's ``options()``, so every OPTIONS request failed with a 500)."""
    for _, handler, kwargs in routes:
        if not issubclass(handler, RequestHandler) or not handler.__module__.startswith("dash_"):
            continue
        instance = object.__new__(handler)
        handler.initialize(instance, **kwargs)
        for name in vars(instance):
            owner = next((c for c in handler.__mro__ if name in vars(c)), None)
            shadowed = vars(owner)[name] if owner else None
            assert not (callable(shadowed) or isinstance(shadowed, property)), (
                f"{handler.__name__}.initialize sets self.{name}, hiding {owner.__name__}.{name}"
            )


# ----- requests the fuzzer does not make -----------------------------------------------


@pytest.mark.parametrize("token", ["", None], ids=["operator", "no-token"])
def test_options_never_fails(gw: Gateway, token: str | None) -> None:
    for path, item in documented().items():
        code, reply = gw.call("OPTIONS", sample_path(path, item), token=token)
        assert code < 500, (path, code, reply)


def post_raw(gw: Gateway, path: str, data: bytes) -> tuple[int, Any]:
    req = urllib.request.Request(
        gw.url + path, data=data, method="POST", headers={"Authorization": f"token {gw.token}"}
    )
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


@pytest.mark.parametrize("depth", [5000, 100])
@pytest.mark.parametrize("path", ["dash/api/invites", "dash/api/enrol", "dash/api/storage/token"])
def test_a_deeply_nested_body_is_refused(gw: Gateway, path: str, depth: int) -> None:
    code, reply = post_raw(gw, path, b'{"a": ' + b"[" * depth + b"]" * depth + b"}")
    assert code == 400, reply
    assert reply["message"] == "the request body nests more than 64 levels deep", reply


# ----- the fuzzer ----------------------------------------------------------------------


def fuzz(case: Any, gw: Gateway, headers: dict[str, str]) -> None:
    response = case.call(base_url=gw.url.rstrip("/"), headers=headers, timeout=30)
    case.validate_response(response, checks=[not_a_server_error])


FUZZ_SETTINGS = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=list(HealthCheck),
)


@SCHEMA.parametrize()
@FUZZ_SETTINGS
def test_fuzz_with_the_operators_token(case: Any, gw: Gateway) -> None:
    fuzz(case, gw, {"Authorization": f"token {gw.token}"})


@SCHEMA.parametrize()
@FUZZ_SETTINGS
def test_fuzz_without_a_token(case: Any, gw: Gateway) -> None:
    fuzz(case, gw, {})
