"""Portfolio-level pre-trade limits: gross/net exposure, order rate per strategy, VaR."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from quantmesh_common.messages import Side
from quantmesh_common.testing import stubs
from quantmesh_common.topics import Topic
from quantmesh_risk.var import ReturnSeries, portfolio_pnl

from .conftest import Deciding, new_risk

D = Decimal
S = stubs.SECOND_NS
NOW = stubs.TS + 3_600 * S
BTC, ETH = "BTC-USDT.SIM", "ETH-USDT.SIM"


class Risk(Deciding):
    """The risk stage with account limits, on the in-memory bus."""

    def __init__(self, limits: dict[str, Any]) -> None:
        risk = new_risk(risk_limits={"default": limits}, risk_var_horizon_s=60)
        super().__init__(risk, now_ns=NOW)

    async def price(self, instrument_id: str, price: str, ts: int = stubs.TS) -> None:
        venue = instrument_id.rpartition(".")[2]
        tick = stubs.tick(instrument_id=instrument_id, venue=venue, price=D(price), ts_event=ts)
        await self.send(Topic.MD_TICKS, tick)

    async def fill(self, instrument_id: str, side: Side, qty: str, trade_id: str) -> None:
        report = stubs.execution_report(
            instrument_id=instrument_id,
            side=side,
            last_qty=D(qty),
            cum_qty=D(qty),
            trade_id=trade_id,
            client_order_id=f"X-{trade_id}",
        )
        await self.send(Topic.EXEC_REPORTS, report)

    async def swinging_btc(self) -> None:
        """Closes 100, 150, 75, 112.5, 56.25 on 60 s buckets: returns +0.5, -0.5, +0.5, -0.5;
        the last price is 100."""
        for minute, price in enumerate(["100", "150", "75", "112.5", "56.25", "100"]):
            await self.price(BTC, price, stubs.TS + minute * 60 * S)


async def test_gross_exposure_when_the_order_goes_beyond_the_max_is_denied_at_it_passes() -> None:
    risk = await Risk({"max_gross_exposure": "10000"}).start()
    await risk.price(BTC, "50000")
    await risk.price(ETH, "2000")
    await risk.fill(BTC, Side.BUY, "0.1", "T-1")  # 5000

    at_limit = await risk.decide(instrument_id=ETH, quantity=D("2.5"))  # + 5000
    beyond = await risk.decide(instrument_id=ETH, quantity=D("0.001"))  # + 2.501 x 2000 = 5002

    assert at_limit.approved is True
    assert beyond.reason == "GROSS_EXPOSURE_EXCEEDS_MAX"
    assert beyond.details == {
        "max_gross_exposure": "10000",
        "gross_exposure": "10002.000",
        "gross_exposure_before": "10000.0",
    }


async def test_net_exposure_when_a_short_offsets_a_long_passes_and_a_long_beyond_is_denied() -> (
    None
):
    risk = await Risk({"max_net_exposure": "5000"}).start()
    await risk.price(BTC, "50000")
    await risk.price(ETH, "2000")
    await risk.fill(BTC, Side.BUY, "0.1", "T-1")  # net +5000, at the limit

    hedge = await risk.decide(instrument_id=ETH, side=Side.SELL, quantity=D("2.5"))  # net 0
    # The working ETH sell counts: 0.3 x 50000 - 2.5 x 2000 = 10000.
    more = await risk.decide(instrument_id=BTC, quantity=D("0.2"))

    assert hedge.approved is True
    assert more.reason == "NET_EXPOSURE_EXCEEDS_MAX"
    assert more.details["net_exposure"] == "10000.0"
    assert more.details["max_net_exposure"] == "5000"


async def test_exposure_when_an_instrument_held_has_no_price_is_denied_for_want_of_one() -> None:
    risk = await Risk({"max_gross_exposure": "10000"}).start()
    await risk.price(ETH, "2000")
    await risk.fill(BTC, Side.BUY, "0.1", "T-1")

    decision = await risk.decide(instrument_id=ETH, quantity=D("1"))

    assert decision.reason == "NO_REFERENCE_PRICE"
    assert decision.details == {"instrument_id": BTC, "needed_for": "exposure"}


async def test_order_rate_when_a_strategy_reached_the_max_in_the_window_is_denied() -> None:
    risk = await Risk({"max_orders_per_strategy": 2, "order_rate_window_s": 1}).start()

    first = await risk.decide()
    second = await risk.decide()
    third = await risk.decide()
    other_strategy = await risk.decide(strategy_id="strat-2")
    risk.clock.advance(1.0)  # the first two leave the window exactly now
    later = await risk.decide()

    assert (first.approved, second.approved) == (True, True)
    assert third.reason == "ORDER_RATE_EXCEEDS_MAX"
    assert third.details == {
        "strategy_id": "strat-1",
        "max_orders": "2",
        "window_s": "1",
        "orders": "2",
    }
    assert other_strategy.approved is True
    assert later.approved is True


async def test_historical_var_when_at_the_limit_passes_and_beyond_it_is_denied() -> None:
    # 1 BTC at 100 on returns +-0.5: P&L +-50, VaR(99 %) = 50 (type-7 quantile of -50, -50, ...).
    limits = {"max_var": "50", "var_min_observations": 4}
    at_limit_risk = await Risk(limits).start()
    await at_limit_risk.swinging_btc()
    beyond_risk = await Risk(limits).start()
    await beyond_risk.swinging_btc()

    at_limit = await at_limit_risk.decide(quantity=D("1"))
    beyond = await beyond_risk.decide(quantity=D("1.01"))

    assert at_limit.approved is True
    assert beyond.reason == "VAR_EXCEEDS_MAX"
    assert beyond.details == {
        "method": "historical",
        "confidence": "0.99",
        "max_var": "50",
        "var": "50.50",
        "observations": "4",
    }


async def test_parametric_var_when_beyond_the_limit_is_denied_with_the_gaussian_figure() -> None:
    # sd of 50, -50, 50, -50 (n - 1) = 100 / sqrt(3) = 57.735; z(0.99) = 2.32635 -> 134.31.
    risk = await Risk(
        {"max_var": "134", "var_method": "parametric", "var_min_observations": 4}
    ).start()
    await risk.swinging_btc()

    decision = await risk.decide(quantity=D("1"))

    assert decision.reason == "VAR_EXCEEDS_MAX"
    assert decision.details["var"] == "134.31"
    assert decision.details["method"] == "parametric"


async def test_var_when_the_order_lowers_it_passes_even_above_the_limit() -> None:
    risk = await Risk({"max_var": "50", "var_min_observations": 4}).start()
    await risk.swinging_btc()
    await risk.fill(BTC, Side.BUY, "2", "T-1")  # VaR 100

    reduce = await risk.decide(side=Side.SELL, quantity=D("0.5"))  # VaR 75 < 100
    add = await risk.decide(quantity=D("0.1"))

    assert reduce.approved is True
    assert add.reason == "VAR_EXCEEDS_MAX"


async def test_var_when_history_is_short_denies_new_risk_but_lets_a_reduction_through() -> None:
    risk = await Risk({"max_var": "50"}).start()  # 20 returns needed by default
    await risk.swinging_btc()
    await risk.fill(BTC, Side.BUY, "1", "T-1")

    add = await risk.decide(quantity=D("0.1"))
    reduce = await risk.decide(side=Side.SELL, quantity=D("0.5"))

    assert add.reason == "VAR_INSUFFICIENT_HISTORY"
    assert add.details == {"observations": "4", "required": "20"}
    assert reduce.approved is True


async def test_var_returns_when_bars_feed_them_count_each_close() -> None:
    risk = await Risk({"max_var": "50", "var_min_observations": 2}).start()
    for minute, close in enumerate(["100", "150", "75", "100"]):
        bar = stubs.bar(
            instrument_id=BTC,
            open=D(close),
            high=D(close),
            low=D(close),
            close=D(close),
            ts_open=stubs.TS + minute * 60 * S,
            ts_close=stubs.TS + (minute + 1) * 60 * S - 1,
        )
        await risk.send(Topic.MD_BARS, bar)

    # Returns +0.5, -0.5; 1.5 BTC at the last close 100: P&L 75, -75. The type-7 quantile at
    # 0.01 of two points: -75 + 0.01 x 150 = -73.5.
    decision = await risk.decide(quantity=D("1.5"))

    assert decision.reason == "VAR_EXCEEDS_MAX"
    assert decision.details["var"] == "73.50"
    assert decision.details["observations"] == "2"


def test_return_series_when_a_bucket_has_several_prices_uses_the_last_and_skips_stale() -> None:
    series = ReturnSeries(horizon_ns=60 * S, window=10)
    series.observe(0, D("100"))
    series.observe(30 * S, D("200"))  # bucket 0 closes at 200
    series.observe(60 * S, D("300"))
    series.observe(10 * S, D("1"))  # older than the last price: ignored
    series.observe(120 * S, D("250"))  # bucket 1 closes at 300

    assert series.by_bucket() == {1: 0.5}


def test_portfolio_pnl_when_two_instruments_counts_only_buckets_both_have() -> None:
    pnl = portfolio_pnl(
        {BTC: D("100"), ETH: D("-50")}, {BTC: {1: 0.5, 2: -0.25}, ETH: {2: 0.5, 3: 1.0}}
    )

    assert pnl == [100 * -0.25 + -50 * 0.5]
