"""Every event on the bus: pydantic models with exact Decimal money and UTC ns times."""

from __future__ import annotations

import re
from decimal import ROUND_DOWN, ROUND_HALF_EVEN, Decimal
from enum import StrEnum
from typing import Annotated, Literal, NamedTuple, Self

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    JsonValue,
    StringConstraints,
    model_validator,
)

from quantmesh_common.envelope import Event, Money, TimestampNs, schemas

# --------------------------------------------------------------------------------------------
# Field types
# --------------------------------------------------------------------------------------------

#: A price: an exact, finite, strictly positive decimal.
Price = Annotated[Money, Field(gt=0)]
#: A quantity that must be strictly positive (an order's size, a fill's size).
PositiveQty = Annotated[Money, Field(gt=0)]
#: A quantity, volume or amount that may be zero but never negative.
NonNegative = Annotated[Money, Field(ge=0)]

#: Identifiers (accounts, strategies, orders, events): no whitespace, at most 128 characters.
Identifier = Annotated[
    str,
    StringConstraints(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9._:@/+=-]*$"),
]
#: A venue name, upper case: "BINANCE", "KRAKEN", "SIM".
Venue = Annotated[str, StringConstraints(min_length=1, max_length=32, pattern=r"^[A-Z][A-Z0-9_]*$")]
#: An asset or currency code, upper case: "BTC", "USDT", "1000PEPE".
Currency = Annotated[str, StringConstraints(min_length=1, max_length=32, pattern=r"^[A-Z0-9]+$")]
#: A machine-readable reason or alert code in UPPER_SNAKE case: "NOTIONAL_EXCEEDS_MAX_PER_ORDER".
ReasonCode = Annotated[
    str, StringConstraints(min_length=1, max_length=64, pattern=r"^[A-Z][A-Z0-9_]*$")
]

_INSTRUMENT_ID_RE = re.compile(r"^([A-Z0-9]+)-([A-Z0-9]+)\.([A-Z][A-Z0-9_]*)$")


class InstrumentId(NamedTuple):
    """The parts of an instrument id `<BASE>-<QUOTE>.<VENUE>`, e.g. `BTC-USDT.BINANCE`.

    Base, quote and venue are upper case; base and quote are letters and digits, the venue may
    also hold underscores. The id names one tradable pair on one venue, so it is unique across
    the platform and keys market data and signals.
    """

    base: str
    quote: str
    venue: str

    @classmethod
    def parse(cls, value: str) -> InstrumentId:
        """Split an instrument id into its parts; ValueError if it breaks the convention."""
        match = _INSTRUMENT_ID_RE.match(value)
        if match is None:
            raise ValueError(f"instrument id {value!r} is not <BASE>-<QUOTE>.<VENUE>")
        return cls(match.group(1), match.group(2), match.group(3))

    @classmethod
    def from_symbol(cls, symbol: str, venue: str) -> InstrumentId:
        """Build the id of a venue's spot symbol `BASE/QUOTE` (ccxt style), e.g. `btc/usdt`."""
        base, sep, quote = symbol.partition("/")
        if not sep or ":" in quote:
            raise ValueError(f"symbol {symbol!r} is not a spot BASE/QUOTE symbol")
        return cls.parse(make_instrument_id(base, quote, venue))

    def __str__(self) -> str:
        return f"{self.base}-{self.quote}.{self.venue}"

    @property
    def symbol(self) -> str:
        """Return the ccxt-style symbol `BASE/QUOTE`."""
        return f"{self.base}/{self.quote}"


def make_instrument_id(base: str, quote: str, venue: str) -> str:
    """Return the instrument id `<BASE>-<QUOTE>.<VENUE>` (parts upper-cased); ValueError if bad."""
    value = f"{base.strip().upper()}-{quote.strip().upper()}.{venue.strip().upper()}"
    InstrumentId.parse(value)
    return value


#: An instrument id following the `<BASE>-<QUOTE>.<VENUE>` convention (same rule as the parser).
InstrumentIdStr = Annotated[
    str, StringConstraints(pattern=r"^[A-Z0-9]+-[A-Z0-9]+\.[A-Z][A-Z0-9_]*$", max_length=128)
]

_INTERVAL_UNITS_NS = {
    "s": 1_000_000_000,
    "m": 60 * 1_000_000_000,
    "h": 3_600 * 1_000_000_000,
    "d": 86_400 * 1_000_000_000,
    "w": 7 * 86_400 * 1_000_000_000,
}
_INTERVAL_RE = re.compile(r"^([1-9][0-9]*)([smhdw])$")


def bar_interval_ns(interval: str) -> int:
    """Return the length of a bar interval such as `"1m"`, `"5m"`, `"1h"`, `"1d"` in nanoseconds.

    Units: s (seconds), m (minutes), h (hours), d (days), w (weeks). ValueError if malformed.
    """
    match = _INTERVAL_RE.match(interval)
    if match is None:
        raise ValueError(f"bar interval {interval!r} is not <count><s|m|h|d|w>, e.g. '1m'")
    return int(match.group(1)) * _INTERVAL_UNITS_NS[match.group(2)]


#: A bar interval: a positive count and a unit, e.g. "1m", "5m", "1h", "1d".
BarInterval = Annotated[str, StringConstraints(pattern=r"^[1-9][0-9]*[smhdw]$", max_length=16)]


def format_reason(code: str, details: dict[str, str] | None = None) -> str:
    """Return a rejection reason with the values behind it: `CODE: key=value, key=value`."""
    if not details:
        return code
    return code + ": " + ", ".join(f"{k}={v}" for k, v in details.items())


def _fmt(value: Decimal) -> str:
    # Plain notation ("0.00001", not "1E-5") reads better in reason strings.
    return format(value, "f")


# --------------------------------------------------------------------------------------------
# Enumerations (closed sets; adding a value is additive, removing one is breaking)
# --------------------------------------------------------------------------------------------


class Side(StrEnum):
    """The side of an order or fill."""

    BUY = "BUY"
    SELL = "SELL"

    @property
    def sign(self) -> int:
        """Return +1 for BUY and -1 for SELL: the sign a fill of this side adds to a position."""
        return 1 if self is Side.BUY else -1

    @property
    def opposite(self) -> Side:
        """Return the other side."""
        return Side.SELL if self is Side.BUY else Side.BUY


class OrderType(StrEnum):
    """How an order executes."""

    MARKET = "MARKET"
    LIMIT = "LIMIT"
    STOP = "STOP"
    STOP_LIMIT = "STOP_LIMIT"


class TimeInForce(StrEnum):
    """How long an order stays working."""

    GTC = "GTC"
    IOC = "IOC"
    FOK = "FOK"
    GTD = "GTD"


class ExecAlgo(StrEnum):
    """How the OMS works a parent order: slices sent over time as child orders."""

    TWAP = "TWAP"
    VWAP = "VWAP"


