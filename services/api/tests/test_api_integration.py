"""The api on the real PostgreSQL, Redis and Kafka: register, log in, trade, watch."""

from __future__ import annotations

import asyncio
import json
import os
import time
import uuid
from collections.abc import AsyncIterator
from decimal import Decimal

import httpx
import pytest
import websockets
from confluent_kafka import Consumer, TopicPartition

from quantmesh_api.config import ApiSettings
from quantmesh_api.service import ApiService
from quantmesh_common.bus.kafka import KafkaBus
from quantmesh_common.envelope import decode
from quantmesh_common.messages import (
    AccountOpened,
    CollectorState,
    CollectorStatus,
    ControlAction,
    ControlCommand,
    Order,
    OrderIntent,
    OrderStatus,
    OrderType,
    Side,
)
from quantmesh_common.runtime import ServiceRunner
from quantmesh_common.storage.postgres import create_pool
from quantmesh_common.testing import stubs
from quantmesh_common.topics import Topic

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

ADMIN_PASSWORD = "admin-password-1"
USER_PASSWORD = "user-password-1"
WAIT_S = 90.0


@pytest.fixture
async def running_api(api_dsn: str) -> AsyncIterator[ApiService]:
    """The api service on the real stack, its Redis keys under a unique prefix."""
    prefix = f"qmtest:api:{uuid.uuid4().hex[:8]}:"
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
        redis_prefix=prefix,
        md_redis_prefix=prefix + "md:",
    )
    service = ApiService(settings)
    runner = ServiceRunner(service, settings)
    await runner.start()
    try:
        yield service
    finally:
        await runner.stop()


def _intents_reader(topic: str = Topic.ORDERS_INTENTS) -> Consumer:
    """A consumer of `topic` positioned at the current end of every partition."""
    consumer = Consumer(
        {
            "bootstrap.servers": os.environ["QM_KAFKA_BOOTSTRAP"],
            "group.id": f"qmtest.api.{uuid.uuid4().hex}",
            "enable.auto.commit": False,
            "isolation.level": "read_committed",
        }
    )
    metadata = consumer.list_topics(topic, timeout=10)
    partitions = []
    for p in metadata.topics[topic].partitions:
        _, high = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)
        partitions.append(TopicPartition(topic, p, high))
    consumer.assign(partitions)
    return consumer


def _wait_for_intent(consumer: Consumer, account_id: str) -> OrderIntent:
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        message = consumer.poll(1.0)
        value = message.value() if message is not None and not message.error() else None
        if value is None:
            continue
        payload = decode(value).payload
        if isinstance(payload, OrderIntent) and payload.account_id == account_id:
            return payload
    raise AssertionError(f"no intent of {account_id} on {Topic.ORDERS_INTENTS}")


async def _login(client: httpx.AsyncClient, username: str, password: str) -> dict[str, str]:
    response = await client.post(
        "/api/v1/auth/token", data={"username": username, "password": password}
    )
    assert response.status_code == 200, response.text
    return {"Authorization": f"Bearer {response.json()['access_token']}"}


async def test_user_when_registered_logs_in_opens_an_account_and_the_order_reaches_kafka(
    running_api: ApiService,
) -> None:
    consumer = await asyncio.to_thread(_intents_reader)
    try:
        async with httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{running_api.port}", timeout=30
        ) as client:
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
            trader = await _login(client, "trader", USER_PASSWORD)
            account = await client.post(
                "/api/v1/accounts", headers=trader, json={"capital": "25000", "currency": "USDT"}
            )
            account_id = account.json()["account_id"]
            order = await client.post(
                f"/api/v1/accounts/{account_id}/orders",
                headers={**trader, "Idempotency-Key": "first-order"},
                json={"instrument_id": "BTC-USDT.SIM", "side": "BUY", "quantity": "0.25"},
            )
            replay = await client.post(
                f"/api/v1/accounts/{account_id}/orders",
                headers={**trader, "Idempotency-Key": "first-order"},
                json={"instrument_id": "BTC-USDT.SIM", "side": "BUY", "quantity": "0.25"},
            )
            listed = await client.get("/api/v1/accounts", headers=trader)
        intent = await asyncio.to_thread(_wait_for_intent, consumer, account_id)
    finally:
        await asyncio.to_thread(consumer.close)

    assert created.status_code == 201
    assert account.status_code == 201
    assert [a["account_id"] for a in listed.json()] == [account_id]
    assert order.status_code == 202
    assert replay.headers["Idempotent-Replayed"] == "true"
    assert intent.client_order_id == order.json()["client_order_id"]
    assert (intent.side, intent.quantity, intent.order_type) == (
        Side.BUY,
        Decimal("0.25"),
        OrderType.MARKET,
    )


