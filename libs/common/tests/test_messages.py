"""Tests of the event models: exact Decimal round trips, validation rules and helpers."""

from __future__ import annotations

import json
from decimal import ROUND_CEILING, ROUND_FLOOR, Decimal
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from quantmesh_common.envelope import Event, decode, encode
from quantmesh_common.messages import (
    BookLevel,
    CommandType,
    ExecType,
    InstrumentId,
    OrderCommand,
    OrderStatus,
    OrderType,
    PositionSide,
    RiskDecision,
    Side,
    TickKind,
    TimeInForce,
    bar_interval_ns,
    format_reason,
    make_instrument_id,
)
from quantmesh_common.schema_export import platform_models
from quantmesh_common.testing import stubs

SAMPLES = stubs.all_samples()


def _roundtrip(payload: Event) -> Event:
    decoded = decode(encode(stubs.envelope(payload)))
    result: Event = decoded.payload
    return result


def _decimals(value: Any, path: str = "") -> dict[str, str]:
    """Every Decimal inside a dumped model, by path, as its exact string."""
    out: dict[str, str] = {}
    if isinstance(value, Decimal):
        out[path] = str(value)
    elif isinstance(value, dict):
        for k, v in value.items():
            out |= _decimals(v, f"{path}.{k}")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            out |= _decimals(v, f"{path}[{i}]")
    return out


#: Samples carrying Decimals (Alert and ControlCommand carry none).
MONEY_SAMPLES = [s for s in SAMPLES if _decimals(s.model_dump())]


# --- round trips ------------------------------------------------------------------------------


def test_all_samples_when_listed_cover_every_registered_model() -> None:
    # Arrange
    registered = set(platform_models())

    # Act
    sampled = {type(s).SCHEMA_NAME for s in SAMPLES}

    # Assert
    assert sampled == registered


@pytest.mark.parametrize("sample", SAMPLES, ids=lambda s: type(s).__name__)
def test_encode_decode_when_any_model_round_trips_equal(sample: Event) -> None:
    # Act
    decoded = _roundtrip(sample)

    # Assert
    assert type(decoded) is type(sample)
    assert decoded == sample


@pytest.mark.parametrize("sample", MONEY_SAMPLES, ids=lambda s: type(s).__name__)
def test_encode_decode_when_decimals_present_keeps_exact_digits(sample: Event) -> None:
    # Arrange
    before = _decimals(sample.model_dump())

    # Act
    after = _decimals(_roundtrip(sample).model_dump())

    # Assert: "50000.10" stays "50000.10", not 50000.1 or a float
    assert after == before


@pytest.mark.parametrize("sample", MONEY_SAMPLES, ids=lambda s: type(s).__name__)
def test_encode_when_decimal_fields_serialises_them_as_json_strings(sample: Event) -> None:
    # Arrange
    dumped = sample.model_dump()

    # Act
    wire = json.loads(encode(stubs.envelope(sample)))["payload"]

    # Assert
    for path, text in _decimals(dumped).items():
        node: Any = wire
        for part in path.replace("[", ".[").strip(".").split("."):
            node = node[int(part[1:-1])] if part.startswith("[") else node[part]
        assert node == text, path


@settings(max_examples=300, deadline=None)
@given(
    st.decimals(allow_nan=False, allow_infinity=False),
    st.decimals(allow_nan=False, allow_infinity=False, min_value=Decimal("1E-30")),
)
def test_decimal_when_random_value_round_trips_exactly(
    any_value: Decimal, positive: Decimal
) -> None:
    # Arrange
    report = stubs.execution_report(fee=any_value, last_price=positive)

    # Act
    decoded = _roundtrip(report)

    # Assert: same sign, digits and exponent, not merely numerically equal
    assert isinstance(decoded, type(report))
    assert decoded.fee.as_tuple() == any_value.as_tuple()
    assert decoded.last_price is not None
    assert decoded.last_price.as_tuple() == positive.as_tuple()


