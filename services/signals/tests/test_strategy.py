"""The strategy API: validated parameters, the context's order helpers, the registry."""

from __future__ import annotations

from decimal import Decimal

import pytest
from pydantic import Field, ValidationError

from quantmesh_common.envelope import Event
from quantmesh_common.messages import (
    Bar,
    OrderIntent,
    OrderType,
    PositionSide,
    Side,
    Signal,
    StrategyState,
    StrategyStatus,
    Tick,
    TimeInForce,
)
from quantmesh_common.testing import stubs
from quantmesh_signals.engine import SignalsEngine, StrategyHost, StrategySpec
from quantmesh_signals.strategies.sma_cross import SmaCross, SmaCrossParams
from quantmesh_signals.strategy import (
    Strategy,
    StrategyContext,
    StrategyParams,
    UnknownStrategyError,
    available_strategies,
    create_strategy,
    load_strategy_class,
)

BTC = "BTC-USDT.SIM"
ETH = "ETH-USDT.SIM"


class _Params(StrategyParams):
    size: Decimal = Field(default=Decimal("0.5"), gt=0)


class _BuyEveryBar(Strategy[_Params]):
    def on_bar(self, bar: Bar, ctx: StrategyContext) -> None:
        ctx.buy(bar.instrument_id, self.params.size, tag="every-bar")


class _Broken(Strategy[_Params]):
    def on_bar(self, bar: Bar, ctx: StrategyContext) -> None:
        raise RuntimeError("bug in the strategy")


def _ctx(now_ns: int = stubs.TS) -> StrategyContext:
    ctx = StrategyContext("s-1", "acc-1", [BTC, ETH])
    ctx.now_ns = now_ns
    return ctx


def test_strategy_when_subclassed_takes_its_params_type_from_the_generic_argument() -> None:
    strategy = _BuyEveryBar({"size": "2"})

    assert _BuyEveryBar.params_type is _Params
    assert strategy.params == _Params(size=Decimal(2))


def test_strategy_when_params_are_bad_raises_validation_error_naming_the_field() -> None:
    with pytest.raises(ValidationError) as raised:
        SmaCross({"fast": 0, "slow": 30})

    assert raised.value.errors()[0]["loc"] == ("fast",)


def test_strategy_when_a_param_is_misspelt_raises_validation_error() -> None:
    with pytest.raises(ValidationError, match="fats"):
        SmaCross({"fats": 5})


def test_strategy_when_fast_not_below_slow_raises_validation_error() -> None:
    with pytest.raises(ValidationError, match=r"fast \(30\) must be below slow \(10\)"):
        SmaCrossParams(fast=30, slow=10)


def test_buy_when_called_builds_a_market_intent_with_deterministic_ids() -> None:
    ctx = _ctx()

    intent = ctx.buy(BTC, Decimal("0.25"), tag="t")

    assert intent == OrderIntent(
        intent_id=f"s-1-{stubs.TS}-0.1-intent",
        account_id="acc-1",
        strategy_id="s-1",
        instrument_id=BTC,
        client_order_id=f"s-1-{stubs.TS}-0.1",
        side=Side.BUY,
        quantity=Decimal("0.25"),
        tag="t",
        ts_event=stubs.TS,
    )
    assert ctx._drain() == [intent]


def test_sell_when_limit_ioc_carries_price_and_time_in_force() -> None:
    ctx = _ctx()

    intent = ctx.sell(
        ETH, "3", order_type=OrderType.LIMIT, limit_price="2500.5", time_in_force=TimeInForce.IOC
    )

    assert intent.side is Side.SELL
    assert intent.quantity == Decimal(3)
    assert intent.limit_price == Decimal("2500.5")
    assert intent.time_in_force is TimeInForce.IOC


def test_buy_when_limit_order_has_no_price_raises_validation_error() -> None:
    ctx = _ctx()

    with pytest.raises(ValidationError, match="needs limit_price"):
        ctx.buy(BTC, 1, order_type=OrderType.LIMIT)


def test_buy_when_quantity_is_a_float_raises_type_error() -> None:
    ctx = _ctx()

    with pytest.raises(TypeError, match="never a float"):
        ctx.buy(BTC, 0.1)  # type: ignore[arg-type]


def test_buy_when_instrument_is_not_traded_raises_naming_the_traded_ones() -> None:
    ctx = _ctx()

    with pytest.raises(ValueError, match=r"does not trade 'SOL-USDT\.SIM'.*BTC-USDT\.SIM, ETH"):
        ctx.buy("SOL-USDT.SIM", 1)


