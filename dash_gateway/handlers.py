"""The DASH REST API: cluster status and mutual-TLS credentials for kernels."""

from __future__ import annotations

import functools
import json
from importlib.resources import files
from typing import TYPE_CHECKING, Any

import yaml
from jsonschema import Draft202012Validator
from jsonschema.exceptions import best_match
from jupyter_server.auth.decorator import authorized
from jupyter_server.base.handlers import APIHandler
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012
from tornado import web

from dash_gateway.auth import is_operator, username
from dash_gateway.cluster import ClusterSupervisor
from dash_gateway.tenancy import PerUserClusters
from dash_kernel._version import __version__

if TYPE_CHECKING:
    from dash_gateway.storage import StorageService

# How long /dash/api/cluster waits for a scheduler that is still starting.
SCHEDULER_WAIT = 30.0
AUTH_RESOURCE = "dash"
AUTH_NEEDED = (
    "authentication needed: send 'Authorization: token <token>' with the server's token, "
    "or with an account token made by 'dash-gateway users add NAME'"
)
# No DASH request nests this deep; past it a body is refused before anything recurses over it.
MAX_JSON_DEPTH = 64
# Where the API's description lives, and the URI its schemas' "#/components/..." refs resolve in.
OPENAPI_FILE = "openapi.yaml"
OPENAPI_URI = "urn:dash:openapi"
MAX_MESSAGE_VALUE = 200

try:
    from jupyter_server.auth.decorator import allow_unauthenticated
except ImportError:  # jupyter_server < 2.13: every handler is reachable without a login anyway

    def allow_unauthenticated(method: Any) -> Any:  # type: ignore[no-redef]
        return method


class JSONAPIHandler(APIHandler):
    """JSON in and out; every error is ``{"message": "<a sentence saying what to do>"}``."""

    def write_json(self, data: Any, status: int = 200) -> None:
        self.set_status(status)
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps(data))

    def json_body(self) -> dict[str, Any]:
        """The request body as a JSON object ({} when empty); 400 if it is anything else."""
        if not self.request.body.strip():
            return {}
        too_deep = web.HTTPError(
            400, f"the request body nests more than {MAX_JSON_DEPTH} levels deep"
        )
        try:
            body = json.loads(self.request.body)
        except ValueError:
            # The body may carry a token: say what is wrong, never echo it.
            raise web.HTTPError(400, "the request body is not valid JSON") from None
        except RecursionError:
            raise too_deep from None
        if json_depth_exceeds(body, MAX_JSON_DEPTH):
            raise too_deep
        if not isinstance(body, dict):
            raise web.HTTPError(400, "the request body must be a JSON object")
        return body

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        exc = (kwargs.get("exc_info") or (None, None, None))[1]
        if isinstance(exc, web.HTTPError) and exc.log_message:
            message = exc.log_message % exc.args if exc.args else exc.log_message
            self.set_header("Content-Type", "application/json")
            self.finish(json.dumps({"message": message, "reason": exc.reason}))
            return
        super().write_error(status_code, **kwargs)


def http_error(status: int, message: str) -> web.HTTPError:
    """An HTTP error whose ``message`` reaches the client as it is (``%`` included)."""
    return web.HTTPError(status, "%s", message)


@functools.cache
def openapi_description() -> dict[str, Any]:
    """The API's OpenAPI description, as shipped in the package (``openapi.yaml``)."""
    text = files("dash_gateway").joinpath(OPENAPI_FILE).read_text(encoding="utf-8")
    return yaml.safe_load(text)


@functools.cache
def _schema_validator(name: str) -> Draft202012Validator:
    resource = Resource.from_contents(openapi_description(), default_specification=DRAFT202012)
    registry = Registry().with_resource(OPENAPI_URI, resource)
    return Draft202012Validator(
        {"$ref": f"{OPENAPI_URI}#/components/schemas/{name}"}, registry=registry
    )


def check_schema(value: Any, name: str) -> None:
    """A 400 naming the first wrong field unless ``value`` fits ``components/schemas/<name>``."""
    error = best_match(_schema_validator(name).iter_errors(value))
    if error is None:
        return
    field = ".".join(str(part) for part in error.absolute_path) or "the body"
    message = error.message
    if len(message) > MAX_MESSAGE_VALUE:
        message = message[:MAX_MESSAGE_VALUE] + "…"
    raise http_error(400, f"{field}: {message}")


def json_depth_exceeds(value: Any, limit: int) -> bool:
    """Does ``value`` nest lists and objects more than ``limit`` deep? (Iterative: no recursion.)"""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            if depth > limit:
                return True
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in children)
    return False