# --- money inputs -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [("50000.10", "50000.10"), (50000, "50000"), (0.1, "0.1"), (Decimal("1E-8"), "1E-8")],
)
def test_money_when_string_int_or_float_given_becomes_exact_decimal(
    raw: object, expected: str
) -> None:
    # Act
    t = stubs.tick(price=raw)

    # Assert
    assert str(t.price) == expected


@pytest.mark.parametrize("bad", ["NaN", "Infinity", "-Infinity", float("nan"), float("inf"), "abc"])
def test_money_when_not_finite_number_is_refused(bad: object) -> None:
    with pytest.raises(ValidationError):
        stubs.tick(price=bad)


@pytest.mark.parametrize("bad", ["0", "-1", Decimal("-0.01")])
def test_price_when_not_positive_is_refused(bad: object) -> None:
    with pytest.raises(ValidationError, match="greater than 0"):
        stubs.tick(price=bad)


def test_model_when_assigned_is_frozen() -> None:
    # Arrange
    t = stubs.tick()

    # Act / Assert
    with pytest.raises(ValidationError, match="frozen"):
        t.price = Decimal("1")  # type: ignore[misc]


def test_model_when_unknown_field_given_ignores_it() -> None:
    # Arrange
    data = stubs.tick().model_dump() | {"added_later": "x"}

    # Act
    t = type(stubs.tick()).model_validate(data)

    # Assert
    assert not hasattr(t, "added_later")
    assert t == stubs.tick()


# --- instruments ------------------------------------------------------------------------------


def test_instrument_id_when_parsed_gives_parts() -> None:
    # Act
    parts = InstrumentId.parse("BTC-USDT.BINANCE")

    # Assert
    assert parts == InstrumentId("BTC", "USDT", "BINANCE")
    assert str(parts) == "BTC-USDT.BINANCE"
    assert parts.symbol == "BTC/USDT"


@pytest.mark.parametrize("bad", ["BTCUSDT.BINANCE", "btc-usdt.binance", "BTC-USDT", "BTC/USDT.X"])
def test_instrument_id_when_malformed_is_refused(bad: str) -> None:
    with pytest.raises(ValueError, match=r"is not <BASE>-<QUOTE>\.<VENUE>"):
        InstrumentId.parse(bad)


def test_instrument_id_when_built_from_lower_case_symbol_is_upper_case() -> None:
    # Act
    from_symbol = InstrumentId.from_symbol("1000pepe/usdt", "binance")
    made = make_instrument_id("eth", "btc", "kraken")

    # Assert
    assert str(from_symbol) == "1000PEPE-USDT.BINANCE"
    assert made == "ETH-BTC.KRAKEN"


def test_instrument_id_when_symbol_is_a_derivative_is_refused() -> None:
    with pytest.raises(ValueError, match="spot"):
        InstrumentId.from_symbol("BTC/USDT:USDT", "binance")


def test_instrument_when_id_disagrees_with_parts_is_refused() -> None:
    with pytest.raises(ValidationError, match=r"should be 'ETH-USDT\.SIM'"):
        stubs.instrument(base="ETH")


def test_instrument_when_min_above_max_quantity_is_refused() -> None:
    with pytest.raises(ValidationError, match="min_quantity exceeds max_quantity"):
        stubs.instrument(min_quantity="10", max_quantity="1")


def test_instrument_precision_when_derived_follows_tick_and_lot() -> None:
    # Arrange
    inst = stubs.instrument(tick_size="0.50", lot_size="10")

    # Assert
    assert inst.price_precision == 1
    assert inst.size_precision == 0
    assert stubs.instrument().price_precision == 2
    assert stubs.instrument().size_precision == 5


@pytest.mark.parametrize(
    ("price", "mode", "expected"),
    [
        ("50000.126", None, "50000.13"),
        ("50000.125", None, "50000.12"),  # half-even
        ("50000.129", ROUND_FLOOR, "50000.12"),
        ("50000.121", ROUND_CEILING, "50000.13"),
        ("50000", None, "50000.00"),
    ],
)
def test_round_price_when_off_tick_lands_on_tick(
    price: str, mode: str | None, expected: str
) -> None:
    # Arrange
    inst = stubs.instrument()

    # Act
    rounded = (
        inst.round_price(Decimal(price)) if mode is None else inst.round_price(Decimal(price), mode)
    )

    # Assert
    assert str(rounded) == expected
    assert inst.check_price(rounded) is None


