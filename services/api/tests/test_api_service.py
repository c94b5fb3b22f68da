"""The api stage's own expectations; what every stage must do is in tests/stages/."""

from __future__ import annotations

import asyncio

import httpx

from quantmesh_api.config import ApiSettings
from quantmesh_api.service import HANDLERS_ISSUE, ApiService
from quantmesh_common.runtime import ComponentState, ServiceRunner
from quantmesh_common.topics import Topic


def test_declared_topics_match_the_design() -> None:
    assert ApiService.consumes == (
        Topic.ORDERS_UPDATES,
        Topic.EXEC_REPORTS,
        Topic.PORTFOLIO_UPDATES,
        Topic.PORTFOLIO_SNAPSHOTS,
        Topic.ALERTS,
        Topic.MD_COLLECTOR,
        Topic.STRATEGIES,
        Topic.RISK_LIMITS,
    )
    assert ApiService.updates == ApiService.consumes[:-3]
    assert ApiService.produces == (
        Topic.CONTROL,
        Topic.ORDERS_INTENTS,
        Topic.ORDERS_REQUESTS,
        Topic.ACCOUNTS,
    )


def test_handlers_issue_when_handlers_exist_is_none() -> None:
    assert HANDLERS_ISSUE is None


async def test_service_when_started_serves_the_api_and_a_bootstrap_admin_can_log_in() -> None:
    settings = ApiSettings(
        bus="memory",
        http_host="127.0.0.1",
        http_port=0,
        database_url=None,
        redis_url=None,
        bootstrap_admin_user="root",
        bootstrap_admin_password="root-password-1",
    )
    service = ApiService(settings)
    runner = ServiceRunner(service, settings)
    await runner.start()
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{service.port}") as client:
            schema = await client.get("/api/v1/openapi.json")
            login = await client.post(
                "/api/v1/auth/token", data={"username": "root", "password": "root-password-1"}
            )
            token = login.json()["access_token"]
            users = await client.get("/api/v1/users", headers={"Authorization": f"Bearer {token}"})
        state = runner.state
    finally:
        stopped = await asyncio.wait_for(runner.stop(), 30)

    assert state is ComponentState.RUNNING
    assert schema.status_code == 200
    assert "/api/v1/accounts/{account_id}/orders" in schema.json()["paths"]
    assert [u["username"] for u in users.json()] == ["root"]
    assert stopped
