"""The node's pages over plain HTTP: the dashboard, `/metrics`, `/healthz`, `/readyz`
(docs/operations.md, docs/dashboard.md).

The dashboard is static files from the package (`web/`): the page logs in over the
WebSocket like any client, so serving it needs no authentication. Metrics and health tell
about the node itself: without more configuration they answer only on a loopback listener;
`[http] public = true` lets them answer elsewhere, and `[http] token` asks every request
for `Authorization: Bearer <token>`.
"""

from __future__ import annotations

import hmac
import html
import ipaddress
import re
from collections.abc import Awaitable
from pathlib import Path
from typing import Any, Protocol

import orjson

from nkservice.metrics import CONTENT_TYPE
from nkservice.service.config import HttpConfig
from nkservice.transport.http import HttpRequest, HttpResponse, text

WEB = Path(__file__).parent / "web"
INDEX = "index.html"
WEBSOCKET_PATH = b"__NKSERVICE_WEBSOCKET_PATH__"  # in index.html: where the page connects
FILE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".mjs": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".ico": "image/x-icon",
    ".json": "application/json",
}
OPERATIONS = ("/metrics", "/healthz", "/readyz")


class NodeStatus(Protocol):
    """What the pages read from the node."""

    def scrape(self) -> Awaitable[bytes]:
        """The Prometheus text of the whole node (all its workers)."""

    def health(self) -> dict[str, Any]: ...

    def readiness(self) -> tuple[bool, dict[str, Any]]: ...


class NodeSite:
    """Answers the plain HTTP requests of one kind of listener: the core service's
    WebSocket listeners (`dashboard`, and `operations` when `[http] metrics = "core"`), or
    the listener of `[http] metrics = "http://HOST:PORT"` (`operations` only)."""

    def __init__(self, status: NodeStatus, config: HttpConfig, *, dashboard: bool,
                 operations: bool) -> None:
        self._status = status
        self._config = config
        self._dashboard = dashboard
        self._operations = operations

    async def __call__(self, request: HttpRequest) -> HttpResponse:
        if request.method not in ("GET", "HEAD"):
            return HttpResponse(405, b"method not allowed\n", headers=(("allow", "GET, HEAD"),))
        path = request.path
        if self._operations and path in OPERATIONS:
            refused = self._refused(request)
            if refused is not None:
                return refused
            if path == "/metrics":
                return HttpResponse(200, await self._status.scrape(), CONTENT_TYPE)
            if path == "/healthz":
                return _json(200, self._status.health())
            ready, state = self._status.readiness()
            return _json(200 if ready else 503, state)
        if self._dashboard:
            return self._page(request)
        return text(404, "not found")

    def _refused(self, request: HttpRequest) -> HttpResponse | None:
        config = self._config
        if not config.public and not _is_loopback(request.listener_host):
            return text(403, "metrics and health answer only on a loopback listener; set "
                        "[http] public = true (and a token) to serve them here")
        if config.token:
            given = request.headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {config.token}".encode()):
                return HttpResponse(401, b"a bearer token is needed\n",
                                    headers=(("www-authenticate", "Bearer"),))
        return None

    def _page(self, request: HttpRequest) -> HttpResponse:
        path = request.path
        if path in ("/", "/dashboard", "/dashboard/", request.websocket_path):
            name = INDEX
        elif path == "/nkservice.js":
            name = "nkservice.js"
        elif path.startswith("/dashboard/"):
            name = path.removeprefix("/dashboard/")
        else:
            return text(404, "not found")
        file = WEB / name
        if not FILE_NAME.fullmatch(name) or file.suffix not in CONTENT_TYPES:
            return text(404, "not found")
        try:
            body = file.read_bytes()
        except OSError:
            return text(404, "not found")
        if name == INDEX:
            where = html.escape(request.websocket_path or "/").encode()
            body = body.replace(WEBSOCKET_PATH, where)
        return HttpResponse(200, body, CONTENT_TYPES[file.suffix])


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a name, or "" (every address)
        return False


def _json(status: int, data: dict[str, Any]) -> HttpResponse:
    return HttpResponse(status, orjson.dumps(data) + b"\n", "application/json")