def test_round_price_when_tick_is_coarse_rounds_to_multiples() -> None:
    # Arrange
    inst = stubs.instrument(tick_size="5")

    # Act / Assert
    assert str(inst.round_price(Decimal("12"))) == "10"
    assert str(inst.round_price(Decimal("13"))) == "15"


def test_round_quantity_when_off_lot_rounds_down() -> None:
    # Arrange
    inst = stubs.instrument()

    # Act
    rounded = inst.round_quantity(Decimal("0.123456789"))

    # Assert
    assert str(rounded) == "0.12345"


def test_check_price_when_off_tick_names_reason_and_values() -> None:
    # Act
    reason = stubs.instrument().check_price(Decimal("50000.005"))

    # Assert
    assert reason == "PRICE_NOT_ON_TICK: price=50000.005, tick_size=0.01"


def test_check_price_when_negative_is_not_positive() -> None:
    assert stubs.instrument().check_price(Decimal("-1")) == "PRICE_NOT_POSITIVE: price=-1"


@pytest.mark.parametrize(
    ("qty", "price", "reason"),
    [
        ("0", None, "QUANTITY_NOT_POSITIVE: quantity=0"),
        ("0.000015", None, "QUANTITY_NOT_ON_LOT: quantity=0.000015, lot_size=0.00001"),
        ("1001", None, "QUANTITY_ABOVE_MAX: quantity=1001, max_quantity=1000"),
        ("0.00001", "50000", "NOTIONAL_BELOW_MIN: notional=0.50000, min_notional=5"),
        ("0.1", "50000", None),
    ],
)
def test_check_quantity_when_checked_gives_reason_or_none(
    qty: str, price: str | None, reason: str | None
) -> None:
    # Arrange
    inst = stubs.instrument()

    # Act
    got = inst.check_quantity(Decimal(qty), Decimal(price) if price else None)

    # Assert
    assert got == reason


def test_check_quantity_when_below_min_quantity_names_minimum() -> None:
    # Arrange
    inst = stubs.instrument(min_quantity="0.001")

    # Act / Assert
    assert inst.check_quantity(Decimal("0.0001")) == (
        "QUANTITY_BELOW_MIN: quantity=0.0001, min_quantity=0.001"
    )


# --- market data ------------------------------------------------------------------------------


def test_tick_when_venue_differs_from_instrument_is_refused() -> None:
    with pytest.raises(ValidationError, match="differs from the venue"):
        stubs.tick(venue="BINANCE")


def test_tick_when_trade_has_no_size_is_refused() -> None:
    with pytest.raises(ValidationError, match="needs size > 0"):
        stubs.tick(size="0")


def test_tick_when_quote_lacks_ask_is_refused() -> None:
    with pytest.raises(ValidationError, match="needs bid and ask"):
        stubs.quote_tick(ask=None)


def test_tick_when_quote_is_crossed_is_refused() -> None:
    with pytest.raises(ValidationError, match="crossed quote"):
        stubs.quote_tick(bid="50001", ask="50000")


def test_tick_when_quote_has_no_size_is_accepted() -> None:
    # Act
    q = stubs.quote_tick()

    # Assert
    assert q.kind is TickKind.QUOTE
    assert q.size == 0