class OrderStatus(StrEnum):
    """The state of an order in the OMS state machine."""

    INITIALIZED = "INITIALIZED"
    DENIED = "DENIED"
    SUBMITTED = "SUBMITTED"
    ACCEPTED = "ACCEPTED"
    PARTIALLY_FILLED = "PARTIALLY_FILLED"
    FILLED = "FILLED"
    CANCEL_PENDING = "CANCEL_PENDING"
    CANCELED = "CANCELED"
    REJECTED = "REJECTED"
    EXPIRED = "EXPIRED"

    @property
    def is_terminal(self) -> bool:
        """Return True if no further transition can happen from this status."""
        return self in _TERMINAL_STATUSES

    @property
    def is_open(self) -> bool:
        """Return True if the order may still fill (it is working, or about to be)."""
        return not self.is_terminal and self is not OrderStatus.INITIALIZED


_TERMINAL_STATUSES = frozenset(
    {
        OrderStatus.DENIED,
        OrderStatus.FILLED,
        OrderStatus.CANCELED,
        OrderStatus.REJECTED,
        OrderStatus.EXPIRED,
    }
)


class ExecType(StrEnum):
    """What happened to an order at the venue, as told by an execution report."""

    ACCEPTED = "ACCEPTED"
    REJECTED = "REJECTED"
    FILL = "FILL"
    PARTIAL_FILL = "PARTIAL_FILL"
    CANCELED = "CANCELED"
    EXPIRED = "EXPIRED"
    REPLACED = "REPLACED"
    CANCEL_REJECTED = "CANCEL_REJECTED"

    @property
    def is_fill(self) -> bool:
        """Return True for FILL and PARTIAL_FILL."""
        return self in (ExecType.FILL, ExecType.PARTIAL_FILL)


class LiquiditySide(StrEnum):
    """Whether a fill added liquidity (maker) or took it (taker)."""

    MAKER = "MAKER"
    TAKER = "TAKER"
    NONE = "NONE"


class AggressorSide(StrEnum):
    """The side that crossed the spread in a trade."""

    BUYER = "BUYER"
    SELLER = "SELLER"
    NO_AGGRESSOR = "NO_AGGRESSOR"


class TickKind(StrEnum):
    """Whether a tick is a trade print or a top-of-book quote."""

    TRADE = "TRADE"
    QUOTE = "QUOTE"


class PositionSide(StrEnum):
    """The direction of a position or of a signal's view."""

    LONG = "LONG"
    SHORT = "SHORT"
    FLAT = "FLAT"

    @classmethod
    def of(cls, quantity: Decimal) -> PositionSide:
        """Return the side of a signed quantity: LONG if > 0, SHORT if < 0, FLAT if 0."""
        if quantity > 0:
            return cls.LONG
        if quantity < 0:
            return cls.SHORT
        return cls.FLAT


class AlertSeverity(StrEnum):
    """How urgently an alert needs a human."""

    INFO = "INFO"
    WARNING = "WARNING"
    CRITICAL = "CRITICAL"


class ControlAction(StrEnum):
    """Operator commands carried on the control topic to every stage."""

    KILL_SWITCH_ON = "KILL_SWITCH_ON"
    KILL_SWITCH_OFF = "KILL_SWITCH_OFF"
    HALT_STRATEGY = "HALT_STRATEGY"
    RESUME_STRATEGY = "RESUME_STRATEGY"
    RESET_CIRCUIT_BREAKER = "RESET_CIRCUIT_BREAKER"
    RELOAD_CONFIG = "RELOAD_CONFIG"
    COLLECTOR_START = "COLLECTOR_START"
    COLLECTOR_STOP = "COLLECTOR_STOP"
    CANCEL_ALL_ORDERS = "CANCEL_ALL_ORDERS"
    FLATTEN_POSITIONS = "FLATTEN_POSITIONS"
    #: Ask the portfolio for PerformanceReports now (target: an account, `portfolio` or `*`).
    REPORT_PERFORMANCE = "REPORT_PERFORMANCE"
    #: Set a strategy's parameters (target: the strategy id). params: `params`, a JSON object
    #: of the parameters, and `mode`: `merge` (onto the current ones, the default) or `replace`.
    CONFIGURE_STRATEGY = "CONFIGURE_STRATEGY"


class CommandType(StrEnum):
    """What an order command asks the execution stage to do at the venue."""

    SUBMIT = "SUBMIT"
    CANCEL = "CANCEL"
    REPLACE = "REPLACE"
    #: Ask the venue what it knows of one order (reconciliation); nothing is sent to it.
    QUERY = "QUERY"


# --------------------------------------------------------------------------------------------
# Shared validation
# --------------------------------------------------------------------------------------------


def _check_venue(instrument_id: str, venue: str) -> None:
    # Runs on every decode. The field's pattern has already been checked, and neither base
    # nor quote may hold a dot, so the venue is what follows the last dot: no regex needed.
    if instrument_id.rpartition(".")[2] == venue:
        return
    own = InstrumentId.parse(instrument_id).venue
    if own != venue:
        raise ValueError(f"venue {venue!r} differs from the venue of {instrument_id!r} ({own!r})")


def _check_order_terms(
    order_type: OrderType,
    limit_price: Decimal | None,
    stop_price: Decimal | None,
    time_in_force: TimeInForce,
    expire_time_ns: int | None,
) -> None:
    """Refuse price and expiry combinations that do not fit the order type and time in force."""
    needs_limit = order_type in (OrderType.LIMIT, OrderType.STOP_LIMIT)
    needs_stop = order_type in (OrderType.STOP, OrderType.STOP_LIMIT)
    if needs_limit and limit_price is None:
        raise ValueError(f"a {order_type} order needs limit_price")
    if not needs_limit and limit_price is not None:
        raise ValueError(f"a {order_type} order takes no limit_price")
    if needs_stop and stop_price is None:
        raise ValueError(f"a {order_type} order needs stop_price")
    if not needs_stop and stop_price is not None:
        raise ValueError(f"a {order_type} order takes no stop_price")
    if time_in_force is TimeInForce.GTD and expire_time_ns is None:
        raise ValueError("a GTD order needs expire_time_ns")
    if time_in_force is not TimeInForce.GTD and expire_time_ns is not None:
        raise ValueError(f"expire_time_ns is only for GTD orders, not {time_in_force}")


# --------------------------------------------------------------------------------------------
# Reference data
# --------------------------------------------------------------------------------------------


