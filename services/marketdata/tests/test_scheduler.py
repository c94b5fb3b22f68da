"""The collection scheduler: params, rounds on a simulated clock, and `control` driving it."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from quantmesh_common.clock import SimulatedClock
from quantmesh_common.envelope import Envelope, Event
from quantmesh_common.messages import (
    Bar,
    CollectorState,
    CollectorStatus,
    ControlAction,
    Instrument,
)
from quantmesh_common.runtime import ServiceRunner
from quantmesh_common.testing import stubs
from quantmesh_common.topics import Topic
from quantmesh_marketdata.backfill import FileCursorStore
from quantmesh_marketdata.config import MarketDataSettings
from quantmesh_marketdata.health import Backoff
from quantmesh_marketdata.scheduler import CollectionScheduler, CollectRequest
from quantmesh_marketdata.service import MarketDataService
from quantmesh_marketdata.venue import VenueConfig, make_rest_exchange

FIXTURES = Path(__file__).parent / "fixtures"
CANDLES: list[list[float]] = json.loads((FIXTURES / "unittest-btc_1m_ohlcv_head.json").read_text())
MS = 1_000_000
MINUTE = 60_000 * MS
WAIT_S = 30.0


def test_request_when_params_complete_parses_times_in_any_unit() -> None:
    request = CollectRequest.from_params(
        {
            "symbols": "BTC/USDT, ETH/USDT",
            "timeframes": "1m,1h,trades",
            "interval": "30",
            "since": "2024-01-30T16:00:00Z",
            "until": "1706634000000",  # ms
        }
    )

    assert request.symbols == ("BTC/USDT", "ETH/USDT")
    assert request.timeframes == ("1m", "1h", "trades")
    assert request.interval_s == 30.0
    assert request.since_ns == 1_706_630_400 * 10**9
    assert request.until_ns == 1_706_634_000 * 10**9


@pytest.mark.parametrize(
    ("params", "reason"),
    [
        ({"timeframes": "1m"}, "params.symbols"),
        ({"symbols": "BTC/USDT", "timeframes": "1M"}, "params.timeframes"),
        ({"symbols": "BTC/USDT", "interval": "0"}, "interval"),
        ({"symbols": "BTC/USDT", "since": "yesterday"}, "params.since"),
        ({"symbols": "BTC/USDT", "since": "2024-01-02T00:00:00"}, "time zone"),
        ({"symbols": "BTC/USDT", "since": "1706634000", "until": "1706630400"}, "until"),
    ],
)
def test_request_when_params_unusable_names_the_reason(params: dict[str, str], reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        CollectRequest.from_params(params)


class Out:
    def __init__(self) -> None:
        self.events: list[tuple[str, Event]] = []
        self.changed = asyncio.Event()

    async def publish(self, topic: str, event: Event, ts_event: int) -> None:
        self.events.append((topic, event))
        self.changed.set()

    async def wait_for_status(self, message: str) -> CollectorStatus:
        async def find() -> CollectorStatus:
            while True:
                for status in self.statuses("collector"):
                    if status.message.startswith(message):
                        return status
                self.changed.clear()
                await self.changed.wait()

        return await asyncio.wait_for(find(), WAIT_S)

    def statuses(self, job_id: str) -> list[CollectorStatus]:
        return [e for _, e in self.events if isinstance(e, CollectorStatus) and e.job_id == job_id]

    def bars(self) -> list[Bar]:
        return [e for t, e in self.events if t == Topic.MD_BARS and isinstance(e, Bar)]


def _candle_times(start_ns: int, end_ns: int) -> list[int]:
    return [int(r[0]) * MS for r in CANDLES if start_ns <= int(r[0]) * MS < end_ns]


async def test_scheduler_when_rounds_repeat_collects_only_closed_new_bars(
    venue: Any, tmp_path: Path
) -> None:
    config = VenueConfig(
        "binance",
        options={"fetchMarkets": {"types": ["spot"]}},
        url_overrides={"api.public": f"http://127.0.0.1:{venue.port}/api/v3"},
    )
    exchange = make_rest_exchange(config)
    await exchange.load_markets()

    async def factory(name: str | None) -> tuple[Any, str]:
        return exchange, "BINANCE"

    # 30 s into the minute after candle 100: bars up to that minute's start are closed
    now = int(CANDLES[100][0]) * MS + MINUTE + 30 * 10**9
    clock = SimulatedClock(now)
    out = Out()
    scheduler = CollectionScheduler(
        factory, FileCursorStore(tmp_path / "c.json"), out.publish, clock, lambda: Backoff(0.01)
    )
    request = CollectRequest.from_params(
        {"symbols": "ETH/BTC", "timeframes": "1m", "interval": "1800", "lookback": "3600"}
    )

    await scheduler.start(request)
    first = await out.wait_for_status("round 1 done")
    round_one = [b.ts_open for b in out.bars()]
    clock.advance(1800)
    second = await out.wait_for_status("round 2 done")
    await scheduler.stop()

    end_one = now // MINUTE * MINUTE
    end_two = (now + 1800 * 10**9) // MINUTE * MINUTE
    assert round_one == _candle_times(end_one - 3600 * 10**9, end_one)
    assert [b.ts_open for b in out.bars()] == _candle_times(end_one - 3600 * 10**9, end_two)
    assert (first.details["rounds"], second.details["rounds"]) == ("1", "2")
    assert out.statuses("collector")[-1].state is CollectorState.STOPPED
    instruments = [e for t, e in out.events if t == Topic.REF_INSTRUMENTS]
    assert [i.instrument_id for i in instruments if isinstance(i, Instrument)] == [
        "ETH-BTC.BINANCE"
    ]


async def test_scheduler_when_symbol_unknown_fails_naming_it(venue: Any, tmp_path: Path) -> None:
    config = VenueConfig(
        "binance",
        options={"fetchMarkets": {"types": ["spot"]}},
        url_overrides={"api.public": f"http://127.0.0.1:{venue.port}/api/v3"},
    )

    async def factory(name: str | None) -> tuple[Any, str]:
        exchange = make_rest_exchange(config)
        await exchange.load_markets()
        return exchange, "BINANCE"

    out = Out()
    scheduler = CollectionScheduler(
        factory, FileCursorStore(tmp_path / "c.json"), out.publish, SimulatedClock(0)
    )

    await scheduler.start(CollectRequest.from_params({"symbols": "DOGE/EUR"}))
    failed = await out.wait_for_status("unknown symbols")

    assert failed.state is CollectorState.FAILED
    assert "DOGE/EUR" in failed.message


async def test_service_when_control_starts_a_backfill_publishes_bars_and_progress(
    venue: Any, tmp_path: Path
) -> None:
    settings = MarketDataSettings(
        bus="memory",
        http_host="127.0.0.1",
        http_port=0,
        venue="binance",
        venue_options=json.dumps({"fetchMarkets": {"types": ["spot"]}}),
        venue_urls=json.dumps({"api.public": f"http://127.0.0.1:{venue.port}/api/v3"}),
        markets_cache_dir=str(tmp_path / "markets"),
        collector_state_dir=str(tmp_path / "collector"),
    )
    runner = ServiceRunner(MarketDataService(settings), settings)
    seen: dict[str, list[Any]] = {Topic.MD_BARS: [], Topic.MD_COLLECTOR: []}
    done = asyncio.Event()

    def collect(envelope: Envelope[Any]) -> None:
        payload = envelope.payload
        seen[Topic.MD_BARS if isinstance(payload, Bar) else Topic.MD_COLLECTOR].append(payload)
        if (
            isinstance(payload, CollectorStatus)
            and payload.job_id == "collector"
            and payload.state in (CollectorState.COMPLETED, CollectorState.FAILED)
        ):
            done.set()

    start_ms, end_ms = int(CANDLES[0][0]), int(CANDLES[-1][0]) + 60_000
    await runner.start()
    try:
        await runner.bus.subscribe("test.md", [Topic.MD_BARS, Topic.MD_COLLECTOR], collect).start()
        await runner.bus.publish(
            Topic.CONTROL,
            stubs.control_command(
                action=ControlAction.COLLECTOR_START,
                target="marketdata",
                params={
                    "symbols": "ETH/BTC",
                    "timeframes": "1m",
                    "since": str(start_ms),
                    "until": str(end_ms),
                    "page_limit": "100",
                },
            ),
        )
        await asyncio.wait_for(done.wait(), WAIT_S)
    finally:
        await runner.stop()

    assert [b.ts_open for b in seen[Topic.MD_BARS]] == [int(r[0]) * MS for r in CANDLES]
    final = [s for s in seen[Topic.MD_COLLECTOR] if s.job_id == "collector"][-1]
    assert (final.state, final.progress, final.fetched) == (CollectorState.COMPLETED, 1.0, 240)
    job = [s for s in seen[Topic.MD_COLLECTOR] if s.job_id == "collect:BINANCE:ETH/BTC:1m"]
    assert [s.progress for s in job] == sorted(s.progress for s in job)
    assert (tmp_path / "markets" / "binance.markets.json").exists()


async def test_service_when_control_params_are_bad_answers_failed_with_reason(
    tmp_path: Path,
) -> None:
    settings = MarketDataSettings(
        bus="memory",
        http_host="127.0.0.1",
        http_port=0,
        collector_state_dir=str(tmp_path / "collector"),
    )
    runner = ServiceRunner(MarketDataService(settings), settings)
    statuses: list[CollectorStatus] = []
    got = asyncio.Event()

    def collect(envelope: Envelope[Any]) -> None:
        statuses.append(envelope.payload)
        got.set()

    await runner.start()
    try:
        await runner.bus.subscribe("test.md", [Topic.MD_COLLECTOR], collect).start()
        await runner.bus.publish(
            Topic.CONTROL,
            stubs.control_command(
                action=ControlAction.COLLECTOR_START,
                params={"symbols": "BTC/USDT", "timeframes": "7x"},
            ),
        )
        await asyncio.wait_for(got.wait(), WAIT_S)
    finally:
        await runner.stop()

    assert statuses[0].state is CollectorState.FAILED
    assert "params.timeframes" in statuses[0].message
