"""Position sizing of target-position intents: fixed, fraction of equity, rolling sigma, ATR."""

from __future__ import annotations

import json
from decimal import Decimal
from typing import Any

import pytest

from quantmesh_common.messages import Bar, RiskDecision, Side
from quantmesh_common.settings import CONFIG_ERROR_EXIT_CODE, load_settings
from quantmesh_common.testing import stubs
from quantmesh_common.testing.harness import StageHarness
from quantmesh_common.topics import Topic
from quantmesh_risk.checks import RiskDenial
from quantmesh_risk.config import RiskSettings
from quantmesh_risk.service import RiskService
from quantmesh_risk.sizing import (
    SizingConfig,
    SizingPolicy,
    TrueRanges,
    rolling_sigma,
    sized_target,
)

D = Decimal
S = stubs.SECOND_NS
BTC = stubs.INSTRUMENT_ID


def _bar(high: str, low: str, close: str, minute: int) -> Bar:
    return stubs.bar(
        open=D(close),
        high=D(high),
        low=D(low),
        close=D(close),
        ts_open=stubs.TS + minute * 60 * S,
        ts_close=stubs.TS + (minute + 1) * 60 * S,
    )


def _size(policy: dict[str, Any], target: str = "1", **kwargs: Any) -> RiskDenial | Decimal:
    return sized_target(SizingPolicy(**policy), D(target), instrument_id=BTC, **kwargs)


def test_fixed_when_target_is_short_keeps_the_sign_and_takes_the_quantity() -> None:
    assert _size({"method": "fixed", "quantity": "0.5"}, "-3", equity=None, price=None) == D("-0.5")


def test_fraction_when_equity_and_price_known_rounds_down_to_the_lot() -> None:
    # 10000 x 0.25 / 2000 = 1.25 -> 1.2 in lots of 0.1
    sized = _size(
        {"method": "fraction", "fraction": "0.25"},
        equity=D(10_000),
        price=D(2_000),
        lot_size=D("0.1"),
    )

    assert sized == D("1.2")


def test_fraction_when_no_equity_yet_sizes_with_the_policy_capital() -> None:
    # 4000 x 0.5 / 100 = 20
    sized = _size(
        {"method": "fraction", "fraction": "0.5", "capital": "4000"},
        equity=None,
        price=D(100),
        lot_size=D(1),
    )

    assert sized == D(20)


def test_volatility_when_sigma_known_sizes_to_the_target_volatility() -> None:
    # sigma of (0.01, -0.01, 0.03, -0.03): mean 0, sqrt(0.002 / 3) = 0.0258199
    # 100000 x 0.01 / (0.0258199 x 100) = 387.298 -> 387.29 in lots of 0.01
    returns = [0.01, -0.01, 0.03, -0.03]
    policy = {"method": "volatility", "target_volatility": "0.01", "volatility_window": 4}

    sized = _size(policy, equity=D(100_000), price=D(100), returns=returns, lot_size=D("0.01"))

    assert rolling_sigma(returns, 4) == pytest.approx(0.0258198890)
    assert sized == D("387.29")


def test_volatility_when_fewer_returns_than_the_window_is_denied() -> None:
    policy = {"method": "volatility", "target_volatility": "0.01", "volatility_window": 5}

    sized = _size(policy, equity=D(100_000), price=D(100), returns=[0.01, 0.02])

    assert sized == RiskDenial(
        "SIZING_INSUFFICIENT_HISTORY", {"method": "volatility", "returns": "2", "needed": "5"}
    )


def test_atr_when_bars_known_sizes_the_risk_per_atr_multiple() -> None:
    # true ranges: max(104-99, |104-100|, |99-100|) = 5; max(8, 0, 8) = 8; max(3, 4, 1) = 4
    # ATR(3) = 17/3; 10000 x 0.01 / (2 x 17/3) = 8.82 -> 8.8 in lots of 0.1
    ranges = TrueRanges()
    for minute, (high, low, close) in enumerate(
        [("102", "98", "100"), ("104", "99", "103"), ("103", "95", "96"), ("100", "97", "99")]
    ):
        ranges.on_bar(_bar(high, low, close, minute))
    policy = {"method": "atr", "risk_fraction": "0.01", "atr_period": 3, "atr_multiple": "2"}

    sized = _size(policy, equity=D(10_000), price=D(99), true_ranges=ranges, lot_size=D("0.1"))

    assert list(ranges.ranges) == [D(5), D(8), D(4)]
    assert sized == D("8.8")


def test_sizing_when_no_equity_nor_capital_is_denied() -> None:
    sized = _size({"method": "fraction", "fraction": "0.1"}, equity=None, price=D(100))

    assert sized == RiskDenial("SIZING_NO_EQUITY", {"method": "fraction"})