@schemas.register
class Instrument(Event):
    """A tradable pair on one venue with its trading rules (tick, lot, minimums, fees)."""

    SCHEMA_NAME = "ref.instrument"
    SCHEMA_VERSION = 1

    instrument_id: InstrumentIdStr = Field(description="`<BASE>-<QUOTE>.<VENUE>`, our own id.")
    venue: Venue
    symbol: str = Field(min_length=1, description="The venue's own symbol, e.g. `BTC/USDT`.")
    base: Currency = Field(description="The asset bought and sold, e.g. BTC.")
    quote: Currency = Field(description="The currency prices are quoted in, e.g. USDT.")
    tick_size: Price = Field(description="Smallest price increment.")
    lot_size: PositiveQty = Field(description="Smallest quantity increment.")
    min_notional: NonNegative = Field(
        default=Decimal(0), description="Smallest order value (price x quantity) in quote."
    )
    min_quantity: PositiveQty | None = Field(default=None, description="Smallest order size.")
    max_quantity: PositiveQty | None = Field(default=None, description="Largest order size.")
    maker_fee: Money | None = Field(
        default=None, description="Maker fee rate as a fraction (0.001 = 10 bp); may be negative."
    )
    taker_fee: Money | None = Field(
        default=None, description="Taker fee rate as a fraction (0.001 = 10 bp)."
    )

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        expected = f"{self.base}-{self.quote}.{self.venue}"
        if self.instrument_id != expected:
            raise ValueError(f"instrument_id {self.instrument_id!r} should be {expected!r}")
        if (
            self.min_quantity is not None
            and self.max_quantity is not None
            and self.min_quantity > self.max_quantity
        ):
            raise ValueError("min_quantity exceeds max_quantity")
        return self

    @property
    def price_precision(self) -> int:
        """Return the number of decimal places of a price on the tick grid."""
        return max(0, -int(self.tick_size.normalize().as_tuple().exponent))

    @property
    def size_precision(self) -> int:
        """Return the number of decimal places of a quantity on the lot grid."""
        return max(0, -int(self.lot_size.normalize().as_tuple().exponent))

    def round_price(self, price: Decimal, mode: str = ROUND_HALF_EVEN) -> Decimal:
        """Return `price` on the tick grid, rounded with a `decimal` rounding mode.

        Buy limits usually round with ROUND_FLOOR and sell limits with ROUND_CEILING so that
        rounding never makes a price more aggressive.
        """
        steps = (price / self.tick_size).quantize(Decimal(1), rounding=mode)
        return (steps * self.tick_size).quantize(Decimal(1).scaleb(-self.price_precision))

    def round_quantity(self, quantity: Decimal) -> Decimal:
        """Return `quantity` rounded toward zero onto the lot grid."""
        steps = (quantity / self.lot_size).quantize(Decimal(1), rounding=ROUND_DOWN)
        return (steps * self.lot_size).quantize(Decimal(1).scaleb(-self.size_precision))

    def check_price(self, price: Decimal) -> str | None:
        """Return why `price` cannot be sent to the venue (`CODE: values`), or None if it can."""
        if not price.is_finite() or price <= 0:
            return format_reason("PRICE_NOT_POSITIVE", {"price": str(price)})
        if price % self.tick_size != 0:
            return format_reason(
                "PRICE_NOT_ON_TICK", {"price": _fmt(price), "tick_size": _fmt(self.tick_size)}
            )
        return None

    def check_quantity(self, quantity: Decimal, price: Decimal | None = None) -> str | None:
        """Return why `quantity` (at `price`, for the notional check) is not tradable, or None."""
        if not quantity.is_finite() or quantity <= 0:
            return format_reason("QUANTITY_NOT_POSITIVE", {"quantity": str(quantity)})
        if quantity % self.lot_size != 0:
            return format_reason(
                "QUANTITY_NOT_ON_LOT",
                {"quantity": _fmt(quantity), "lot_size": _fmt(self.lot_size)},
            )
        if self.min_quantity is not None and quantity < self.min_quantity:
            return format_reason(
                "QUANTITY_BELOW_MIN",
                {"quantity": _fmt(quantity), "min_quantity": _fmt(self.min_quantity)},
            )
        if self.max_quantity is not None and quantity > self.max_quantity:
            return format_reason(
                "QUANTITY_ABOVE_MAX",
                {"quantity": _fmt(quantity), "max_quantity": _fmt(self.max_quantity)},
            )
        if price is not None and self.min_notional > 0:
            notional = quantity * price
            if notional < self.min_notional:
                return format_reason(
                    "NOTIONAL_BELOW_MIN",
                    {"notional": _fmt(notional), "min_notional": _fmt(self.min_notional)},
                )
        return None


# --------------------------------------------------------------------------------------------
# Market data
# --------------------------------------------------------------------------------------------


_TRADE = TickKind.TRADE
_QUOTE = TickKind.QUOTE


@schemas.register
class Tick(Event):
    """A trade print (kind TRADE) or a top-of-book quote (kind QUOTE) from a venue.

    `ts_event` is the venue's own timestamp; `ts_init` is when quantmesh received it.
    """

    SCHEMA_NAME = "md.tick"
    SCHEMA_VERSION = 1

    instrument_id: InstrumentIdStr
    venue: Venue
    kind: TickKind = TickKind.TRADE
    price: Price = Field(description="Trade price; for a QUOTE, the mid of bid and ask.")
    size: NonNegative = Field(
        default=Decimal(0), description="Trade size in base units (> 0 for TRADE, 0 for QUOTE)."
    )
    aggressor_side: AggressorSide = AggressorSide.NO_AGGRESSOR
    trade_id: str | None = Field(default=None, description="The venue's trade id (TRADE only).")
    bid: Price | None = Field(default=None, description="Best bid (QUOTE only).")
    ask: Price | None = Field(default=None, description="Best ask (QUOTE only).")
    bid_size: NonNegative | None = Field(default=None, description="Size at the best bid.")
    ask_size: NonNegative | None = Field(default=None, description="Size at the best ask.")
    ts_event: TimestampNs = Field(description="Venue timestamp, UTC ns.")
    ts_init: TimestampNs = Field(description="When quantmesh received the tick, UTC ns.")

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        _check_venue(self.instrument_id, self.venue)
        # Module-level members: reading TickKind.TRADE goes through the enum's descriptor.
        kind = self.kind
        if kind is _TRADE and self.size <= 0:
            raise ValueError("a TRADE tick needs size > 0")
        if kind is _QUOTE:
            if self.bid is None or self.ask is None:
                raise ValueError("a QUOTE tick needs bid and ask")
            if self.bid > self.ask:
                raise ValueError(f"crossed quote: bid {self.bid} > ask {self.ask}")
        return self


