"""The recorder and replay on the real PostgreSQL and Redis of the local stack."""

from __future__ import annotations

import asyncio
import time
from decimal import Decimal
from typing import Any

import pytest

from quantmesh_common.bus.memory import InMemoryBus
from quantmesh_common.clock import WallClock
from quantmesh_common.envelope import Envelope
from quantmesh_common.messages import Bar, Tick
from quantmesh_common.runtime import ServiceRunner
from quantmesh_common.storage.redis import RedisClient
from quantmesh_common.testing import stubs
from quantmesh_common.topics import Topic, registry
from quantmesh_marketdata.config import MarketDataSettings
from quantmesh_marketdata.recorder import PostgresSink, Recorder, RedisLatest, tick_row
from quantmesh_marketdata.replay import db_bars, db_ticks, replay
from quantmesh_marketdata.service import MarketDataService

pytestmark = pytest.mark.integration

SEC = 1_000_000_000
MIN = 60 * SEC
T0 = 28_333_334 * MIN  # a minute boundary
BTC, ETH = "BTC-USDT.SIM", "ETH-USDT.SIM"
_BUS = InMemoryBus("test", registry())


def env(payload: Any) -> Envelope[Any]:
    return _BUS.wrap(payload)


def trade(instrument_id: str, ts: int, price: str, size: str, trade_id: str) -> Tick:
    return stubs.tick(
        instrument_id=instrument_id,
        ts_event=ts,
        ts_init=ts + 1_000,
        price=Decimal(price),
        size=Decimal(size),
        trade_id=trade_id,
    )


def recorded_ticks() -> list[Tick]:
    """1,200 trades on two instruments; BTC and ETH trade at the same instants."""
    out: list[Tick] = []
    for i in range(600):
        ts = T0 + i * 250_000_000
        out.append(trade(BTC, ts, f"{50000 + i % 17}.{i % 100:02d}", "0.125", f"B{i}"))
        out.append(trade(ETH, ts, f"{3000 + i % 11}.5", "1.5", f"E{i}"))
    return out


def recorded_bars() -> list[Bar]:
    return [
        stubs.bar(instrument_id=inst, ts_open=T0 + i * MIN, ts_close=T0 + (i + 1) * MIN)
        for i in range(30)
        for inst in (BTC, ETH)
    ]


async def test_recorder_when_ticks_and_bars_are_written_twice_stores_them_once(
    md_pool: Any,
) -> None:
    recorder = Recorder(PostgresSink(md_pool), None, WallClock(), batch_rows=100_000)
    ticks, bars = recorded_ticks(), recorded_bars()

    for _ in range(2):
        for event in (*ticks, *bars):
            await recorder.handle(env(event))
    first = await recorder.flush()
    for event in (*ticks[:500], *bars[:7]):
        await recorder.handle(env(event))
    second = await recorder.flush()

    assert await md_pool.fetchval("SELECT count(*) FROM ticks") == 1200
    assert await md_pool.fetchval("SELECT count(*) FROM bars") == 60
    assert (first.ticks, first.ticks_inserted, first.bars, first.bars_inserted) == (
        2400,
        1200,
        120,
        60,
    )
    assert (second.ticks_inserted, second.bars_inserted) == (0, 0)


async def test_sink_when_parallel_chunks_meet_stored_rows_falls_back_and_stores_once(
    md_pool: Any,
) -> None:
    sink = PostgresSink(md_pool, parallel=3, min_chunk_rows=100)
    rows = [tick_row(t) for t in recorded_ticks()]

    first = await sink.write_ticks(rows[:700])  # fast path: plain COPY in two chunks
    fallbacks_before = sink.fallbacks
    second = await sink.write_ticks(rows)  # 700 stored already, 500 new

    assert (first, second) == (700, 500)
    assert fallbacks_before == 0
    assert sink.fallbacks >= 1
    assert await md_pool.fetchval("SELECT count(*) FROM ticks") == 1200
    assert await md_pool.fetchval("SELECT count(DISTINCT trade_id) FROM ticks") == 1200


async def test_recorder_when_text_needs_escapes_stores_every_column_exactly(
    md_pool: Any,
) -> None:
    recorder = Recorder(PostgresSink(md_pool), None, WallClock(), batch_rows=1000)
    ticks = [
        trade(BTC, T0, "50000.10", "0.50", "a\tb"),
        trade(BTC, T0 + 1, "1E+3", "1.2E-7", "c\\d"),
        trade(BTC, T0 + 2, "49999.9", "3", "e\nf\rg"),
        stubs.quote_tick(instrument_id=ETH, ts_event=T0 + 3, ts_init=T0 + 4),
    ]
    for tick in ticks:
        recorder.add(tick)

    await recorder.flush()
    stored = [t async for t in db_ticks(md_pool, [BTC, ETH], T0, T0 + SEC)]
    cells = await md_pool.fetch(
        "SELECT trade_id, price::text, size::text FROM ticks WHERE instrument_id = $1"
        " ORDER BY ts_event",
        BTC,
    )

    assert stored == ticks
    assert [tuple(row) for row in cells] == [
        ("a\tb", "50000.10", "0.50"),
        ("c\\d", "1000", "0.00000012"),
        ("e\nf\rg", "49999.9", "3"),
    ]


