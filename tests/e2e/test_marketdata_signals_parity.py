"""Replay parity: marketdata and signals as processes on Kafka equal the same stages in one process.

A recorded trade file (2,000 Binance BTC/USDT trades, `fixtures/README.md`) is replayed by
marketdata (`QM_FEED=replay`, 1 s bars aggregated from the trades, the recorder on)
while signals runs three strategies over it. Once as two processes on the real Kafka,
PostgreSQL and Redis; once as the same two services on one in-memory bus in this process,
recording to another fresh schema and Redis prefix. The recorded tick and bar rows, the Redis
latest-price/24 h hash and the order intents must be the same (the intents' own random ids
aside). The Kafka run has its own topics (a prefix), consumer groups, schema and Redis prefix.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from quantmesh_common.bus.kafka import ensure_topics
from quantmesh_common.bus.memory import InMemoryBus
from quantmesh_common.envelope import Envelope
from quantmesh_common.messages import OrderIntent
from quantmesh_common.runtime import ServiceRunner
from quantmesh_common.storage.redis import RedisClient, create_redis
from quantmesh_common.testing.kafka import delete_topics
from quantmesh_common.testing.postgres import fresh_schema, server_dsn_for_tests
from quantmesh_common.topics import Topic, registry
from quantmesh_marketdata.config import MarketDataSettings
from quantmesh_marketdata.recorder import BAR_COLUMNS, TICK_COLUMNS
from quantmesh_marketdata.service import MarketDataService
from quantmesh_signals.config import SignalsSettings
from quantmesh_signals.service import SignalsService
from tests.e2e.conftest import Mesh, TopicReader, kafka_bootstrap

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(420)]

#: 2024-08-08 23:54:15.342 to 23:55:51.137 UTC (MIT; see fixtures/README.md).
TRADES = Path(__file__).parent / "fixtures" / "binance-spot_BTCUSDT_trades_2024-08-08.csv"
INSTRUMENT = "BTC-USDT.BINANCE"
INTERVAL = "1s"
TRADE_ROWS = 2_000
#: Every second from 23:54:15 to 23:55:51 has trades: 97 bars (the last closed at the end).
BAR_ROWS = 97
#: The file's last trade (line 2001): what the Redis hash must say as the latest price.
LAST_PRICE, LAST_TS = "61784.64", 1_723_161_351_137_000_000
WAIT_S = 180.0
STRATEGIES: list[dict[str, Any]] = [
    {
        "id": "sma",
        "name": "sma_cross",
        "account_id": "acc-sma",
        "instruments": [INSTRUMENT],
        "params": {"fast": 3, "slow": 8, "allow_short": True},
    },
    {
        "id": "rsi",
        "name": "rsi_reversion",
        "account_id": "acc-rsi",
        "instruments": [INSTRUMENT],
        "params": {"period": 5, "oversold": 40, "overbought": 60},
    },
    {
        "id": "boll",
        "name": "bollinger_breakout",
        "account_id": "acc-boll",
        "instruments": [INSTRUMENT],
        "params": {"period": 8, "k": 1.0},
    },
]
#: Every topic either stage reads or writes, prefixed per run.
TOPICS = (
    Topic.MD_TICKS,
    Topic.MD_BARS,
    Topic.MD_BOOKS,
    Topic.REF_INSTRUMENTS,
    Topic.MD_COLLECTOR,
    Topic.ALERTS,
    Topic.CONTROL,
    Topic.EXEC_REPORTS,
    Topic.SIGNALS,
    Topic.ORDERS_INTENTS,
    Topic.SIGNALS_JOINT_BARS,
    Topic.SIGNALS_JOINT_TICKS,
)
IntentKey = tuple[Any, ...]


@dataclass(frozen=True)
class Recorded:
    """What one run left behind: its rows, its Redis hash and its intents."""

    ticks: list[tuple[Any, ...]]
    bars: list[tuple[Any, ...]]
    latest: dict[str, str]
    instruments: set[str]
    intents: Counter[IntentKey]


def _intent_key(intent: OrderIntent) -> IntentKey:
    # Everything but intent_id, a fresh random id wherever the intent is made.
    return tuple(v for k, v in intent.model_dump().items() if k != "intent_id")


async def _read_store(dsn: str, redis: RedisClient, prefix: str) -> tuple[Any, ...]:
    conn = await asyncpg.connect(dsn)
    try:
        ticks = await conn.fetch(
            f"SELECT {', '.join(TICK_COLUMNS)} FROM ticks ORDER BY ts_event, trade_id"
        )
        bars = await conn.fetch(
            f"SELECT {', '.join(BAR_COLUMNS)} FROM bars ORDER BY instrument_id, ts_open"
        )
    finally:
        await conn.close()
    latest = await redis.hgetall(f"{prefix}latest:{INSTRUMENT}")
    instruments = await redis.smembers(f"{prefix}instruments")
    return [tuple(r) for r in ticks], [tuple(r) for r in bars], latest, set(instruments)


async def _until(condition: Callable[[], Awaitable[bool]], what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not await condition():
        assert time.monotonic() < deadline, f"timed out after {WAIT_S} s waiting for {what}"
        await asyncio.sleep(0.5)


async def _count(dsn: str, table: str) -> int:
    conn = await asyncpg.connect(dsn)
    try:
        return int(await conn.fetchval(f"SELECT count(*) FROM {table}"))
    finally:
        await conn.close()


def _md_env(dsn: str, redis_prefix: str) -> dict[str, str]:
    return {
        "QM_FEED": "replay",
        "QM_REPLAY_FILE": str(TRADES),
        "QM_INSTRUMENTS": INSTRUMENT,
        "QM_BAR_INTERVAL": INTERVAL,
        "QM_RECORDER": "on",
        "QM_RECORDER_FLUSH_MS": "100",
        "QM_DATABASE_URL": dsn,
        "QM_REDIS_PREFIX": redis_prefix,
    }


async def _in_memory(dsn: str, redis: RedisClient, redis_url: str) -> Recorded:
    """The same replay through both services' setup on one in-memory bus, in this process."""
    prefix = f"qmtest:mdsig:{uuid.uuid4().hex[:10]}:mem:"
    bus = InMemoryBus("parity", registry())
    env = _md_env(dsn, prefix)
    md_settings = MarketDataSettings(
        bus="memory",
        http_host="127.0.0.1",
        http_port=0,
        redis_url=redis_url,
        feed="replay",
        replay_file=env["QM_REPLAY_FILE"],
        instruments=INSTRUMENT,
        bar_interval=INTERVAL,
        recorder="on",
        recorder_flush_ms=100,
        database_url=dsn,
        redis_prefix=prefix,
    )
    sig_settings = SignalsSettings(
        bus="memory", http_host="127.0.0.1", http_port=0, strategies=json.dumps(STRATEGIES)
    )
    marketdata = MarketDataService(md_settings)
    signals = ServiceRunner(SignalsService(sig_settings), sig_settings, bus=bus, pump=False)
    md = ServiceRunner(marketdata, md_settings, bus=bus, pump=False)
    intents: Counter[IntentKey] = Counter()

    def collect(envelope: Envelope[Any]) -> None:
        if isinstance(envelope.payload, OrderIntent):
            intents[_intent_key(envelope.payload)] += 1

    await bus.subscribe("parity.intents", [Topic.ORDERS_INTENTS], collect).start()
    await signals.start()
    await md.start()
    try:
        deadline = time.monotonic() + WAIT_S
        while not marketdata.replay_done or await bus.run_until_idle():
            assert time.monotonic() < deadline, "the in-memory replay did not finish"
            await bus.run_until_idle()
            await asyncio.sleep(0.01)
    finally:
        await signals.stop()
        await md.stop()  # its teardown flushes what the recorder still buffers
    try:
        ticks, bars, latest, instruments = await _read_store(dsn, redis, prefix)
    finally:
        await _delete_keys(redis, prefix)
    return Recorded(ticks, bars, latest, instruments, intents)