@schemas.register
class Bar(Event):
    """An OHLCV bar covering [ts_open, ts_close) for one instrument."""

    SCHEMA_NAME = "md.bar"
    SCHEMA_VERSION = 1

    instrument_id: InstrumentIdStr
    interval: BarInterval = Field(description="Bar length: count and unit s/m/h/d/w, e.g. '1m'.")
    open: Price
    high: Price
    low: Price
    close: Price
    volume: NonNegative = Field(description="Traded volume in base units.")
    trades: int | None = Field(default=None, ge=0, description="Number of trades, if known.")
    ts_open: TimestampNs = Field(description="Start of the bar, UTC ns (inclusive).")
    ts_close: TimestampNs = Field(description="End of the bar, UTC ns (exclusive).")

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if self.high < max(self.open, self.close, self.low):
            raise ValueError(f"high {self.high} is below open, close or low")
        if self.low > min(self.open, self.close):
            raise ValueError(f"low {self.low} is above open or close")
        if self.ts_close <= self.ts_open:
            raise ValueError("ts_close must be after ts_open")
        return self

    @property
    def interval_ns(self) -> int:
        """Return the bar interval in nanoseconds."""
        return bar_interval_ns(self.interval)


class BookLevel(BaseModel):
    """One price level of an order book."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    price: Price
    size: PositiveQty = Field(description="Total size resting at this price, base units.")


@schemas.register
class BookSnapshot(Event):
    """An L2 order book snapshot: bids best (highest) first, asks best (lowest) first."""

    SCHEMA_NAME = "md.book"
    SCHEMA_VERSION = 1

    instrument_id: InstrumentIdStr
    bids: list[BookLevel] = Field(default_factory=list, description="Highest price first.")
    asks: list[BookLevel] = Field(default_factory=list, description="Lowest price first.")
    sequence: int = Field(default=0, ge=0, description="Venue update id or our own counter.")
    depth: int = Field(gt=0, description="Levels per side requested; each side has at most this.")
    ts_event: TimestampNs = Field(description="Venue timestamp, UTC ns.")
    ts_init: TimestampNs = Field(description="When quantmesh received the book, UTC ns.")

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if len(self.bids) > self.depth or len(self.asks) > self.depth:
            raise ValueError(f"more levels than depth {self.depth}")
        if any(a.price <= b.price for a, b in zip(self.bids, self.bids[1:], strict=False)):
            raise ValueError("bids must be strictly descending by price")
        if any(b.price <= a.price for a, b in zip(self.asks, self.asks[1:], strict=False)):
            raise ValueError("asks must be strictly ascending by price")
        if self.bids and self.asks and self.bids[0].price > self.asks[0].price:
            raise ValueError(f"crossed book: bid {self.bids[0].price} > ask {self.asks[0].price}")
        return self

    @property
    def best_bid(self) -> Decimal | None:
        """Return the highest bid price, or None for an empty side."""
        return self.bids[0].price if self.bids else None

    @property
    def best_ask(self) -> Decimal | None:
        """Return the lowest ask price, or None for an empty side."""
        return self.asks[0].price if self.asks else None

    @property
    def mid(self) -> Decimal | None:
        """Return the mid price, or None unless both sides have a level."""
        if not self.bids or not self.asks:
            return None
        return (self.bids[0].price + self.asks[0].price) / 2


# --------------------------------------------------------------------------------------------
# Strategy and risk
# --------------------------------------------------------------------------------------------


@schemas.register
class Signal(Event):
    """A strategy's view on an instrument: a direction with a strength, or a target position."""

    SCHEMA_NAME = "signals.signal"
    SCHEMA_VERSION = 1

    signal_id: Identifier
    strategy_id: Identifier
    instrument_id: InstrumentIdStr
    direction: PositionSide
    strength: Money = Field(
        default=Decimal(1), ge=0, le=1, description="Conviction from 0 (none) to 1 (full)."
    )
    target_position: Money | None = Field(
        default=None, description="Desired signed position in base units (sign = direction)."
    )
    price: Price | None = Field(default=None, description="Reference price the signal saw.")
    reason: str = Field(default="", description="Human-readable why, e.g. 'ema_fast crossed up'.")
    ts_event: TimestampNs = Field(description="When the strategy decided, UTC ns.")

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if self.target_position is not None:
            implied = PositionSide.of(self.target_position)
            if implied is not self.direction:
                raise ValueError(
                    f"target_position {self.target_position} is {implied}, direction is "
                    f"{self.direction}"
                )
        return self


@schemas.register
class OrderIntent(Event):
    """A strategy's request to trade, before risk checks.

    Either `quantity` with `side` (trade this much), or `target_position` without `side` (trade
    whatever brings the position there; risk derives the side and size).
    """

    SCHEMA_NAME = "orders.intent"
    SCHEMA_VERSION = 1

    intent_id: Identifier
    account_id: Identifier
    strategy_id: Identifier
    instrument_id: InstrumentIdStr
    client_order_id: Identifier = Field(
        description="Idempotency key of the order this intent becomes; reused across retries."
    )
    side: Side | None = Field(default=None, description="Required with quantity; None w/ target.")
    quantity: PositiveQty | None = Field(default=None, description="Order size in base units.")
    target_position: Money | None = Field(
        default=None, description="Desired signed position in base units."
    )
    order_type: OrderType = OrderType.MARKET
    limit_price: Price | None = Field(default=None, description="For LIMIT and STOP_LIMIT.")
    stop_price: Price | None = Field(default=None, description="Trigger for STOP and STOP_LIMIT.")
    time_in_force: TimeInForce = TimeInForce.GTC
    expire_time_ns: TimestampNs | None = Field(default=None, description="For GTD, UTC ns.")
    post_only: bool = Field(default=False, description="Reject rather than take liquidity.")
    reduce_only: bool = Field(default=False, description="Only reduce an existing position.")
    tag: str = Field(default="", description="Free-form label carried to the order.")
    ts_event: TimestampNs = Field(description="When the strategy emitted the intent, UTC ns.")
    stop_loss_price: Price | None = Field(
        default=None,
        description="OCO exit: the OMS attaches a STOP at this price to the position the order "
        "opens (sized to it), canceled when the take-profit fills.",
    )
    take_profit_price: Price | None = Field(
        default=None,
        description="OCO exit: the OMS attaches a LIMIT at this price to the position the order "
        "opens (sized to it), canceled when the stop-loss fills.",
    )
    algo: ExecAlgo | None = Field(
        default=None,
        description="Work the order as a TWAP/VWAP parent: child orders over algo_duration_s.",
    )
    algo_duration_s: int | None = Field(
        default=None,
        gt=0,
        description="With algo: the slices' span; one every duration/slices s, the first at once.",
    )
    algo_slices: int | None = Field(
        default=None, ge=1, le=10_000, description="With algo: how many child orders."
    )
    algo_lot_size: PositiveQty | None = Field(
        default=None,
        description="With algo: slice sizes are multiples of it (the last takes the remainder).",
    )

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if (self.quantity is None) == (self.target_position is None):
            raise ValueError("give exactly one of quantity and target_position")
        if self.quantity is not None and self.side is None:
            raise ValueError("an intent with a quantity needs a side")
        if self.target_position is not None and self.side is not None:
            raise ValueError("an intent with a target_position takes no side (it is derived)")
        _check_order_terms(
            self.order_type,
            self.limit_price,
            self.stop_price,
            self.time_in_force,
            self.expire_time_ns,
        )
        stop, take, side = self.stop_loss_price, self.take_profit_price, self.side
        # A long is protected below and takes profit above; a short the other way round.
        if (
            stop is not None
            and take is not None
            and ((side is Side.BUY and stop >= take) or (side is Side.SELL and stop <= take))
        ):
            raise ValueError(
                f"stop_loss_price {stop} and take_profit_price {take} do not fit a {side}"
            )
        if self.algo is not None:
            _check_algo(self)
        return self

    @property
    def is_target(self) -> bool:
        """Return True if this intent asks for a target position rather than a quantity."""
        return self.target_position is not None


