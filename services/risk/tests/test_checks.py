"""Pre-trade checks at their boundaries: at a limit passes, one tick or lot over is denied."""

from __future__ import annotations

from decimal import Decimal

import pytest
from pydantic import ValidationError

from quantmesh_common.messages import Side
from quantmesh_common.testing import stubs
from quantmesh_risk.checks import (
    RiskDenial,
    check_circuit_breaker,
    check_kill_switch,
    check_max_open_orders,
    check_max_order_notional,
    check_max_order_quantity,
    check_max_position,
    check_min_notional,
    check_price_collar,
    check_price_on_tick,
    check_quantity_rules,
    check_reference_price,
    round_to_lot,
)
from quantmesh_risk.limits import EffectiveLimits, InstrumentLimits, RiskConfig, RiskLimits

D = Decimal
# BTC-USDT.SIM: tick 0.01, lot 0.00001, min notional 5, quantity 0.00001..1000.
BTC = stubs.instrument()


# -- halts ----------------------------------------------------------------------------------


def test_kill_switch_when_engaged_denies_naming_its_target() -> None:
    assert check_kill_switch(None) is None
    assert check_kill_switch("*") == RiskDenial("KILL_SWITCH_ENGAGED", {"target": "*"})


def test_circuit_breaker_when_tripped_denies_with_the_cause() -> None:
    assert check_circuit_breaker("acc-1", None) is None
    assert check_circuit_breaker("acc-1", "DAILY_LOSS") == RiskDenial(
        "CIRCUIT_BREAKER_TRIPPED", {"account_id": "acc-1", "cause": "DAILY_LOSS"}
    )


# -- instrument rules ----------------------------------------------------------------------


def test_price_on_tick_when_on_the_grid_passes_and_half_a_tick_off_is_denied() -> None:
    assert check_price_on_tick(D("50000.01"), BTC, "limit_price") is None

    denial = check_price_on_tick(D("50000.015"), BTC, "limit_price")

    assert denial == RiskDenial(
        "PRICE_NOT_ON_TICK",
        {"field": "limit_price", "price": "50000.015", "tick_size": "0.01"},
    )


@pytest.mark.parametrize(
    ("requested", "rounded"),
    [
        (D("0.12345"), D("0.12345")),
        (D("0.123456"), D("0.12345")),
        (D("0.123459999"), D("0.12345")),
        (D("2"), D("2")),
        (D("0.000009"), D("0")),
    ],
)
def test_round_to_lot_when_off_the_lot_grid_rounds_down(
    requested: Decimal, rounded: Decimal
) -> None:
    assert round_to_lot(requested, BTC) == rounded


def test_quantity_rules_when_rounded_to_zero_deny_below_lot() -> None:
    denial = check_quantity_rules(D("0"), D("0.000009"), BTC)

    assert denial == RiskDenial(
        "QUANTITY_BELOW_LOT", {"quantity": "0.000009", "lot_size": "0.00001"}
    )


def test_quantity_rules_when_at_the_minimum_pass_and_one_lot_below_is_denied() -> None:
    instrument = stubs.instrument(min_quantity=D("0.001"))

    assert check_quantity_rules(D("0.001"), D("0.001"), instrument) is None
    assert check_quantity_rules(D("0.00099"), D("0.00099"), instrument) == RiskDenial(
        "QUANTITY_BELOW_MIN", {"quantity": "0.00099", "min_quantity": "0.001"}
    )


def test_quantity_rules_when_at_the_maximum_pass_and_one_lot_over_is_denied() -> None:
    assert check_quantity_rules(D("1000"), D("1000"), BTC) is None
    assert check_quantity_rules(D("1000.00001"), D("1000.00001"), BTC) == RiskDenial(
        "QUANTITY_ABOVE_MAX", {"quantity": "1000.00001", "max_quantity": "1000"}
    )


