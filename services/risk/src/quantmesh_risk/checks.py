"""Pure pre-trade checks: each returns None (pass) or a denial with its reason and values."""

from __future__ import annotations

from dataclasses import dataclass, field
from decimal import ROUND_DOWN, ROUND_HALF_EVEN, Decimal

from quantmesh_common.messages import Instrument, Side, format_reason

_BPS = Decimal(10_000)
_DEVIATION_PLACES = Decimal("0.0001")


@dataclass(frozen=True, slots=True)
class RiskDenial:
    """Why an intent is denied: an UPPER_SNAKE reason and the values behind it, as strings."""

    reason: str
    details: dict[str, str] = field(default_factory=dict)

    @property
    def text(self) -> str:
        """Return `REASON: key=value, ...`."""
        return format_reason(self.reason, self.details)


def fmt(value: Decimal) -> str:
    """Return `value` in plain notation ("0.00001", not "1E-5")."""
    return format(value, "f")


# -- halts ----------------------------------------------------------------------------------


def check_kill_switch(engaged_by: str | None) -> RiskDenial | None:
    """Deny everything while a kill switch covers the intent (`engaged_by` is its target)."""
    if engaged_by is None:
        return None
    return RiskDenial("KILL_SWITCH_ENGAGED", {"target": engaged_by})


def check_circuit_breaker(
    account_id: str, tripped_because: str | None, values: dict[str, str] | None = None
) -> RiskDenial | None:
    """Deny the account's intents while its circuit breaker is tripped, with the trip's values."""
    if tripped_because is None:
        return None
    return RiskDenial(
        "CIRCUIT_BREAKER_TRIPPED",
        {"account_id": account_id, "cause": tripped_because, **(values or {})},
    )


# -- instrument rules ----------------------------------------------------------------------


def check_price_on_tick(price: Decimal, instrument: Instrument, field: str) -> RiskDenial | None:
    """Deny a limit or stop price (named by `field`) that is not a multiple of the tick size."""
    if price % instrument.tick_size == 0:
        return None
    return RiskDenial(
        "PRICE_NOT_ON_TICK",
        {"field": field, "price": fmt(price), "tick_size": fmt(instrument.tick_size)},
    )


def round_to_lot(quantity: Decimal, instrument: Instrument) -> Decimal:
    """Return `quantity` rounded down (toward zero) to a whole number of lots."""
    lots = (quantity / instrument.lot_size).to_integral_value(rounding=ROUND_DOWN)
    return lots * instrument.lot_size


def check_quantity_rules(
    quantity: Decimal, requested: Decimal, instrument: Instrument
) -> RiskDenial | None:
    """Deny a lot-rounded `quantity` that is zero, below the minimum or above the maximum."""
    if quantity <= 0:
        return RiskDenial(
            "QUANTITY_BELOW_LOT",
            {"quantity": fmt(requested), "lot_size": fmt(instrument.lot_size)},
        )
    if instrument.min_quantity is not None and quantity < instrument.min_quantity:
        return RiskDenial(
            "QUANTITY_BELOW_MIN",
            {"quantity": fmt(quantity), "min_quantity": fmt(instrument.min_quantity)},
        )
    if instrument.max_quantity is not None and quantity > instrument.max_quantity:
        return RiskDenial(
            "QUANTITY_ABOVE_MAX",
            {"quantity": fmt(quantity), "max_quantity": fmt(instrument.max_quantity)},
        )
    return None


def check_min_notional(notional: Decimal, instrument: Instrument) -> RiskDenial | None:
    """Deny an order worth less than the instrument's minimum notional."""
    if notional >= instrument.min_notional:
        return None
    return RiskDenial(
        "NOTIONAL_BELOW_MIN",
        {"notional": fmt(notional), "min_notional": fmt(instrument.min_notional)},
    )


# -- limits ---------------------------------------------------------------------------------


def check_max_order_quantity(quantity: Decimal, maximum: Decimal | None) -> RiskDenial | None:
    """Deny an order larger than `maximum` base units; at the limit passes."""
    if maximum is None or quantity <= maximum:
        return None
    return RiskDenial(
        "QUANTITY_EXCEEDS_MAX_PER_ORDER", {"max_quantity": fmt(maximum), "quantity": fmt(quantity)}
    )


def check_max_order_notional(notional: Decimal, maximum: Decimal | None) -> RiskDenial | None:
    """Deny an order worth more than `maximum` in the quote currency; at the limit passes."""
    if maximum is None or notional <= maximum:
        return None
    return RiskDenial(
        "NOTIONAL_EXCEEDS_MAX_PER_ORDER", {"max_notional": fmt(maximum), "notional": fmt(notional)}
    )