async def _delete_keys(redis: RedisClient, prefix: str) -> None:
    keys = [k async for k in redis.scan_iter(match=f"{prefix}*")]
    if keys:
        await redis.delete(*keys)


@pytest.fixture
async def redis_client() -> AsyncIterator[tuple[RedisClient, str]]:
    url = os.environ.get("QM_REDIS_URL")
    if not url:
        pytest.skip("no Redis: QM_REDIS_URL is not set")
    client = await create_redis(url)
    try:
        yield client, url
    finally:
        await client.aclose()


@pytest.fixture
def schemas() -> Any:
    server = server_dsn_for_tests()
    if server is None:
        pytest.skip("no PostgreSQL: QM_DATABASE_URL is not set")
    with (
        fresh_schema(server, "qm_e2e_kafka", migrate=True) as kafka_dsn,
        fresh_schema(server, "qm_e2e_mem", migrate=True) as memory_dsn,
    ):
        yield kafka_dsn, memory_dsn


@pytest.fixture
def topic_prefix() -> Any:
    bootstrap = kafka_bootstrap()
    prefix = f"qmtest.mdsig.{uuid.uuid4().hex[:10]}."
    topics = registry().prefixed(prefix, TOPICS)
    ensure_topics(bootstrap, topics)
    yield prefix
    delete_topics(bootstrap, topics.all_topic_names())


