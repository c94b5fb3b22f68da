"""The risk stage's handlers on the in-memory bus; what every stage must do is in tests/stages/."""

from __future__ import annotations

import json
import subprocess
import sys
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from quantmesh_common.messages import (
    ControlAction,
    OrderStatus,
    OrderType,
    RiskDecision,
    Side,
)
from quantmesh_common.settings import CONFIG_ERROR_EXIT_CODE, load_settings
from quantmesh_common.testing import stubs
from quantmesh_common.testing.harness import StageHarness
from quantmesh_common.topics import Topic
from quantmesh_risk.config import RiskSettings
from quantmesh_risk.service import HANDLERS_ISSUE, RiskService

from .conftest import new_risk

D = Decimal
NOW = stubs.TS + 10 * stubs.SECOND_NS


class Harness(StageHarness[RiskService]):
    """The risk service's handlers on a retaining in-memory bus with a simulated clock."""

    def __init__(self, limits: dict[str, Any] | None = None, instruments: Any = ()) -> None:
        risk = new_risk(
            risk_limits=limits or {}, risk_instruments=[i.model_dump() for i in instruments]
        )
        super().__init__(risk, now_ns=NOW)

    async def decide(self, **intent: Any) -> RiskDecision:
        """Send one intent and return the one decision it produced."""
        approved, rejected = len(self.approved()), len(self.rejected())
        await self.send(Topic.ORDERS_INTENTS, stubs.order_intent(**intent))
        new = self.approved()[approved:] + self.rejected()[rejected:]
        assert len(new) == 1
        return new[0]

    def approved(self) -> list[RiskDecision]:
        return [e.payload for e in self.bus.messages(Topic.ORDERS_APPROVED)]

    def rejected(self) -> list[RiskDecision]:
        return [e.payload for e in self.bus.messages(Topic.ORDERS_REJECTED)]


async def _risk(limits: dict[str, Any] | None = None, instruments: Any = ()) -> Harness:
    return await Harness(limits, instruments).start()


def test_declared_topics_are_what_the_handlers_use() -> None:
    assert RiskService.consumes == (
        Topic.ORDERS_INTENTS,
        Topic.EXEC_REPORTS,
        Topic.ORDERS_UPDATES,
        Topic.MD_TICKS,
        Topic.CONTROL,
        Topic.PORTFOLIO_UPDATES,
        Topic.PORTFOLIO_SNAPSHOTS,
        Topic.MD_BARS,
        Topic.ACCOUNTS,
        Topic.REF_INSTRUMENTS,
    )
    assert RiskService.produces == (
        Topic.ORDERS_APPROVED,
        Topic.ORDERS_REJECTED,
        Topic.ALERTS,
        Topic.RISK_LIMITS,
    )


def test_handlers_issue_when_handlers_exist_is_none() -> None:
    assert HANDLERS_ISSUE is None


async def test_intent_when_within_limits_is_approved_keeping_the_intent() -> None:
    risk = await _risk({"default": {"max_order_quantity": "1"}})
    intent = stubs.order_intent()

    await risk.send(Topic.ORDERS_INTENTS, intent)

    [decision] = risk.approved()
    assert risk.rejected() == []
    assert decision.intent == intent
    assert decision.approved is True
    assert decision.reason is None
    assert decision.adjusted_quantity is None
    assert decision.decision_id == "D-I-1"
    assert decision.ts_event == NOW


async def test_limit_order_when_notional_over_the_max_is_rejected_with_the_values() -> None:
    risk = await _risk({"default": {"max_order_notional": "10000"}})

    # 0.25 x 50000.00 = 12500.0000
    decision = await risk.decide(
        order_type=OrderType.LIMIT, quantity=D("0.25"), limit_price=D("50000.00")
    )

    assert risk.approved() == []
    assert decision.approved is False
    assert decision.reason == "NOTIONAL_EXCEEDS_MAX_PER_ORDER"
    assert decision.details == {"max_notional": "10000", "notional": "12500.0000"}
    assert decision.reason_text == (
        "NOTIONAL_EXCEEDS_MAX_PER_ORDER: max_notional=10000, notional=12500.0000"
    )


async def test_market_order_when_no_trade_seen_yet_is_rejected_for_want_of_a_price() -> None:
    risk = await _risk({"default": {"max_order_notional": "10000"}})

    decision = await risk.decide()

    assert decision.reason == "NO_REFERENCE_PRICE"
    assert decision.details == {"instrument_id": "BTC-USDT.SIM", "needed_for": "notional"}