def test_tick_when_instrument_id_malformed_is_refused() -> None:
    with pytest.raises(ValidationError, match="instrument_id"):
        stubs.tick(instrument_id="BTCUSDT")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"high": "49999"}, "high .* is below"),
        ({"low": "50060"}, "low .* is above"),
        ({"ts_close": stubs.TS}, "ts_close must be after ts_open"),
        ({"interval": "0m"}, "interval"),
        ({"interval": "1y"}, "interval"),
        ({"volume": "-1"}, "greater than or equal to 0"),
    ],
)
def test_bar_when_inconsistent_is_refused(overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        stubs.bar(**overrides)


@pytest.mark.parametrize(
    ("interval", "ns"),
    [
        ("1s", 10**9),
        ("1m", 60 * 10**9),
        ("5m", 300 * 10**9),
        ("1h", 3600 * 10**9),
        ("1d", 86400 * 10**9),
        ("1w", 7 * 86400 * 10**9),
    ],
)
def test_bar_interval_ns_when_valid_gives_nanoseconds(interval: str, ns: int) -> None:
    assert bar_interval_ns(interval) == ns


def test_bar_interval_ns_when_bar_built_matches_interval() -> None:
    assert stubs.bar().interval_ns == 60 * 10**9


def test_bar_interval_ns_when_malformed_raises() -> None:
    with pytest.raises(ValueError, match="is not <count>"):
        bar_interval_ns("m1")


def test_book_when_helpers_used_give_top_of_book() -> None:
    # Act
    book = stubs.book_snapshot()

    # Assert
    assert book.best_bid == Decimal("50000.00")
    assert book.best_ask == Decimal("50000.20")
    assert book.mid == Decimal("50000.10")


def test_book_when_side_empty_has_no_mid() -> None:
    assert stubs.book_snapshot(asks=[]).mid is None


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            {
                "bids": [
                    BookLevel(price=Decimal(1), size=Decimal(1)),
                    BookLevel(price=Decimal(2), size=Decimal(1)),
                ]
            },
            "bids must be strictly descending",
        ),
        (
            {
                "asks": [
                    BookLevel(price=Decimal(50002), size=Decimal(1)),
                    BookLevel(price=Decimal(50001), size=Decimal(1)),
                ]
            },
            "asks must be strictly ascending",
        ),
        (
            {"asks": [BookLevel(price=Decimal("49999"), size=Decimal(1))]},
            "crossed book",
        ),
        ({"depth": 1}, "more levels than depth"),
    ],
)
def test_book_when_malformed_is_refused(overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        stubs.book_snapshot(**overrides)


def test_book_level_when_size_zero_is_refused() -> None:
    with pytest.raises(ValidationError):
        BookLevel(price=Decimal(1), size=Decimal(0))


# --- signals, intents, risk --------------------------------------------------------------------


def test_signal_when_target_sign_disagrees_with_direction_is_refused() -> None:
    with pytest.raises(ValidationError, match="direction is LONG"):
        stubs.signal(target_position="-1")


def test_signal_when_strength_above_one_is_refused() -> None:
    with pytest.raises(ValidationError, match="less than or equal to 1"):
        stubs.signal(strength="1.5")


def test_order_intent_when_target_position_given_derives_side_later() -> None:
    # Act
    intent = stubs.order_intent(quantity=None, side=None, target_position="-0.5")

    # Assert
    assert intent.is_target
    assert intent.side is None


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"target_position": "1"}, "exactly one of quantity and target_position"),
        ({"quantity": None}, "exactly one of quantity and target_position"),
        ({"side": None}, "needs a side"),
        ({"quantity": None, "target_position": "1"}, "takes no side"),
        ({"quantity": "0"}, "greater than 0"),
        ({"order_type": OrderType.LIMIT}, "needs limit_price"),
        ({"limit_price": "100"}, "MARKET order takes no limit_price"),
        ({"order_type": OrderType.STOP}, "needs stop_price"),
        ({"order_type": OrderType.STOP, "stop_price": "1", "limit_price": "1"}, "no limit_price"),
        ({"order_type": OrderType.STOP_LIMIT, "limit_price": "1"}, "needs stop_price"),
        ({"order_type": OrderType.STOP_LIMIT, "stop_price": "1"}, "needs limit_price"),
        ({"time_in_force": TimeInForce.GTD}, "GTD order needs expire_time_ns"),
        ({"expire_time_ns": stubs.TS}, "only for GTD"),
        ({"side": "HOLD"}, "side"),
    ],
)
def test_order_intent_when_terms_inconsistent_is_refused(
    overrides: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValidationError, match=message):
        stubs.order_intent(**overrides)