def _check_algo(intent: OrderIntent) -> None:
    if intent.algo_duration_s is None or intent.algo_slices is None:
        raise ValueError("an algo intent needs algo_duration_s and algo_slices")
    if intent.order_type not in (OrderType.MARKET, OrderType.LIMIT):
        raise ValueError(f"an algo intent is MARKET or LIMIT, not {intent.order_type}")
    if intent.time_in_force is TimeInForce.GTD:
        raise ValueError("an algo intent takes no GTD (its duration is algo_duration_s)")
    if intent.stop_loss_price is not None or intent.take_profit_price is not None:
        raise ValueError("an algo intent takes no OCO exits")


@schemas.register
class RiskDecision(Event):
    """The risk stage's verdict on an intent: approved (maybe resized) or rejected with a reason.

    A rejection is an event, not an exception: `reason` is an UPPER_SNAKE code and `details`
    the values behind it, e.g. NOTIONAL_EXCEEDS_MAX_PER_ORDER with max_notional and notional.
    """

    SCHEMA_NAME = "risk.decision"
    SCHEMA_VERSION = 1

    decision_id: Identifier
    account_id: Identifier
    intent: OrderIntent
    approved: bool
    reason: ReasonCode | None = Field(default=None, description="Required when rejected.")
    details: dict[str, str] = Field(
        default_factory=dict, description="The values behind the reason, as strings."
    )
    adjusted_quantity: PositiveQty | None = Field(
        default=None, description="Size risk approved instead of the intent's (sizing, caps)."
    )
    side: Side | None = Field(
        default=None,
        description="The side risk derived for a target-position intent (which has none).",
    )
    ts_event: TimestampNs = Field(description="When risk decided, UTC ns.")

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if self.account_id != self.intent.account_id:
            raise ValueError("account_id differs from the intent's account_id")
        if not self.approved and self.reason is None:
            raise ValueError("a rejection needs a reason")
        if not self.approved and self.adjusted_quantity is not None:
            raise ValueError("a rejection takes no adjusted_quantity")
        if self.approved and self.intent.side is None:
            if self.side is None or self.adjusted_quantity is None:
                raise ValueError(
                    "approving a target-position intent needs the derived side and quantity"
                )
        elif self.side is not None and self.side != self.intent.side:
            raise ValueError("side differs from the intent's side")
        return self

    @property
    def order_side(self) -> Side | None:
        """Return the side of the order to place: the intent's, or the one risk derived."""
        return self.intent.side or self.side

    @property
    def order_quantity(self) -> Decimal | None:
        """Return the quantity to place: risk's adjusted size, else the intent's."""
        return self.adjusted_quantity or self.intent.quantity

    @property
    def instrument_id(self) -> str:
        """Return the intent's instrument id."""
        return self.intent.instrument_id

    @property
    def reason_text(self) -> str:
        """Return `REASON: key=value, ...`, or an empty string if there is no reason."""
        return format_reason(self.reason, self.details) if self.reason else ""


# --------------------------------------------------------------------------------------------
# Orders and execution
# --------------------------------------------------------------------------------------------


@schemas.register
class Order(Event):
    """The OMS's state of one order, published on every change."""

    SCHEMA_NAME = "orders.order"
    SCHEMA_VERSION = 1

    client_order_id: Identifier = Field(description="Our id; at most one venue order per id.")
    venue_order_id: str | None = Field(default=None, description="The venue's id once accepted.")
    account_id: Identifier
    strategy_id: Identifier
    instrument_id: InstrumentIdStr
    intent_id: Identifier | None = Field(default=None, description="The intent it came from.")
    parent_order_id: Identifier | None = Field(
        default=None, description="client_order_id of the parent (TWAP/VWAP) order, if a child."
    )
    side: Side
    order_type: OrderType
    quantity: PositiveQty
    filled_quantity: NonNegative = Decimal(0)
    avg_fill_price: Price | None = Field(default=None, description="Set once anything filled.")
    limit_price: Price | None = None
    stop_price: Price | None = None
    time_in_force: TimeInForce = TimeInForce.GTC
    expire_time_ns: TimestampNs | None = None
    post_only: bool = False
    reduce_only: bool = False
    status: OrderStatus
    reason: str | None = Field(default=None, description="Why denied/rejected/canceled.")
    tag: str = ""
    ts_init: TimestampNs = Field(description="When the OMS created the order, UTC ns.")
    ts_last: TimestampNs = Field(description="Time of the last state change, UTC ns.")
    algo_slices_sent: int | None = Field(
        default=None, ge=0, description="A TWAP/VWAP parent: child orders sent so far."
    )
    algo_slices_total: int | None = Field(
        default=None, ge=1, description="A TWAP/VWAP parent: child orders planned."
    )

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if self.filled_quantity > self.quantity:
            raise ValueError(f"filled_quantity {self.filled_quantity} exceeds {self.quantity}")
        if self.filled_quantity > 0 and self.avg_fill_price is None:
            raise ValueError("a (partly) filled order needs avg_fill_price")
        if self.ts_last < self.ts_init:
            raise ValueError("ts_last is before ts_init")
        _check_order_terms(
            self.order_type,
            self.limit_price,
            self.stop_price,
            self.time_in_force,
            self.expire_time_ns,
        )
        return self

    @property
    def venue(self) -> str:
        """Return the venue of the order's instrument."""
        return InstrumentId.parse(self.instrument_id).venue

    @property
    def leaves_quantity(self) -> Decimal:
        """Return the quantity still working: zero once the order is terminal."""
        return Decimal(0) if self.status.is_terminal else self.quantity - self.filled_quantity