def test_min_notional_when_exactly_at_minimum_passes_and_a_tick_below_is_denied() -> None:
    # 0.0001 x 50000.00 = 5.000000 (the minimum); 0.0001 x 49999.99 = 4.999999.
    assert check_min_notional(D("0.0001") * D("50000.00"), BTC) is None
    assert check_min_notional(D("0.0001") * D("49999.99"), BTC) == RiskDenial(
        "NOTIONAL_BELOW_MIN", {"notional": "4.999999", "min_notional": "5"}
    )


# -- limits ---------------------------------------------------------------------------------


def test_max_order_quantity_when_at_limit_passes_and_one_lot_over_is_denied() -> None:
    assert check_max_order_quantity(D("2"), D("2")) is None
    assert check_max_order_quantity(D("2.00001"), D("2")) == RiskDenial(
        "QUANTITY_EXCEEDS_MAX_PER_ORDER", {"max_quantity": "2", "quantity": "2.00001"}
    )
    assert check_max_order_quantity(D("1e6"), None) is None


def test_max_order_notional_when_at_limit_passes_and_one_tick_over_is_denied() -> None:
    # 0.2 x 50000.00 = 10000.000; 0.2 x 50000.01 = 10000.002.
    assert check_max_order_notional(D("0.2") * D("50000.00"), D("10000")) is None
    assert check_max_order_notional(D("0.2") * D("50000.01"), D("10000")) == RiskDenial(
        "NOTIONAL_EXCEEDS_MAX_PER_ORDER", {"max_notional": "10000", "notional": "10000.002"}
    )


def test_max_position_when_projection_reaches_the_limit_passes() -> None:
    # 0.5 held + 0.3 working buys + 0.2 = 1.0, the limit.
    assert check_max_position(D("0.5"), D("0.3"), Side.BUY, D("0.2"), D("1")) is None


def test_max_position_when_projection_is_one_lot_over_is_denied_with_the_projection() -> None:
    denial = check_max_position(D("0.5"), D("0.3"), Side.BUY, D("0.20001"), D("1"))

    assert denial == RiskDenial(
        "POSITION_EXCEEDS_MAX",
        {
            "max_position": "1",
            "position": "0.5",
            "open_quantity": "0.3",
            "quantity": "0.20001",
            "projected_position": "1.00001",
        },
    )


def test_max_position_when_short_side_breaches_is_denied() -> None:
    # -0.8 held - 0.2 = -1.0 passes; - 0.20001 = -1.00001 is over.
    assert check_max_position(D("-0.8"), D(0), Side.SELL, D("0.2"), D("1")) is None
    denial = check_max_position(D("-0.8"), D(0), Side.SELL, D("0.20001"), D("1"))
    assert denial is not None
    assert denial.details["projected_position"] == "-1.00001"


def test_max_position_when_order_reduces_an_oversized_position_passes() -> None:
    # Long 2 with a limit of 1: selling 0.5 leaves 1.5, still over the limit but smaller.
    assert check_max_position(D("2"), D(0), Side.SELL, D("0.5"), D("1")) is None


def test_max_position_when_order_flips_to_a_larger_opposite_position_is_denied() -> None:
    # Long 2, sell 4.5: short 2.5, further from flat than before and over the limit of 1.
    denial = check_max_position(D("2"), D(0), Side.SELL, D("4.5"), D("1"))

    assert denial is not None
    assert denial.details["projected_position"] == "-2.5"


def test_max_open_orders_when_one_below_limit_passes_and_at_limit_is_denied() -> None:
    assert check_max_open_orders(2, 3) is None
    assert check_max_open_orders(3, 3) == RiskDenial(
        "OPEN_ORDERS_EXCEED_MAX", {"max_open_orders": "3", "open_orders": "3"}
    )
    assert check_max_open_orders(0, 0) is not None


@pytest.mark.parametrize("price", [D("50500.00"), D("49500.00"), D("50000.00")])
def test_price_collar_when_within_or_exactly_at_the_band_passes(price: Decimal) -> None:
    # 100 bp of 50000 = 500: the band is [49500, 50500], inclusive.
    assert check_price_collar(price, D("50000"), D("100"), "limit_price") is None


