"""Prometheus metrics of an HTTP API: requests and latency by route, method and status.

`HttpMetricsMiddleware` is plain ASGI, so it wraps a FastAPI/Starlette app without importing
either. The route label is the matched route's template (`/api/v1/orders/{order_id}`), never
the raw path, so ids in URLs cannot blow up the series count; an unmatched path is `<unmatched>`.
The api dashboard and its alert read these families.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from prometheus_client import Counter, Histogram

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

UNMATCHED = "<unmatched>"

HTTP_REQUESTS = Counter(
    "quantmesh_http_requests",
    "HTTP requests answered, by route template, method and status code.",
    ("service", "route", "method", "status"),
)
HTTP_REQUEST_SECONDS = Histogram(
    "quantmesh_http_request_seconds",
    "Time from a request's arrival to its last response byte, by route template and method.",
    ("service", "route", "method"),
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
)
WEBSOCKET_CONNECTIONS = Counter(
    "quantmesh_websocket_connections",
    "WebSocket connections accepted, by route template.",
    ("service", "route"),
)


def route_template(scope: Scope) -> str:
    """The template of the route the framework matched (set in the scope), else UNMATCHED.

    A route of an included or mounted router may know only its own part of the path (FastAPI
    includes routers lazily): the part of the request path in front of what the route's regex
    matches is the prefix it was reached under, and goes in front of its template.
    """
    route = scope.get("route")
    template = getattr(route, "path_format", None) or getattr(route, "path", None)
    if not isinstance(template, str):
        return UNMATCHED
    path: str = scope.get("path", "")
    regex = getattr(route, "path_regex", None)
    if path == template or regex is None or regex.fullmatch(path):
        return template
    for index, char in enumerate(path):
        if char == "/" and regex.fullmatch(path[index:]):
            return path[:index] + template
    return template


class HttpMetricsMiddleware:
    """Count every HTTP request and time it to the last byte; count WebSocket connections."""

    def __init__(self, app: ASGIApp, service: str) -> None:
        self.app = app
        self.service = service

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Pass the request through, then record what the matched route answered."""
        if scope["type"] == "websocket":
            await self._websocket(scope, receive, send)
            return
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500  # an exception before the response started is a 500 to the client

        async def send_recording(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_recording)
        finally:
            route, method = route_template(scope), scope.get("method", "GET")
            HTTP_REQUESTS.labels(self.service, route, method, str(status)).inc()
            HTTP_REQUEST_SECONDS.labels(self.service, route, method).observe(
                time.perf_counter() - start
            )

    async def _websocket(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def send_recording(message: Message) -> None:
            if message["type"] == "websocket.accept":
                WEBSOCKET_CONNECTIONS.labels(self.service, route_template(scope)).inc()
            await send(message)

        await self.app(scope, receive, send_recording)