def test_target_position_when_target_changes_emits_signal_then_intent_without_side() -> None:
    ctx = _ctx()
    ctx._see_price(BTC, Decimal("50000"))

    intent = ctx.target_position(BTC, Decimal("-2"), reason="why")
    again = ctx.target_position(BTC, Decimal("-2"))

    assert intent.side is None
    assert intent.quantity is None
    assert intent.target_position == Decimal(-2)
    assert ctx._drain() == [
        Signal(
            signal_id=f"s-1-{stubs.TS}-0.1-signal",
            strategy_id="s-1",
            instrument_id=BTC,
            direction=PositionSide.SHORT,
            target_position=Decimal(-2),
            price=Decimal("50000"),
            reason="why",
            ts_event=stubs.TS,
        ),
        intent,
        again,
    ]
    assert ctx.target(BTC) == Decimal(-2)


def test_ids_when_event_time_steps_back_never_repeat() -> None:
    ctx = _ctx(now_ns=200)
    first = ctx.buy(BTC, 1)
    ctx.now_ns = 100

    second = ctx.buy(BTC, 1)

    assert first.client_order_id == "s-1-200-0.1"
    assert second.client_order_id == "s-1-200-0.2"


def test_context_when_muted_drops_output_and_remembers_no_target() -> None:
    ctx = _ctx()
    ctx.muted = True

    ctx.target_position(BTC, 1)
    ctx.buy(BTC, 1)

    assert ctx._drain() == []
    assert ctx.target(BTC) is None


def test_registry_when_installed_lists_the_builtins() -> None:
    names = available_strategies()

    assert {"sma_cross", "rsi_reversion", "bollinger_breakout", "pairs_spread"} <= set(names)
    assert load_strategy_class("sma_cross") is SmaCross


def test_registry_when_name_is_unknown_lists_known_names() -> None:
    with pytest.raises(UnknownStrategyError, match=r"unknown strategy 'nope'.*sma_cross"):
        load_strategy_class("nope")


def test_create_strategy_when_params_given_validates_them() -> None:
    strategy = create_strategy("sma_cross", {"fast": 3, "slow": 5})

    assert isinstance(strategy, SmaCross)
    assert strategy.params.slow == 5


def test_host_when_strategy_raises_mutes_only_that_strategy() -> None:
    spec = StrategySpec(id="bad", name="x", account_id="acc-1", instruments=[BTC])
    broken = StrategyHost(spec, _Broken())
    fine = StrategyHost(spec.model_copy(update={"id": "good"}), _BuyEveryBar())
    bar = stubs.bar(instrument_id=BTC)

    broken_out = broken.run(lambda ctx: broken.strategy.on_bar(bar, ctx), bar.ts_close)
    fine_out = fine.run(lambda ctx: fine.strategy.on_bar(bar, ctx), bar.ts_close)

    # No order: only the status saying it faulted.
    assert [(type(e), getattr(e, "state", None)) for e in broken_out] == [
        (StrategyStatus, StrategyState.FAULTED)
    ]
    assert broken.fault == "RuntimeError: bug in the strategy"
    assert broken.muted
    assert [type(e) for e in fine_out] == [OrderIntent]


class _SellOnTick(Strategy[_Params]):
    def on_tick(self, tick: Tick, ctx: StrategyContext) -> None:
        ctx.sell(tick.instrument_id, self.params.size)


def test_engine_when_tick_arrives_calls_on_tick_of_strategies_on_that_instrument_only() -> None:
    on_btc = StrategySpec(id="t-btc", name="x", account_id="acc-1", instruments=[BTC])
    on_eth = on_btc.model_copy(update={"id": "t-eth", "instruments": [ETH]})
    engine = SignalsEngine(
        [StrategyHost(on_btc, _SellOnTick()), StrategyHost(on_eth, _SellOnTick())]
    )

    out = engine.on_tick(stubs.tick(instrument_id=BTC, ts_event=stubs.TS + 5))

    assert [(e.strategy_id, e.side, e.client_order_id) for e in _only_intents(out)] == [
        ("t-btc", Side.SELL, f"t-btc-{stubs.TS + 5}-0.1")
    ]
    assert engine.hosts["t-btc"].ctx.last_price(BTC) == Decimal("50000.10")


def _only_intents(events: list[Event]) -> list[OrderIntent]:
    return [e for e in events if isinstance(e, OrderIntent)]
