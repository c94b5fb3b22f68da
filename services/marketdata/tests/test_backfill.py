"""Backfill through the real ccxt Binance client against a loopback server of recorded rows.

The server answers /api/v3/klines from `unittest-btc_1m_ohlcv_head.json` (freqtrade's
1-minute candles, served under ETHBTC) and /api/v3/aggTrades from
`binance_xrpeth_aggtrades_2019-10-11_head.json` (Binance XRP/ETH aggregate trades), honouring
startTime, endTime and limit as Binance does.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from quantmesh_common.clock import WallClock
from quantmesh_common.envelope import Event
from quantmesh_common.messages import Bar, CollectorState, CollectorStatus, Tick
from quantmesh_common.topics import Topic
from quantmesh_marketdata.backfill import Backfill, BackfillJob, FileCursorStore
from quantmesh_marketdata.health import Backoff
from quantmesh_marketdata.venue import VenueConfig, make_rest_exchange

FIXTURES = Path(__file__).parent / "fixtures"
CANDLES: list[list[float]] = json.loads((FIXTURES / "unittest-btc_1m_ohlcv_head.json").read_text())
AGG_TRADES: list[dict[str, Any]] = json.loads(
    (FIXTURES / "binance_xrpeth_aggtrades_2019-10-11_head.json").read_text()
)
MS = 1_000_000
MINUTE_NS = 60_000 * MS


class Out:
    def __init__(self) -> None:
        self.events: list[tuple[str, Event]] = []
        self.on_status: Any = None

    async def publish(self, topic: str, event: Event, ts_event: int) -> None:
        self.events.append((topic, event))
        if isinstance(event, CollectorStatus) and self.on_status is not None:
            self.on_status(event)

    def bars(self) -> list[Bar]:
        return [e for t, e in self.events if t == Topic.MD_BARS and isinstance(e, Bar)]

    def ticks(self) -> list[Tick]:
        return [e for t, e in self.events if t == Topic.MD_TICKS and isinstance(e, Tick)]

    def statuses(self) -> list[CollectorStatus]:
        return [e for _, e in self.events if isinstance(e, CollectorStatus)]


@pytest.fixture
async def exchange(venue: Any) -> AsyncIterator[Any]:
    config = VenueConfig(
        "binance",
        options={"fetchMarkets": {"types": ["spot"]}},
        url_overrides={"api.public": f"http://127.0.0.1:{venue.port}/api/v3"},
    )
    ex = make_rest_exchange(config)  # enableRateLimit on: Binance's own request spacing
    await ex.load_markets()
    yield ex
    await ex.close()


def _ohlcv_job(page_limit: int = 50) -> BackfillJob:
    return BackfillJob(
        job_id="bf-ethbtc-1m",
        kind="ohlcv",
        symbol="ETH/BTC",
        instrument_id="ETH-BTC.BINANCE",
        venue="BINANCE",
        timeframe="1m",
        start_ns=int(CANDLES[0][0]) * MS,
        end_ns=int(CANDLES[-1][0]) * MS + MINUTE_NS,
        page_limit=page_limit,
    )


def _backfill(exchange: Any, job: BackfillJob, store: FileCursorStore, out: Out) -> Backfill:
    return Backfill(exchange, job, store, out.publish, WallClock(), Backoff(0.01, 0.05, 0.0))


async def test_backfill_ohlcv_when_paged_publishes_every_candle_once_in_order(
    exchange: Any, venue: Any, tmp_path: Path
) -> None:
    out = Out()
    backfill = _backfill(exchange, _ohlcv_job(), FileCursorStore(tmp_path / "c.json"), out)

    final = await backfill.run()

    bars = out.bars()
    assert [b.ts_open for b in bars] == [int(r[0]) * MS for r in CANDLES]  # 240, gaps kept
    first = bars[0]
    # UNITTEST/BTC 2017-11-04 23:02: 0.00162008 flat, volume 108.14853839
    assert (str(first.open), str(first.close), str(first.volume)) == (
        "0.00162008",
        "0.00162008",
        "108.14853839",
    )
    assert (first.interval, first.ts_close - first.ts_open) == ("1m", MINUTE_NS)
    assert (final.state, final.progress, final.fetched) == (CollectorState.COMPLETED, 1.0, 240)
    assert len(venue.requests) >= 5  # 240 candles at 50 a page: paged
    assert all(int(r["limit"]) == 50 for r in venue.requests)
    progress = [s.progress for s in out.statuses()]
    assert progress == sorted(progress)
    assert out.statuses()[0].state is CollectorState.RUNNING


async def test_backfill_when_cancelled_then_rerun_resumes_from_the_saved_cursor(
    exchange: Any, venue: Any, tmp_path: Path
) -> None:
    store = FileCursorStore(tmp_path / "c.json")
    first_out = Out()
    first = _backfill(exchange, _ohlcv_job(), store, first_out)
    first_out.on_status = lambda s: first.cancel() if first.pages == 2 else None

    cancelled = await first.run()
    saved = store.load("bf-ethbtc-1m")
    requests_before = len(venue.requests)
    second_out = Out()
    completed = await _backfill(exchange, _ohlcv_job(), store, second_out).run()

    assert cancelled.state is CollectorState.CANCELLED
    assert saved is not None
    assert saved == cancelled.cursor_ns
    assert int(venue.requests[requests_before]["startTime"]) * MS == saved
    assert 0 < cancelled.progress < 1
    both = [b.ts_open for b in first_out.bars() + second_out.bars()]
    assert both == [int(r[0]) * MS for r in CANDLES]  # nothing lost, nothing twice
    assert completed.state is CollectorState.COMPLETED


async def test_backfill_when_task_killed_mid_run_resumes_without_losing_rows(
    exchange: Any, tmp_path: Path
) -> None:
    store = FileCursorStore(tmp_path / "c.json")
    first_out = Out()
    paged = asyncio.Event()
    first_out.on_status = lambda s: paged.set() if s.fetched > 0 else None
    task = asyncio.create_task(_backfill(exchange, _ohlcv_job(), store, first_out).run())
    await asyncio.wait_for(paged.wait(), 30)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task

    second_out = Out()
    await _backfill(exchange, _ohlcv_job(), store, second_out).run()

    resumed_from = second_out.bars()[0].ts_open
    assert resumed_from > int(CANDLES[0][0]) * MS
    assert {b.ts_open for b in first_out.bars() + second_out.bars()} == {
        int(r[0]) * MS for r in CANDLES
    }


async def test_backfill_trades_when_pages_split_a_millisecond_publishes_each_trade_once(
    exchange: Any, venue: Any, tmp_path: Path
) -> None:
    job = BackfillJob(
        job_id="bf-xrpeth-trades",
        kind="trades",
        symbol="XRP/ETH",
        instrument_id="XRP-ETH.BINANCE",
        venue="BINANCE",
        start_ns=AGG_TRADES[0]["T"] * MS,
        end_ns=AGG_TRADES[-1]["T"] * MS + MS,
        page_limit=7,  # small pages, so boundaries fall inside shared milliseconds
    )
    out = Out()

    final = await _backfill(exchange, job, FileCursorStore(tmp_path / "c.json"), out).run()

    ticks = out.ticks()
    assert [t.trade_id for t in ticks] == [str(t["a"]) for t in AGG_TRADES]
    assert (ticks[0].price, ticks[0].size) == (Decimal("0.00141342"), Decimal("23"))
    assert ticks[0].ts_event == 1_570_752_011_620 * MS
    assert final.state is CollectorState.COMPLETED
    assert final.fetched == len(AGG_TRADES)


async def test_backfill_when_venue_answers_503_twice_retries_and_completes(
    exchange: Any, venue: Any, tmp_path: Path
) -> None:
    venue.fail_next = 2
    out = Out()

    final = await _backfill(
        exchange, _ohlcv_job(100), FileCursorStore(tmp_path / "c.json"), out
    ).run()

    assert final.state is CollectorState.COMPLETED
    assert len(out.bars()) == len(CANDLES)
    assert venue.requests[0]["startTime"] == venue.requests[2]["startTime"]  # same page again


async def test_backfill_when_symbol_unknown_fails_with_the_reason(
    exchange: Any, tmp_path: Path
) -> None:
    job = BackfillJob(
        job_id="bf-bad",
        kind="ohlcv",
        symbol="NOPE/USDT",
        instrument_id="NOPE-USDT.BINANCE",
        venue="BINANCE",
        timeframe="1m",
        start_ns=0,
        end_ns=MINUTE_NS,
    )
    out = Out()

    final = await _backfill(exchange, job, FileCursorStore(tmp_path / "c.json"), out).run()

    assert final.state is CollectorState.FAILED
    assert "NOPE/USDT" in final.message
