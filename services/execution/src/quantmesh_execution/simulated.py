"""The simulated venue: order matching on market data, with fees, slippage, latency, a ledger.

Plain Python: no clock, bus or I/O. Every call carries its time (UTC ns) and returns the
execution reports it produced. The matching rules (README.md, "Simulated venue") in brief:

* Liquidity is the latest book of the instrument (a BookSnapshot; for an instrument that never
  had one, a QUOTE tick with sizes as a one-level book); without any book, the last trade print
  at its price and size. Filling consumes that displayed volume, so two orders never take the
  same size twice; the next book or trade brings fresh volume.
* MARKET orders walk the book level by level as taker; what the book cannot fill is canceled
  (FOK: rejected whole). A LIMIT that crosses takes at the book's prices (never worse than its
  limit), then rests (GTC/GTD) or has its remainder canceled (IOC). A resting limit fills as
  maker at its own price when a later book crosses it (best opposite price at or through the
  limit) or a later trade prints strictly through it (a trade at the limit is not enough: the
  queue position is unknown), limited by the crossing volume.
* STOP and STOP_LIMIT orders trigger when a trade reaches the stop (buy: trade >= stop, sell:
  trade <= stop) and then behave as MARKET / LIMIT orders.
* With `market_waits_for_trade` (bar backtests: the last print between two bars is the stale
  close of the earlier one), a MARKET order that arrives waits at the venue for the next trade
  print and fills on it, as the market then is; off by default.
* GTD orders expire once venue time reaches their expire time. Venue time only moves forward;
  it is the latest time passed in (command times, market data times, `advance`).
* A latency model delays every command: sent at `t`, it reaches the venue at `t + latency_ns`,
  and is acted on by the first call whose time reaches that (commands keep their order).
* Idempotent: a SUBMIT for a client order id the venue already knows, or any command whose
  command id it already saw, is dropped and returns nothing. A duplicate-reject report was
  rejected as the alternative: it would carry the client order id of the live order, and the
  OMS would read it as that order's rejection.
"""

from __future__ import annotations

import bisect
import functools
import heapq
import itertools
import logging
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from decimal import ROUND_CEILING, ROUND_FLOOR, ROUND_HALF_EVEN, ROUND_HALF_UP, Context, Decimal
from typing import Protocol

from quantmesh_common.ids import new_id
from quantmesh_common.messages import (
    BookSnapshot,
    CommandType,
    ExecType,
    ExecutionReport,
    Instrument,
    InstrumentId,
    LiquiditySide,
    OrderCommand,
    OrderStatus,
    OrderType,
    Side,
    Tick,
    TickKind,
    TimeInForce,
    format_reason,
)
from quantmesh_common.trusted import build

log = logging.getLogger(__name__)

#: Default maker and taker fee rate: 0.1 %.
DEFAULT_FEE_RATE = Decimal("0.001")
#: Fees are quantized to 8 decimal places of the quote currency (ROUND_HALF_UP): the finest
#: precision common on crypto venues, so a fee is never rounded away on a small fill.
FEE_PRECISION = Decimal("0.00000001")
_BPS = Decimal(10_000)
#: Python's default context, stated: the thread's may have been changed (ccxt sets ROUND_HALF_UP).
_AVERAGE = Context(prec=28, rounding=ROUND_HALF_EVEN)
#: A prefix that keeps `<prefix>-<kind><n>` an Identifier (messages.py) of at most 128 chars.
_ID_PREFIX = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@/+=-]{0,99}")
_ZERO = Decimal(0)


# --------------------------------------------------------------------------------------------
# Slippage
# --------------------------------------------------------------------------------------------


class SlippageModel(Protocol):
    """Moves a taker fill's price against the taker."""

    def apply(self, price: Decimal, side: Side, order_quantity: Decimal) -> Decimal:
        """Return the price the taker gets instead of the book's `price`."""
        ...


@dataclass(frozen=True, slots=True)
class NoSlippage:
    """Fills at the book's price."""

    def apply(self, price: Decimal, side: Side, order_quantity: Decimal) -> Decimal:
        """Return `price` unchanged."""
        return price


@dataclass(frozen=True, slots=True)
class FixedBpsSlippage:
    """A fixed cost in basis points: a buy pays price x (1 + bps/10000), a sell gets x (1 - ...)."""

    bps: Decimal

    def __post_init__(self) -> None:
        if not self.bps.is_finite() or self.bps < 0:
            raise ValueError(f"slippage bps must be >= 0, got {self.bps}")

    def apply(self, price: Decimal, side: Side, order_quantity: Decimal) -> Decimal:
        """Return `price` moved by `bps` against the taker."""
        return price * (1 + side.sign * self.bps / _BPS)


@dataclass(frozen=True, slots=True)
class SquareRootImpact:
    """Square-root market impact: impact = k x sigma x sqrt(Q / ADV), as a fraction of price.

    `Q` is the order's whole quantity (base units), `adv` the instrument's average daily volume
    (base units), `sigma` its daily volatility as a fraction (0.02 = 2 %), `k` a dimensionless
    constant of order 1. A buy pays price x (1 + impact), a sell gets price x (1 - impact).
    Every fill of the order carries the same impact, because it is a property of the order's
    size, not of the level it hits.
    """

    k: Decimal
    sigma: Decimal
    adv: Decimal

    def __post_init__(self) -> None:
        if not (self.k.is_finite() and self.k >= 0):
            raise ValueError(f"impact k must be >= 0, got {self.k}")
        if not (self.sigma.is_finite() and self.sigma >= 0):
            raise ValueError(f"impact sigma must be >= 0, got {self.sigma}")
        if not (self.adv.is_finite() and self.adv > 0):
            raise ValueError(f"impact adv must be > 0, got {self.adv}")

    def impact(self, order_quantity: Decimal) -> Decimal:
        """Return the impact fraction of an order of `order_quantity`."""
        return self.k * self.sigma * (order_quantity / self.adv).sqrt()

    def apply(self, price: Decimal, side: Side, order_quantity: Decimal) -> Decimal:
        """Return `price` moved by the order's impact against the taker."""
        return price * (1 + side.sign * self.impact(order_quantity))