@schemas.register
class OrderCommand(Event):
    """An instruction from the OMS to the execution stage: submit, cancel or replace an order.

    SUBMIT carries the order terms; CANCEL names the order; REPLACE carries at least one of
    the new_* fields.
    """

    SCHEMA_NAME = "orders.command"
    SCHEMA_VERSION = 1

    command_id: Identifier
    command_type: CommandType
    account_id: Identifier
    venue: Venue
    instrument_id: InstrumentIdStr
    client_order_id: Identifier
    venue_order_id: str | None = Field(default=None, description="For CANCEL/REPLACE if known.")
    strategy_id: Identifier | None = None
    side: Side | None = Field(default=None, description="SUBMIT only.")
    order_type: OrderType | None = Field(default=None, description="SUBMIT only.")
    quantity: PositiveQty | None = Field(default=None, description="SUBMIT only.")
    limit_price: Price | None = Field(default=None, description="SUBMIT only.")
    stop_price: Price | None = Field(default=None, description="SUBMIT only.")
    time_in_force: TimeInForce | None = Field(default=None, description="SUBMIT only.")
    expire_time_ns: TimestampNs | None = Field(default=None, description="SUBMIT GTD only.")
    post_only: bool = False
    reduce_only: bool = False
    new_quantity: PositiveQty | None = Field(default=None, description="REPLACE only.")
    new_limit_price: Price | None = Field(default=None, description="REPLACE only.")
    new_stop_price: Price | None = Field(default=None, description="REPLACE only.")
    ts_event: TimestampNs = Field(description="When the OMS issued the command, UTC ns.")

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        _check_venue(self.instrument_id, self.venue)
        if self.command_type is CommandType.SUBMIT:
            if self.side is None or self.order_type is None or self.quantity is None:
                raise ValueError("SUBMIT needs side, order_type and quantity")
            if self.time_in_force is None:
                raise ValueError("SUBMIT needs time_in_force")
            _check_order_terms(
                self.order_type,
                self.limit_price,
                self.stop_price,
                self.time_in_force,
                self.expire_time_ns,
            )
        elif self.command_type is CommandType.REPLACE and (
            self.new_quantity is None
            and self.new_limit_price is None
            and self.new_stop_price is None
        ):
            raise ValueError("REPLACE needs new_quantity, new_limit_price or new_stop_price")
        return self

    @classmethod
    def for_submit(cls, order: Order, *, command_id: str, ts_event: int) -> OrderCommand:
        """Return the SUBMIT command for `order`."""
        return cls(
            command_id=command_id,
            command_type=CommandType.SUBMIT,
            account_id=order.account_id,
            venue=order.venue,
            instrument_id=order.instrument_id,
            client_order_id=order.client_order_id,
            strategy_id=order.strategy_id,
            side=order.side,
            order_type=order.order_type,
            quantity=order.quantity,
            limit_price=order.limit_price,
            stop_price=order.stop_price,
            time_in_force=order.time_in_force,
            expire_time_ns=order.expire_time_ns,
            post_only=order.post_only,
            reduce_only=order.reduce_only,
            ts_event=ts_event,
        )

    @classmethod
    def for_cancel(cls, order: Order, *, command_id: str, ts_event: int) -> OrderCommand:
        """Return the CANCEL command for `order`."""
        return cls(
            command_id=command_id,
            command_type=CommandType.CANCEL,
            account_id=order.account_id,
            venue=order.venue,
            instrument_id=order.instrument_id,
            client_order_id=order.client_order_id,
            venue_order_id=order.venue_order_id,
            strategy_id=order.strategy_id,
            ts_event=ts_event,
        )


@schemas.register
class ExecutionReport(Event):
    """What the venue said about an order: an ack, a fill, a reject, a cancel, an expiry.

    A fill (FILL or PARTIAL_FILL) carries `last_qty` > 0, `last_price` and a `trade_id`; the
    pair (account_id, trade_id) identifies it, so it is applied to a position exactly once.
    """

    SCHEMA_NAME = "exec.report"
    SCHEMA_VERSION = 1

    report_id: Identifier
    account_id: Identifier
    client_order_id: Identifier
    venue_order_id: str | None = Field(default=None, description="None if rejected before ack.")
    strategy_id: Identifier | None = None
    instrument_id: InstrumentIdStr
    exec_type: ExecType
    order_status: OrderStatus = Field(description="The order's status after this report.")
    side: Side
    last_qty: NonNegative = Field(default=Decimal(0), description="Size of this fill.")
    last_price: Price | None = Field(default=None, description="Price of this fill.")
    cum_qty: NonNegative = Field(default=Decimal(0), description="Total filled so far.")
    leaves_qty: NonNegative = Field(default=Decimal(0), description="Still working at the venue.")
    avg_price: Price | None = Field(default=None, description="Average price of cum_qty.")
    fee: Money = Field(default=Decimal(0), description="Fee of this fill; negative is a rebate.")
    fee_currency: Currency | None = None
    liquidity_side: LiquiditySide = LiquiditySide.NONE
    trade_id: str | None = Field(default=None, description="The venue's trade id of this fill.")
    reason: str | None = Field(default=None, description="Why rejected/canceled, if told.")
    ts_event: TimestampNs = Field(description="Venue timestamp, UTC ns.")

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if self.exec_type.is_fill:
            if self.last_qty <= 0 or self.last_price is None or not self.trade_id:
                raise ValueError(
                    f"a {self.exec_type} report needs last_qty > 0, last_price, trade_id"
                )
        elif self.last_qty != 0:
            raise ValueError(f"a {self.exec_type} report has no last_qty")
        if self.cum_qty < self.last_qty:
            raise ValueError(f"cum_qty {self.cum_qty} is below last_qty {self.last_qty}")
        return self

    @property
    def is_fill(self) -> bool:
        """Return True if this report is a (partial) fill."""
        return self.exec_type.is_fill

    @property
    def last_notional(self) -> Decimal:
        """Return last_qty x last_price (zero for a report that is not a fill)."""
        return self.last_qty * self.last_price if self.last_price is not None else Decimal(0)


# --------------------------------------------------------------------------------------------
# Portfolio
# --------------------------------------------------------------------------------------------


@schemas.register
class Position(Event):
    """One account's position in one instrument, with its P&L in the quote currency."""

    SCHEMA_NAME = "portfolio.position"
    SCHEMA_VERSION = 1

    account_id: Identifier
    instrument_id: InstrumentIdStr
    side: PositionSide
    quantity: Money = Field(description="Signed size in base units: > 0 long, < 0 short.")
    avg_entry_price: NonNegative = Field(description="Average price of the open quantity.")
    realized_pnl: Money = Decimal(0)
    unrealized_pnl: Money = Decimal(0)
    fees: Money = Field(default=Decimal(0), description="Fees paid on this position so far.")
    last_price: Price | None = Field(default=None, description="Mark price of unrealized_pnl.")
    ts_event: TimestampNs = Field(description="Time of the fill or mark that changed it, UTC ns.")

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        implied = PositionSide.of(self.quantity)
        if implied is not self.side:
            raise ValueError(f"side {self.side} disagrees with quantity {self.quantity}")
        return self

    @property
    def notional(self) -> Decimal:
        """Return |quantity| x last_price (x avg_entry_price when there is no mark)."""
        mark = self.last_price if self.last_price is not None else self.avg_entry_price
        return abs(self.quantity) * mark