async def test_market_order_when_priced_at_the_last_trade_uses_it_for_the_notional() -> None:
    risk = await _risk({"default": {"max_order_notional": "10000"}})
    await risk.send(Topic.MD_TICKS, stubs.tick(price=D("50000.00")))

    at_limit = await risk.decide(quantity=D("0.2"))  # 0.2 x 50000.00 = 10000.000
    await risk.send(Topic.MD_TICKS, stubs.tick(price=D("50000.01"), ts_event=stubs.TS + 1))
    over = await risk.decide(intent_id="I-2", client_order_id="O-2", quantity=D("0.2"))

    assert at_limit.approved is True
    assert over.approved is False
    assert over.details == {"max_notional": "10000", "notional": "10000.002"}


async def test_tick_when_older_than_the_last_one_does_not_replace_the_price() -> None:
    risk = await _risk()

    await risk.send(
        Topic.MD_TICKS,
        stubs.tick(price=D("50000.00"), ts_event=stubs.TS + 5),
        stubs.tick(price=D("1.00"), ts_event=stubs.TS + 1),
    )

    assert risk.service.engine.last_price("BTC-USDT.SIM") == D("50000.00")


async def test_limit_order_when_price_is_beyond_the_collar_is_rejected_as_fat_finger() -> None:
    risk = await _risk({"default": {"price_collar_bps": "100"}})
    await risk.send(Topic.MD_TICKS, stubs.tick(price=D("50000.00")))

    inside = await risk.decide(order_type=OrderType.LIMIT, limit_price=D("50500.00"))
    outside = await risk.decide(
        intent_id="I-2",
        client_order_id="O-2",
        order_type=OrderType.LIMIT,
        limit_price=D("50500.01"),
    )

    assert inside.approved is True
    assert outside.reason == "PRICE_OUTSIDE_COLLAR"
    assert outside.details["deviation_bps"] == "100.0020"


async def test_kill_switch_when_on_denies_everything_and_when_off_lets_orders_through() -> None:
    risk = await _risk()

    await risk.send(Topic.CONTROL, stubs.control_command())
    halted = await risk.decide()
    await risk.send(
        Topic.CONTROL, stubs.control_command(command_id="K-2", action=ControlAction.KILL_SWITCH_OFF)
    )
    resumed = await risk.decide(intent_id="I-2", client_order_id="O-2")

    assert halted.reason == "KILL_SWITCH_ENGAGED"
    assert halted.details == {"target": "*"}
    assert resumed.approved is True


async def test_kill_switch_when_aimed_at_one_account_halts_only_that_account() -> None:
    risk = await _risk()

    await risk.send(Topic.CONTROL, stubs.control_command(target="acc-1"))
    halted = await risk.decide()
    other = await risk.decide(intent_id="I-2", client_order_id="O-2", account_id="acc-2")

    assert halted.details == {"target": "acc-1"}
    assert other.approved is True


async def test_circuit_breaker_when_tripped_denies_until_an_operator_resets_it() -> None:
    risk = await _risk()
    risk.service.engine.trip_circuit_breaker("acc-1", "DAILY_LOSS_LIMIT")

    tripped = await risk.decide()
    await risk.send(
        Topic.CONTROL,
        stubs.control_command(action=ControlAction.RESET_CIRCUIT_BREAKER, target="acc-1"),
    )
    after_reset = await risk.decide(intent_id="I-2", client_order_id="O-2")

    assert tripped.reason == "CIRCUIT_BREAKER_TRIPPED"
    assert tripped.details == {"account_id": "acc-1", "cause": "DAILY_LOSS_LIMIT"}
    assert after_reset.approved is True


async def test_max_position_when_fills_redelivered_counts_each_trade_once() -> None:
    risk = await _risk({"default": {"max_position": "0.15"}})
    fill = stubs.execution_report(client_order_id="O-old")  # bought 0.1, trade T-1
    await risk.send(Topic.EXEC_REPORTS, fill, fill)

    # 0.1 held + 0.05 = 0.15 (the limit); + 0.05001 = 0.15001.
    at_limit = await risk.decide(quantity=D("0.05"))
    await risk.send(
        Topic.ORDERS_UPDATES, stubs.order(status=OrderStatus.CANCELED, quantity=D("0.05"))
    )
    over = await risk.decide(intent_id="I-2", client_order_id="O-2", quantity=D("0.05001"))

    assert risk.service.engine.position("acc-1", "BTC-USDT.SIM") == D("0.1")
    assert at_limit.approved is True
    assert over.reason == "POSITION_EXCEEDS_MAX"
    assert over.details["projected_position"] == "0.15001"


