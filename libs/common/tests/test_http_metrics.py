"""HTTP metrics middleware: requests counted by route template and status, timed, websockets."""

from __future__ import annotations

import uuid

import pytest
from fastapi import APIRouter, FastAPI, HTTPException, WebSocket
from fastapi.testclient import TestClient

from quantmesh_common.http_metrics import (
    HTTP_REQUEST_SECONDS,
    HTTP_REQUESTS,
    UNMATCHED,
    WEBSOCKET_CONNECTIONS,
    HttpMetricsMiddleware,
)


def _value(metric: object, name: str, labels: dict[str, str]) -> float:
    for family in metric.collect():  # type: ignore[attr-defined]
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return float(sample.value)
    return 0.0


@pytest.fixture
def service() -> str:
    # A fresh service label per test: the collectors are process-wide.
    return f"api-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def client(service: str) -> TestClient:
    app = FastAPI()

    @app.get("/orders/{order_id}")
    def get_order(order_id: str) -> dict[str, str]:
        if order_id == "missing":
            raise HTTPException(status_code=404, detail="no such order")
        return {"order_id": order_id}

    @app.get("/boom")
    def boom() -> None:
        raise RuntimeError("handler failed")

    @app.websocket("/ws")
    async def ws(socket: WebSocket) -> None:
        await socket.accept()
        await socket.send_text("hello")
        await socket.close()

    app.add_middleware(HttpMetricsMiddleware, service=service)
    return TestClient(app, raise_server_exceptions=False)


def test_requests_when_ids_differ_count_under_one_route_template(
    client: TestClient, service: str
) -> None:
    # Arrange / Act
    for order_id in ("a1", "b2", "missing"):
        client.get(f"/orders/{order_id}")

    # Assert
    route = {"service": service, "route": "/orders/{order_id}", "method": "GET"}
    assert _value(HTTP_REQUESTS, "quantmesh_http_requests_total", {**route, "status": "200"}) == 2
    assert _value(HTTP_REQUESTS, "quantmesh_http_requests_total", {**route, "status": "404"}) == 1
    assert _value(HTTP_REQUEST_SECONDS, "quantmesh_http_request_seconds_count", route) == 3


def test_requests_when_path_matches_no_route_count_as_unmatched(
    client: TestClient, service: str
) -> None:
    # Arrange / Act
    response = client.get("/nowhere/12345")

    # Assert
    labels = {"service": service, "route": UNMATCHED, "method": "GET", "status": "404"}
    assert response.status_code == 404
    assert _value(HTTP_REQUESTS, "quantmesh_http_requests_total", labels) == 1


def test_requests_when_handler_raises_count_a_500(client: TestClient, service: str) -> None:
    # Arrange / Act
    response = client.get("/boom")

    # Assert
    labels = {"service": service, "route": "/boom", "method": "GET", "status": "500"}
    assert response.status_code == 500
    assert _value(HTTP_REQUESTS, "quantmesh_http_requests_total", labels) == 1


def test_websocket_when_accepted_counts_one_connection(client: TestClient, service: str) -> None:
    # Arrange / Act
    with client.websocket_connect("/ws") as socket:
        greeting = socket.receive_text()

    # Assert
    labels = {"service": service, "route": "/ws"}
    assert greeting == "hello"
    assert _value(WEBSOCKET_CONNECTIONS, "quantmesh_websocket_connections_total", labels) == 1


def test_requests_when_route_sits_in_an_included_router_count_under_the_full_template(
    service: str,
) -> None:
    # Arrange: FastAPI includes routers lazily; the matched route knows only its own part.
    app = FastAPI()
    inner = APIRouter()

    @inner.get("/accounts/{account_id}")
    def account(account_id: str) -> dict[str, str]:
        return {"account_id": account_id}

    v1 = APIRouter(prefix="/api/v1")
    v1.include_router(inner)
    app.include_router(v1)
    app.add_middleware(HttpMetricsMiddleware, service=service)

    # Act
    TestClient(app).get("/api/v1/accounts/acc-7")

    # Assert
    labels = {
        "service": service,
        "route": "/api/v1/accounts/{account_id}",
        "method": "GET",
        "status": "200",
    }
    assert _value(HTTP_REQUESTS, "quantmesh_http_requests_total", labels) == 1
