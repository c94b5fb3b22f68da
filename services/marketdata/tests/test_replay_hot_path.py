"""The replay's fast path (file_records, add_trade, the service loop) against plain references."""

from __future__ import annotations

import csv
import logging
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from quantmesh_common.clock import WallClock
from quantmesh_common.envelope import Event
from quantmesh_common.messages import AggressorSide, Bar, Tick
from quantmesh_common.testing import stubs
from quantmesh_common.topics import Topic, TopicRegistry, TopicSpec, registry
from quantmesh_marketdata.bars import BarAggregator
from quantmesh_marketdata.config import MarketDataSettings
from quantmesh_marketdata.files import DataFileError, parse_time_ns
from quantmesh_marketdata.replay import file_events, file_records
from quantmesh_marketdata.service import MarketDataService

SEC = 1_000_000_000
INSTRUMENT = "ETH-USDT.SIM"

# Whitespace around cells, sides in several spellings, ISO and epoch times in s and ms,
# trades sharing a timestamp, a missing trade id, gaps of several bars.
MIXED_TRADES = (
    "timestamp,trade_id,side,price,amount\n"
    "1700000040000,1,buy,100.5,1\n"
    "1700000040000, 2 ,SELL, 99.25 , 0.5 \n"
    "1700000041,3,Buy,101,2\n"
    "2023-11-14T22:14:05Z,,s,100,1E+1\n"
    "1700000045500, 5 , unknown ,98.125,3\n"
    "\n"
    "1700000170000,6,BUYER,102,0.001\n"
    "1700000171000,7,sell,102,4\n"
    "1700000300000,8,b,97,1\n"
)


def _reference(path: Path, interval_ns: int) -> list[tuple[str, Event, int]]:
    """What the replay should give: every row validated by the model (cells stripped, sides
    lower-cased), bars by grouping the trades by aligned interval, each bar right after the
    trade that opened the next one, the last at the end."""
    sides = {"buy": AggressorSide.BUYER, "b": AggressorSide.BUYER, "buyer": AggressorSide.BUYER}
    sides |= {"sell": AggressorSide.SELLER, "s": AggressorSide.SELLER}
    out: list[tuple[str, Event, int]] = []
    group: list[Tick] = []

    def bar_of(trades: list[Tick]) -> Bar:
        start = trades[0].ts_event - trades[0].ts_event % interval_ns
        prices = [t.price for t in trades]
        return Bar(
            instrument_id=INSTRUMENT,
            interval="1m",
            open=prices[0],
            high=max(prices),
            low=min(prices),
            close=prices[-1],
            volume=sum((t.size for t in trades), Decimal(0)),
            trades=len(trades),
            ts_open=start,
            ts_close=start + interval_ns,
        )

    with path.open(newline="") as handle:
        rows = list(csv.reader(handle))[1:]
    for row in rows:
        if not row:
            continue
        ts = parse_time_ns(row[0])
        tick = Tick(
            instrument_id=INSTRUMENT,
            venue="SIM",
            price=Decimal(row[3].strip()),
            size=Decimal(row[4].strip()),
            aggressor_side=sides.get(row[2].strip().lower(), AggressorSide.NO_AGGRESSOR),
            trade_id=row[1].strip() or None,
            ts_event=ts,
            ts_init=ts,
        )
        out.append((Topic.MD_TICKS, tick, ts))
        if group and ts // interval_ns != group[0].ts_event // interval_ns:
            bar = bar_of(group)
            out.append((Topic.MD_BARS, bar, bar.ts_close))
            group = []
        group.append(tick)
    bar = bar_of(group)
    out.append((Topic.MD_BARS, bar, bar.ts_close))
    return out


def _comparable(records: list[tuple[str, Event, int]]) -> list[tuple[Any, ...]]:
    return [
        (topic, type(event).__name__, event.model_dump_json(), event.model_fields_set, ts)
        for topic, event, ts in records
    ]


def test_file_records_when_trades_are_mixed_equal_the_validated_reference(tmp_path: Path) -> None:
    path = tmp_path / "trades.csv"
    path.write_text(MIXED_TRADES)

    records = list(file_records(path, INSTRUMENT, "1m"))

    assert _comparable(records) == _comparable(_reference(path, 60 * SEC))
    # Hand-checked: 8 trades; minutes 1700000040 (trades 1-5), ...160 (6-7), ...280 (8).
    bars = [event for _, event, _ in records if isinstance(event, Bar)]
    assert (bars[0].open, bars[0].high, bars[0].low, bars[0].close) == (
        Decimal("100.5"),
        Decimal("101"),
        Decimal("98.125"),
        Decimal("98.125"),
    )
    assert (bars[0].volume, bars[0].trades) == (Decimal("16.5"), 5)
    assert [b.ts_close for b in bars] == [
        1_700_000_100 * SEC,
        1_700_000_220 * SEC,
        1_700_000_340 * SEC,
    ]