async def test_target_position_when_the_fill_arrives_before_the_order_update_is_not_resized() -> (
    None
):
    risk = await _risk()
    first = await risk.decide(
        side=None, quantity=None, target_position=D("0.1"), client_order_id="O-t1"
    )
    # The venue's fill is read before the OMS's FILLED update (two topics, no order between).
    fill = stubs.execution_report(client_order_id="O-t1", last_qty=D("0.1"), cum_qty=D("0.1"))
    await risk.send(Topic.EXEC_REPORTS, fill)

    again = await risk.decide(
        side=None,
        quantity=None,
        target_position=D("0.1"),
        client_order_id="O-t2",
        intent_id="I-2",
    )
    # A late non-terminal update of the finished order must not count it as working again.
    await risk.send(
        Topic.ORDERS_UPDATES,
        stubs.order(client_order_id="O-t1", status=OrderStatus.ACCEPTED, quantity=D("0.1")),
    )
    still = await risk.decide(
        side=None,
        quantity=None,
        target_position=D("0.1"),
        client_order_id="O-t3",
        intent_id="I-3",
    )

    assert (first.side, first.adjusted_quantity) == (Side.BUY, D("0.1"))
    assert again.reason == "TARGET_POSITION_ALREADY_REACHED"
    assert again.details == {"target_position": "0.1", "working": "0"}
    assert still.reason == "TARGET_POSITION_ALREADY_REACHED"


async def test_max_position_when_an_approved_order_still_works_counts_it() -> None:
    risk = await _risk({"default": {"max_position": "0.15"}})

    first = await risk.decide(quantity=D("0.1"))
    second = await risk.decide(intent_id="I-2", client_order_id="O-2", quantity=D("0.1"))
    sell = await risk.decide(
        intent_id="I-3", client_order_id="O-3", side=Side.SELL, quantity=D("0.1")
    )

    assert first.approved is True
    assert second.reason == "POSITION_EXCEEDS_MAX"
    assert second.details["open_quantity"] == "0.1"
    assert sell.approved is True


async def test_max_open_orders_when_reached_denies_until_the_oms_reports_one_finished() -> None:
    risk = await _risk({"default": {"max_open_orders": 1}})

    first = await risk.decide()
    second = await risk.decide(intent_id="I-2", client_order_id="O-2")
    await risk.send(
        Topic.ORDERS_UPDATES,
        stubs.order(status=OrderStatus.FILLED, filled_quantity=D("0.1"), avg_fill_price=D("49000")),
    )
    third = await risk.decide(intent_id="I-3", client_order_id="O-3")

    assert first.approved is True
    assert second.reason == "OPEN_ORDERS_EXCEED_MAX"
    assert second.details == {"max_open_orders": "1", "open_orders": "1"}
    assert third.approved is True


async def test_intent_when_redelivered_while_its_order_works_does_not_count_itself() -> None:
    risk = await _risk({"default": {"max_open_orders": 1}})

    first = await risk.decide()
    again = await risk.decide()

    assert first.approved is True
    assert again.approved is True


async def test_intent_when_client_order_id_already_finished_is_rejected_as_duplicate() -> None:
    risk = await _risk()
    await risk.send(Topic.ORDERS_UPDATES, stubs.order(status=OrderStatus.CANCELED))

    decision = await risk.decide()

    assert decision.reason == "DUPLICATE_CLIENT_ORDER_ID"
    assert decision.details == {"client_order_id": "O-1"}


async def test_quantity_when_off_the_lot_is_rounded_down_and_approved_as_adjusted() -> None:
    risk = await _risk(instruments=[stubs.instrument()])
    await risk.send(Topic.MD_TICKS, stubs.tick())

    decision = await risk.decide(quantity=D("0.123456"))

    assert decision.approved is True
    assert decision.adjusted_quantity == D("0.12345")
    assert decision.intent.quantity == D("0.123456")


async def test_limit_price_when_off_the_tick_is_rejected() -> None:
    risk = await _risk(instruments=[stubs.instrument()])

    decision = await risk.decide(order_type=OrderType.LIMIT, limit_price=D("49000.005"))

    assert decision.reason == "PRICE_NOT_ON_TICK"
    assert decision.details == {"field": "limit_price", "price": "49000.005", "tick_size": "0.01"}