async def test_websocket_when_an_order_update_is_published_receives_it(
    running_api: ApiService,
) -> None:
    port = running_api.port
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
        admin = await _login(client, "admin", ADMIN_PASSWORD)
        account_id = (
            await client.post("/api/v1/accounts", headers=admin, json={"capital": "1000"})
        ).json()["account_id"]
    token = admin["Authorization"].removeprefix("Bearer ")
    now = time.time_ns()
    update = Order(
        client_order_id=f"it-{uuid.uuid4().hex[:12]}",
        account_id=account_id,
        strategy_id="api",
        instrument_id="BTC-USDT.SIM",
        side=Side.BUY,
        order_type=OrderType.MARKET,
        quantity=Decimal(1),
        status=OrderStatus.ACCEPTED,
        ts_init=now,
        ts_last=now,
    )

    async with websockets.connect(f"ws://127.0.0.1:{port}/api/v1/ws?token={token}") as ws:
        hello = json.loads(await asyncio.wait_for(ws.recv(), 30))
        bus = KafkaBus("api-it", os.environ["QM_KAFKA_BOOTSTRAP"])
        await bus.start()
        try:
            await bus.publish(Topic.ORDERS_UPDATES, update)
            await bus.flush()
        finally:
            await bus.close()
        async with asyncio.timeout(WAIT_S):
            while True:
                message = json.loads(await ws.recv())
                if message["channel"] == "orders":
                    break

    assert hello["data"]["accounts"] == [account_id]
    assert message["account_id"] == account_id
    assert message["data"]["client_order_id"] == update.client_order_id


async def test_websocket_when_a_collector_job_reports_pushes_it_to_a_reader(
    running_api: ApiService,
) -> None:
    port = running_api.port
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
        admin = await _login(client, "admin", ADMIN_PASSWORD)
        created = await client.post(
            "/api/v1/users",
            headers=admin,
            json={"username": "reader", "password": USER_PASSWORD, "roles": ["READ_PORTFOLIO"]},
        )
        assert created.status_code == 201, created.text
        reader = await _login(client, "reader", USER_PASSWORD)
    token = reader["Authorization"].removeprefix("Bearer ")
    job_id = f"it-job-{uuid.uuid4().hex[:12]}"
    status = stubs.collector_status(
        job_id=job_id, progress=0.4, fetched=400, ts_event=time.time_ns()
    )

    async with websockets.connect(f"ws://127.0.0.1:{port}/api/v1/ws?token={token}") as ws:
        await asyncio.wait_for(ws.recv(), 30)  # hello
        bus = KafkaBus("api-it", os.environ["QM_KAFKA_BOOTSTRAP"])
        await bus.start()
        try:
            await bus.publish(Topic.MD_COLLECTOR, status, key=job_id)
            await bus.flush()
        finally:
            await bus.close()
        async with asyncio.timeout(WAIT_S):
            while True:
                message = json.loads(await ws.recv())
                # md.collector is shared: other runs' jobs may come first.
                if message["channel"] == "collector" and message["data"]["job_id"] == job_id:
                    break

    assert message["account_id"] is None
    assert (message["data"]["progress"], message["data"]["fetched"]) == (0.4, 400)