def test_file_events_when_trades_are_mixed_are_the_events_of_file_records(tmp_path: Path) -> None:
    path = tmp_path / "trades.csv"
    path.write_text(MIXED_TRADES)

    events = list(file_events(path, INSTRUMENT, "1m"))

    expected = [event for _, event, _ in file_records(path, INSTRUMENT, "1m")]
    assert [e.model_dump_json() for e in events] == [e.model_dump_json() for e in expected]
    assert len(events) == 11


@pytest.mark.parametrize(
    ("cell", "side"),
    [
        ("true", AggressorSide.SELLER),
        ("True", AggressorSide.SELLER),
        (" TRUE ", AggressorSide.SELLER),
        ("false", AggressorSide.BUYER),
        ("FALSE", AggressorSide.BUYER),
        ("fAlSe", AggressorSide.BUYER),
        ("maybe", AggressorSide.NO_AGGRESSOR),
    ],
)
def test_file_records_when_buyer_is_maker_is_spelt_any_case_gives_the_aggressor(
    tmp_path: Path, cell: str, side: AggressorSide
) -> None:
    path = tmp_path / "trades.csv"
    path.write_text(f"time_ms,price,qty,buyer_is_maker\n1700000040000,10,1,{cell}\n")

    (topic, tick, _), _bar = list(file_records(path, INSTRUMENT, "1m"))

    assert topic == Topic.MD_TICKS
    assert isinstance(tick, Tick)
    assert tick.aggressor_side is side


@pytest.mark.parametrize(("price", "size"), [("nan", "1"), ("1", "Infinity"), ("1", "sNaN")])
def test_file_records_when_a_row_is_not_finite_names_its_line(
    tmp_path: Path, price: str, size: str
) -> None:
    path = tmp_path / "trades.csv"
    path.write_text(f"time,price,size\n1700000000,10,1\n1700000001,{price},{size}\n")

    with pytest.raises(DataFileError, match=r"trades\.csv:3"):
        list(file_records(path, INSTRUMENT, "1m"))


TRADES = [("10", "1", 0), ("12", "2", 30), ("9", "1", 59), ("11", "5", 61), ("8", "2", 201)]


def test_add_trade_when_fed_what_update_is_fed_closes_the_same_bars() -> None:
    ticks = [
        stubs.tick(instrument_id=INSTRUMENT, price=Decimal(p), size=Decimal(q), ts_event=t * SEC)
        for p, q, t in TRADES
    ]
    by_update, by_trade = BarAggregator(INSTRUMENT, "1m"), BarAggregator(INSTRUMENT, "1m")

    updated = [bar for tick in ticks for bar in by_update.update(tick)]
    traded = [by_trade.add_trade(t.ts_event, t.price, t.size) for t in ticks]

    closed = [bar for bar in traded if bar is not None]
    assert closed == updated
    assert traded[:3] == [None, None, None]
    assert (closed[0].open, closed[0].high, closed[0].low, closed[0].close) == (
        Decimal(10),
        Decimal(12),
        Decimal(9),
        Decimal(9),
    )
    assert (closed[0].volume, closed[0].trades, closed[1].volume) == (Decimal(4), 3, Decimal(5))
    assert by_trade.flush_until(2**62) == by_update.flush_until(2**62)


def test_add_trade_when_older_than_the_open_bar_is_refused_and_the_bar_kept() -> None:
    bars = BarAggregator(INSTRUMENT, "1m")
    bars.add_trade(120 * SEC, Decimal(10), Decimal(1))

    with pytest.raises(ValueError, match="out-of-order"):
        bars.add_trade(59 * SEC, Decimal(11), Decimal(1))

    (bar,) = bars.flush_until(2**62)
    assert (bar.ts_open, bar.close, bar.volume, bar.trades) == (
        120 * SEC,
        Decimal(10),
        Decimal(1),
        1,
    )


class _RecordingBus:
    def __init__(self) -> None:
        self.calls: list[tuple[str, str | None, int | None, str]] = []

    async def publish(
        self, topic: str, payload: Event, *, key: str | None = None, ts_event: int | None = None
    ) -> None:
        self.calls.append((topic, key, ts_event, type(payload).__name__))


def _two_trade_replay(tmp_path: Path, prefix: str) -> tuple[MarketDataService, _RecordingBus, Any]:
    """A replay service of a two-trade file (two 1m bars) and its recording bus and context."""
    path = tmp_path / "trades.csv"
    path.write_text("timestamp,price,amount\n1700000040000,100,1\n1700000100000,99,2\n")
    settings = MarketDataSettings(
        bus="memory",
        http_host="127.0.0.1",
        http_port=0,
        feed="replay",
        replay_file=str(path),
        instruments=INSTRUMENT,
        bar_interval="1m",
        marketdata_topic_prefix=prefix,
    )
    bus = _RecordingBus()
    ctx: Any = type("Ctx", (), {"bus": bus, "clock": WallClock(), "logger": logging.getLogger()})
    return MarketDataService(settings), bus, ctx