def check_max_position(
    position: Decimal,
    open_same_side: Decimal,
    side: Side,
    quantity: Decimal,
    maximum: Decimal | None,
) -> RiskDenial | None:
    """Deny an order that takes the absolute position beyond `maximum`.

    The projection is the worst case: the position, plus every working order on the same side
    filling, plus this one. An order that brings the position closer to flat always passes.
    """
    if maximum is None:
        return None
    sign = side.sign
    before = position + sign * open_same_side
    projected = before + sign * quantity
    if abs(projected) <= maximum or abs(projected) <= abs(before):
        return None
    return RiskDenial(
        "POSITION_EXCEEDS_MAX",
        {
            "max_position": fmt(maximum),
            "position": fmt(position),
            "open_quantity": fmt(open_same_side),
            "quantity": fmt(quantity),
            "projected_position": fmt(projected),
        },
    )


def check_max_open_orders(open_orders: int, maximum: int | None) -> RiskDenial | None:
    """Deny a new order when the account already has `maximum` working orders."""
    if maximum is None or open_orders < maximum:
        return None
    return RiskDenial(
        "OPEN_ORDERS_EXCEED_MAX", {"max_open_orders": str(maximum), "open_orders": str(open_orders)}
    )


def check_price_collar(
    price: Decimal, last_price: Decimal, max_bps: Decimal | None, field: str
) -> RiskDenial | None:
    """Deny a price more than `max_bps` basis points away from the last price (fat finger).

    At exactly `max_bps` it passes. Compared without division, so the boundary is exact.
    """
    if max_bps is None:
        return None
    distance = abs(price - last_price)
    if distance * _BPS <= max_bps * last_price:
        return None
    deviation = (distance * _BPS / last_price).quantize(_DEVIATION_PLACES, rounding=ROUND_HALF_EVEN)
    return RiskDenial(
        "PRICE_OUTSIDE_COLLAR",
        {
            "field": field,
            "price": fmt(price),
            "last_price": fmt(last_price),
            "deviation_bps": fmt(deviation),
            "max_deviation_bps": fmt(max_bps),
        },
    )


def check_reference_price(
    reference: Decimal | None, instrument_id: str, needed_for: str
) -> RiskDenial | None:
    """Deny when a check needs a price (the last trade) and none has been seen."""
    if reference is not None:
        return None
    return RiskDenial(
        "NO_REFERENCE_PRICE", {"instrument_id": instrument_id, "needed_for": needed_for}
    )


# -- portfolio limits ------------------------------------------------------------------------


def check_exposure(
    name: str, before: Decimal, after: Decimal, maximum: Decimal | None
) -> RiskDenial | None:
    """Deny an order taking the `name` exposure (gross or net) beyond `maximum`.

    At the limit passes; an order that does not raise the exposure always passes.
    """
    if maximum is None or after <= maximum or after <= before:
        return None
    return RiskDenial(
        f"{name.upper()}_EXPOSURE_EXCEEDS_MAX",
        {
            f"max_{name}_exposure": fmt(maximum),
            f"{name}_exposure": fmt(after),
            f"{name}_exposure_before": fmt(before),
        },
    )


def check_order_rate(
    strategy_id: str, recent: int, maximum: int | None, window_s: float
) -> RiskDenial | None:
    """Deny a strategy's order when it already had `maximum` approved in the window."""
    if maximum is None or recent < maximum:
        return None
    return RiskDenial(
        "ORDER_RATE_EXCEEDS_MAX",
        {
            "strategy_id": strategy_id,
            "max_orders": str(maximum),
            "window_s": format(window_s, "g"),
            "orders": str(recent),
        },
    )


_VAR_PLACES = Decimal("0.01")


def check_var(
    var: float | None,
    var_before: float | None,
    observations: int,
    maximum: Decimal | None,
    *,
    method: str,
    confidence: float,
    min_observations: int,
    reduces: bool,
) -> RiskDenial | None:
    """Deny an order whose post-trade VaR exceeds `maximum`.

    At the limit passes, and so does an order that lowers the VaR (or, with too little history
    to tell, an order that `reduces` the position). Too little history otherwise denies.
    """
    if maximum is None:
        return None
    if observations < min_observations or var is None:
        if reduces:
            return None
        return RiskDenial(
            "VAR_INSUFFICIENT_HISTORY",
            {"observations": str(observations), "required": str(min_observations)},
        )
    exact = Decimal(repr(var))
    if exact <= maximum or (var_before is not None and var <= var_before):
        return None
    return RiskDenial(
        "VAR_EXCEEDS_MAX",
        {
            "method": method,
            "confidence": format(confidence, "g"),
            "max_var": fmt(maximum),
            "var": fmt(exact.quantize(_VAR_PLACES, rounding=ROUND_HALF_EVEN)),
            "observations": str(observations),
        },
    )
