"""HTTP calls from ``dash-worker`` to the gateway (stdlib only), with errors a person can act on."""

from __future__ import annotations

import contextlib
import json
import socket
import ssl
import urllib.error
import urllib.request
from typing import Any

__all__ = ["GatewayClient", "GatewayError", "GatewayUnreachable", "normalize_url"]

TOKEN_HEADER = "X-Dash-Machine-Token"
TIMEOUT = 10.0


class GatewayUnreachable(ConnectionError):
    """The gateway could not be reached at all; the message names the URL and why."""


class GatewayError(RuntimeError):
    """The gateway answered with an error; ``str()`` is its own sentence."""

    def __init__(self, status: int, message: str, url: str):
        super().__init__(message)
        self.status = status
        self.message = message
        self.url = url


def normalize_url(url: str) -> str:
    """The gateway's base URL without a trailing slash; a bare ``host:port`` gets ``http://``."""
    url = url.strip()
    if "://" not in url:
        url = "http://" + url
    return url.rstrip("/")


def _why(exc: BaseException) -> str:
    reason = getattr(exc, "reason", exc)
    if isinstance(reason, ssl.SSLCertVerificationError):
        return (
            f"its TLS certificate is not trusted ({reason.verify_message}); if the gateway "
            "uses a private CA, point SSL_CERT_FILE at that CA's certificate"
        )
    if isinstance(reason, ssl.SSLError):
        return f"TLS failed ({reason.reason or reason})"
    if isinstance(reason, socket.gaierror):
        return "its host name does not resolve (DNS)"
    if isinstance(reason, ConnectionRefusedError):
        return "connection refused (is the gateway running, and is the port right?)"
    if isinstance(reason, (TimeoutError, socket.timeout)):
        return f"no answer within {TIMEOUT:.0f}s"
    if isinstance(reason, OSError) and reason.strerror:
        return reason.strerror
    return str(reason)


class GatewayClient:
    """JSON requests to ``<url>/dash/api/...``, optionally as an enrolled machine."""

    def __init__(self, url: str, machine_token: str | None = None, timeout: float = TIMEOUT):
        self.url = normalize_url(url)
        self.machine_token = machine_token
        self.timeout = timeout

    def request(self, method: str, path: str, body: Any = None) -> Any:
        """The decoded JSON reply (None for an empty one).

        Raises :class:`GatewayUnreachable` or :class:`GatewayError`.
        """
        url = f"{self.url}/{path.lstrip('/')}"
        headers = {"Accept": "application/json"}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        if self.machine_token:
            headers[TOKEN_HEADER] = self.machine_token
        req = urllib.request.Request(url, data=data, headers=headers, method=method)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as response:
                raw = response.read()
        except urllib.error.HTTPError as exc:
            raise self._http_error(exc, url) from None
        except (urllib.error.URLError, OSError, ValueError) as exc:
            raise GatewayUnreachable(
                f"cannot reach the DASH gateway at {self.url}: {_why(exc)}"
            ) from None
        if not raw:
            return None
        try:
            return json.loads(raw)
        except ValueError:
            raise GatewayError(
                200, f"{url} did not answer with JSON: is {self.url} a DASH gateway?", url
            ) from None

    def _http_error(self, exc: urllib.error.HTTPError, url: str) -> GatewayError:
        raw = exc.read() or b""
        message = ""
        with contextlib.suppress(ValueError, AttributeError):
            message = str(json.loads(raw).get("message") or "")
        if not message:
            if exc.code == 404:
                message = f"{url} was not found: is {self.url} a DASH gateway (with its base URL)?"
            else:
                message = f"the gateway answered {exc.code} {exc.reason} for {url}"
        return GatewayError(exc.code, message, url)

    def get(self, path: str) -> Any:
        return self.request("GET", path)

    def post(self, path: str, body: Any = None) -> Any:
        return self.request("POST", path, {} if body is None else body)

    def delete(self, path: str) -> Any:
        return self.request("DELETE", path)
