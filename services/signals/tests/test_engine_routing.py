"""What lets instances split the work: per-instrument ids, redelivery guards, joint routing."""

from __future__ import annotations

from decimal import Decimal

from quantmesh_common.envelope import Event
from quantmesh_common.messages import Bar, OrderIntent
from quantmesh_common.testing import stubs
from quantmesh_signals.engine import SignalsEngine, StrategySpec
from quantmesh_signals.strategy import StrategyContext

AAA = "AAA-USDT.SIM"
BBB = "BBB-USDT.SIM"
CCC = "CCC-USDT.SIM"
MINUTE = 60 * stubs.SECOND_NS


def _bar(instrument: str, close: int, i: int) -> Bar:
    price = Decimal(close)
    return stubs.bar(
        instrument_id=instrument,
        open=price,
        high=price,
        low=price,
        close=price,
        ts_open=stubs.TS + i * MINUTE,
        ts_close=stubs.TS + (i + 1) * MINUTE,
    )


def _intents(events: list[Event]) -> list[tuple[str, str, Decimal | None]]:
    return [
        (e.client_order_id, e.instrument_id, e.target_position)
        for e in events
        if isinstance(e, OrderIntent)
    ]


def _pairs(route_joint: bool = False) -> SignalsEngine:
    spec = StrategySpec(
        id="pair",
        name="pairs_spread",
        account_id="acc-1",
        instruments=[AAA, BBB],
        params={"lookback": 4, "entry_z": 1.2, "exit_z": 0.5},
    )
    engine = SignalsEngine.from_specs([spec], route_joint=route_joint)
    engine.start(stubs.TS)
    return engine


# As in test_builtin_strategies: B at 100, A 101 99 101 99 105 101 -> short the spread at bar 4,
# flat at bar 5.
A_CLOSES = [101, 99, 101, 99, 105, 101]
EXPECTED_PAIRS = [
    (f"pair-{stubs.TS + 5 * MINUTE}-0.1", AAA, Decimal(-1)),
    (f"pair-{stubs.TS + 5 * MINUTE}-1.1", BBB, Decimal(1)),
    (f"pair-{stubs.TS + 6 * MINUTE}-0.1", AAA, Decimal(0)),
    (f"pair-{stubs.TS + 6 * MINUTE}-1.1", BBB, Decimal(0)),
]


def test_ids_when_two_instruments_trade_at_one_time_do_not_depend_on_each_other() -> None:
    ctx = StrategyContext("s", "acc-1", [AAA, BBB])
    ctx.now_ns = 500

    b = ctx.buy(BBB, 1)
    a1 = ctx.buy(AAA, 1)
    a2 = ctx.sell(AAA, 1)

    assert (b.client_order_id, a1.client_order_id, a2.client_order_id) == (
        "s-500-1.1",
        "s-500-0.1",
        "s-500-0.2",
    )


def test_pairs_spread_when_one_leg_arrives_all_first_trades_as_when_interleaved() -> None:
    engine = _pairs()
    out: list[Event] = []

    for i, close in enumerate(A_CLOSES):
        out += engine.on_bar(_bar(AAA, close, i))
    for i in range(len(A_CLOSES)):
        out += engine.on_bar(_bar(BBB, 100, i))

    assert _intents(out) == EXPECTED_PAIRS


def test_pairs_spread_when_b_leads_by_two_bars_trades_as_when_interleaved() -> None:
    engine = _pairs()
    out: list[Event] = []
    order = [(BBB, 0), (BBB, 1), (AAA, 0), (BBB, 2), (AAA, 1), (AAA, 2), (BBB, 3), (AAA, 3)]
    order += [(AAA, 4), (BBB, 4), (BBB, 5), (AAA, 5)]

    for instrument, i in order:
        close = A_CLOSES[i] if instrument == AAA else 100
        out += engine.on_bar(_bar(instrument, close, i))

    assert _intents(out) == EXPECTED_PAIRS


def test_bar_when_redelivered_is_ignored_so_indicators_move_once() -> None:
    spec = StrategySpec(
        id="sma",
        name="sma_cross",
        account_id="acc-1",
        instruments=[AAA],
        params={"fast": 2, "slow": 3},
    )
    engine = SignalsEngine.from_specs([spec])
    engine.start(stubs.TS)
    out: list[Event] = []

    # closes 10 10 10 9 8 12 cross up at bar 5; bar 4 (8) redelivered after it must not enter
    # the averages again: counted twice, bar 6 (11) would give fast 9.5 < slow 10.33, a
    # down-cross (target 0); counted once, fast 11.5 > slow 10.33, no trade.
    for i, close in [(0, 10), (1, 10), (2, 10), (3, 9), (4, 8), (5, 12), (4, 8), (6, 11)]:
        out += engine.on_bar(_bar(AAA, close, i))

    assert _intents(out) == [(f"sma-{stubs.TS + 6 * MINUTE}-0.1", AAA, Decimal(1))]


def test_tick_when_redelivered_with_its_trade_id_is_ignored() -> None:
    engine = SignalsEngine.from_specs(
        [StrategySpec(id="s", name="sma_cross", account_id="acc-1", instruments=[AAA])]
    )
    first = stubs.tick(instrument_id=AAA, trade_id="T1", ts_event=stubs.TS)
    second = stubs.tick(instrument_id=AAA, trade_id="T2", ts_event=stubs.TS)
    older = stubs.tick(instrument_id=AAA, trade_id="T0", ts_event=stubs.TS - 1)
    guard = engine._direct

    seen = [guard.tick_is_new(t) for t in (first, second, first, older)]

    assert seen == [True, True, False, False]


def test_joint_routing_when_on_feeds_pairs_only_from_the_joint_path() -> None:
    engine = _pairs(route_joint=True)
    direct: list[Event] = []
    joint: list[Event] = []

    for i, close in enumerate(A_CLOSES):
        for bar in (_bar(AAA, close, i), _bar(BBB, 100, i)):
            direct += engine.on_bar(bar)
            joint += engine.on_joint_bar(bar)

    assert direct == []
    assert _intents(joint) == EXPECTED_PAIRS
    assert (engine.joint_key(AAA), engine.joint_key(BBB), engine.joint_key(CCC)) == (
        "pair",
        "pair",
        None,
    )


def test_joint_key_when_pairs_share_a_leg_is_one_key_for_the_whole_group() -> None:
    def pair(sid: str, legs: list[str]) -> StrategySpec:
        return StrategySpec(id=sid, name="pairs_spread", account_id="a", instruments=legs)

    sma = StrategySpec(id="a-sma", name="sma_cross", account_id="a", instruments=["DDD-USDT.SIM"])
    engine = SignalsEngine.from_specs(
        [pair("z-pair", [AAA, BBB]), pair("m-pair", [BBB, CCC]), sma], route_joint=True
    )

    keys = [engine.joint_key(i) for i in (AAA, BBB, CCC, "DDD-USDT.SIM")]

    assert keys == ["m-pair", "m-pair", "m-pair", None]
