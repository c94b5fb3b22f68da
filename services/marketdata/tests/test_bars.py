"""Time bars aggregated from trades: hand-built cases and a real Kraken trade capture."""

from __future__ import annotations

import csv
import os
from collections import defaultdict
from decimal import Decimal
from pathlib import Path

import pytest

from quantmesh_common.messages import Tick, TickKind
from quantmesh_common.testing import stubs
from quantmesh_marketdata.bars import BarAggregator

MINUTE = 60 * 1_000_000_000
KRAKEN_DAY = "market/kraken_BCH-EUR_trades_2023-01-01.csv"


def recorded(name: str) -> Path:
    """A file of the team's recorded venue data, which lives beside the repository, not in it
    (its licences differ from ours); QM_SHARED_DATA points elsewhere."""
    repo = Path(__file__).resolve().parents[3]
    candidates = [Path(os.environ["QM_SHARED_DATA"])] if os.environ.get("QM_SHARED_DATA") else []
    candidates += [repo.parent / "shared/data", Path("/work/shared/data")]
    for root in candidates:
        if (root / name).is_file():
            return root / name
    pytest.skip(f"recorded data {name} not found (looked in {[str(c) for c in candidates]})")


def _trade(ts: int, price: str, size: str = "1") -> Tick:
    return stubs.tick(ts_event=ts, ts_init=ts, price=Decimal(price), size=Decimal(size))


def test_update_when_a_trade_opens_the_next_interval_closes_the_bar_with_ohlcv() -> None:
    agg = BarAggregator(stubs.INSTRUMENT_ID, "1m")
    t0 = 1_700_000_040 * 1_000_000_000  # 2023-11-14T22:14:00Z, a minute boundary

    closed = [
        bar
        for tick in (
            _trade(t0 + 1, "10", "1"),
            _trade(t0 + 20 * 1_000_000_000, "12", "2"),
            _trade(t0 + 30 * 1_000_000_000, "9", "0.5"),
            _trade(t0 + 59 * 1_000_000_000, "11", "1.5"),
            _trade(t0 + MINUTE + 5, "13", "1"),
        )
        for bar in agg.update(tick)
    ]

    [bar] = closed
    assert (bar.open, bar.high, bar.low, bar.close) == (
        Decimal("10"),
        Decimal("12"),
        Decimal("9"),
        Decimal("11"),
    )
    assert bar.volume == Decimal("5.0")
    assert bar.trades == 4
    assert (bar.ts_open, bar.ts_close) == (t0, t0 + MINUTE)


def test_intervals_without_trades_produce_no_bar_and_flush_closes_the_last() -> None:
    agg = BarAggregator(stubs.INSTRUMENT_ID, "1m")
    t0 = 1_700_000_040 * 1_000_000_000

    first = agg.update(_trade(t0, "10"))
    gap = agg.update(_trade(t0 + 3 * MINUTE, "20"))
    early = agg.flush_until(t0 + 3 * MINUTE + 1)
    late = agg.flush_until(t0 + 4 * MINUTE)

    assert first == []
    assert [b.ts_open for b in gap] == [t0]
    assert early == []
    assert [(b.ts_open, b.close) for b in late] == [(t0 + 3 * MINUTE, Decimal("20"))]


def test_update_when_trade_is_older_than_the_open_bar_is_refused() -> None:
    agg = BarAggregator(stubs.INSTRUMENT_ID, "1m")
    t0 = 1_700_000_040 * 1_000_000_000
    agg.update(_trade(t0 + MINUTE, "10"))

    with pytest.raises(ValueError, match="out-of-order"):
        agg.update(_trade(t0, "10"))


def test_quote_ticks_are_ignored() -> None:
    agg = BarAggregator(stubs.INSTRUMENT_ID, "1m")

    assert agg.update(stubs.quote_tick()) == []
    assert stubs.quote_tick().kind is TickKind.QUOTE


def test_hourly_bars_of_a_real_kraken_day_equal_a_grouped_reference() -> None:
    rows = [
        (int(r[0]), Decimal(r[1]), Decimal(r[2])) for r in csv.reader(recorded(KRAKEN_DAY).open())
    ]
    instrument = "BCH-EUR.KRAKEN"
    agg = BarAggregator(instrument, "1h")
    bars = []
    for i, (secs, price, size) in enumerate(rows):
        ts = secs * 1_000_000_000
        tick = Tick(
            instrument_id=instrument,
            venue="KRAKEN",
            price=price,
            size=size,
            trade_id=str(i),
            ts_event=ts,
            ts_init=ts,
        )
        bars += agg.update(tick)
    bars += agg.flush_until(2**62)

    # Reference: group by hour with plain dictionaries.
    groups: dict[int, list[tuple[Decimal, Decimal]]] = defaultdict(list)
    for secs, price, size in rows:
        groups[secs // 3600].append((price, size))
    expected = [
        (
            hour * 3600 * 1_000_000_000,
            trades[0][0],
            max(p for p, _ in trades),
            min(p for p, _ in trades),
            trades[-1][0],
            sum((s for _, s in trades), Decimal(0)),
            len(trades),
        )
        for hour, trades in sorted(groups.items())
    ]
    got = [(b.ts_open, b.open, b.high, b.low, b.close, b.volume, b.trades) for b in bars]
    assert len(rows) == 148
    assert got == expected