def test_sizing_when_size_is_below_one_lot_is_denied() -> None:
    # 100 x 0.01 / 2000 = 0.0005 < 0.001
    sized = _size(
        {"method": "fraction", "fraction": "0.01"},
        equity=D(100),
        price=D(2_000),
        lot_size=D("0.001"),
    )

    assert isinstance(sized, RiskDenial)
    assert sized.reason == "SIZED_QUANTITY_BELOW_LOT"
    assert sized.details["size"] == "0.0005"


def test_sizing_when_target_is_flat_is_not_resized() -> None:
    assert _size({"method": "fixed", "quantity": "2"}, "0", equity=None, price=None) == D(0)


def test_policy_when_strategy_and_account_both_set_prefers_the_strategy() -> None:
    config = SizingConfig.model_validate(
        {
            "default": {"method": "fixed", "quantity": "1"},
            "accounts": {"acc-1": {"method": "fixed", "quantity": "2"}},
            "strategies": {"s-1": {"method": "fixed", "quantity": "3"}},
        }
    )

    assert config.policy_for("acc-1", "s-1").quantity == D(3)
    assert config.policy_for("acc-1", "s-2").quantity == D(2)
    assert config.policy_for("acc-2", "s-2").quantity == D(1)


@pytest.mark.parametrize(
    ("value", "phrase"),
    [
        ('{"default": {"method": "fraction"}}', "needs fraction"),
        ('{"default": {"method": "kelly"}}', "method"),
        ('{"default": {"method": "fixed", "quantity": "0"}}', "greater than 0"),
    ],
)
def test_settings_when_sizing_invalid_exit_2_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    value: str,
    phrase: str,
) -> None:
    monkeypatch.setenv("QM_BUS", "memory")
    monkeypatch.setenv("QM_RISK_SIZING", value)

    with pytest.raises(SystemExit) as exited:
        load_settings(RiskSettings)

    err = capsys.readouterr().err
    assert exited.value.code == CONFIG_ERROR_EXIT_CODE
    assert "configuration error: QM_RISK_SIZING" in err
    assert phrase in err


class Risk(StageHarness[RiskService]):
    """The risk stage with a sizing policy and BTC's rules (lot 0.1), on the in-memory bus."""

    def __init__(self, sizing: dict[str, Any]) -> None:
        settings = RiskSettings(
            bus="memory",
            http_port=0,
            risk_sizing=json.dumps(sizing),
            risk_instruments=[stubs.instrument(lot_size=D("0.1"), min_quantity=D("0.1"))],
        )
        super().__init__(RiskService(settings), now_ns=stubs.TS + 3_600 * S)

    async def target(self, cid: str, target: str) -> RiskDecision:
        intent = stubs.order_intent(
            intent_id=f"I-{cid}",
            client_order_id=cid,
            side=None,
            quantity=None,
            target_position=D(target),
        )
        await self.send(Topic.ORDERS_INTENTS, intent)
        decisions = self.payloads(Topic.ORDERS_APPROVED) + self.payloads(Topic.ORDERS_REJECTED)
        found: RiskDecision = next(d for d in decisions if d.intent.client_order_id == cid)
        return found


async def test_target_intent_when_sized_by_fraction_orders_the_sized_target() -> None:
    # Arrange: equity 10000 from a snapshot, BTC at 2000; a 0.5 BTC fill already held.
    risk = await Risk({"default": {"method": "fraction", "fraction": "0.25"}}).start()
    await risk.send(
        Topic.PORTFOLIO_SNAPSHOTS,
        stubs.portfolio_snapshot(equity=D(10_000), positions=[], ts_event=stubs.TS),
    )
    await risk.send(Topic.MD_TICKS, stubs.tick(price=D(2_000), ts_event=stubs.TS + S))
    await risk.send(
        Topic.EXEC_REPORTS,
        stubs.execution_report(last_qty=D("0.5"), cum_qty=D("0.5"), client_order_id="X-1"),
    )

    # Act: the strategy says "long 1"; the policy sizes it to 1.2 (10000 x 0.25 / 2000).
    decision = await risk.target("O-1", "1")

    # Assert
    assert decision.approved
    assert decision.side is Side.BUY
    assert decision.adjusted_quantity == D("0.7")  # 1.2 - 0.5 held


async def test_target_intent_when_equity_unknown_is_denied_with_the_reason() -> None:
    risk = await Risk({"default": {"method": "fraction", "fraction": "0.25"}}).start()
    await risk.send(Topic.MD_TICKS, stubs.tick(price=D(2_000), ts_event=stubs.TS + S))

    decision = await risk.target("O-1", "-1")

    assert not decision.approved
    assert decision.reason == "SIZING_NO_EQUITY"