def test_price_collar_when_one_tick_above_the_band_is_denied_with_the_deviation() -> None:
    denial = check_price_collar(D("50500.01"), D("50000"), D("100"), "limit_price")

    # 500.01 / 50000 x 10000 = 100.002 bp
    assert denial == RiskDenial(
        "PRICE_OUTSIDE_COLLAR",
        {
            "field": "limit_price",
            "price": "50500.01",
            "last_price": "50000",
            "deviation_bps": "100.0020",
            "max_deviation_bps": "100",
        },
    )


def test_price_collar_when_one_tick_below_the_band_is_denied() -> None:
    denial = check_price_collar(D("49499.99"), D("50000"), D("100"), "stop_price")

    assert denial is not None
    assert denial.reason == "PRICE_OUTSIDE_COLLAR"
    assert denial.details["field"] == "stop_price"


def test_price_collar_when_fat_finger_extra_zero_is_denied() -> None:
    denial = check_price_collar(D("500000"), D("50000"), D("500"), "limit_price")

    assert denial is not None
    assert denial.details["deviation_bps"] == "90000.0000"


def test_reference_price_when_none_seen_denies_naming_what_needed_it() -> None:
    assert check_reference_price(D("1"), "BTC-USDT.SIM", "notional") is None
    assert check_reference_price(None, "BTC-USDT.SIM", "notional") == RiskDenial(
        "NO_REFERENCE_PRICE", {"instrument_id": "BTC-USDT.SIM", "needed_for": "notional"}
    )


def test_denial_text_when_formatted_carries_reason_and_values() -> None:
    denial = RiskDenial(
        "NOTIONAL_EXCEEDS_MAX_PER_ORDER", {"max_notional": "10000", "notional": "12500"}
    )

    assert denial.text == "NOTIONAL_EXCEEDS_MAX_PER_ORDER: max_notional=10000, notional=12500"


# -- limits configuration -------------------------------------------------------------------


def test_limits_when_instrument_overrides_some_fields_keeps_the_account_values_for_others() -> None:
    limits = RiskLimits(
        max_order_quantity=D("2"),
        max_order_notional=D("10000"),
        max_open_orders=5,
        instruments={"BTC-USDT.SIM": InstrumentLimits(max_order_notional=D("50000"))},
    )

    btc = limits.for_instrument("BTC-USDT.SIM")
    eth = limits.for_instrument("ETH-USDT.SIM")

    assert btc == EffectiveLimits(
        max_order_quantity=D("2"), max_order_notional=D("50000"), max_open_orders=5
    )
    assert eth.max_order_notional == D("10000")


def test_config_when_account_sets_some_fields_inherits_the_rest_from_default() -> None:
    config = RiskConfig.model_validate(
        {
            "default": {
                "max_order_notional": "10000",
                "price_collar_bps": "500",
                "instruments": {"BTC-USDT.SIM": {"max_position": "1"}},
            },
            "accounts": {
                "acc-big": {
                    "max_order_notional": "1000000",
                    "instruments": {"ETH-USDT.SIM": {"max_position": "100"}},
                }
            },
        }
    )

    big = config.limits_for("acc-big")
    other = config.limits_for("acc-other")

    assert big.max_order_notional == D("1000000")
    assert big.price_collar_bps == D("500")
    assert big.for_instrument("BTC-USDT.SIM").max_position == D("1")
    assert big.for_instrument("ETH-USDT.SIM").max_position == D("100")
    assert other.max_order_notional == D("10000")
    assert other.for_instrument("ETH-USDT.SIM").max_position is None


@pytest.mark.parametrize(
    "bad",
    [
        {"default": {"max_order_notional": "-1"}},
        {"default": {"max_order_notional": "0"}},
        {"default": {"max_notional": "10"}},  # a typo must not silently mean "no limit"
        {"accounts": {"acc 1": {}}},
        {"default": {"instruments": {"btc": {}}}},
    ],
)
def test_config_when_invalid_is_refused(bad: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        RiskConfig.model_validate(bad)
