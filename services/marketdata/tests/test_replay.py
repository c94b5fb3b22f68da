"""Replay pacing and replay from CSV files on the in-memory bus."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from quantmesh_common.bus.memory import InMemoryBus
from quantmesh_common.envelope import Envelope
from quantmesh_common.messages import Bar
from quantmesh_common.testing import stubs
from quantmesh_common.topics import Topic, registry
from quantmesh_marketdata.replay import Pacer, csv_bars, event_time, file_events, replay

SEC = 1_000_000_000


class SteppingClock:
    """A clock whose sleep moves time at once, recording each sleep (unit tests only)."""

    def __init__(self, start_ns: int = 0) -> None:
        self.now = start_ns
        self.sleeps: list[float] = []

    def now_ns(self) -> int:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += round(seconds * SEC)


async def test_pacer_when_speed_is_two_waits_half_the_event_gaps() -> None:
    clock = SteppingClock(start_ns=5 * SEC)
    pacer = Pacer(clock, 2.0)
    released: list[int] = []

    for ts in (100 * SEC, 101 * SEC, 103 * SEC):
        await pacer.wait(ts)
        released.append(clock.now_ns())

    assert released == [5 * SEC, 5 * SEC + SEC // 2, 5 * SEC + 3 * SEC // 2]


async def test_pacer_when_the_consumer_was_slow_does_not_wait_for_past_events() -> None:
    clock = SteppingClock()
    pacer = Pacer(clock, 1.0)
    await pacer.wait(0)
    clock.now = 10 * SEC  # publishing took 10 s

    await pacer.wait(3 * SEC)

    assert clock.sleeps == []


async def test_pacer_when_speed_is_none_never_sleeps() -> None:
    clock = SteppingClock()
    pacer = Pacer(clock, None)

    for ts in (0, 60 * SEC, 3600 * SEC):
        await pacer.wait(ts)

    assert clock.sleeps == []


def test_pacer_when_speed_is_negative_refuses() -> None:
    with pytest.raises(ValueError, match="speed"):
        Pacer(SteppingClock(), -1.0)


def test_event_time_when_bar_is_its_close_and_tick_its_event_time() -> None:
    assert event_time(stubs.bar()) == stubs.TS + 60 * SEC
    assert event_time(stubs.tick()) == stubs.TS


async def test_replay_when_csv_at_ten_times_keeps_event_times_and_order(tmp_path: Path) -> None:
    path = tmp_path / "bars.csv"
    path.write_text(
        "timestamp,open,high,low,close,volume\n"
        "1700000040,100,101,99,100.5,3\n"
        "1700000100,100.5,102,100,101.5,4\n"
        "1700000160,101.5,101.5,98,99,5\n"
    )
    bus = InMemoryBus("test", registry())
    got: list[Envelope[Any]] = []
    await bus.subscribe("test.bars", [Topic.MD_BARS], got.append).start()
    clock = SteppingClock(start_ns=42)

    count = await replay(csv_bars(path, "BTC-USDT.SIM", "1m"), bus, clock, speed=10.0)
    await bus.run_until_idle()

    assert count == 3
    closes = [1_700_000_100 * SEC, 1_700_000_160 * SEC, 1_700_000_220 * SEC]
    assert [e.ts_event for e in got] == closes
    assert [str(e.payload.close) for e in got] == ["100.5", "101.5", "99"]
    assert all(isinstance(e.payload, Bar) for e in got)
    assert clock.sleeps == [6.0, 6.0]  # one minute apart, ten times faster


def test_file_events_when_trades_give_ticks_with_each_bar_after_the_trade_that_closed_it(
    tmp_path: Path,
) -> None:
    path = tmp_path / "trades.csv"
    path.write_text(
        "timestamp,id,side,price,amount\n"
        "1700000040000,1,buy,100,1\n"
        "1700000045000,2,sell,102,2\n"
        "1700000100000,3,buy,101,3\n"
    )

    events = list(file_events(path, "BTC-USDT.SIM", "1m"))

    kinds = [type(e).__name__ for e in events]
    assert kinds == ["Tick", "Tick", "Tick", "Bar", "Bar"]
    first, last = events[3], events[4]
    assert isinstance(first, Bar)
    assert isinstance(last, Bar)
    d = Decimal
    # Trades 1 and 2 fall in the minute 1700000040 s; trade 3 opens the next one.
    assert (first.open, first.high, first.low, first.close) == (d(100), d(102), d(100), d(102))
    assert (first.volume, first.trades, first.ts_open) == (d(3), 2, 1_700_000_040 * SEC)
    # The end of the file closes the last open bar.
    assert (last.close, last.volume, last.ts_close) == (d(101), d(3), 1_700_000_160 * SEC)


def test_file_events_when_file_is_ohlcv_gives_its_bars(tmp_path: Path) -> None:
    path = tmp_path / "bars.csv"
    path.write_text("timestamp,open,high,low,close,volume\n1700000040,100,101,99,100.5,3\n")

    events = list(file_events(path, "BTC-USDT.SIM", "1m"))

    assert len(events) == 1
    assert isinstance(events[0], Bar)
    assert events[0].close == Decimal("100.5")
