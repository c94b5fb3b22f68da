"""The FastAPI application: /api/v1 routes, the WebSocket, security headers, CORS."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from dataclasses import dataclass
from typing import Any

import orjson
from fastapi import APIRouter, Depends, FastAPI, HTTPException, WebSocket, WebSocketDisconnect
from fastapi.middleware.cors import CORSMiddleware
from opentelemetry import trace
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from quantmesh_api import auth, routes
from quantmesh_api.live import Client
from quantmesh_api.security import Role
from quantmesh_api.state import ApiState
from quantmesh_common.http_metrics import HttpMetricsMiddleware
from quantmesh_common.telemetry import records_spans

log = logging.getLogger(__name__)

PREFIX = "/api/v1"
#: How long a WebSocket client has to send its token when it did not put it in the URL.
WS_AUTH_TIMEOUT_S = 10.0
#: WebSocket close codes: policy violation (auth) and "try again later" (too slow).
WS_POLICY_VIOLATION = 1008
WS_TRY_AGAIN_LATER = 1013

_SECURITY_HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
    (b"cache-control", b"no-store"),
    (b"cross-origin-opener-policy", b"same-origin"),
]
_CSP = (b"content-security-policy", b"default-src 'none'; frame-ancestors 'none'")
#: The docs pages load Swagger UI / ReDoc scripts, so they get no restrictive CSP.
_DOC_PATHS = (f"{PREFIX}/docs", f"{PREFIX}/redoc")


class SecurityHeaders:
    """Adds security headers to every HTTP response (plain ASGI: no per-request task)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        docs = str(scope.get("path", "")).startswith(_DOC_PATHS)

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                headers.extend(_SECURITY_HEADERS)
                if not docs:
                    headers.append(_CSP)
                message["headers"] = headers
            await send(message)

        await self.app(scope, receive, send_with_headers)


#: The hot, polled route that `FastPrices` answers without FastAPI's routing and dependencies.
PRICES_PATH = f"{PREFIX}/market/prices"


@dataclass(frozen=True)
class _RouteLabel:
    """What the metrics middleware reads of a matched route: its template."""

    path_format: str
    path_regex: None = None


class FastPrices:
    """Answers `GET /api/v1/market/prices` (no query) before FastAPI routes it.

    Same checks, in the same order, as the declared route's dependencies (IP limit, bearer
    token or API key with revocation, user limit, READ_PORTFOLIO) and the same bytes; routing
    and dependency solving cost several times what the cached answer does. Every other
    request, and the declared route itself (OpenAPI, schemathesis), go to FastAPI.
    """

    def __init__(self, app: ASGIApp, state: ApiState) -> None:
        self.app = app
        self.state = state
        self.label = _RouteLabel(PRICES_PATH)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] != "http"
            or scope["path"] != PRICES_PATH
            or scope["method"] != "GET"
            or scope["query_string"]
        ):
            await self.app(scope, receive, send)
            return
        scope["route"] = self.label
        try:
            body = await self._answer(scope)
        except HTTPException as exc:
            headers = dict(exc.headers or {})
            await _send(send, exc.status_code, orjson.dumps({"detail": exc.detail}), headers)
            return
        await _send(send, 200, body, {})

    async def _answer(self, scope: Scope) -> bytes:
        state = self.state
        client = scope.get("client")
        await auth.check_ip_limit(state, client[0] if client else None)
        # The first of each header, read as HTTPBearer and APIKeyHeader read them.
        authorization: bytes | None = None
        key: bytes | None = None
        for name, value in scope["headers"]:
            if name == b"authorization" and authorization is None:
                authorization = value
            elif name == b"x-api-key" and key is None:
                key = value
        token: str | None = None
        if authorization:
            scheme, _, credentials = authorization.decode("latin-1").partition(" ")
            if scheme.lower() == "bearer" and credentials:
                token = credentials
        api_key = key.decode("latin-1") if key else None
        principal = await auth.authenticate(state, token, api_key)
        await auth.check_user_limit(state, principal)
        auth.check_role(principal, Role.READ_PORTFOLIO)
        return await routes.all_prices_json(state)