# --------------------------------------------------------------------------------------------
# Ledger
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LedgerOrder:
    """An order the venue accepted, with its terms at acceptance."""

    client_order_id: str
    venue_order_id: str
    account_id: str
    instrument_id: str
    side: Side
    order_type: OrderType
    quantity: Decimal
    limit_price: Decimal | None
    stop_price: Decimal | None
    time_in_force: TimeInForce
    expire_time_ns: int | None
    ts_accepted: int


@dataclass(frozen=True, slots=True)
class LedgerAmendment:
    """An accepted REPLACE: the order's terms from `ts_event` on."""

    client_order_id: str
    quantity: Decimal
    limit_price: Decimal | None
    stop_price: Decimal | None
    ts_event: int


@dataclass(frozen=True, slots=True)
class LedgerFill:
    """One fill (one trade) at the venue."""

    trade_id: str
    client_order_id: str
    venue_order_id: str
    account_id: str
    instrument_id: str
    side: Side
    quantity: Decimal
    price: Decimal
    fee: Decimal
    fee_currency: str
    liquidity_side: LiquiditySide
    ts_event: int


@dataclass(slots=True)
class Ledger:
    """The venue's ground truth: accepted orders, their amendments and every fill, in order."""

    orders: list[LedgerOrder] = field(default_factory=list)
    amendments: list[LedgerAmendment] = field(default_factory=list)
    fills: list[LedgerFill] = field(default_factory=list)

    def fills_of(self, client_order_id: str) -> list[LedgerFill]:
        """Return the fills of one order, in order."""
        return [f for f in self.fills if f.client_order_id == client_order_id]

    def filled_quantity(self, client_order_id: str) -> Decimal:
        """Return the total quantity filled for one order."""
        return sum((f.quantity for f in self.fills_of(client_order_id)), _ZERO)


# --------------------------------------------------------------------------------------------
# Venue state
# --------------------------------------------------------------------------------------------


@dataclass(slots=True)
class SimOrder:
    """An order as the simulated venue holds it."""

    client_order_id: str
    venue_order_id: str | None
    account_id: str
    strategy_id: str | None
    instrument_id: str
    side: Side
    order_type: OrderType
    quantity: Decimal
    limit_price: Decimal | None
    stop_price: Decimal | None
    time_in_force: TimeInForce
    expire_time_ns: int | None
    post_only: bool
    status: OrderStatus
    priority: int = 0
    triggered: bool = False
    filled_quantity: Decimal = _ZERO
    filled_notional: Decimal = _ZERO
    reason: str | None = None  # why it was rejected, canceled or expired, as reported
    awaiting_trade: bool = False  # market_waits_for_trade: accepted, matched at the next trade
    ts_closed: int = 0  # venue time it was canceled or expired

    @property
    def leaves_quantity(self) -> Decimal:
        """Return the quantity still working (zero once terminal)."""
        return _ZERO if self.status.is_terminal else self.quantity - self.filled_quantity

    @property
    def avg_price(self) -> Decimal | None:
        """Return the average fill price, or None before any fill."""
        if self.filled_quantity == 0:
            return None
        return _AVERAGE.divide(self.filled_notional, self.filled_quantity)

    @property
    def waiting_for_trigger(self) -> bool:
        """Return True for a stop order whose stop has not been reached yet."""
        return self.order_type in (OrderType.STOP, OrderType.STOP_LIMIT) and not self.triggered

    @property
    def working_limit(self) -> Decimal | None:
        """Return the limit it matches with: None when it executes as a market order."""
        if self.order_type in (OrderType.LIMIT, OrderType.STOP_LIMIT):
            return self.limit_price
        return None

    @property
    def is_market_like(self) -> bool:
        """Return True for MARKET orders and triggered STOP orders."""
        return self.order_type in (OrderType.MARKET, OrderType.STOP)


@dataclass(slots=True)
class _Level:
    price: Decimal
    size: Decimal


@dataclass(slots=True)
class _Market:
    """What the venue knows of one instrument's market; sizes shrink as fills consume them."""

    bids: list[_Level] | None = None  # None until a book was seen
    asks: list[_Level] | None = None
    last_trade: Decimal | None = None
    trade_left: Decimal = _ZERO  # the last trade's size not yet consumed
    has_snapshot: bool = False  # a BookSnapshot was seen: QUOTE ticks no longer set the book

    @property
    def has_data(self) -> bool:
        return self.bids is not None or self.last_trade is not None

    def liquidity(self, taker_side: Side, limit: Decimal | None) -> list[_Level]:
        """Levels a taker on `taker_side` may hit, best first, within its limit.

        Without a book: the last trade as one level. The levels are the market's own objects,
        so shrinking their size consumes the liquidity.
        """
        if self.bids is not None and self.asks is not None:
            levels = self.asks if taker_side is Side.BUY else self.bids
            return [lvl for lvl in levels if lvl.size > 0 and _within(lvl.price, taker_side, limit)]
        if self.last_trade is None or self.trade_left <= 0:
            return []
        if not _within(self.last_trade, taker_side, limit):
            return []
        return [_TradeLevel(self)]


class _TradeLevel(_Level):
    """The last trade as a level: consuming its size consumes the market's `trade_left`."""

    __slots__ = ("_market",)

    def __init__(self, market: _Market) -> None:
        assert market.last_trade is not None
        super().__init__(market.last_trade, market.trade_left)
        self._market = market

    def consume(self, quantity: Decimal) -> None:
        self._market.trade_left -= quantity


def _within(price: Decimal, taker_side: Side, limit: Decimal | None) -> bool:
    """Return True if a taker on `taker_side` with `limit` accepts `price`."""
    if limit is None:
        return True
    return price <= limit if taker_side is Side.BUY else price >= limit