def test_order_intent_when_stop_limit_complete_is_accepted() -> None:
    # Act
    intent = stubs.order_intent(
        order_type=OrderType.STOP_LIMIT,
        stop_price="51000",
        limit_price="51100",
        time_in_force=TimeInForce.GTD,
        expire_time_ns=stubs.TS + 10**12,
    )

    # Assert
    assert intent.order_type is OrderType.STOP_LIMIT
    assert intent.expire_time_ns == stubs.TS + 10**12


def test_risk_decision_when_rejected_gives_reason_text() -> None:
    # Act
    decision = stubs.risk_rejection()

    # Assert
    assert decision.instrument_id == stubs.INSTRUMENT_ID
    assert decision.reason_text == (
        "NOTIONAL_EXCEEDS_MAX_PER_ORDER: max_notional=1000, notional=5000.01"
    )


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"approved": False}, "a rejection needs a reason"),
        ({"approved": False, "reason": "X", "adjusted_quantity": "1"}, "no adjusted_quantity"),
        ({"approved": False, "reason": "too big"}, "reason"),
        ({"account_id": "other"}, "account_id differs"),
    ],
)
def test_risk_decision_when_inconsistent_is_refused(
    overrides: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValidationError, match=message):
        stubs.risk_decision(**overrides)


def test_risk_decision_when_approved_has_no_reason_text() -> None:
    # Act
    decision = stubs.risk_decision()

    # Assert
    assert isinstance(decision, RiskDecision)
    assert decision.approved
    assert decision.reason_text == ""


def test_format_reason_when_no_details_is_just_the_code() -> None:
    assert format_reason("KILL_SWITCH_ACTIVE") == "KILL_SWITCH_ACTIVE"
    assert format_reason("A", {"x": "1", "y": "2"}) == "A: x=1, y=2"


# --- orders and execution ----------------------------------------------------------------------


def test_order_when_partly_filled_has_leaves() -> None:
    # Act
    o = stubs.order(
        status=OrderStatus.PARTIALLY_FILLED, filled_quantity="0.04", avg_fill_price="49000"
    )

    # Assert
    assert o.leaves_quantity == Decimal("0.06")
    assert o.venue == "SIM"


def test_order_when_terminal_has_no_leaves() -> None:
    assert stubs.order(status=OrderStatus.CANCELED).leaves_quantity == 0


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"filled_quantity": "0.2", "avg_fill_price": "1"}, "exceeds"),
        ({"filled_quantity": "0.05"}, "needs avg_fill_price"),
        ({"ts_last": stubs.TS - 1}, "ts_last is before ts_init"),
        ({"limit_price": None}, "needs limit_price"),
    ],
)
def test_order_when_inconsistent_is_refused(overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        stubs.order(**overrides)


@pytest.mark.parametrize(
    ("status", "terminal", "open_"),
    [
        (OrderStatus.INITIALIZED, False, False),
        (OrderStatus.SUBMITTED, False, True),
        (OrderStatus.PARTIALLY_FILLED, False, True),
        (OrderStatus.CANCEL_PENDING, False, True),
        (OrderStatus.FILLED, True, False),
        (OrderStatus.DENIED, True, False),
        (OrderStatus.EXPIRED, True, False),
    ],
)
def test_order_status_when_classified_is_terminal_or_open(
    status: OrderStatus, terminal: bool, open_: bool
) -> None:
    assert status.is_terminal is terminal
    assert status.is_open is open_


def test_order_command_when_built_from_order_carries_its_terms() -> None:
    # Arrange
    o = stubs.order()

    # Act
    submit = OrderCommand.for_submit(o, command_id="C-9", ts_event=stubs.TS)
    cancel = OrderCommand.for_cancel(o, command_id="C-10", ts_event=stubs.TS)

    # Assert
    assert submit.command_type is CommandType.SUBMIT
    assert (submit.side, submit.quantity, submit.limit_price) == (o.side, o.quantity, o.limit_price)
    assert submit.venue == "SIM"
    assert cancel.command_type is CommandType.CANCEL
    assert cancel.venue_order_id == stubs.VENUE_ORDER_ID


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"side": None}, "SUBMIT needs side"),
        ({"time_in_force": None}, "SUBMIT needs time_in_force"),
        ({"limit_price": None}, "needs limit_price"),
        ({"command_type": CommandType.REPLACE}, "REPLACE needs"),
        ({"venue": "BINANCE"}, "differs from the venue"),
    ],
)
def test_order_command_when_incomplete_is_refused(overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        stubs.order_command(**overrides)


def test_order_command_when_replace_has_new_price_is_accepted() -> None:
    # Act
    cmd = stubs.order_command(command_type=CommandType.REPLACE, new_limit_price="48000")

    # Assert
    assert cmd.new_limit_price == Decimal("48000")


def test_execution_report_when_fill_gives_notional() -> None:
    # Act
    report = stubs.execution_report()

    # Assert
    assert report.is_fill
    assert report.last_notional == Decimal("4900.000")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"trade_id": None}, "needs last_qty > 0, last_price, trade_id"),
        ({"last_price": None}, "needs last_qty > 0, last_price, trade_id"),
        ({"last_qty": "0"}, "needs last_qty > 0, last_price, trade_id"),
        ({"cum_qty": "0.05"}, "cum_qty .* is below last_qty"),
        ({"exec_type": ExecType.CANCELED}, "has no last_qty"),
        ({"fee": "NaN"}, "finite"),
    ],
)
def test_execution_report_when_inconsistent_is_refused(
    overrides: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValidationError, match=message):
        stubs.execution_report(**overrides)


