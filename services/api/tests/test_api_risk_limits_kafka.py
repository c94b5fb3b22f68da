"""The api on the real stack reads risk's limits from Kafka and serves them by role."""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import AsyncIterator
from decimal import Decimal

import httpx
import pytest

from quantmesh_api.config import ApiSettings
from quantmesh_api.service import ApiService
from quantmesh_common.bus.kafka import KafkaBus, ensure_topics
from quantmesh_common.runtime import ServiceRunner
from quantmesh_common.testing import stubs
from quantmesh_common.testing.kafka import delete_topics
from quantmesh_common.topics import Topic, TopicRegistry, registry

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

ADMIN_PASSWORD = "admin-password-1"
USER_PASSWORD = "user-password-1"
WAIT_S = 90.0


@pytest.fixture
async def limits_topic() -> AsyncIterator[str]:
    bootstrap = os.environ["QM_KAFKA_BOOTSTRAP"]
    prefix = f"qmtest.apirisk.{uuid.uuid4().hex[:10]}."
    name = prefix + Topic.RISK_LIMITS
    topics = registry().prefixed(prefix, [Topic.RISK_LIMITS])
    await asyncio.get_running_loop().run_in_executor(None, ensure_topics, bootstrap, topics)
    try:
        yield name
    finally:
        delete_topics(bootstrap, topics.all_topic_names())


async def _login(client: httpx.AsyncClient, username: str, password: str) -> dict[str, str]:
    response = await client.post(
        "/api/v1/auth/token", data={"username": username, "password": password}
    )
    assert response.status_code == 200, response.text
    return {"Authorization": f"Bearer {response.json()['access_token']}"}


async def test_limits_when_risk_publishes_them_are_served_to_admins_and_to_owners(
    api_dsn: str, limits_topic: str
) -> None:
    bootstrap = os.environ["QM_KAFKA_BOOTSTRAP"]
    settings = ApiSettings(
        bus="kafka",
        kafka_bootstrap=bootstrap,
        database_url=api_dsn,
        redis_url=os.environ["QM_REDIS_URL"],
        http_host="127.0.0.1",
        http_port=0,
        jwt_secret="integration-secret-long-enough-for-hs256",
        bootstrap_admin_user="admin",
        bootstrap_admin_password=ADMIN_PASSWORD,
        redis_prefix=f"qmtest:api:{uuid.uuid4().hex[:8]}:",
    )
    api = ApiService(settings, risk_limits_topic=limits_topic)
    runner = ServiceRunner(api, settings)
    await runner.start()
    bus = KafkaBus(
        "risk-limits-test", bootstrap, registry=TopicRegistry([registry()[Topic.ACCOUNTS]])
    )
    await bus.start()
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{api.port}", timeout=60) as client:
            admin = await _login(client, "admin", ADMIN_PASSWORD)
            created = await client.post(
                "/api/v1/users",
                headers=admin,
                json={
                    "username": "trader",
                    "password": USER_PASSWORD,
                    "roles": ["READ_PORTFOLIO", "EXECUTE_TRADES"],
                },
            )
            assert created.status_code == 201, created.text
            trader = await _login(client, "trader", USER_PASSWORD)
            opened = await client.post(
                "/api/v1/accounts",
                headers=trader,
                json={"name": "paper", "capital": "25000", "currency": "USDT"},
            )
            account_id = opened.json()["account_id"]
            default = stubs.risk_limits_status(
                account_id="*", limits={"max_order_quantity": "2"}, opening_equity=None
            )
            own = stubs.risk_limits_status(
                account_id=account_id,
                configured=False,
                limits={"max_order_quantity": "2"},
                opening_equity=Decimal("25000"),
                kill_switch=True,
                kill_switch_targets=[account_id],
            )
            for status in (default, own):
                await bus.publish(limits_topic, status, key=status.account_id)
            await bus.flush()

            deadline = time.monotonic() + WAIT_S
            listed = await client.get("/api/v1/risk/limits", headers=admin)
            while len(listed.json()) < 2:
                assert time.monotonic() < deadline, "the limits never reached the api"
                await asyncio.sleep(0.2)
                listed = await client.get("/api/v1/risk/limits", headers=admin)
            mine = await client.get(f"/api/v1/accounts/{account_id}/risk-limits", headers=trader)
            refused = await client.get("/api/v1/risk/limits", headers=trader)
    finally:
        await bus.close()
        await runner.stop()

    assert [s["account_id"] for s in listed.json()] == ["*", account_id]
    assert mine.status_code == 200
    assert (mine.json()["opening_equity"], mine.json()["kill_switch"]) == ("25000", True)
    assert mine.json()["limits"] == {"max_order_quantity": "2"}
    assert refused.status_code == 403