def _consume(level: _Level, quantity: Decimal) -> None:
    level.size -= quantity
    if isinstance(level, _TradeLevel):
        level.consume(quantity)


# --------------------------------------------------------------------------------------------
# The venue
# --------------------------------------------------------------------------------------------


#: A resting limit order where market data finds it: (key, priority, client order id), the key
#: being the limit negated for a buy and the limit for a sell, so each side's list, ascending,
#: is in price-time priority (buys high, sells low, then oldest), and both merged are in the
#: order the venue matches them.
_Entry = tuple[Decimal, int, str]


@dataclass(slots=True)
class _Resting:
    """The working limit orders of one instrument that market data may fill, per side."""

    buys: list[_Entry] = field(default_factory=list)
    sells: list[_Entry] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class SimulatedVenueConfig:
    """How the simulated venue behaves.

    Fee rates are fractions (0.001 = 0.1 %); a negative maker fee is a rebate. An Instrument's
    own `maker_fee` / `taker_fee`, when set, take precedence for that instrument. With an
    Instrument configured, orders off its tick or lot grid are rejected and slipped prices are
    rounded onto the tick grid against the taker (buys up, sells down); without one, prices
    are used exactly as they come.

    `market_waits_for_trade`: a MARKET order that arrives is accepted and then waits for the
    next trade print of its instrument, which it meets first (before resting orders). Off (the
    default), it takes the liquidity the venue knows on arrival: right for a live feed, where
    the last print is current, wrong for bars, where between a close and the next open (a
    weekend, missing minutes) the last print is the close.
    """

    venue: str = "SIM"
    maker_fee: Decimal = DEFAULT_FEE_RATE
    taker_fee: Decimal = DEFAULT_FEE_RATE
    slippage: SlippageModel = field(default_factory=NoSlippage)
    latency_ns: int = 0
    instruments: Mapping[str, Instrument] = field(default_factory=dict)
    market_waits_for_trade: bool = False

    def __post_init__(self) -> None:
        if self.latency_ns < 0:
            raise ValueError(f"latency_ns must be >= 0, got {self.latency_ns}")
        for name in ("maker_fee", "taker_fee"):
            rate: Decimal = getattr(self, name)
            if not rate.is_finite() or abs(rate) >= 1:
                raise ValueError(f"{name} must be a fraction in (-1, 1), got {rate}")