def test_execution_report_when_ack_is_not_a_fill() -> None:
    # Act
    ack = stubs.order_accepted()

    # Assert
    assert not ack.is_fill
    assert ack.last_notional == 0


# --- portfolio and operations ------------------------------------------------------------------


def test_position_when_side_disagrees_with_quantity_is_refused() -> None:
    with pytest.raises(ValidationError, match="disagrees with quantity"):
        stubs.position(quantity="-0.1")


def test_position_when_short_has_negative_quantity_and_positive_notional() -> None:
    # Act
    p = stubs.position(side=PositionSide.SHORT, quantity="-0.2")

    # Assert
    assert p.notional == Decimal("10000.0000")


@pytest.mark.parametrize(("qty", "side"), [("1", "LONG"), ("-1", "SHORT"), ("0", "FLAT")])
def test_position_side_of_when_signed_quantity_gives_side(qty: str, side: str) -> None:
    assert PositionSide.of(Decimal(qty)) == side


def test_portfolio_snapshot_when_position_of_other_account_is_refused() -> None:
    with pytest.raises(ValidationError, match="another account"):
        stubs.portfolio_snapshot(positions=[stubs.position(account_id="acc-2")])


def test_portfolio_snapshot_when_drawdown_above_one_is_refused() -> None:
    with pytest.raises(ValidationError, match="less than or equal to 1"):
        stubs.portfolio_snapshot(drawdown="1.5")


def test_alert_when_code_not_upper_snake_is_refused() -> None:
    with pytest.raises(ValidationError, match="code"):
        stubs.alert(code="order rejected")


def test_control_command_when_targeted_applies_only_to_target() -> None:
    # Arrange
    everyone = stubs.control_command()
    one = stubs.control_command(target="strat-1")

    # Assert
    assert everyone.applies_to("strat-9")
    assert one.applies_to("acc-1", "strat-1")
    assert not one.applies_to("strat-2")


def test_control_command_when_action_unknown_is_refused() -> None:
    with pytest.raises(ValidationError, match="action"):
        stubs.control_command(action="SELF_DESTRUCT")


def test_side_when_used_gives_sign_and_opposite() -> None:
    assert (Side.BUY.sign, Side.SELL.sign) == (1, -1)
    assert Side.BUY.opposite is Side.SELL
    assert ExecType.PARTIAL_FILL.is_fill
    assert not ExecType.REPLACED.is_fill
