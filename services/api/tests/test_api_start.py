"""The api starts from PostgreSQL and the update topics' stable end, on the real stack."""

from __future__ import annotations

import asyncio
import json
import os
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from decimal import Decimal

import pytest
from confluent_kafka import Consumer, TopicPartition

from quantmesh_api.config import ApiSettings
from quantmesh_api.service import ApiService
from quantmesh_common.bus.kafka import KafkaBus
from quantmesh_common.envelope import decode
from quantmesh_common.messages import OrderRequest, OrderRequestAction, Position, PositionSide
from quantmesh_common.runtime import ServiceRunner
from quantmesh_common.storage.postgres import create_pool
from quantmesh_common.topics import Topic

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

WAIT_S = 90.0
T = 1_767_225_600_000_000_000  # 2026-01-01 UTC


Starter = Callable[[], Awaitable[ApiService]]


@pytest.fixture
async def start_api(api_dsn: str) -> AsyncIterator[Starter]:
    """Starts the api service on the real stack when called; stops it afterwards."""
    runners: list[ServiceRunner[ApiSettings]] = []

    async def start() -> ApiService:
        prefix = f"qmtest:apistart:{uuid.uuid4().hex[:8]}:"
        settings = ApiSettings(
            bus="kafka",
            kafka_bootstrap=os.environ["QM_KAFKA_BOOTSTRAP"],
            database_url=api_dsn,
            redis_url=os.environ["QM_REDIS_URL"],
            http_host="127.0.0.1",
            http_port=0,
            jwt_secret="integration-secret-long-enough-for-hs256",
            redis_prefix=prefix,
            md_redis_prefix=prefix + "md:",
        )
        service = ApiService(settings)
        runner = ServiceRunner(service, settings)
        await runner.start()
        runners.append(runner)
        return service

    yield start
    for runner in runners:
        await runner.stop()


def _position(account_id: str, instrument_id: str, quantity: str, ts: int) -> Position:
    qty = Decimal(quantity)
    return Position(
        account_id=account_id,
        instrument_id=instrument_id,
        side=PositionSide.of(qty),
        quantity=qty,
        avg_entry_price=Decimal("100"),
        ts_event=ts,
    )


async def _publish(*positions: Position) -> None:
    bus = KafkaBus("api-start-it", os.environ["QM_KAFKA_BOOTSTRAP"])
    await bus.start()
    try:
        for position in positions:
            await bus.publish(Topic.PORTFOLIO_UPDATES, position, key=position.account_id)
        await bus.flush()
    finally:
        await bus.close()


async def _store(dsn: str, statements: list[tuple[str, tuple[object, ...]]]) -> None:
    pool = await create_pool(dsn, 1, 1, timeout_s=10)
    try:
        for sql, args in statements:
            await pool.execute(sql, *args)
    finally:
        await pool.close()


_INSERT_POSITION = (
    "INSERT INTO positions (account_id, instrument_id, side, quantity, avg_entry_price,"
    " ts_event) VALUES ($1, $2, $3, $4, 100, $5)"
)
_INSERT_SNAPSHOT = (
    "INSERT INTO equity_snapshots (account_id, ts_event, base_currency, equity, peak_equity,"
    " drawdown, balances) VALUES ($1, $2, 'USDT', $3, $3, 0, $4)"
)