@schemas.register
class PortfolioSnapshot(Event):
    """An account's balances, equity, P&L and open positions at one time."""

    SCHEMA_NAME = "portfolio.snapshot"
    SCHEMA_VERSION = 1

    account_id: Identifier
    base_currency: Currency = Field(description="Currency of equity and P&L, e.g. USDT.")
    balances: dict[Currency, Money] = Field(default_factory=dict, description="Cash per currency.")
    equity: Money = Field(description="Cash plus marked positions, in base_currency.")
    realized_pnl: Money = Decimal(0)
    unrealized_pnl: Money = Decimal(0)
    fees: Money = Decimal(0)
    positions: list[Position] = Field(default_factory=list, description="Open positions.")
    peak_equity: Money | None = Field(default=None, description="Highest equity seen so far.")
    drawdown: Money = Field(
        default=Decimal(0), ge=0, le=1, description="(peak_equity - equity) / peak_equity, 0..1."
    )
    ts_event: TimestampNs

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if any(p.account_id != self.account_id for p in self.positions):
            raise ValueError("a position belongs to another account")
        return self


# --------------------------------------------------------------------------------------------
# Operations
# --------------------------------------------------------------------------------------------


@schemas.register
class Alert(Event):
    """Something a human may need to know: a rejection, a breach, a failure, a stage's health."""

    SCHEMA_NAME = "alerts.alert"
    SCHEMA_VERSION = 1

    alert_id: Identifier
    severity: AlertSeverity
    source_service: Identifier = Field(description="The stage that raised it, e.g. 'risk'.")
    code: ReasonCode = Field(description="Machine-readable kind, e.g. CIRCUIT_BREAKER_TRIPPED.")
    message: str = Field(description="One line for a human.")
    account_id: Identifier | None = None
    instrument_id: InstrumentIdStr | None = None
    details: dict[str, str] = Field(default_factory=dict, description="The values behind it.")
    ts_event: TimestampNs


@schemas.register
class ControlCommand(Event):
    """An operator command to every stage: kill switch, halt/resume a strategy, reload config."""

    SCHEMA_NAME = "control.command"
    SCHEMA_VERSION = 1

    command_id: Identifier
    action: ControlAction
    target: str = Field(
        default="*",
        min_length=1,
        description="'*' for everything, or the account, strategy or service id it applies to.",
    )
    params: dict[str, str] = Field(default_factory=dict)
    issued_by: str = Field(min_length=1, description="User or system that issued it.")
    reason: str = ""
    ts_event: TimestampNs

    def applies_to(self, *ids: str) -> bool:
        """Return True if the command targets everything or one of `ids`."""
        return self.target == "*" or self.target in ids


# --------------------------------------------------------------------------------------------
# Order requests (api / operators -> oms)
# --------------------------------------------------------------------------------------------


class OrderRequestAction(StrEnum):
    """What a request asks the OMS to do with one working order."""

    CANCEL = "CANCEL"
    REPLACE = "REPLACE"


@schemas.register
class OrderRequest(Event):
    """A request to cancel or amend one working order, from the api or an operator.

    The OMS turns it into a CANCEL or REPLACE command once the order's state allows it;
    REPLACE carries at least one of the new_* fields, CANCEL none. `request_id` makes the
    request idempotent: a request seen before is not applied twice.
    """

    SCHEMA_NAME = "orders.request"
    SCHEMA_VERSION = 1

    request_id: Identifier
    action: OrderRequestAction
    account_id: Identifier
    client_order_id: Identifier
    new_quantity: PositiveQty | None = Field(default=None, description="REPLACE only.")
    new_limit_price: Price | None = Field(default=None, description="REPLACE only.")
    new_stop_price: Price | None = Field(default=None, description="REPLACE only.")
    requested_by: str = Field(min_length=1, description="User or system that asked.")
    reason: str = ""
    ts_event: TimestampNs = Field(description="When it was requested, UTC ns.")

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        news = (self.new_quantity, self.new_limit_price, self.new_stop_price)
        if self.action is OrderRequestAction.REPLACE and all(v is None for v in news):
            raise ValueError("REPLACE needs new_quantity, new_limit_price or new_stop_price")
        if self.action is OrderRequestAction.CANCEL and any(v is not None for v in news):
            raise ValueError("CANCEL takes no new_* fields")
        return self


# --------------------------------------------------------------------------------------------
# Market-data collection (marketdata -> api)
# --------------------------------------------------------------------------------------------


class CollectorState(StrEnum):
    """Where a market-data collection job (a backfill or the scheduler) stands."""

    RUNNING = "RUNNING"
    STOPPED = "STOPPED"
    COMPLETED = "COMPLETED"
    CANCELLED = "CANCELLED"
    FAILED = "FAILED"


@schemas.register
class CollectorStatus(Event):
    """Status and progress of one collection job: a historical backfill or scheduled collection.

    `cursor_ns` is how far the job got (everything before it is collected); `progress` is the
    fraction of [start_ns, end_ns) done, 0 to 1.
    """

    SCHEMA_NAME = "md.collector_status"
    SCHEMA_VERSION = 1

    job_id: Identifier
    kind: Identifier = Field(description="`backfill.ohlcv`, `backfill.trades` or `schedule`.")
    state: CollectorState
    venue: Venue
    instrument_id: InstrumentIdStr | None = None
    timeframe: BarInterval | None = Field(default=None, description="For OHLCV jobs.")
    start_ns: TimestampNs | None = None
    end_ns: TimestampNs | None = None
    cursor_ns: TimestampNs | None = Field(default=None, description="Collected up to here.")
    fetched: int = Field(default=0, ge=0, description="Rows fetched so far by this job.")
    progress: float = Field(default=0.0, ge=0.0, le=1.0, description="Fraction done, 0 to 1.")
    message: str = Field(default="", description="One line for a human, e.g. the error.")
    details: dict[str, str] = Field(default_factory=dict)
    ts_event: TimestampNs


# --------------------------------------------------------------------------------------------
# Performance (portfolio -> api)
# --------------------------------------------------------------------------------------------


class RoundTripRecord(BaseModel):
    """One position opened and closed (its FIFO lots all closed), with its excursions.

    Prices are volume-weighted over the trip's entries and exits; `pnl` is net of `fees`, in
    the quote currency. `mae` / `mfe` are the largest moves against / for the trip per unit,
    weighted over its lots, each lot measured from its own price over the prices it saw.
    """

    model_config = ConfigDict(frozen=True, extra="ignore")

    instrument_id: InstrumentIdStr
    side: PositionSide
    quantity: PositiveQty
    entry_price: Price
    exit_price: Price
    entry_ts_ns: TimestampNs
    exit_ts_ns: TimestampNs
    fees: Money = Decimal(0)
    pnl: Money
    mae: NonNegative = Field(description="Maximum adverse excursion per unit, quote currency.")
    mfe: NonNegative = Field(description="Maximum favourable excursion per unit, quote currency.")