async def test_replay_when_stages_run_as_processes_on_kafka_records_and_emits_what_one_process_does(
    mesh: Mesh,
    schemas: tuple[str, str],
    redis_client: tuple[RedisClient, str],
    topic_prefix: str,
) -> None:
    kafka_dsn, memory_dsn = schemas
    redis, redis_url = redis_client
    redis_prefix = f"qmtest:mdsig:{uuid.uuid4().hex[:10]}:kafka:"
    expected = await _in_memory(memory_dsn, redis, redis_url)
    assert len(expected.ticks) == TRADE_ROWS
    assert len(expected.bars) == BAR_ROWS
    assert expected.latest["price"] == LAST_PRICE
    assert expected.latest["ts"] == str(LAST_TS)
    assert sum(expected.intents.values()) > 0

    await mesh.start(
        "signals",
        {
            "QM_STRATEGIES": json.dumps(STRATEGIES),
            "QM_SIGNALS_TOPIC_PREFIX": topic_prefix,
            "QM_SIGNALS_GROUP": topic_prefix + "signals",
            "QM_SIGNALS_INSTANCE": "parity",
        },
    )
    await mesh.wait_ready("signals")
    await mesh.start(
        "marketdata",
        {**_md_env(kafka_dsn, redis_prefix), "QM_MARKETDATA_TOPIC_PREFIX": topic_prefix},
    )
    reader = TopicReader(kafka_bootstrap(), (topic_prefix + Topic.ORDERS_INTENTS,)).open()
    try:
        intents_topic = topic_prefix + Topic.ORDERS_INTENTS
        total = sum(expected.intents.values())

        async def intents_in() -> bool:
            reader.poll(0.2)
            return len(reader.payloads(intents_topic, OrderIntent)) >= total

        async def recorded() -> bool:
            latest = await redis.hgetall(f"{redis_prefix}latest:{INSTRUMENT}")
            return (
                await _count(kafka_dsn, "ticks") >= TRADE_ROWS
                and await _count(kafka_dsn, "bars") >= BAR_ROWS
                and latest.get("ts") == str(LAST_TS)
            )

        await _until(recorded, "the recorder to store the replay")
        await _until(intents_in, f"{total} intents")
        codes = await mesh.stop()
        reader.read_to_end()
        got_intents = Counter(_intent_key(p) for p in reader.payloads(intents_topic, OrderIntent))
        ticks, bars, latest, instruments = await _read_store(kafka_dsn, redis, redis_prefix)
    finally:
        reader.close()
        await _delete_keys(redis, redis_prefix)

    assert codes == {"signals": 0, "marketdata": 0}
    assert ticks == expected.ticks
    assert bars == expected.bars
    assert latest == expected.latest
    assert instruments == expected.instruments == {INSTRUMENT}
    assert got_intents == expected.intents
    # The file's values, not only the two runs agreeing: the first trade as recorded (the
    # buyer was the maker, so the seller was the aggressor).
    assert ticks[0] == (
        "BINANCE",
        INSTRUMENT,
        1_723_161_255_342_000_000,
        1_723_161_255_342_000_000,
        "TRADE",
        Decimal("61837.63"),
        Decimal("0.02"),
        "SELLER",
        "3735683259",
        None,
        None,
        None,
        None,
    )