def _wait_for_opening(consumer: Consumer, account_id: str) -> tuple[bytes | None, AccountOpened]:
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        message = consumer.poll(1.0)
        value = message.value() if message is not None and not message.error() else None
        if message is None or value is None:
            continue
        payload = decode(value).payload
        if isinstance(payload, AccountOpened) and payload.account_id == account_id:
            return message.key(), payload
    raise AssertionError(f"no opening of {account_id} on {Topic.ACCOUNTS}")


async def test_account_when_opened_is_announced_with_its_cash_on_the_accounts_topic(
    running_api: ApiService,
) -> None:
    consumer = await asyncio.to_thread(_intents_reader, Topic.ACCOUNTS)
    try:
        async with httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{running_api.port}", timeout=30
        ) as client:
            admin = await _login(client, "admin", ADMIN_PASSWORD)
            response = await client.post(
                "/api/v1/accounts", headers=admin, json={"capital": "12345.67", "currency": "EUR"}
            )
        account_id = response.json()["account_id"]
        key, opened = await asyncio.to_thread(_wait_for_opening, consumer, account_id)
    finally:
        await asyncio.to_thread(consumer.close)

    assert response.status_code == 201
    assert key == account_id.encode()
    assert opened.starting_cash == {"EUR": Decimal("12345.67")}
    assert opened.base_currency == "EUR"


async def test_performance_when_the_portfolio_stored_reports_serves_the_latest(
    running_api: ApiService, api_dsn: str
) -> None:
    async with httpx.AsyncClient(
        base_url=f"http://127.0.0.1:{running_api.port}", timeout=30
    ) as client:
        admin = await _login(client, "admin", ADMIN_PASSWORD)
        account_id = (
            await client.post("/api/v1/accounts", headers=admin, json={"capital": "1000"})
        ).json()["account_id"]
        pool = await create_pool(api_dsn, 1, 1, timeout_s=10)
        try:
            for ts, win_rate in ((stubs.TS, 0.5), (stubs.TS + 60, 0.75)):
                report = stubs.performance_report(
                    account_id=account_id, win_rate=win_rate, ts_event=ts
                )
                await pool.execute(
                    "INSERT INTO portfolio_performance (account_id, ts_event, report_id, report)"
                    " VALUES ($1, $2, $3, $4)",
                    account_id,
                    ts,
                    f"PERF:{account_id}:{ts}",
                    json.loads(report.model_dump_json()),
                )
        finally:
            await pool.close()
        response = await client.get(f"/api/v1/accounts/{account_id}/performance", headers=admin)

    assert response.status_code == 200
    assert response.json()["source"] == "portfolio"
    assert response.json()["win_rate"] == 0.75
    assert response.json()["ts_event"] == stubs.TS + 60


async def test_strategy_performance_when_stored_per_strategy_serves_each_strategys_latest(
    running_api: ApiService, api_dsn: str
) -> None:
    async with httpx.AsyncClient(
        base_url=f"http://127.0.0.1:{running_api.port}", timeout=30
    ) as client:
        admin = await _login(client, "admin", ADMIN_PASSWORD)
        account_id = (
            await client.post("/api/v1/accounts", headers=admin, json={"capital": "1000"})
        ).json()["account_id"]
        pool = await create_pool(api_dsn, 1, 1, timeout_s=10)
        rows = [("", stubs.TS, 9), ("sma-btc", stubs.TS, 1), ("sma-btc", stubs.TS + 60, 3)]
        rows.append(("rsi-eth", stubs.TS + 30, 5))
        try:
            for strategy_id, ts, trades in rows:
                report = stubs.performance_report(
                    account_id=account_id,
                    strategy_id=strategy_id or None,
                    trades=trades,
                    ts_event=ts,
                )
                await pool.execute(
                    "INSERT INTO portfolio_performance"
                    " (account_id, strategy_id, ts_event, report_id, report)"
                    " VALUES ($1, $2, $3, $4, $5)",
                    account_id,
                    strategy_id,
                    ts,
                    f"PERF:{account_id}:{strategy_id}:{ts}",
                    json.loads(report.model_dump_json()),
                )
        finally:
            await pool.close()
        url = f"/api/v1/accounts/{account_id}/performance"
        one = await client.get(url, headers=admin, params={"strategy_id": "sma-btc"})
        whole = await client.get(url, headers=admin)
        listed = await client.get(url + "/strategies", headers=admin)

    assert (one.status_code, one.json()["trades"], one.json()["ts_event"]) == (
        200,
        3,
        stubs.TS + 60,
    )
    assert (whole.json()["strategy_id"], whole.json()["trades"]) == (None, 9)
    assert [(p["strategy_id"], p["trades"]) for p in listed.json()] == [
        ("rsi-eth", 5),
        ("sma-btc", 3),
    ]