@schemas.register
class PerformanceReport(Event):
    """Performance of an account (strategy_id None) or of one strategy in it.

    Ratios follow `quantmesh_common.performance` over the equity curve of the portfolio's
    snapshots: fractions, annualised with `periods_per_year`; an unbounded ratio (no losing
    period, no losing trade) is infinite, a figure that cannot be computed is None. VaR and
    CVaR are losses over one snapshot period as positive fractions of equity.
    """

    SCHEMA_NAME = "portfolio.performance"
    SCHEMA_VERSION = 1

    report_id: Identifier
    account_id: Identifier
    strategy_id: Identifier | None = Field(default=None, description="None: the whole account.")
    base_currency: Currency
    points: int = Field(default=0, ge=0, description="Equity curve points (snapshots) used.")
    start_ts_ns: TimestampNs | None = None
    start_equity: Money | None = None
    final_equity: Money | None = None
    periods_per_year: float
    total_return: float | None = None
    cagr: float | None = None
    volatility: float | None = None
    sharpe: float | None = None
    sortino: float | None = None
    calmar: float | None = None
    omega: float | None = None
    max_drawdown: float = Field(default=0.0, description="Deepest (peak - trough) / peak.")
    max_drawdown_duration_ns: int = Field(default=0, ge=0)
    max_drawdown_duration_periods: int = Field(default=0, ge=0)
    confidence: float = Field(default=0.95, gt=0, lt=1, description="Of VaR and CVaR.")
    historical_var: float | None = None
    historical_cvar: float | None = None
    parametric_var: float | None = None
    parametric_cvar: float | None = None
    trades: int = Field(default=0, ge=0, description="Round trips closed.")
    wins: int = Field(default=0, ge=0)
    losses: int = Field(default=0, ge=0)
    win_rate: float | None = None
    profit_factor: float | None = None
    gross_profit: Money = Decimal(0)
    gross_loss: Money = Decimal(0)
    net_pnl: Money = Field(default=Decimal(0), description="Sum of the round trips' P&L.")
    expectancy: Money | None = Field(default=None, description="Mean P&L per round trip.")
    average_win: Money | None = None
    average_loss: Money | None = None
    mean_mae_fraction: float | None = Field(default=None, description="Mean MAE / entry price.")
    mean_mfe_fraction: float | None = Field(default=None, description="Mean MFE / entry price.")
    round_trips: list[RoundTripRecord] = Field(
        default_factory=list, description="The latest round trips, oldest first."
    )
    ts_event: TimestampNs


# --------------------------------------------------------------------------------------------
# Accounts (api -> portfolio, risk)
# --------------------------------------------------------------------------------------------


@schemas.register
class AccountOpened(Event):
    """An account was opened (a paper account through the api) with its starting cash.

    Keyed by account on the compacted `accounts` topic, so every account's opening stays
    readable from the topic's start. The portfolio seeds the account's cash from it once.
    """

    SCHEMA_NAME = "accounts.opened"
    SCHEMA_VERSION = 1

    account_id: Identifier
    owner: str = Field(min_length=1, description="The owner's user id.")
    base_currency: Currency = Field(description="Currency of equity and P&L, e.g. USDT.")
    starting_cash: dict[Currency, NonNegative] = Field(description="Cash per currency at opening.")
    venue: Venue
    mode: str = Field(default="PAPER", description="PAPER or LIVE.")
    ts_event: TimestampNs = Field(description="When it was opened, UTC ns.")


# --------------------------------------------------------------------------------------------
# Strategies (signals -> api)
# --------------------------------------------------------------------------------------------


class StrategyState(StrEnum):
    """Whether a running strategy's output is published, and if not, why."""

    RUNNING = "RUNNING"
    HALTED = "HALTED"
    KILLED = "KILLED"
    #: A hook raised: the strategy is muted until the signals stage restarts.
    FAULTED = "FAULTED"


@schemas.register
class StrategyStatus(Event):
    """A strategy the signals stage runs: what it trades, its parameters, its switches.

    Keyed by strategy id on the compacted `strategies` topic: published at start, on every
    halt, resume, kill switch and configuration command, and when the strategy faults.
    """

    SCHEMA_NAME = "signals.strategy_status"
    SCHEMA_VERSION = 1

    strategy_id: Identifier
    name: str = Field(min_length=1, description="Registered strategy name, e.g. `sma_cross`.")
    account_id: Identifier
    instruments: list[InstrumentIdStr] = Field(default_factory=list)
    params: dict[str, JsonValue] = Field(
        default_factory=dict, description="Effective parameters, JSON values (Decimal as str)."
    )
    param_schema: dict[str, JsonValue] = Field(
        default_factory=dict, description="JSON Schema of the strategy's parameter model."
    )
    state: StrategyState = StrategyState.RUNNING
    halted: bool = False
    killed: bool = False
    fault: str | None = Field(default=None, description="The error that muted it (FAULTED).")
    last_error: str | None = Field(
        default=None, description="Why the last configuration command was refused, if it was."
    )
    last_command_id: str | None = Field(
        default=None, description="The control command this status answers, if any."
    )
    config_version: int = Field(
        default=0, ge=0, description="Configuration commands applied since the stage started."
    )
    instance: str = Field(default="", description="The signals instance that published it.")
    ts_event: TimestampNs


# --------------------------------------------------------------------------------------------
# Risk limits (risk -> api)
# --------------------------------------------------------------------------------------------


@schemas.register
class RiskLimitsStatus(Event):
    """The limits risk applies to an account, its kill switch and its circuit breaker.

    Keyed by account on the compacted `risk.limits` topic; `account_id` `*` is the default,
    which applies to every account without a record of its own. Published at start, on every
    kill switch and breaker command, when a breaker trips and when an account is opened.
    """

    SCHEMA_NAME = "risk.limits"
    SCHEMA_VERSION = 1

    account_id: Identifier | Literal["*"] = Field(description="The account, or `*`: the default.")
    configured: bool = Field(
        default=False, description="The account has an entry of its own in QM_RISK_LIMITS."
    )
    limits: dict[str, JsonValue] = Field(
        default_factory=dict, description="The effective limits (Decimal values as strings)."
    )
    kill_switch: bool = Field(default=False, description="A kill switch blocks this account.")
    kill_switch_targets: list[str] = Field(
        default_factory=list, description="Every engaged kill switch target (`*`, ids)."
    )
    breaker_tripped: bool = False
    breaker_cause: ReasonCode | None = None
    breaker_details: dict[str, str] = Field(default_factory=dict)
    breaker_ts_ns: TimestampNs | None = None
    opening_equity: Money | None = Field(
        default=None, description="Starting capital in the base currency (AccountOpened)."
    )
    base_currency: Currency | None = None
    ts_event: TimestampNs