class SimulatedVenue:
    """A matching venue in memory; implements `VenueAdapter`.

    `id_prefix` starts every id the venue makes (venue order ids `<prefix>-O<n>`, trade ids
    `<prefix>-T<n>`, report ids `<prefix>-R<n>`); it defaults to a fresh UUIDv7 so that ids
    of a restarted venue never collide with those of an earlier run (portfolio de-duplicates
    fills by trade id). Tests pass a fixed prefix.
    """

    def __init__(
        self,
        config: SimulatedVenueConfig | None = None,
        *,
        id_prefix: str | None = None,
        keep_closed: int | None = None,
    ) -> None:
        if keep_closed is not None and keep_closed < 1:
            raise ValueError(f"keep_closed must be >= 1, got {keep_closed}")
        self.config = config or SimulatedVenueConfig()
        #: None: every order, command id and ledger entry is kept (tests, backtests). A number:
        #: closed orders past the latest `keep_closed` are forgotten with their history, and
        #: the seen ids and the ledger are trimmed to match (a long-running stage whose
        #: sent-log guards client order ids beyond that).
        self.keep_closed = keep_closed
        self._closed_ids: dict[str, None] = {}
        self.ledger = Ledger()
        self._prefix = id_prefix or new_id()
        if not _ID_PREFIX.fullmatch(self._prefix):
            # Every id is `<prefix>-<kind><n>`: an identifier, so reports may carry it as made.
            raise ValueError(f"id_prefix {self._prefix!r} does not start a valid identifier")
        self._counters: dict[str, itertools.count[int]] = {}
        self._priority = itertools.count(1)
        self._now = 0
        self._orders: dict[str, SimOrder] = {}
        self._open: dict[str, SimOrder] = {}
        #: The working orders of each instrument (what market data of it can touch).
        self._open_of: dict[str, dict[str, SimOrder]] = {}
        #: Of those, the limit orders market data may fill, sorted (a trade or a book visits
        #: only the ones it reaches, not every working order), with each one's entry...
        self._resting: dict[str, _Resting] = {}
        self._entries: dict[str, _Entry] = {}
        #: ... and the stop orders waiting for their trigger.
        self._stops_of: dict[str, dict[str, SimOrder]] = {}
        #: (expire time, priority, client order id) of working orders with an expiry: a
        #: wake-up with nothing due looks at the head only.
        self._expiries: list[tuple[int, int, str]] = []
        self._markets: dict[str, _Market] = {}
        # Insertion-ordered, so the oldest can be trimmed (keep_closed).
        self._seen_commands: dict[str, None] = {}
        self._seen_client_ids: dict[str, None] = {}
        self._inflight: list[tuple[int, int, OrderCommand]] = []
        self._arrival = itertools.count()
        #: Every report made for each known order, in order: its history.
        self._reports_of: dict[str, list[ExecutionReport]] = {}

    # -- VenueAdapter ---------------------------------------------------------------------

    @property
    def venue(self) -> str:
        """The venue id this simulated venue answers for."""
        return self.config.venue

    @property
    def now_ns(self) -> int:
        """Venue time: the latest time passed in."""
        return self._now

    def order(self, client_order_id: str) -> SimOrder | None:
        """Return the venue's view of an order (any status), or None if unknown."""
        return self._orders.get(client_order_id)

    def open_orders(self) -> list[SimOrder]:
        """Return the working orders, oldest first."""
        return sorted(self._open.values(), key=lambda o: o.priority)

    def history(self, client_order_id: str, account_id: str) -> list[ExecutionReport]:
        """Return what the venue did with one order: every report it made for it, as made.

        The reports keep their original report ids and trade ids (ACCEPTED, fills, REPLACED,
        CANCEL_REJECTED, the CANCELED/EXPIRED that ended it; a rejected order is its REJECTED),
        so a consumer that applied them once ignores the replay. Used to answer a redelivered
        SUBMIT and a QUERY. Empty when the venue has not received the order (never sent, or
        still travelling under the latency model) or it belongs to another account.
        """
        order = self._orders.get(client_order_id)
        if order is None or order.account_id != account_id:
            return []
        return list(self._reports_of.get(client_order_id, ()))

    def submit(self, command: OrderCommand, now_ns: int) -> list[ExecutionReport]:
        """Receive a SUBMIT; a client order id already seen is dropped (returns nothing new)."""
        if command.command_type is not CommandType.SUBMIT:
            raise ValueError(f"submit() takes a SUBMIT command, not {command.command_type}")
        return self.advance(now_ns) + self._receive(command)

    def cancel(self, command: OrderCommand, now_ns: int) -> list[ExecutionReport]:
        """Receive a CANCEL."""
        if command.command_type is not CommandType.CANCEL:
            raise ValueError(f"cancel() takes a CANCEL command, not {command.command_type}")
        return self.advance(now_ns) + self._receive(command)

    def replace(self, command: OrderCommand, now_ns: int) -> list[ExecutionReport]:
        """Receive a REPLACE."""
        if command.command_type is not CommandType.REPLACE:
            raise ValueError(f"replace() takes a REPLACE command, not {command.command_type}")
        return self.advance(now_ns) + self._receive(command)

    def cancel_all(
        self, now_ns: int, account_ids: Iterable[str] | None = None, reason: str | None = None
    ) -> list[ExecutionReport]:
        """Cancel every working order (of `account_ids` if given), oldest first."""
        reports = self.advance(now_ns)
        accounts = set(account_ids) if account_ids is not None else None
        for order in self.open_orders():
            if accounts is None or order.account_id in accounts:
                self._close(order, OrderStatus.CANCELED, ExecType.CANCELED, reason, reports)
        return reports

    def on_market_data(self, event: Tick | BookSnapshot) -> list[ExecutionReport]:
        """Apply a tick or a book at its `ts_event`, then match what it crosses."""
        if isinstance(event, BookSnapshot):
            return self.on_book(event)
        return self.on_tick(event)

    def on_book(self, book: BookSnapshot) -> list[ExecutionReport]:
        """Replace the instrument's book and fill resting limits it crosses (as maker)."""
        reports = self.advance(book.ts_event)
        if not self._is_ours(book.instrument_id):
            return reports
        market = self._market(book.instrument_id)
        market.bids = [_Level(lvl.price, lvl.size) for lvl in book.bids]
        market.asks = [_Level(lvl.price, lvl.size) for lvl in book.asks]
        market.has_snapshot = True
        self._match_resting_on_book(book.instrument_id, market, reports)
        return reports

    def on_tick(self, tick: Tick) -> list[ExecutionReport]:
        """Apply a trade (fills resting limits it passes, triggers stops) or a quote."""
        reports = self.advance(tick.ts_event)
        if not self._is_ours(tick.instrument_id):
            return reports
        market = self._market(tick.instrument_id)
        if tick.kind is TickKind.QUOTE:
            # A quote stands in for the book only where no depth snapshot is published: it
            # would otherwise wipe the deeper levels of the latest BookSnapshot.
            if not market.has_snapshot and tick.bid_size is not None and tick.ask_size is not None:
                assert tick.bid is not None  # a QUOTE tick has both sides (the model's rule)
                assert tick.ask is not None
                market.bids = [_Level(tick.bid, tick.bid_size)] if tick.bid_size > 0 else []
                market.asks = [_Level(tick.ask, tick.ask_size)] if tick.ask_size > 0 else []
                self._match_resting_on_book(tick.instrument_id, market, reports)
            return reports
        market.last_trade = tick.price
        market.trade_left = tick.size
        if self._open_of.get(tick.instrument_id):
            # Nothing works in the instrument (most ticks of a backtest): nothing to match.
            if self.config.market_waits_for_trade:
                self._release_waiting(tick.instrument_id, reports)
            self._match_resting_on_trade(tick.instrument_id, market, tick.price, reports)
            self._trigger_stops(tick.instrument_id, tick.price, reports)
        return reports

    def advance(self, now_ns: int) -> list[ExecutionReport]:
        """Move venue time to `now_ns`: commands that arrive by then act, GTD orders expire."""
        reports: list[ExecutionReport] = []
        if self.keep_closed is not None and len(self._closed_ids) > self.keep_closed:
            self._evict_closed(self.keep_closed)
        target = max(now_ns, self._now)
        while self._inflight and self._inflight[0][0] <= target:
            arrive_at, _, command = heapq.heappop(self._inflight)
            self._expire(arrive_at, reports)
            self._now = max(self._now, arrive_at)
            self._act(command, reports)
        self._expire(target, reports)
        self._now = target
        return reports

    # -- commands -------------------------------------------------------------------------

    def _receive(self, command: OrderCommand) -> list[ExecutionReport]:
        if command.command_id in self._seen_commands:
            log.warning("duplicate command dropped", extra={"command_id": command.command_id})
            return []
        if command.command_type is CommandType.SUBMIT:
            if command.client_order_id in self._seen_client_ids:
                log.warning(
                    "duplicate SUBMIT dropped: the client order id is taken",
                    extra={"client_order_id": command.client_order_id},
                )
                return []
            self._seen_client_ids[command.client_order_id] = None
        self._seen_commands[command.command_id] = None
        heapq.heappush(
            self._inflight, (self._now + self.config.latency_ns, next(self._arrival), command)
        )
        return self.advance(self._now)

    def _act(self, command: OrderCommand, reports: list[ExecutionReport]) -> None:
        if command.command_type is CommandType.SUBMIT:
            self._activate(command, reports)
        elif command.command_type is CommandType.CANCEL:
            self._cancel(command, reports)
        else:
            self._replace(command, reports)

    def _activate(self, cmd: OrderCommand, reports: list[ExecutionReport]) -> None:
        # The SUBMIT rules of OrderCommand guarantee these.
        assert cmd.side is not None
        assert cmd.order_type is not None
        assert cmd.quantity is not None
        assert cmd.time_in_force is not None
        order = SimOrder(
            client_order_id=cmd.client_order_id,
            venue_order_id=None,
            account_id=cmd.account_id,
            strategy_id=cmd.strategy_id,
            instrument_id=cmd.instrument_id,
            side=cmd.side,
            order_type=cmd.order_type,
            quantity=cmd.quantity,
            limit_price=cmd.limit_price,
            stop_price=cmd.stop_price,
            time_in_force=cmd.time_in_force,
            expire_time_ns=cmd.expire_time_ns,
            post_only=cmd.post_only,
            status=OrderStatus.SUBMITTED,
        )
        self._orders[order.client_order_id] = order
        reason = self._submit_problem(order)
        if reason is not None:
            order.status = OrderStatus.REJECTED
            order.reason = reason
            reports.append(self._report(order, ExecType.REJECTED, reason=reason))
            self._closed_ids[order.client_order_id] = None
            return
        order.venue_order_id = self._next_id("O")
        order.status = OrderStatus.ACCEPTED
        order.priority = next(self._priority)
        self.ledger.orders.append(
            LedgerOrder(
                client_order_id=order.client_order_id,
                venue_order_id=order.venue_order_id,
                account_id=order.account_id,
                instrument_id=order.instrument_id,
                side=order.side,
                order_type=order.order_type,
                quantity=order.quantity,
                limit_price=order.limit_price,
                stop_price=order.stop_price,
                time_in_force=order.time_in_force,
                expire_time_ns=order.expire_time_ns,
                ts_accepted=self._now,
            )
        )
        self._open[order.client_order_id] = order
        self._open_of.setdefault(order.instrument_id, {})[order.client_order_id] = order
        self._index(order)
        if order.expire_time_ns is not None:
            heapq.heappush(
                self._expiries, (order.expire_time_ns, order.priority, order.client_order_id)
            )
        reports.append(self._accepted(order))
        if self.config.market_waits_for_trade and order.order_type is OrderType.MARKET:
            order.awaiting_trade = True
            return
        self._work(order, reports)

    def _submit_problem(self, order: SimOrder) -> str | None:
        """Return why the venue rejects a new order, or None if it accepts it."""
        venue = _parts(order.instrument_id).venue
        if venue != self.venue:
            return format_reason("VENUE_MISMATCH", {"venue": venue, "expected": self.venue})
        instrument = self.config.instruments.get(order.instrument_id)
        if self.config.instruments and instrument is None:
            return format_reason("UNKNOWN_INSTRUMENT", {"instrument_id": order.instrument_id})
        if instrument is not None:
            for price in (order.limit_price, order.stop_price):
                problem = instrument.check_price(price) if price is not None else None
                if problem:
                    return problem
            problem = instrument.check_quantity(
                order.quantity, order.limit_price or order.stop_price
            )
            if problem:
                return problem
        if order.expire_time_ns is not None and order.expire_time_ns <= self._now:
            return format_reason(
                "EXPIRE_TIME_IN_PAST",
                {"expire_time_ns": str(order.expire_time_ns), "venue_time_ns": str(self._now)},
            )
        market = self._market(order.instrument_id)
        if order.order_type is OrderType.MARKET and not market.has_data:
            return format_reason("NO_MARKET_DATA", {"instrument_id": order.instrument_id})
        if order.post_only and order.order_type is not OrderType.LIMIT:
            return format_reason("POST_ONLY_NEEDS_LIMIT", {"order_type": order.order_type})
        if order.post_only and market.liquidity(order.side, order.limit_price):
            return format_reason("POST_ONLY_WOULD_TAKE", {"limit_price": str(order.limit_price)})
        waits = self.config.market_waits_for_trade and order.order_type is OrderType.MARKET
        if order.time_in_force is TimeInForce.FOK and not order.waiting_for_trigger and not waits:
            available = self._available(market, order.side, order.working_limit)
            if available < order.quantity:
                return format_reason(
                    "FOK_NOT_FILLABLE",
                    {"quantity": str(order.quantity), "available": str(available)},
                )
        return None

    def _cancel(self, cmd: OrderCommand, reports: list[ExecutionReport]) -> None:
        order = self._orders.get(cmd.client_order_id)
        if order is None or order.account_id != cmd.account_id:
            reports.append(self._unknown_order_reject(cmd))
            return
        if order.status.is_terminal:
            reports.append(
                self._report(
                    order,
                    ExecType.CANCEL_REJECTED,
                    reason=format_reason("ORDER_NOT_OPEN", {"status": order.status}),
                )
            )
            return
        self._close(order, OrderStatus.CANCELED, ExecType.CANCELED, None, reports)

    def _replace(self, cmd: OrderCommand, reports: list[ExecutionReport]) -> None:
        order = self._orders.get(cmd.client_order_id)
        if order is None or order.account_id != cmd.account_id:
            reports.append(self._unknown_order_reject(cmd))
            return
        reason = self._replace_problem(order, cmd)
        if reason is not None:
            reports.append(self._report(order, ExecType.CANCEL_REJECTED, reason=reason))
            return
        new_quantity = cmd.new_quantity if cmd.new_quantity is not None else order.quantity
        new_limit = cmd.new_limit_price if cmd.new_limit_price is not None else order.limit_price
        new_stop = cmd.new_stop_price if cmd.new_stop_price is not None else order.stop_price
        # Like real venues: a new price or a larger size loses time priority, a smaller keeps it.
        repriced = new_limit != order.limit_price or new_stop != order.stop_price
        self._unindex(order)
        if repriced or new_quantity > order.quantity:
            order.priority = next(self._priority)
        order.quantity, order.limit_price, order.stop_price = new_quantity, new_limit, new_stop
        self._index(order)
        self.ledger.amendments.append(
            LedgerAmendment(order.client_order_id, new_quantity, new_limit, new_stop, self._now)
        )
        reports.append(self._report(order, ExecType.REPLACED))
        self._work(order, reports)

    def _replace_problem(self, order: SimOrder, cmd: OrderCommand) -> str | None:
        if order.status.is_terminal:
            return format_reason("ORDER_NOT_OPEN", {"status": order.status})
        if cmd.new_limit_price is not None and order.order_type not in (
            OrderType.LIMIT,
            OrderType.STOP_LIMIT,
        ):
            return format_reason("NO_LIMIT_PRICE_TO_REPLACE", {"order_type": order.order_type})
        if cmd.new_stop_price is not None and not order.waiting_for_trigger:
            return format_reason("NO_STOP_PRICE_TO_REPLACE", {"order_type": order.order_type})
        if cmd.new_quantity is not None and cmd.new_quantity <= order.filled_quantity:
            return format_reason(
                "QUANTITY_NOT_ABOVE_FILLED",
                {"new_quantity": str(cmd.new_quantity), "filled": str(order.filled_quantity)},
            )
        instrument = self.config.instruments.get(order.instrument_id)
        if instrument is not None:
            for price in (cmd.new_limit_price, cmd.new_stop_price):
                problem = instrument.check_price(price) if price is not None else None
                if problem:
                    return problem
            if cmd.new_quantity is not None:
                problem = instrument.check_quantity(cmd.new_quantity)
                if problem:
                    return problem
        new_limit = cmd.new_limit_price or order.limit_price
        if order.post_only and self._market(order.instrument_id).liquidity(order.side, new_limit):
            return format_reason("POST_ONLY_WOULD_TAKE", {"limit_price": str(new_limit)})
        return None

    # -- matching -------------------------------------------------------------------------

    def _work(self, order: SimOrder, reports: list[ExecutionReport]) -> None:
        """Trigger, take and then rest or cancel an order that just became active or changed."""
        if order.awaiting_trade:
            return  # a REPLACE does not make it take the market it arrived after
        market = self._market(order.instrument_id)
        if order.waiting_for_trigger:
            assert order.stop_price is not None
            if market.last_trade is None or not _reached(order, market.last_trade):
                return  # rests until a trade reaches the stop
            self._unindex(order)
            order.triggered = True
            self._index(order)
        limit = order.working_limit
        leaves = order.leaves_quantity
        if order.time_in_force is TimeInForce.FOK:
            available = self._available(market, order.side, limit)
            if available < leaves:
                reason = format_reason(
                    "FOK_NOT_FILLABLE", {"quantity": str(leaves), "available": str(available)}
                )
                self._close(order, OrderStatus.CANCELED, ExecType.CANCELED, reason, reports)
                return
        for level in market.liquidity(order.side, limit):
            leaves = order.leaves_quantity
            if leaves <= 0:
                break
            quantity = min(leaves, level.size)
            _consume(level, quantity)
            price = self._slipped(order, level.price, limit)
            self._fill(order, quantity, price, LiquiditySide.TAKER, reports)
        remaining = order.leaves_quantity
        if remaining <= 0:
            return
        if order.is_market_like:
            reason = format_reason("INSUFFICIENT_LIQUIDITY", {"unfilled": str(remaining)})
            self._close(order, OrderStatus.CANCELED, ExecType.CANCELED, reason, reports)
        elif order.time_in_force is TimeInForce.IOC:
            reason = format_reason("IOC_UNFILLED", {"unfilled": str(remaining)})
            self._close(order, OrderStatus.CANCELED, ExecType.CANCELED, reason, reports)
        # else: a GTC/GTD limit rests in _open until market data crosses it

    def _release_waiting(self, instrument_id: str, reports: list[ExecutionReport]) -> None:
        """Match the MARKET orders waiting for a trade (oldest first) on the one just applied."""
        waiting = sorted(
            (o for o in self._open_of[instrument_id].values() if o.awaiting_trade),
            key=lambda o: o.priority,
        )
        for order in waiting:
            order.awaiting_trade = False
            self._work(order, reports)

    def _match_resting_on_book(
        self, instrument_id: str, market: _Market, reports: list[ExecutionReport]
    ) -> None:
        resting = self._resting.get(instrument_id)
        if resting is None:
            return
        # Only a buy whose limit reaches the lowest ask on offer (a sell: the highest bid) can
        # take anything, and fills only shrink the sizes: the others are not visited.
        asks = market.liquidity(Side.BUY, None)
        bids = market.liquidity(Side.SELL, None)
        buys = sells = resting.buys[:0]
        if asks:
            lowest = min(level.price for level in asks).copy_negate()
            buys = resting.buys[: bisect.bisect_left(resting.buys, (lowest, math.inf))]
        if bids:
            highest = max(level.price for level in bids)
            sells = resting.sells[: bisect.bisect_left(resting.sells, (highest, math.inf))]
        for _, _, client_order_id in heapq.merge(buys, sells):
            order = self._open[client_order_id]
            limit = order.working_limit
            assert limit is not None
            crossing = market.liquidity(order.side, limit)
            quantity = _ZERO
            for level in crossing:
                take = min(order.leaves_quantity - quantity, level.size)
                if take <= 0:
                    break
                _consume(level, take)
                quantity += take
            if quantity > 0:
                self._fill(order, quantity, limit, LiquiditySide.MAKER, reports)

    def _match_resting_on_trade(
        self, instrument_id: str, market: _Market, price: Decimal, reports: list[ExecutionReport]
    ) -> None:
        resting = self._resting.get(instrument_id)
        if resting is None:
            return
        # A print strictly through the limit fills (buys: below it, sells: above it): a prefix
        # of each side.
        buys = resting.buys[: bisect.bisect_left(resting.buys, (price.copy_negate(),))]
        sells = resting.sells[: bisect.bisect_left(resting.sells, (price,))]
        for _, _, client_order_id in heapq.merge(buys, sells):
            if market.trade_left <= 0:
                break
            order = self._open[client_order_id]
            limit = order.working_limit
            assert limit is not None
            quantity = min(order.leaves_quantity, market.trade_left)
            market.trade_left -= quantity
            self._fill(order, quantity, limit, LiquiditySide.MAKER, reports)

    def _trigger_stops(
        self, instrument_id: str, price: Decimal, reports: list[ExecutionReport]
    ) -> None:
        waiting = self._stops_of.get(instrument_id)
        if not waiting:
            return
        stops = sorted(waiting.values(), key=lambda o: o.priority)
        for order in stops:
            if order.client_order_id in self._open and _reached(order, price):
                self._work(order, reports)

    def _available(self, market: _Market, side: Side, limit: Decimal | None) -> Decimal:
        return sum((lvl.size for lvl in market.liquidity(side, limit)), _ZERO)

    def _slipped(self, order: SimOrder, price: Decimal, limit: Decimal | None) -> Decimal:
        """The taker's price: slipped against it, on the tick grid, never beyond its limit."""
        slipped = self.config.slippage.apply(price, order.side, order.quantity)
        instrument = self.config.instruments.get(order.instrument_id)
        if instrument is not None and slipped != price:
            mode = ROUND_CEILING if order.side is Side.BUY else ROUND_FLOOR
            slipped = instrument.round_price(slipped, mode)
        if limit is not None:
            slipped = min(slipped, limit) if order.side is Side.BUY else max(slipped, limit)
        return slipped

    def _expire(self, now_ns: int, reports: list[ExecutionReport]) -> None:
        heap = self._expiries
        due: list[SimOrder] = []
        # Popped in (expire time, priority) order; an entry of an order no longer working
        # is stale and dropped.
        while heap and heap[0][0] <= now_ns:
            _, priority, client_order_id = heapq.heappop(heap)
            order = self._open.get(client_order_id)
            if order is not None and order.priority == priority:
                due.append(order)
        for order in due:
            # The report carries the expire time: venue time has reached it by now.
            self._now = max(self._now, order.expire_time_ns or 0)
            self._close(order, OrderStatus.EXPIRED, ExecType.EXPIRED, None, reports)

    # -- state changes and reports --------------------------------------------------------

    def _fill(
        self,
        order: SimOrder,
        quantity: Decimal,
        price: Decimal,
        liquidity: LiquiditySide,
        reports: list[ExecutionReport],
    ) -> None:
        assert order.venue_order_id is not None
        instrument = self.config.instruments.get(order.instrument_id)
        rate = self._fee_rate(instrument, liquidity)
        fee = (quantity * price * rate).quantize(FEE_PRECISION, rounding=ROUND_HALF_UP)
        currency = _parts(order.instrument_id).quote
        order.filled_quantity += quantity
        order.filled_notional += quantity * price
        done = order.filled_quantity >= order.quantity
        order.status = OrderStatus.FILLED if done else OrderStatus.PARTIALLY_FILLED
        if done:
            self._unlist(order)
            self._closed_ids[order.client_order_id] = None
        trade_id = self._next_id("T")
        self.ledger.fills.append(
            LedgerFill(
                trade_id=trade_id,
                client_order_id=order.client_order_id,
                venue_order_id=order.venue_order_id,
                account_id=order.account_id,
                instrument_id=order.instrument_id,
                side=order.side,
                quantity=quantity,
                price=price,
                fee=fee,
                fee_currency=currency,
                liquidity_side=liquidity,
                ts_event=self._now,
            )
        )
        reports.append(
            self._report(
                order,
                ExecType.FILL if done else ExecType.PARTIAL_FILL,
                last_qty=quantity,
                last_price=price,
                fee=fee,
                fee_currency=currency,
                liquidity_side=liquidity,
                trade_id=trade_id,
            )
        )

    def _fee_rate(self, instrument: Instrument | None, liquidity: LiquiditySide) -> Decimal:
        if liquidity is LiquiditySide.MAKER:
            own = instrument.maker_fee if instrument is not None else None
            return own if own is not None else self.config.maker_fee
        own = instrument.taker_fee if instrument is not None else None
        return own if own is not None else self.config.taker_fee

    def _close(
        self,
        order: SimOrder,
        status: OrderStatus,
        exec_type: ExecType,
        reason: str | None,
        reports: list[ExecutionReport],
    ) -> None:
        order.status = status
        order.reason = reason
        order.ts_closed = self._now
        self._unlist(order)
        self._closed_ids[order.client_order_id] = None
        reports.append(self._report(order, exec_type, reason=reason))

    def _unlist(self, order: SimOrder) -> None:
        """Take an order off the working lists (its expiry entry is skipped when popped)."""
        self._open.pop(order.client_order_id, None)
        of_instrument = self._open_of.get(order.instrument_id)
        if of_instrument is not None:
            of_instrument.pop(order.client_order_id, None)
        self._unindex(order)

    def _index(self, order: SimOrder) -> None:
        """File a working order where market data looks for it: among the resting limits, in
        price-time priority, or the stops waiting for their trigger (else nowhere: a market
        order). Called whenever one of them starts working or its terms or priority changed.
        """
        if order.waiting_for_trigger:
            self._stops_of.setdefault(order.instrument_id, {})[order.client_order_id] = order
            return
        limit = order.working_limit
        if limit is None:
            return
        resting = self._resting.get(order.instrument_id)
        if resting is None:
            resting = self._resting[order.instrument_id] = _Resting()
        if order.side is Side.BUY:
            entry, side = (limit.copy_negate(), order.priority, order.client_order_id), resting.buys
        else:
            entry, side = (limit, order.priority, order.client_order_id), resting.sells
        if not side or side[-1] < entry:
            side.append(entry)  # the newest at the worst price so far: no search
        else:
            bisect.insort(side, entry)
        self._entries[order.client_order_id] = entry

    def _unindex(self, order: SimOrder) -> None:
        """Take an order out of `_index`'s lists (before its terms change, or it stops working)."""
        stops = self._stops_of.get(order.instrument_id)
        if stops:
            stops.pop(order.client_order_id, None)
        entry = self._entries.pop(order.client_order_id, None)
        if entry is None:
            return
        resting = self._resting[order.instrument_id]
        side = resting.buys if order.side is Side.BUY else resting.sells
        del side[bisect.bisect_left(side, entry)]

    def _evict_closed(self, keep: int) -> None:
        """Forget the oldest closed orders past `keep`, and trim the seen ids and the ledger.

        Its history goes with an order: a later QUERY or duplicate SUBMIT for it is answered
        as for an unknown order (the stage's sent-log keeps such a SUBMIT from being sent).
        """
        closed = self._closed_ids
        for client_order_id in list(itertools.islice(closed, len(closed) - keep)):
            del closed[client_order_id]
            self._orders.pop(client_order_id, None)
            self._reports_of.pop(client_order_id, None)
        # Trimmed in chunks (at twice the bound), so the cost per order stays constant.
        for seen in (self._seen_commands, self._seen_client_ids):
            if len(seen) > 4 * keep:
                for key in list(itertools.islice(seen, len(seen) - 2 * keep)):
                    del seen[key]
        ledger = self.ledger
        for entries in (ledger.orders, ledger.fills, ledger.amendments):
            if len(entries) > 2 * keep:
                del entries[: len(entries) - keep]

    def _report(
        self,
        order: SimOrder,
        exec_type: ExecType,
        *,
        reason: str | None = None,
        last_qty: Decimal = _ZERO,
        last_price: Decimal | None = None,
        fee: Decimal = _ZERO,
        fee_currency: str | None = None,
        liquidity_side: LiquiditySide = LiquiditySide.NONE,
        trade_id: str | None = None,
    ) -> ExecutionReport:
        report = ExecutionReport(
            report_id=self._next_id("R"),
            account_id=order.account_id,
            client_order_id=order.client_order_id,
            venue_order_id=order.venue_order_id,
            strategy_id=order.strategy_id,
            instrument_id=order.instrument_id,
            exec_type=exec_type,
            order_status=order.status,
            side=order.side,
            last_qty=last_qty,
            last_price=last_price,
            cum_qty=order.filled_quantity,
            leaves_qty=order.leaves_quantity,
            avg_price=order.avg_price,
            fee=fee,
            fee_currency=fee_currency,
            liquidity_side=liquidity_side,
            trade_id=trade_id,
            reason=reason,
            ts_event=self._now,
        )
        self._reports_of.setdefault(order.client_order_id, []).append(report)
        return report

    def _accepted(self, order: SimOrder) -> ExecutionReport:
        """Return the ACCEPTED report of an order just activated: `_report`, not validated again.

        Every value is the validated SUBMIT command's (as the order holds it), a constant, an
        id of this venue (its prefix is checked once, at start) or venue time; nothing is
        filled yet, so what is left is the command's quantity.
        """
        report = build(
            ExecutionReport,
            {
                "report_id": self._next_id("R"),
                "account_id": order.account_id,
                "client_order_id": order.client_order_id,
                "venue_order_id": order.venue_order_id,
                "strategy_id": order.strategy_id,
                "instrument_id": order.instrument_id,
                "exec_type": ExecType.ACCEPTED,
                "order_status": order.status,
                "side": order.side,
                "last_qty": _ZERO,
                "last_price": None,
                "cum_qty": order.filled_quantity,
                "leaves_qty": order.leaves_quantity,
                "avg_price": None,
                "fee": _ZERO,
                "fee_currency": None,
                "liquidity_side": LiquiditySide.NONE,
                "trade_id": None,
                "reason": None,
                "ts_event": self._now,
            },
        )
        self._reports_of.setdefault(order.client_order_id, []).append(report)
        return report

    def _unknown_order_reject(self, cmd: OrderCommand) -> ExecutionReport:
        # FIX answers a cancel of an unknown order with OrdStatus=Rejected; the report model
        # needs a side, which a CANCEL need not carry: the command's, else BUY as a filler.
        return ExecutionReport(
            report_id=self._next_id("R"),
            account_id=cmd.account_id,
            client_order_id=cmd.client_order_id,
            venue_order_id=cmd.venue_order_id,
            strategy_id=cmd.strategy_id,
            instrument_id=cmd.instrument_id,
            exec_type=ExecType.CANCEL_REJECTED,
            order_status=OrderStatus.REJECTED,
            side=cmd.side or Side.BUY,
            reason=format_reason("ORDER_NOT_FOUND", {"client_order_id": cmd.client_order_id}),
            ts_event=self._now,
        )

    # -- helpers --------------------------------------------------------------------------

    def _next_id(self, kind: str) -> str:
        counter = self._counters.get(kind)
        if counter is None:
            counter = self._counters[kind] = itertools.count(1)
        return f"{self._prefix}-{kind}{next(counter)}"

    def _is_ours(self, instrument_id: str) -> bool:
        return instrument_id.rpartition(".")[2] == self.venue

    def _market(self, instrument_id: str) -> _Market:
        market = self._markets.get(instrument_id)
        if market is None:
            market = self._markets[instrument_id] = _Market()
        return market


@functools.lru_cache(maxsize=4096)
def _parts(instrument_id: str) -> InstrumentId:
    """The parsed instrument id; cached because every order and fill needs its venue or quote."""
    return InstrumentId.parse(instrument_id)


def _reached(order: SimOrder, trade_price: Decimal) -> bool:
    """Return True if a trade at `trade_price` reaches the order's stop."""
    assert order.stop_price is not None
    if order.side is Side.BUY:
        return trade_price >= order.stop_price
    return trade_price <= order.stop_price
