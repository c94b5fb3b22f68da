"""The built-in strategies over hand-built bars; expected entry bars are worked out by hand."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from quantmesh_common.envelope import Event
from quantmesh_common.messages import Bar, OrderIntent, PositionSide, Signal
from quantmesh_common.testing import stubs
from quantmesh_signals.engine import SignalsEngine, StrategySpec

BTC = "BTC-USDT.SIM"
AAA = "AAA-USDT.SIM"
BBB = "BBB-USDT.SIM"
MINUTE = 60 * stubs.SECOND_NS


def _bar(instrument: str, close: str | int | float, i: int) -> Bar:
    price = Decimal(str(close))
    return stubs.bar(
        instrument_id=instrument,
        open=price,
        high=price,
        low=price,
        close=price,
        ts_open=stubs.TS + i * MINUTE,
        ts_close=stubs.TS + (i + 1) * MINUTE,
    )


def _close_ns(i: int) -> int:
    return stubs.TS + (i + 1) * MINUTE


def _engine(
    name: str, params: dict[str, Any], instruments: list[str] | None = None
) -> SignalsEngine:
    spec = StrategySpec(
        id="s1", name=name, account_id="acc-1", instruments=instruments or [BTC], params=params
    )
    engine = SignalsEngine.from_specs([spec])
    engine.start(stubs.TS)
    return engine


def _run(engine: SignalsEngine, closes: list[float | int | str]) -> list[Event]:
    out: list[Event] = []
    for i, close in enumerate(closes):
        out += engine.on_bar(_bar(BTC, close, i))
    return out


def _target(instrument: str, qty: str | int, i: int, tag: str, slot: int = 0) -> OrderIntent:
    coid = f"s1-{_close_ns(i)}-{slot}.1"
    return OrderIntent(
        intent_id=f"{coid}-intent",
        account_id="acc-1",
        strategy_id="s1",
        instrument_id=instrument,
        client_order_id=coid,
        target_position=Decimal(qty),
        tag=tag,
        ts_event=_close_ns(i),
    )


def _intents(events: list[Event]) -> list[OrderIntent]:
    return [e for e in events if isinstance(e, OrderIntent)]


# Closes 10 10 10 9 8 12 14 6 with fast=2, slow=3:
#  bar 3: fast 9.5 < slow 9.667 -> first regime (down), no trade
#  bar 5: fast 10 > slow 9.667 -> up-cross -> target +1
#  bar 7: fast 10 < slow 10.667 -> down-cross -> target 0 (or -1 when shorting)
SMA_CLOSES: list[float | int | str] = [10, 10, 10, 9, 8, 12, 14, 6]


def test_sma_cross_when_fast_crosses_up_then_down_goes_long_then_flat() -> None:
    engine = _engine("sma_cross", {"fast": 2, "slow": 3, "quantity": "1"})

    out = _run(engine, SMA_CLOSES)

    assert _intents(out) == [_target(BTC, 1, 5, "sma_cross"), _target(BTC, 0, 7, "sma_cross")]


def test_sma_cross_when_shorting_allowed_goes_short_on_down_cross() -> None:
    engine = _engine("sma_cross", {"fast": 2, "slow": 3, "quantity": "0.5", "allow_short": True})

    out = _run(engine, SMA_CLOSES)

    assert _intents(out) == [
        _target(BTC, "0.5", 5, "sma_cross"),
        _target(BTC, "-0.5", 7, "sma_cross"),
    ]


def test_sma_cross_when_target_changes_publishes_a_signal_before_each_intent() -> None:
    engine = _engine("sma_cross", {"fast": 2, "slow": 3})

    out = _run(engine, SMA_CLOSES)

    signals = [e for e in out if isinstance(e, Signal)]
    assert [type(e) for e in out] == [Signal, OrderIntent, Signal, OrderIntent]
    assert [(s.direction, s.target_position, s.price) for s in signals] == [
        (PositionSide.LONG, Decimal(1), Decimal(12)),
        (PositionSide.FLAT, Decimal(0), Decimal(6)),
    ]


def test_sma_cross_when_first_warm_bar_is_above_does_not_buy_it() -> None:
    engine = _engine("sma_cross", {"fast": 2, "slow": 3})

    # bar 2: fast 12.5 > slow 11.67 only sets the regime; bar 3: fast 17.5 < slow 18.33
    out = _run(engine, [10, 20, 5, 30])

    assert _intents(out) == [_target(BTC, 0, 3, "sma_cross")]


# Closes 10 9 8 9 10 11, RSI(2):
#  bar 2: avg gain 0, avg loss 1 -> RSI 0 < 30 -> target +1
#  bar 3: gain 0.5, loss 0.5 -> RSI 50 -> hold
#  bar 4: gain 0.75, loss 0.25 -> RSI 75 > 70 -> target 0
#  bar 5: gain 0.875, loss 0.125 -> RSI 87.5 -> already flat, nothing
def test_rsi_reversion_when_oversold_then_overbought_goes_long_then_flat() -> None:
    engine = _engine("rsi_reversion", {"period": 2, "oversold": 30, "overbought": 70})

    out = _run(engine, [10, 9, 8, 9, 10, 11])

    assert _intents(out) == [
        _target(BTC, 1, 2, "rsi_reversion"),
        _target(BTC, 0, 4, "rsi_reversion"),
    ]


# Closes 10 11 12 | 13 12.5 11.9, Bollinger(3, k=1) of the three bars before each:
#  bar 3: [10 11 12] mid 11, std 0.8165, upper 11.82 -> 13 above -> target +1
#  bar 4: [11 12 13] mid 12 -> 12.5 above the mid, inside the bands -> hold
#  bar 5: [12 13 12.5] mid 12.5, lower 12.09 -> 11.9 below the mid -> flat (or short)
def test_bollinger_breakout_when_close_breaks_upper_then_falls_below_mid_goes_long_then_flat() -> (
    None
):
    engine = _engine("bollinger_breakout", {"period": 3, "k": 1})

    out = _run(engine, [10, 11, 12, 13, "12.5", "11.9"])

    assert _intents(out) == [
        _target(BTC, 1, 3, "bollinger_breakout"),
        _target(BTC, 0, 5, "bollinger_breakout"),
    ]


def test_bollinger_breakout_when_shorting_allowed_goes_short_below_lower_band() -> None:
    engine = _engine("bollinger_breakout", {"period": 3, "k": 1, "allow_short": True})

    out = _run(engine, [10, 11, 12, 13, "12.5", "11.9"])

    assert _intents(out) == [
        _target(BTC, 1, 3, "bollinger_breakout"),
        _target(BTC, -1, 5, "bollinger_breakout"),
    ]


# B closes 100 throughout; A closes 101 99 101 99 105 101 -> spreads 1 -1 1 -1 5 1, lookback 4:
#  bar 3: [1 -1 1 -1] mean 0, std 1.155, z -0.87 -> between exit and entry: nothing
#  bar 4: [-1 1 -1 5] mean 1, std 2.828, z 1.414 > 1.2 -> short the spread: A -1, B +1
#  bar 5: [1 -1 5 1] mean 1.5, std 2.517, z -0.199, |z| < 0.5 -> both legs flat
def test_pairs_spread_when_z_crosses_entry_then_exit_opens_and_closes_both_legs() -> None:
    engine = _engine(
        "pairs_spread", {"lookback": 4, "entry_z": 1.2, "exit_z": 0.5}, instruments=[AAA, BBB]
    )
    out: list[Event] = []

    for i, a_close in enumerate([101, 99, 101, 99, 105, 101]):
        out += engine.on_bar(_bar(AAA, a_close, i))
        out += engine.on_bar(_bar(BBB, 100, i))

    assert _intents(out) == [
        _target(AAA, -1, 4, "pairs_spread", slot=0),
        _target(BBB, 1, 4, "pairs_spread", slot=1),
        _target(AAA, 0, 5, "pairs_spread", slot=0),
        _target(BBB, 0, 5, "pairs_spread", slot=1),
    ]


def test_pairs_spread_when_one_leg_has_no_bar_at_that_time_waits() -> None:
    engine = _engine(
        "pairs_spread", {"lookback": 2, "entry_z": 0.5, "exit_z": 0.1}, instruments=[AAA, BBB]
    )
    out: list[Event] = []

    for i, a_close in enumerate([101, 99, 110, 90]):
        out += engine.on_bar(_bar(AAA, a_close, i))  # BBB never prints

    assert out == []
