"""Rolling 24 h statistics: hand-computed windows, expiry, redelivery, and a brute-force check."""

from __future__ import annotations

import random
from decimal import ROUND_HALF_EVEN, Decimal

from quantmesh_common.messages import Tick
from quantmesh_common.testing import stubs
from quantmesh_marketdata.stats import MINUTE_NS, RollingStats24h

#: A minute boundary (2023-11-14T22:14:00Z).
T0 = 28_333_334 * MINUTE_NS
SEC = 1_000_000_000
MIN = MINUTE_NS


def trade(ts: int, price: str, size: str, trade_id: str | None = None) -> Tick:
    return stubs.tick(
        ts_event=ts,
        ts_init=ts,
        price=Decimal(price),
        size=Decimal(size),
        trade_id=trade_id or f"T{ts}",
    )


def test_snapshot_when_no_trade_yet_is_none() -> None:
    assert RollingStats24h("BTC-USDT.SIM").snapshot() is None


def test_snapshot_when_trades_within_a_day_matches_hand_computation() -> None:
    stats = RollingStats24h("BTC-USDT.SIM")
    for tick in (
        trade(T0, "100", "1"),
        trade(T0 + 30 * SEC, "105", "2"),
        trade(T0 + 61 * SEC, "95", "0.5"),
        trade(T0 + 120 * MIN, "102", "1.5"),
    ):
        stats.update(tick)

    snap = stats.snapshot()

    assert snap is not None
    assert snap.price == Decimal("102")
    assert snap.ts == T0 + 120 * MIN
    assert snap.open_24h == Decimal("100")
    assert snap.change_24h == Decimal("2")
    assert snap.change_pct_24h == Decimal("2.0000")
    assert snap.high_24h == Decimal("105")
    assert snap.low_24h == Decimal("95")
    assert snap.volume_24h == Decimal("5.0")


def test_snapshot_when_minutes_leave_the_window_drops_them() -> None:
    stats = RollingStats24h("BTC-USDT.SIM")
    stats.update(trade(T0, "100", "1"))  # minute 0
    stats.update(trade(T0 + 10 * MIN, "120", "2"))  # minute 10
    stats.update(trade(T0 + 1445 * MIN, "110", "1"))  # window: minutes 6..1445

    first = stats.snapshot()
    stats.update(trade(T0 + 1451 * MIN, "90", "1"))  # window: minutes 12..1451
    second = stats.snapshot()

    assert first is not None
    assert (first.open_24h, first.high_24h, first.low_24h) == (
        Decimal(120),
        Decimal(120),
        Decimal(110),
    )
    assert first.volume_24h == 3
    assert first.change_24h == -10
    assert first.change_pct_24h == Decimal("-8.3333")  # -10 / 120 * 100
    assert second is not None
    assert (second.open_24h, second.high_24h, second.low_24h) == (
        Decimal(110),
        Decimal(110),
        Decimal(90),
    )
    assert second.volume_24h == 2
    assert second.change_24h == -20
    assert second.change_pct_24h == Decimal("-18.1818")  # -20 / 110 * 100


def test_update_when_a_trade_is_redelivered_or_late_ignores_it() -> None:
    stats = RollingStats24h("BTC-USDT.SIM")
    first = trade(T0, "100", "1", "A")
    second = trade(T0 + SEC, "101", "1", "B")
    stats.update(first)
    stats.update(second)

    results = [
        stats.update(second),
        stats.update(first),
        stats.update(stubs.quote_tick(ts_event=T0 + 2 * SEC)),
    ]
    snap = stats.snapshot()

    assert results == [False, False, False]
    assert snap is not None
    assert snap.volume_24h == 2
    assert snap.price == Decimal("101")


def test_update_when_two_trades_share_a_timestamp_counts_both() -> None:
    stats = RollingStats24h("BTC-USDT.SIM")

    stats.update(trade(T0, "100", "1", "A"))
    stats.update(trade(T0, "99", "2", "B"))
    snap = stats.snapshot()

    assert snap is not None
    assert snap.volume_24h == 3
    assert snap.low_24h == 99


def test_snapshot_when_random_trades_over_three_days_equals_brute_force() -> None:
    rng = random.Random(7)
    stats = RollingStats24h("BTC-USDT.SIM")
    seen: list[Tick] = []
    ts = T0
    for i in range(3000):
        ts += rng.choice([SEC, 30 * SEC, 5 * MIN, 90 * MIN])
        tick = trade(
            ts,
            f"{rng.randint(5000, 15000) / 100:.2f}",
            f"{rng.randint(1, 900) / 1000:.3f}",
            f"T{i}",
        )
        stats.update(tick)
        seen.append(tick)
        if i % 37:
            continue
        first_minute = ts // MIN - 1439
        window = [t for t in seen if t.ts_event // MIN >= first_minute]
        snap = stats.snapshot()
        assert snap is not None
        assert snap.high_24h == max(t.price for t in window)
        assert snap.low_24h == min(t.price for t in window)
        assert snap.volume_24h == sum((t.size for t in window), Decimal(0))
        assert snap.open_24h == window[0].price
        expected_pct = ((tick.price - window[0].price) / window[0].price * 100).quantize(
            Decimal("0.0001"), rounding=ROUND_HALF_EVEN
        )
        assert snap.change_pct_24h == expected_pct
