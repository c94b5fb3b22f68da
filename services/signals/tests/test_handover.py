"""The hand-over of moved partitions: which partitions need what, and drop-then-replay."""

from __future__ import annotations

import random
from decimal import Decimal

from quantmesh_common.envelope import Envelope, Event
from quantmesh_common.messages import Bar, ControlAction, OrderIntent
from quantmesh_common.testing import stubs
from quantmesh_signals.engine import SignalsEngine, StrategySpec
from quantmesh_signals.handover import Holding

AAA = "AAA-USDT.SIM"
BBB = "BBB-USDT.SIM"
MINUTE = 60 * stubs.SECOND_NS
SPEC = StrategySpec(
    id="sma",
    name="sma_cross",
    account_id="acc-1",
    instruments=[AAA, BBB],
    params={"fast": 2, "slow": 4, "allow_short": True},
)
P0 = ("md.bars", 0)
P1 = ("md.bars", 1)


def _walk(instrument: str, seed: int, steps: int) -> list[Bar]:
    rng = random.Random(seed)
    price = 100.0
    bars = []
    for i in range(steps):
        price *= 1 + rng.gauss(0, 0.03)
        close = Decimal(f"{price:.2f}")
        bars.append(
            stubs.bar(
                instrument_id=instrument,
                open=close,
                high=close,
                low=close,
                close=close,
                ts_open=stubs.TS + i * MINUTE,
                ts_close=stubs.TS + (i + 1) * MINUTE,
            )
        )
    return bars


A_BARS = _walk(AAA, 1, 30)
B_BARS = _walk(BBB, 2, 30)


def _engine() -> SignalsEngine:
    engine = SignalsEngine.from_specs([SPEC])
    engine.start(stubs.TS)
    return engine


def _feed(engine: SignalsEngine, bars: list[Bar]) -> list[tuple[str, Decimal | None]]:
    out: list[Event] = []
    for bar in bars:
        out += engine.on_bar(bar)
    return [(e.client_order_id, e.target_position) for e in out if isinstance(e, OrderIntent)]


def _envelope(bar: Bar, event_id: str) -> Envelope[Bar]:
    return Envelope.wrap(bar, source="t", ts_event=bar.ts_close, ts_init=0, event_id=event_id)


def _stale_engine() -> SignalsEngine:
    """An instance that handled both instruments for 10 bars, then only BBB for 10 more (AAA's
    partition was with another instance meanwhile)."""
    engine = _engine()
    _feed(engine, [*A_BARS[:10], *B_BARS[:10]])
    _feed(engine, B_BARS[10:20])
    return engine


def test_adopt_when_an_instrument_moved_back_emits_what_an_uninterrupted_engine_would() -> None:
    reference = _engine()
    _feed(reference, [*A_BARS[:20], *B_BARS[:20]])
    expected = _feed(reference, [*A_BARS[20:], *B_BARS[20:]])
    stale = _stale_engine()
    live = _stale_engine()
    rebuilt = _engine()
    _feed(rebuilt, [*A_BARS[:20], *B_BARS[:20]])

    live.adopt(rebuilt, ["sma"])
    found = _feed(live, [*A_BARS[20:], *B_BARS[20:]])

    assert expected  # the rest of the data makes intents at all
    assert _feed(stale, [*A_BARS[20:], *B_BARS[20:]]) != expected  # what it fixes
    assert found == expected


def test_adopt_when_done_takes_the_redelivery_guards_of_the_moved_instrument() -> None:
    live = _stale_engine()
    rebuilt = _engine()
    _feed(rebuilt, [*A_BARS[:20], *B_BARS[:20]])

    live.adopt(rebuilt, ["sma"])

    # AAA's bar 19 was handled by the other instance: a redelivery here must not count twice.
    assert live.on_bar(A_BARS[19]) == []
    assert live.on_bar(A_BARS[20]) == rebuilt.on_bar(A_BARS[20])


def test_adopt_when_the_strategy_is_halted_and_reconfigured_keeps_switches_and_params() -> None:
    live = _stale_engine()
    live.on_control(stubs.control_command(action=ControlAction.HALT_STRATEGY, target="sma"))
    live.on_control(
        stubs.control_command(
            action=ControlAction.CONFIGURE_STRATEGY,
            target="sma",
            params={"params": '{"fast": 3}'},
        )
    )
    rebuilt = _engine()
    _feed(rebuilt, [*A_BARS[:20], *B_BARS[:20]])

    live.adopt(rebuilt, ["sma"])

    host = live.hosts["sma"]
    assert host.halted
    assert host.config_version == 1
    assert host.strategy.params.model_dump()["fast"] == 3
    assert host.ctx is rebuilt.hosts["sma"].ctx


def test_classify_when_first_assigned_catches_up_from_the_start_up_replay() -> None:
    holding = Holding("g", ["md.bars"], exact={P0: 5, P1: 8})

    plan = holding.classify([P0, P1], {P0: 9, P1: 8}, {})

    assert plan.catch_up == {P0: (5, 9)}
    assert plan.kept == {P1}
    assert plan.moved == set()


def test_classify_when_committed_went_back_or_state_unknown_calls_it_moved() -> None:
    holding = Holding("g", ["md.bars"], exact={P0: 5}, default=None)

    plan = holding.classify([P0, P1], {P0: 3, P1: 4}, {})

    assert plan.moved == {P0, P1}


def test_classify_when_handled_here_before_tells_kept_from_moved_by_offset_and_last_id() -> None:
    holding = Holding("g", ["md.bars"])
    holding.assigned([P0, P1], {P0: 10, P1: 20}, rebuilt=False, owned=[P0, P1])
    holding.last_seen[(Bar, AAA)] = "mine"
    committed = {P0: 10, P1: 25}

    wanted = holding.needs_last_messages([P0, P1], committed)
    mine = holding.classify([P0, P1], committed, {P1: _envelope(A_BARS[0], "mine")})
    theirs = holding.classify([P0, P1], committed, {P1: _envelope(A_BARS[1], "theirs")})

    assert wanted == {P1: 25}  # P0's committed offset is where this instance began: kept
    assert mine.kept == {P0, P1}
    assert theirs.kept == {P0}
    assert theirs.moved == {P1}


def test_assigned_when_rebuilt_forgets_what_it_held_of_partitions_it_does_not_own() -> None:
    holding = Holding("g", ["md.bars"], exact={P1: 4})
    holding.assigned([P0, P1], {P0: 10, P1: 20}, rebuilt=False, owned=[P0, P1])
    holding.exact[("md.ticks", 0)] = 3

    holding.assigned([P0], {P0: 12}, rebuilt=True, owned=[P0])

    assert holding.tenure == {P0: 12}
    assert holding.exact == {}
    assert holding.classify([P1], {P1: 20}, {}).moved == {P1}