@pytest.mark.parametrize("prefix", ["", "run1."])
async def test_replay_loop_publishes_each_event_on_its_topic_with_the_registry_key_and_time(
    tmp_path: Path, prefix: str
) -> None:
    service, bus, ctx = _two_trade_replay(tmp_path, prefix)

    await service._run_replay(ctx)

    # Unprefixed, the bus keys the event by the registry itself; prefixed, the stage does.
    key = INSTRUMENT if prefix else None
    assert bus.calls == [
        (prefix + "md.ticks", key, 1_700_000_040 * SEC, "Tick"),
        (prefix + "md.ticks", key, 1_700_000_100 * SEC, "Tick"),
        (prefix + "md.bars", key, 1_700_000_100 * SEC, "Bar"),
        (prefix + "md.bars", key, 1_700_000_160 * SEC, "Bar"),
    ]
    assert (service.replayed, service.published, service.replay_done) == (4, 4, True)


async def test_replay_loop_when_a_topic_is_keyed_by_another_field_keys_each_event_by_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Arrange: a registry keying bars by their interval (not the file's instrument)
    bars_by_interval = TopicSpec(Topic.MD_BARS, Bar, "interval")
    topics = TopicRegistry([registry()[Topic.MD_TICKS], bars_by_interval])
    monkeypatch.setattr("quantmesh_marketdata.service.registry", lambda: topics)
    service, bus, ctx = _two_trade_replay(tmp_path, "run1.")

    # Act
    await service._run_replay(ctx)

    # Assert
    assert [(topic, key) for topic, key, _, _ in bus.calls] == [
        ("run1.md.ticks", INSTRUMENT),
        ("run1.md.ticks", INSTRUMENT),
        ("run1.md.bars", "1m"),
        ("run1.md.bars", "1m"),
    ]


class _StopFeedError(Exception):
    """Ends the synthetic feed's endless loop once the test has the events it needs."""


class _SteppingClock:
    """Time moves only when the feed sleeps or publishes (unit tests only)."""

    def __init__(self) -> None:
        self.now = 1_700_000_000 * SEC
        self.sleeps: list[float] = []

    def now_ns(self) -> int:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += round(seconds * SEC)


class _SlowBus:
    """Publish n takes `costs(n)` ns of the clock's time; stops the feed after `limit`."""

    def __init__(self, clock: _SteppingClock, costs: Callable[[int], int], limit: int) -> None:
        self.clock, self.costs, self.limit = clock, costs, limit
        self.times: list[int] = []

    async def publish(self, topic: str, payload: Event, **_: Any) -> None:
        if len(self.times) == self.limit:
            raise _StopFeedError
        self.clock.now += self.costs(len(self.times))
        self.times.append(self.clock.now)


def _synthetic_ctx(costs: Callable[[int], int], limit: int) -> tuple[Any, _SteppingClock, _SlowBus]:
    clock = _SteppingClock()
    bus = _SlowBus(clock, costs, limit)
    ctx: Any = type("Ctx", (), {"bus": bus, "clock": clock, "logger": logging.getLogger()})
    return ctx, clock, bus


def _synthetic_service(rate: float) -> MarketDataService:
    settings = MarketDataSettings(
        bus="memory",
        http_host="127.0.0.1",
        http_port=0,
        feed="synthetic",
        feed_rate=rate,
        instruments="BTC-USDT.SIM,ETH-USDT.SIM",
        bar_interval="1h",
    )
    return MarketDataService(settings)


async def test_synthetic_feed_when_publishing_takes_time_keeps_the_asked_rate() -> None:
    # 10 steps/s (100 ms apart), two ticks a step, each publish taking 30 ms of the clock.
    service = _synthetic_service(10)
    ctx, clock, bus = _synthetic_ctx(lambda n: 30_000_000, 20)

    with pytest.raises(_StopFeedError):
        await service._run_synthetic(ctx)

    step_ends = bus.times[1::2]
    assert [t - step_ends[0] for t in step_ends] == [n * 100_000_000 for n in range(10)]
    assert clock.sleeps[:3] == [0.04, 0.04, 0.04]  # 100 ms period - 2 x 30 ms publishing


async def test_synthetic_feed_after_a_stall_makes_up_one_second_of_lag_at_most() -> None:
    # 10 steps/s; the first publish stalls 5 s, every later one is instant.
    service = _synthetic_service(10)
    ctx, clock, _bus = _synthetic_ctx(lambda n: 5 * SEC if n == 0 else 0, 60)

    with pytest.raises(_StopFeedError):
        await service._run_synthetic(ctx)

    # Behind by 4.9 s after the stalled step: the lag is cut to 1 s, which 10 more steps at
    # full speed (sleep 0) make up; then the steps are 100 ms apart again.
    assert clock.sleeps[:11] == [0] * 11
    assert clock.sleeps[11:29] == [0.1] * 18