async def test_recorder_when_flushed_writes_24h_stats_to_redis_as_computed_by_hand(
    md_pool: Any, md_redis: RedisClient, redis_prefix: str
) -> None:
    latest = RedisLatest(md_redis, redis_prefix)
    recorder = Recorder(PostgresSink(md_pool), latest, WallClock(), batch_rows=1000)
    for tick in (
        trade(ETH, T0, "100", "1", "1"),
        trade(ETH, T0 + 30 * SEC, "105", "2", "2"),
        trade(BTC, T0 + 40 * SEC, "50000", "0.25", "3"),
        trade(ETH, T0 + 61 * SEC, "95", "0.5", "4"),
        trade(ETH, T0 + 120 * MIN, "102", "1.5", "5"),
        trade(ETH, T0 + 120 * MIN, "102", "1.5", "5"),  # redelivered: counted once
    ):
        await recorder.handle(env(tick))

    await recorder.flush()
    eth = await md_redis.hgetall(f"{redis_prefix}latest:{ETH}")
    btc = await md_redis.hgetall(f"{redis_prefix}latest:{BTC}")
    members = await md_redis.smembers(f"{redis_prefix}instruments")

    assert eth == {
        "price": "102",
        "ts": str(T0 + 120 * MIN),
        "open_24h": "100",
        "change_24h": "2",
        "change_pct_24h": "2.0000",  # 2 / 100 * 100
        "high_24h": "105",
        "low_24h": "95",
        "volume_24h": "5.0",  # 1 + 2 + 0.5 + 1.5
    }
    assert btc["price"] == "50000"
    assert btc["change_24h"] == "0"
    assert btc["volume_24h"] == "0.25"
    assert members == {ETH, BTC}


async def test_replay_from_db_when_paged_returns_exactly_what_was_recorded_in_order(
    md_pool: Any,
) -> None:
    recorder = Recorder(PostgresSink(md_pool), None, WallClock(), batch_rows=500)
    ticks, bars = recorded_ticks(), recorded_bars()
    for event in (*ticks, *bars):
        await recorder.handle(env(event))
    await recorder.flush()

    # Pages of 49 rows cut the BTC/ETH pairs that share a timestamp.
    replayed = [t async for t in db_ticks(md_pool, [BTC, ETH], T0, T0 + 3600 * SEC, page_rows=49)]
    window = [t async for t in db_ticks(md_pool, [ETH], T0 + 10 * SEC, T0 + 20 * SEC)]
    replayed_bars = [
        b async for b in db_bars(md_pool, [BTC, ETH], "1m", T0, T0 + MIN * 60, page_rows=7)
    ]

    assert replayed == ticks
    assert window == [
        t for t in ticks if t.instrument_id == ETH and T0 + 10 * SEC <= t.ts_event < T0 + 20 * SEC
    ]
    assert len(window) == 40
    assert replayed_bars == bars


async def test_replay_from_db_to_the_bus_publishes_recorded_ticks_with_their_event_times(
    md_pool: Any,
) -> None:
    ticks = recorded_ticks()[:100]
    await PostgresSink(md_pool).write_ticks([tick_row(t) for t in ticks])
    bus = InMemoryBus("replay", registry())
    got: list[Envelope[Any]] = []
    await bus.subscribe("test.ticks", [Topic.MD_TICKS], got.append).start()

    count = await replay(
        db_ticks(md_pool, [BTC, ETH], T0, T0 + 3600 * SEC), bus, WallClock(), speed=None
    )
    await bus.run_until_idle()

    assert count == 100
    assert [e.payload for e in got] == ticks
    assert [e.ts_event for e in got] == [t.ts_event for t in ticks]


async def _wait(predicate: Any, timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not await predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


async def test_service_when_recorder_on_records_the_synthetic_feed_and_latest_price(
    md_dsn: str, md_pool: Any, md_redis: RedisClient, redis_url: str, redis_prefix: str
) -> None:
    settings = MarketDataSettings(
        bus="memory",
        http_host="127.0.0.1",
        http_port=0,
        feed="synthetic",
        feed_rate=200,
        instruments=f"{BTC},{ETH}",
        bar_interval="1s",
        database_url=md_dsn,
        redis_url=redis_url,
        recorder="on",
        recorder_flush_ms=50,
        redis_prefix=redis_prefix,
    )
    service = MarketDataService(settings)
    runner = ServiceRunner(service, settings)

    async def enough() -> bool:
        return bool(await md_pool.fetchval("SELECT count(*) >= 400 FROM ticks"))

    await runner.start()
    try:
        await _wait(enough)
    finally:
        stopped = await runner.stop()

    rows = await md_pool.fetch(
        "SELECT DISTINCT ON (instrument_id) instrument_id, price, ts_event FROM ticks"
        " ORDER BY instrument_id, ts_event DESC"
    )
    latest = {
        r["instrument_id"]: await md_redis.hgetall(f"{redis_prefix}latest:{r['instrument_id']}")
        for r in rows
    }
    assert stopped
    assert {r["instrument_id"] for r in rows} == {BTC, ETH}
    assert await md_pool.fetchval("SELECT count(*) FROM bars") >= 1
    # The last flush (teardown) wrote both the rows and the hashes: they agree.
    for r in rows:
        assert Decimal(latest[r["instrument_id"]]["price"]) == r["price"]
        assert int(latest[r["instrument_id"]]["ts"]) == r["ts_event"]