class DashAPIHandler(JSONAPIHandler):
    """Base of DASH API handlers: authenticated, authorized on the ``dash`` resource."""

    auth_resource = AUTH_RESOURCE

    def initialize(self, cluster: ClusterSupervisor) -> None:
        self.cluster = cluster

    async def prepare(self) -> None:  # type: ignore[override]
        await super().prepare()
        # Every DASH API call needs a user: say how to be one (tornado's 403 says nothing).
        if not self.current_user and self.request.method != "OPTIONS":
            raise web.HTTPError(403, AUTH_NEEDED)

    def check_xsrf_cookie(self) -> None:
        # Nobody logged in: prepare() refuses the request and says why, which helps more
        # than a complaint about a missing XSRF field.
        if hasattr(self, "_jupyter_current_user") and not self.current_user:
            return None
        return super().check_xsrf_cookie()

    def get_login_url(self) -> str:
        # Asked for the login page (allow_unauthenticated_access=False): an API says why instead.
        if not self.current_user:
            raise web.HTTPError(403, AUTH_NEEDED)
        return super().get_login_url()


class StatusHandler(DashAPIHandler):
    """``GET /dash/api/status``: version, scheduler address, registered workers, storage."""

    def initialize(  # type: ignore[override]
        self, cluster: ClusterSupervisor, storage: StorageService | None = None
    ) -> None:
        super().initialize(cluster)
        self.storage = storage

    @web.authenticated
    @authorized
    async def get(self) -> None:
        workers: list[dict[str, Any]] = []
        error = None
        try:
            workers = await self.cluster.workers()
        except Exception as exc:
            # The page stays useful while the scheduler restarts: say why the list is empty.
            error = f"cannot reach the scheduler: {exc!r}"
        reply: dict[str, Any] = {
            "version": __version__,
            "scheduler": self.cluster.scheduler_address,
            "workers": workers,
            "state": self.cluster.state,
        }
        if self.storage is not None:
            reply["storage"] = self.storage.description
        if error:
            reply["error"] = error
        self.write_json(reply)


class ClusterHandler(DashAPIHandler):
    """``GET /dash/api/cluster``: the scheduler address and a fresh client certificate."""

    @web.authenticated
    @authorized
    async def get(self) -> None:
        if isinstance(self.cluster, PerUserClusters):
            await self._own_cluster()
            return
        if self.cluster.external_scheduler and not is_operator(self):
            raise http_error(
                403,
                "this gateway uses an existing Dask scheduler (--scheduler-address), which "
                "cannot keep users apart: only the operator may use it. Ask the operator to "
                "run the gateway with --tenancy per-user for a cluster of your own.",
            )
        address = await self.cluster.wait_for_scheduler(SCHEDULER_WAIT)
        if not address:
            raise web.HTTPError(503, "the DASH scheduler is not running yet; try again shortly")
        user = self.current_user
        creds = self.cluster.client_credentials(getattr(user, "username", "") or "client")
        # A private key is in the body: keep it out of every cache.
        self.set_header("Cache-Control", "no-store")
        self.write_json(
            {"scheduler": address, "tls": {"ca": creds.ca, "cert": creds.cert, "key": creds.key}}
        )

    async def _own_cluster(self) -> None:
        assert isinstance(self.cluster, PerUserClusters)
        name = username(self)
        try:
            access = await self.cluster.access(name)
        except RuntimeError as exc:
            raise http_error(503, f"your cluster did not start: {exc}; try again shortly") from None
        creds = access.credentials
        self.set_header("Cache-Control", "no-store")
        self.write_json(
            {
                "scheduler": access.address,
                "tls": {"ca": creds.ca, "cert": creds.cert, "key": creds.key},
                "tenancy": "per-user",
                "pool": self.cluster.pool(name),
            }
        )


class PoolHandler(DashAPIHandler):
    """``GET /dash/api/pool``: the pool's slots (whether each is free, the caller's or
    another user's) and the caller's leases (every lease, for the operator)."""

    @web.authenticated
    @authorized
    async def get(self) -> None:
        if not isinstance(self.cluster, PerUserClusters):
            raise http_error(404, "this gateway runs one shared cluster: it has no pool of leases")
        name = username(self)
        mine = None if is_operator(self) else name
        self.write_json(
            {
                "pool": self.cluster.pool(name),
                "leases": [lease.to_json() for lease in self.cluster.broker.leases(mine)],
            }
        )


class OpenAPIHandler(JSONAPIHandler):
    """``GET /dash/api/openapi.json``: this API's OpenAPI description; no login needed, so
    that tools can read it."""

    @allow_unauthenticated
    def get(self) -> None:
        description = dict(openapi_description())
        url = f"{self.request.protocol}://{self.request.host}{self.base_url}".rstrip("/")
        description["servers"] = [{"url": url}]
        self.write_json(description)
