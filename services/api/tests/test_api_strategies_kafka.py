"""The api and the signals stage on the real Kafka: list, configure, refuse, restart."""

from __future__ import annotations

import asyncio
import json
import os
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx
import pytest

from quantmesh_api.config import ApiSettings
from quantmesh_api.service import ApiService
from quantmesh_common.bus.kafka import ensure_topics
from quantmesh_common.runtime import ServiceRunner
from quantmesh_common.testing.kafka import delete_topics
from quantmesh_common.topics import Topic, registry
from quantmesh_signals.config import SignalsSettings
from quantmesh_signals.service import SignalsService

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

ADMIN_PASSWORD = "admin-password-1"
WAIT_S = 90.0
SPEC: dict[str, Any] = {
    "id": "sma-btc",
    "name": "sma_cross",
    "account_id": "paper-1",
    "instruments": ["BTC-USDT.SIM"],
    "params": {"fast": 2, "slow": 3},
}
TOPICS = (
    Topic.MD_BARS,
    Topic.MD_TICKS,
    Topic.EXEC_REPORTS,
    Topic.CONTROL,
    Topic.SIGNALS,
    Topic.ORDERS_INTENTS,
    Topic.STRATEGIES,
)


@pytest.fixture
async def prefix() -> AsyncIterator[str]:
    bootstrap = os.environ["QM_KAFKA_BOOTSTRAP"]
    made = f"qmtest.apistrat.{uuid.uuid4().hex[:10]}."
    topics = registry().prefixed(made, TOPICS)
    await asyncio.get_running_loop().run_in_executor(None, ensure_topics, bootstrap, topics)
    try:
        yield made
    finally:
        delete_topics(bootstrap, topics.all_topic_names())


def _signals(prefix: str) -> ServiceRunner[SignalsSettings]:
    settings = SignalsSettings(
        bus="kafka",
        kafka_bootstrap=os.environ["QM_KAFKA_BOOTSTRAP"],
        http_host="127.0.0.1",
        http_port=0,
        strategies=json.dumps([SPEC]),
        signals_group=prefix + "signals",
        signals_instance="one",
        signals_topic_prefix=prefix,
        shutdown_timeout_s=30.0,
    )
    return ServiceRunner(SignalsService(settings), settings)


async def _until(
    probe: Callable[[], Awaitable[dict[str, Any] | None]], what: str
) -> dict[str, Any]:
    deadline = time.monotonic() + WAIT_S
    while True:
        found = await probe()
        if found is not None:
            return found
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.2)


async def test_strategy_when_configured_through_the_api_is_validated_applied_and_kept(
    api_dsn: str, prefix: str
) -> None:
    signals = _signals(prefix)
    await signals.start()
    settings = ApiSettings(
        bus="kafka",
        kafka_bootstrap=os.environ["QM_KAFKA_BOOTSTRAP"],
        database_url=api_dsn,
        redis_url=os.environ["QM_REDIS_URL"],
        http_host="127.0.0.1",
        http_port=0,
        jwt_secret="integration-secret-long-enough-for-hs256",
        bootstrap_admin_user="admin",
        bootstrap_admin_password=ADMIN_PASSWORD,
        redis_prefix=f"qmtest:api:{uuid.uuid4().hex[:8]}:",
        strategy_config_wait_s=60.0,
    )
    api = ApiService(
        settings, strategies_topic=prefix + Topic.STRATEGIES, control_topic=prefix + Topic.CONTROL
    )
    api_runner = ServiceRunner(api, settings)
    await api_runner.start()
    restarted: ServiceRunner[SignalsSettings] | None = None
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{api.port}", timeout=90) as client:
            login = await client.post(
                "/api/v1/auth/token", data={"username": "admin", "password": ADMIN_PASSWORD}
            )
            headers = {"Authorization": f"Bearer {login.json()['access_token']}"}

            async def announced() -> dict[str, Any] | None:
                response = await client.get("/api/v1/strategies/sma-btc", headers=headers)
                body: dict[str, Any] = response.json()
                return body if response.status_code == 200 and body["announced"] else None

            first = await _until(announced, "the strategy announced")
            applied = await client.patch(
                "/api/v1/strategies/sma-btc",
                headers=headers,
                json={"params": {"fast": 4, "slow": 9}},
            )
            refused = await client.patch(
                "/api/v1/strategies/sma-btc", headers=headers, json={"params": {"fast": 9}}
            )
            before = await announced()
            assert before is not None
            before_ts = before["ts_event"]
            await signals.stop()
            restarted = _signals(prefix)
            await restarted.start()

            async def after_restart() -> dict[str, Any] | None:
                body = await announced()
                if body is None or body["ts_event"] <= before_ts:
                    return None
                return body if body["last_command_id"] is None else None

            again = await _until(after_restart, "the restarted stage's status")
    finally:
        if restarted is not None:
            await restarted.stop()
        await signals.stop()
        await api_runner.stop()

    assert (first["state"], first["params"]["fast"], first["instance"]) == ("RUNNING", 2, "one")
    assert applied.status_code == 200, applied.text
    assert applied.json()["outcome"] == "APPLIED"
    assert applied.json()["strategy"]["params"] == {
        "fast": 4,
        "slow": 9,
        "quantity": "1",
        "allow_short": False,
    }
    assert refused.status_code == 422
    assert refused.json() == {
        "detail": "INVALID_PARAMS: Value error, fast (9) must be below slow (9)"
    }
    assert (again["params"]["fast"], again["params"]["slow"]) == (4, 9)
    # The refused command changed nothing; the restart replays it, so its reason stays.
    assert (again["config_version"], again["last_error"]) == (
        1,
        "INVALID_PARAMS: Value error, fast (9) must be below slow (9)",
    )