async def _send(send: Send, status: int, body: bytes, headers: dict[str, str]) -> None:
    raw = [
        (b"content-length", str(len(body)).encode()),
        (b"content-type", b"application/json"),
        *((k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()),
    ]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


def create_app(state: ApiState, *, fast_prices: bool = True) -> FastAPI:
    """Build the gateway's app over `state`."""
    app = FastAPI(
        title="quantmesh api",
        version="1",
        description="REST and WebSocket gateway of quantmesh: paper trading for many users.",
        openapi_url=f"{PREFIX}/openapi.json",
        docs_url=f"{PREFIX}/docs",
        redoc_url=f"{PREFIX}/redoc",
        # FastAPI's own OpenTelemetry layer asks the global providers on every request and,
        # with the SDK provider every service installs, makes a server span per request
        # (about 0.1 ms each, a quarter of a GET's cost) that goes nowhere without
        # QM_OTLP_ENDPOINT. Spans only when they are exported; metrics are Prometheus's.
        telemetry={
            "tracing": records_spans(trace.get_tracer_provider()),
            "metrics": False,
            "logs": False,
        },
    )
    app.state.api = state
    v1 = APIRouter(prefix=PREFIX, dependencies=[Depends(auth.limit_ip)])
    v1.include_router(auth.router)
    v1.include_router(routes.router)
    app.include_router(v1)

    @app.websocket(f"{PREFIX}/ws")
    async def websocket(ws: WebSocket) -> None:
        """Pushes prices, orders, fills, positions and alerts of the caller's accounts."""
        await serve_websocket(state, ws)

    if fast_prices:
        # Added first, so innermost: CORS, the security headers and the metrics still wrap it.
        app.add_middleware(FastPrices, state=state)
    if state.settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=state.settings.cors_origins,
            allow_methods=["GET", "POST", "PUT", "PATCH", "DELETE"],
            allow_headers=["Authorization", "Content-Type", "Idempotency-Key", "X-API-Key"],
            max_age=600,
        )
    app.add_middleware(SecurityHeaders)
    # Added last, so outermost: the time covers every other middleware, and a request the
    # rate limit or CORS refuses is counted too.
    app.add_middleware(HttpMetricsMiddleware, service=state.settings.service_name or "api")
    return app


async def _first_message_token(ws: WebSocket) -> str | None:
    try:
        raw = await asyncio.wait_for(ws.receive_text(), WS_AUTH_TIMEOUT_S)
    except (TimeoutError, WebSocketDisconnect):
        return None
    with contextlib.suppress(ValueError, AttributeError):
        token = json.loads(raw).get("token")
        return token if isinstance(token, str) else None
    return None


async def serve_websocket(state: ApiState, ws: WebSocket) -> None:
    """Authenticate (token query parameter or a first `{"token": ...}` message), then push."""
    await ws.accept()
    token = ws.query_params.get("token") or await _first_message_token(ws)
    try:
        principal = await auth.authenticate(state, token, None)
    except HTTPException as exc:
        await ws.close(WS_POLICY_VIOLATION, reason=str(exc.detail)[:120])
        return
    if not principal.can(Role.READ_PORTFOLIO):
        await ws.close(WS_POLICY_VIOLATION, reason="needs role READ_PORTFOLIO")
        return
    accounts = {a.account_id for a in await state.store.list_accounts(principal.user_id)}
    client = Client(
        principal.user_id,
        accounts,
        admin=principal.can(Role.ADMIN),
        queue_size=state.settings.ws_queue_size,
    )
    state.hub.add(client)
    await ws.send_json(
        {"channel": "hello", "account_id": None, "data": {"accounts": sorted(accounts)}}
    )
    receiver = asyncio.create_task(_drain_incoming(ws))
    try:
        while True:
            getter = asyncio.create_task(client.queue.get())
            dropped = asyncio.create_task(client.dropped.wait())
            done, _ = await asyncio.wait(
                {getter, dropped, receiver}, return_when=asyncio.FIRST_COMPLETED
            )
            if getter not in done:
                getter.cancel()
            dropped.cancel()
            if receiver in done:
                return  # the client went away
            if client.dropped.is_set():
                await ws.close(WS_TRY_AGAIN_LATER, reason="too slow: outbox overflowed")
                return
            await ws.send_json(getter.result())
    except (WebSocketDisconnect, RuntimeError):
        return
    finally:
        state.hub.remove(client)
        receiver.cancel()
        with contextlib.suppress(BaseException):
            await receiver


async def _drain_incoming(ws: WebSocket) -> None:
    """Read and ignore what the client sends, until it disconnects."""
    with contextlib.suppress(WebSocketDisconnect, RuntimeError):
        while True:
            message: Any = await ws.receive()
            if message.get("type") == "websocket.disconnect":
                return
