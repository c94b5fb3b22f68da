"""The FastAPI application: /api/v1 routes, the WebSocket, security headers, CORS."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, HTTPException, WebSocket, WebSocketDisconnect
from fastapi.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from quantmesh_api import auth, routes
from quantmesh_api.live import Client
from quantmesh_api.security import Role
from quantmesh_api.state import ApiState
from quantmesh_common.http_metrics import HttpMetricsMiddleware

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


def create_app(state: ApiState) -> FastAPI:
    """Build the gateway's app over `state`."""
    app = FastAPI(
        title="quantmesh api",
        version="1",
        description="REST and WebSocket gateway of quantmesh: paper trading for many users.",
        openapi_url=f"{PREFIX}/openapi.json",
        docs_url=f"{PREFIX}/docs",
        redoc_url=f"{PREFIX}/redoc",
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

    if state.settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=state.settings.cors_origins,
            allow_methods=["GET", "POST", "PATCH", "DELETE"],
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