def _wait_for_command(consumer: Consumer, command_id: str) -> ControlCommand:
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        message = consumer.poll(1.0)
        value = message.value() if message is not None and not message.error() else None
        if value is None:
            continue
        payload = decode(value).payload
        if isinstance(payload, ControlCommand) and payload.command_id == command_id:
            return payload
    raise AssertionError(f"no command {command_id} on {Topic.CONTROL}")


async def test_collector_when_started_sends_the_params_and_shows_the_jobs_reported(
    running_api: ApiService,
) -> None:
    consumer = await asyncio.to_thread(_intents_reader, Topic.CONTROL)
    job_a, job_b = (f"it-{uuid.uuid4().hex[:12]}" for _ in range(2))
    now = time.time_ns()

    def status(job_id: str, ts_event: int, progress: float, fetched: int) -> CollectorStatus:
        return CollectorStatus(
            job_id=job_id,
            kind="backfill.ohlcv",
            state=CollectorState.RUNNING,
            venue="BINANCE",
            instrument_id="BTC-USDT.BINANCE",
            timeframe="1m",
            cursor_ns=now - 60 * 10**9,
            progress=progress,
            fetched=fetched,
            ts_event=ts_event,
        )

    bus = KafkaBus("api-it", os.environ["QM_KAFKA_BOOTSTRAP"])
    await bus.start()
    try:
        # job A's older status arrives last: the api keeps the newer one.
        for update in (status(job_a, now, 0.5, 500), status(job_a, now - 1, 0.25, 250)):
            await bus.publish(Topic.MD_COLLECTOR, update, key=update.job_id)
        await bus.publish(Topic.MD_COLLECTOR, status(job_b, now, 1.0, 42), key=job_b)
        await bus.flush()
    finally:
        await bus.close()
    try:
        async with httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{running_api.port}", timeout=30
        ) as client:
            admin = await _login(client, "admin", ADMIN_PASSWORD)
            started = await client.post(
                "/api/v1/market/collector/start",
                headers=admin,
                json={"symbols": ["BTC/USDT"], "timeframes": ["1m"], "page_limit": 100},
            )
            command = await asyncio.to_thread(
                _wait_for_command, consumer, started.json()["last_command_id"]
            )
            jobs: dict[str, dict[str, object]] = {}
            deadline = time.monotonic() + WAIT_S
            while time.monotonic() < deadline and not {job_a, job_b} <= set(jobs):
                await asyncio.sleep(0.2)  # polling the endpoint is what a client does
                answer = await client.get("/api/v1/market/collector", headers=admin)
                jobs = {j["job_id"]: j for j in answer.json()["jobs"]}
    finally:
        await asyncio.to_thread(consumer.close)

    assert started.status_code == 202
    assert (command.action, command.params) == (
        ControlAction.COLLECTOR_START,
        {"symbols": "BTC/USDT", "timeframes": "1m", "page_limit": "100"},
    )
    assert answer.json()["state"] == "STARTED"
    assert (jobs[job_a]["progress"], jobs[job_a]["fetched"], jobs[job_a]["ts_event"]) == (
        0.5,
        500,
        now,
    )
    assert (jobs[job_b]["progress"], jobs[job_b]["fetched"]) == (1.0, 42)