async def test_order_when_below_the_min_notional_is_rejected() -> None:
    risk = await _risk(instruments=[stubs.instrument()])

    # 0.0001 x 49999.99 = 4.999999 < 5
    decision = await risk.decide(
        order_type=OrderType.LIMIT, quantity=D("0.0001"), limit_price=D("49999.99")
    )

    assert decision.reason == "NOTIONAL_BELOW_MIN"


async def test_instrument_when_unknown_and_not_allowed_is_rejected() -> None:
    risk = await _risk({"default": {"allow_unknown_instruments": False}})

    decision = await risk.decide(instrument_id="ETH-USDT.SIM")

    assert decision.reason == "UNKNOWN_INSTRUMENT"


async def test_target_position_intent_is_sized_from_the_position_and_working_orders() -> None:
    risk = await _risk()
    fill = stubs.execution_report(client_order_id="O-old")  # long 0.1 from trade T-1
    await risk.send(Topic.EXEC_REPORTS, fill)

    to_short = await risk.decide(
        side=None, quantity=None, target_position=D("-0.5"), client_order_id="O-t1"
    )
    # O-t1 now works SELL 0.6; a repeat of the same target needs nothing more.
    again = await risk.decide(
        side=None,
        quantity=None,
        target_position=D("-0.5"),
        client_order_id="O-t2",
        intent_id="I-2",
    )

    assert to_short.approved
    assert (to_short.side, to_short.adjusted_quantity) == (Side.SELL, D("0.6"))
    assert (to_short.order_side, to_short.order_quantity) == (Side.SELL, D("0.6"))
    assert again.reason == "TARGET_POSITION_ALREADY_REACHED"
    assert again.details == {"target_position": "-0.5", "working": "-0.6"}


async def test_account_override_when_configured_applies_only_to_that_account() -> None:
    risk = await _risk(
        {
            "default": {"max_order_quantity": "0.1"},
            "accounts": {"acc-big": {"max_order_quantity": "10"}},
        }
    )

    small = await risk.decide(quantity=D("0.5"))
    big = await risk.decide(
        intent_id="I-2", client_order_id="O-2", account_id="acc-big", quantity=D("0.5")
    )

    assert small.reason == "QUANTITY_EXCEEDS_MAX_PER_ORDER"
    assert big.approved is True


# -- configuration --------------------------------------------------------------------------


def test_settings_when_limits_json_is_valid_parse_into_the_config(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("QM_BUS", "memory")
    monkeypatch.setenv("QM_RISK_LIMITS", json.dumps({"default": {"max_order_notional": "5000"}}))
    monkeypatch.setenv(
        "QM_RISK_INSTRUMENTS", json.dumps([stubs.instrument().model_dump(mode="json")])
    )

    settings = load_settings(RiskSettings)

    assert settings.risk_limits.limits_for("x").max_order_notional == D("5000")
    assert [i.instrument_id for i in settings.risk_instruments] == ["BTC-USDT.SIM"]


@pytest.mark.parametrize(
    ("variable", "value", "phrase"),
    [
        ("QM_RISK_LIMITS", "{not json", "is not valid JSON"),
        ("QM_RISK_LIMITS", '{"default": {"max_order_notional": "-5"}}', "greater than 0"),
        ("QM_RISK_LIMITS", '{"defaults": {}}', "Extra inputs are not permitted"),
        ("QM_RISK_INSTRUMENTS", '[{"instrument_id": "BTC"}]', "QM_RISK_INSTRUMENTS"),
    ],
)
def test_settings_when_limits_invalid_exit_2_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    variable: str,
    value: str,
    phrase: str,
) -> None:
    monkeypatch.setenv("QM_BUS", "memory")
    monkeypatch.setenv(variable, value)

    with pytest.raises(SystemExit) as exited:
        load_settings(RiskSettings)

    err = capsys.readouterr().err
    assert exited.value.code == CONFIG_ERROR_EXIT_CODE
    assert f"configuration error: {variable}" in err
    assert phrase in err


def test_console_script_when_limits_invalid_exits_2_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("QM_BUS", "memory")
    monkeypatch.setenv("QM_RISK_LIMITS", "{oops")
    script = Path(sys.executable).parent / "quantmesh-risk"

    result = subprocess.run([str(script)], capture_output=True, text=True, timeout=60, check=False)

    assert result.returncode == CONFIG_ERROR_EXIT_CODE
    assert "QM_RISK_LIMITS" in result.stderr
    assert "is not valid JSON" in result.stderr