async def test_start_when_rows_stored_and_updates_published_seeds_from_rows_then_consumes_new(
    api_dsn: str, start_api: Starter
) -> None:
    account = f"acct-{uuid.uuid4().hex[:10]}"
    await _store(
        api_dsn,
        [
            (_INSERT_POSITION, (account, "X-USDT.SIM", "LONG", Decimal(2), T + 100)),
            (_INSERT_SNAPSHOT, (account, T + 100, Decimal(1000), json.dumps({"USDT": "800"}))),
            (_INSERT_SNAPSHOT, (account, T + 200, Decimal(1010), json.dumps({"USDT": "810"}))),
        ],
    )
    # Published before the start and (unlike the portfolio's) never stored: a replay would
    # fold it in, a start at the topics' end does not.
    await _publish(_position(account, "Y-USDT.SIM", "5", T + 300))

    service = await start_api()
    assert service.state is not None
    view = service.state.projection.view(account)
    seeded = (dict(view.positions), view.snapshot, list(view.equity))
    await _publish(
        _position(account, "X-USDT.SIM", "1", T + 50),  # older than the stored row: ignored
        _position(account, "Z-USDT.SIM", "-4", T + 400),
        _position(account, "X-USDT.SIM", "3", T + 500),  # newer: replaces it
    )
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        held = service.state.projection.view(account).positions.get("X-USDT.SIM")
        if held is not None and held.ts_event == T + 500:
            break
        await asyncio.sleep(0.1)
    positions = service.state.projection.view(account).positions

    assert sorted(seeded[0]) == ["X-USDT.SIM"]
    assert seeded[0]["X-USDT.SIM"].quantity == Decimal(2)
    assert seeded[1] is not None
    assert (seeded[1].ts_event, seeded[1].balances) == (T + 200, {"USDT": Decimal(810)})
    assert seeded[2] == [(T + 100, Decimal(1000)), (T + 200, Decimal(1010))]
    assert sorted(positions) == ["X-USDT.SIM", "Z-USDT.SIM"]  # Y was before the start
    assert positions["X-USDT.SIM"].quantity == Decimal(3)
    assert positions["Z-USDT.SIM"].quantity == Decimal(-4)


def _requests_reader() -> Consumer:
    """A consumer of `orders.requests` at the current end of every partition."""
    consumer = Consumer(
        {
            "bootstrap.servers": os.environ["QM_KAFKA_BOOTSTRAP"],
            "group.id": f"qmtest.apistart.{uuid.uuid4().hex}",
            "enable.auto.commit": False,
            "isolation.level": "read_committed",
        }
    )
    topic = Topic.ORDERS_REQUESTS
    metadata = consumer.list_topics(topic, timeout=10)
    partitions = []
    for p in metadata.topics[topic].partitions:
        _, high = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)
        partitions.append(TopicPartition(topic, p, high))
    consumer.assign(partitions)
    return consumer


_INSERT_ORDER = (
    "INSERT INTO orders (client_order_id, account_id, strategy_id, instrument_id, venue, side,"
    " order_type, quantity, filled_quantity, avg_fill_price, limit_price, stop_price, reduce_only,"
    " status, tag, ts_init, ts_last) VALUES ($1, $2, 'api', 'X-USDT.SIM', 'SIM', 'SELL', $3, 1,"
    " $4, $5, $6, $7, true, $8, $9, $10, $10)"
)


async def test_start_when_a_protect_leg_filled_unfollowed_cancels_the_other_leg(
    api_dsn: str, start_api: Starter
) -> None:
    account = f"acct-{uuid.uuid4().hex[:10]}"
    base = f"{account}-o1"
    stop_loss = (f"{base}:SL", account, "STOP", Decimal(1), Decimal(90), None, Decimal(90))
    take_profit = (f"{base}:TP", account, "LIMIT", Decimal(0), None, Decimal(120), None)
    await _store(
        api_dsn,
        [
            (_INSERT_ORDER, (*stop_loss, "FILLED", "PROTECT_SL", T)),
            (_INSERT_ORDER, (*take_profit, "ACCEPTED", "PROTECT_TP", T)),
        ],
    )
    reader = _requests_reader()
    try:
        await start_api()
        request: OrderRequest | None = None
        deadline = time.monotonic() + WAIT_S
        while request is None and time.monotonic() < deadline:
            message = await asyncio.to_thread(reader.poll, 1.0)
            value = message.value() if message is not None and message.error() is None else None
            if value is None:
                continue
            payload = decode(value).payload
            if isinstance(payload, OrderRequest) and payload.account_id == account:
                request = payload
    finally:
        reader.close()

    assert request is not None
    assert request.action is OrderRequestAction.CANCEL
    assert (request.client_order_id, request.request_id) == (
        f"{base}:TP",
        f"{base}:TP:OCO-CANCEL",
    )
