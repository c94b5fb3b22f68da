"""The risk stage's state (prices, positions, working orders, halts) and its decision pipeline."""

from __future__ import annotations

import itertools
import logging
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from quantmesh_common.ids import new_id
from quantmesh_common.messages import (
    AccountOpened,
    Alert,
    AlertSeverity,
    Bar,
    ControlAction,
    ControlCommand,
    ExecutionReport,
    Instrument,
    Order,
    OrderIntent,
    PortfolioSnapshot,
    Position,
    RiskDecision,
    RiskLimitsStatus,
    Side,
    Tick,
    TickKind,
)
from quantmesh_common.trusted import build
from quantmesh_risk.checks import (
    RiskDenial,
    check_circuit_breaker,
    check_exposure,
    check_kill_switch,
    check_max_open_orders,
    check_max_order_notional,
    check_max_order_quantity,
    check_max_position,
    check_min_notional,
    check_order_rate,
    check_price_collar,
    check_price_on_tick,
    check_quantity_rules,
    check_reference_price,
    check_var,
    fmt,
    round_to_lot,
)
from quantmesh_risk.limits import EffectiveLimits, RiskConfig, RiskLimits
from quantmesh_risk.losses import LossTracker, check_loss_limits
from quantmesh_risk.sizing import SizingConfig, TrueRanges, sized_target
from quantmesh_risk.var import ReturnSeries, estimate

#: Default VaR horizon (one return per bucket of this length) and window (returns kept).
DEFAULT_VAR_HORIZON_NS = 60 * 1_000_000_000
DEFAULT_VAR_WINDOW = 500

log = logging.getLogger(__name__)

#: A kill switch or reset aimed at every account.
EVERYTHING = "*"
#: Fills counted from `exec.reports` whose quantities are kept for a reload (the newest; trimmed
#: past twice this): the portfolio stores a fill well before this many newer ones.
RECENT_FILLS = 10_000
#: Identifier length limit of the messages (decision ids derived from intent ids must fit).
_MAX_ID = 128


@dataclass(frozen=True, slots=True)
class Breaker:
    """A tripped circuit breaker: why (an UPPER_SNAKE cause), the values behind it, and when."""

    cause: str
    details: dict[str, str] = field(default_factory=dict)
    ts_ns: int = 0


@dataclass(frozen=True, slots=True)
class WorkingOrder:
    """An order that may still fill: approved here, or reported open by the OMS."""

    instrument_id: str
    side: Side
    leaves: Decimal


@dataclass(slots=True)
class _LeavesSum:
    """The leaves of one instrument and side: their exact total and their exponents."""

    total: Decimal = Decimal(0)
    #: How many orders have each exponent (a fresh sum's exponent is the smallest of them).
    exponents: dict[int, int] = field(default_factory=dict)


def _exponent(value: Decimal) -> int:
    return int(value.as_tuple().exponent)


class WorkingOrders:
    """One account's working orders by client order id, with their leaves summed per
    instrument and side.

    An intent needs the leaves of the account's orders in its instrument; walking every
    working order for them took a third of risk's time with 10,000 orders resting. A sum is
    exact (Decimal) and reads as the walk's would: `Decimal(0)` plus each order's leaves has
    the smallest exponent among them (and 0), so the sum is given that exponent.
    WorkingOrder is frozen: an order changes only through `put` and `pop`.
    """

    __slots__ = ("_orders", "_sums")

    def __init__(self) -> None:
        self._orders: dict[str, WorkingOrder] = {}
        self._sums: dict[tuple[str, Side], _LeavesSum] = {}

    def __len__(self) -> int:
        return len(self._orders)

    def __contains__(self, client_order_id: object) -> bool:
        return client_order_id in self._orders

    def get(self, client_order_id: str) -> WorkingOrder | None:
        """Return the working order, or None."""
        return self._orders.get(client_order_id)

    def values(self) -> Iterable[WorkingOrder]:
        """Return the working orders."""
        return self._orders.values()

    def items(self) -> Iterable[tuple[str, WorkingOrder]]:
        """Return the working orders with their client order ids."""
        return self._orders.items()

    def put(self, client_order_id: str, order: WorkingOrder) -> None:
        """Add the order, or replace what was known of it."""
        self.pop(client_order_id)
        self._orders[client_order_id] = order
        key = (order.instrument_id, order.side)
        sums = self._sums.get(key)
        if sums is None:
            sums = self._sums[key] = _LeavesSum()
        sums.total += order.leaves
        exponent = _exponent(order.leaves)
        sums.exponents[exponent] = sums.exponents.get(exponent, 0) + 1

    def pop(self, client_order_id: str) -> WorkingOrder | None:
        """Remove the order; return it (None: it was not working)."""
        order = self._orders.pop(client_order_id, None)
        if order is None:
            return None
        key = (order.instrument_id, order.side)
        sums = self._sums[key]
        exponent = _exponent(order.leaves)
        left = sums.exponents[exponent] - 1
        if left:
            sums.exponents[exponent] = left
        else:
            del sums.exponents[exponent]
            if not sums.exponents:
                del self._sums[key]
                return order
        sums.total -= order.leaves
        return order

    def leaves(
        self, instrument_id: str, side: Side, excluding: WorkingOrder | None = None
    ) -> Decimal:
        """Return the leaves of the orders in `instrument_id` on `side`, but `excluding`'s."""
        sums = self._sums.get((instrument_id, side))
        if sums is None:
            return Decimal(0)
        total = sums.total
        exponents = sums.exponents
        if (
            excluding is not None
            and excluding.instrument_id == instrument_id
            and excluding.side is side
        ):
            total -= excluding.leaves
            own = _exponent(excluding.leaves)
            if exponents[own] == 1:
                exponents = {e: n for e, n in exponents.items() if e != own}
        smallest = min(0, *exponents) if exponents else 0
        return total.quantize(_ONE.scaleb(smallest))

    def net(self, instrument_id: str, excluding: WorkingOrder | None = None) -> Decimal:
        """Return the buy leaves less the sell leaves in `instrument_id`, but `excluding`'s."""
        buy = self.leaves(instrument_id, Side.BUY, excluding)
        sell = self.leaves(instrument_id, Side.SELL, excluding)
        # As a walk adding +buy and -sell leaves to Decimal(0): the smaller exponent of both.
        return (buy - sell).quantize(_ONE.scaleb(min(_exponent(buy), _exponent(sell))))


_ONE = Decimal(1)


class RiskEngine:
    """Pre-trade risk for every account this instance owns: plain state, no I/O.

    Sources of state: last prices from `md.ticks`; positions from fills on `exec.reports`
    (each trade id counted once), which also shrink or end the working order they fill;
    working orders from this engine's own approvals and the OMS's `orders.updates`; kill
    switch and circuit-breaker resets from `control`; instrument rules from the configuration
    and, for the instruments it does not name, from the venue on `ref.instruments`.
    """

    def __init__(
        self,
        config: RiskConfig,
        instruments: Iterable[Instrument] = (),
        *,
        var_horizon_ns: int = DEFAULT_VAR_HORIZON_NS,
        var_window: int = DEFAULT_VAR_WINDOW,
        sizing: SizingConfig | None = None,
        keep_ids: int | None = None,
    ) -> None:
        if keep_ids is not None and keep_ids < 1:
            raise ValueError(f"keep_ids must be >= 1, got {keep_ids}")
        self.config = config
        #: How many fill keys and closed order ids are remembered (the newest); None: all.
        self.keep_ids = keep_ids
        #: How target-position intents are sized, per account and strategy.
        self.sizing = sizing or SizingConfig()
        #: Bars' true ranges per instrument, for ATR sizing.
        self.true_ranges: dict[str, TrueRanges] = {}
        self.var_horizon_ns = var_horizon_ns
        self.var_window = var_window
        #: Returns per instrument on the VaR horizon, from ticks and bars.
        self.returns: dict[str, ReturnSeries] = {}
        #: Last bar close per instrument: the price of last resort (no tick seen).
        self.last_close: dict[str, tuple[int, Decimal]] = {}
        #: Times of recent approvals per (account, strategy), for the order rate.
        self.approvals: dict[tuple[str, str], deque[int]] = {}
        #: Each instrument's rules: the configuration's, else the venue's (`ref.instruments`).
        self.instruments = {i.instrument_id: i for i in instruments}
        #: The instruments the configuration names: the venue's rules never replace theirs.
        self.configured_instruments = frozenset(self.instruments)
        self.last_trade: dict[str, tuple[int, Decimal]] = {}
        self.last_mid: dict[str, tuple[int, Decimal]] = {}
        self.positions: dict[tuple[str, str], Decimal] = {}
        self.open_orders: dict[str, WorkingOrders] = {}
        #: Targets of engaged kill switches: EVERYTHING, an account id or a strategy id.
        self.kill_switch: set[str] = set()
        #: Tripped circuit breakers: account id -> why and when.
        self.breakers: dict[str, Breaker] = {}
        #: Equity, day-opening equity and peak per account, for the loss limits.
        self.losses = LossTracker()
        #: Fills counted in the positions: (account, instrument, trade id), oldest first.
        self.seen_trades: dict[tuple[str, str, str], None] = {}
        #: The newest fills counted from `exec.reports` with their signed quantities (about
        #: RECENT_FILLS): what a reload carries over while the portfolio has not stored them.
        self.recent_fills: dict[tuple[str, str, str], Decimal] = {}
        #: Finished orders (account, client order id), oldest first.
        self._closed: dict[tuple[str, str], None] = {}
        self._limits: dict[str, RiskLimits] = {}
        #: Each account's limits for each instrument it trades (overrides applied), cached.
        self._effective: dict[tuple[str, str], EffectiveLimits] = {}

    # -- state updates ----------------------------------------------------------------------

    def on_tick(self, tick: Tick) -> None:
        """Remember the latest trade price (or quote mid) of the instrument."""
        book = self.last_trade if tick.kind is TickKind.TRADE else self.last_mid
        seen = book.get(tick.instrument_id)
        if seen is None or tick.ts_event >= seen[0]:
            book[tick.instrument_id] = (tick.ts_event, tick.price)
        self._series(tick.instrument_id).observe(tick.ts_event, tick.price)

    def on_bar(self, bar: Bar) -> None:
        """Take a bar's close: a return for VaR, and a price while no tick was seen."""
        seen = self.last_close.get(bar.instrument_id)
        if seen is None or bar.ts_close >= seen[0]:
            self.last_close[bar.instrument_id] = (bar.ts_close, bar.close)
        self._series(bar.instrument_id).observe(bar.ts_close, bar.close)
        ranges = self.true_ranges.get(bar.instrument_id)
        if ranges is None:
            ranges = self.true_ranges[bar.instrument_id] = TrueRanges()
        ranges.on_bar(bar)

    def _series(self, instrument_id: str) -> ReturnSeries:
        series = self.returns.get(instrument_id)
        if series is None:
            series = self.returns[instrument_id] = ReturnSeries(
                self.var_horizon_ns, self.var_window
            )
        return series

    def on_report(self, report: ExecutionReport) -> None:
        """Apply a venue report: a fill moves the position and the working order together.

        Both change in one step because Kafka keeps no order between `exec.reports` and
        `orders.updates`: counting a fill in the position while its order still counted as
        working would size the next target-position order as if the fill happened twice.
        """
        orders = self.working(report.account_id)
        cid = report.client_order_id
        if report.is_fill and report.trade_id is not None:
            trade = (report.account_id, report.instrument_id, report.trade_id)
            if trade not in self.seen_trades:
                self.seen_trades[trade] = None
                self._trim(self.seen_trades)
                signed = report.side.sign * report.last_qty
                self._recent_fill(trade, signed)
                key = (report.account_id, report.instrument_id)
                self.positions[key] = self.positions.get(key, Decimal(0)) + signed
                working = orders.get(cid)
                if working is not None:
                    leaves = working.leaves - report.last_qty
                    if leaves > 0:
                        orders.put(cid, WorkingOrder(working.instrument_id, working.side, leaves))
                    else:
                        orders.pop(cid)
        if report.order_status.is_terminal:
            orders.pop(cid)
            self._close((report.account_id, cid))

    def _recent_fill(self, trade: tuple[str, str, str], signed: Decimal) -> None:
        recent = self.recent_fills
        recent[trade] = signed
        if len(recent) > 2 * RECENT_FILLS:
            for key in list(itertools.islice(recent, len(recent) - RECENT_FILLS)):
                del recent[key]

    def carry_fills(self, fills: dict[tuple[str, str, str], Decimal]) -> int:
        """Count fills another engine counted that this one's positions do not hold yet (the
        store had not stored them when it was loaded); returns how many were counted."""
        counted = 0
        for trade, signed in fills.items():
            if trade in self.seen_trades:
                continue
            self.seen_trades[trade] = None
            self._recent_fill(trade, signed)
            key = (trade[0], trade[1])
            self.positions[key] = self.positions.get(key, Decimal(0)) + signed
            counted += 1
        self._trim(self.seen_trades)
        return counted

    def carry_working(self, other: RiskEngine, unknown: set[str]) -> int:
        """Take `other`'s working orders whose client order ids are in `unknown` (approvals
        the OMS had not stored when this engine was loaded); returns how many."""
        carried = 0
        for account_id, orders in other.open_orders.items():
            for client_order_id, order in list(orders.items()):
                if client_order_id in unknown and (account_id, client_order_id) not in self._closed:
                    self.working(account_id).put(client_order_id, order)
                    carried += 1
        return carried

    def carry_closed(self, other: RiskEngine) -> None:
        """Take the orders `other` saw finish; none of them counts as working here.

        An engine reloaded from the store reads working orders from the OMS's table, which
        may not yet hold a finish `other` saw on `exec.reports`.
        """
        for key in other._closed:
            self._closed[key] = None
            self.working(key[0]).pop(key[1])
        self._trim(self._closed)

    def _close(self, key: tuple[str, str]) -> None:
        self._closed[key] = None
        self._trim(self._closed)

    def _trim(self, seen: dict[Any, None]) -> None:
        """Forget the oldest keys past twice `keep_ids` (down to `keep_ids`: amortised O(1))."""
        keep = self.keep_ids
        if keep is not None and len(seen) > 2 * keep:
            for key in list(itertools.islice(seen, len(seen) - keep)):
                del seen[key]

    def working(self, account_id: str) -> WorkingOrders:
        """Return the account's working orders (an empty set the first time)."""
        orders = self.open_orders.get(account_id)
        if orders is None:
            orders = self.open_orders[account_id] = WorkingOrders()
        return orders

    def on_order(self, order: Order) -> None:
        """Track the OMS's view of an order: working (with what is left) or finished."""
        orders = self.working(order.account_id)
        key = (order.account_id, order.client_order_id)
        if order.status.is_terminal:
            orders.pop(order.client_order_id)
            self._close(key)
        elif key not in self._closed:  # a late update must not revive a finished order
            current = orders.get(order.client_order_id)
            leaves = order.leaves_quantity
            if current is not None:
                leaves = min(leaves, current.leaves)  # fills may be ahead of the OMS's view
            orders.put(order.client_order_id, WorkingOrder(order.instrument_id, order.side, leaves))

    def on_control(self, command: ControlCommand) -> None:
        """Apply an operator command: kill switch on/off, circuit-breaker reset."""
        target = EVERYTHING if command.target in (EVERYTHING, "risk") else command.target
        action = command.action
        if action is ControlAction.KILL_SWITCH_ON:
            self.kill_switch.add(target)
        elif action is ControlAction.KILL_SWITCH_OFF:
            if target == EVERYTHING:
                self.kill_switch.clear()
            else:
                self.kill_switch.discard(target)
        elif action is ControlAction.RESET_CIRCUIT_BREAKER:
            reset = list(self.breakers) if target == EVERYTHING else [target]
            for account_id in reset:
                if self.breakers.pop(account_id, None) is not None:
                    # The operator accepts the losses so far: measure from here.
                    self.losses.account(account_id).rebase()
        else:
            return
        log.warning(
            "control %s (target %s) by %s: kill switch %s, breakers %s",
            action,
            target,
            command.issued_by,
            sorted(self.kill_switch) or "off",
            sorted(self.breakers) or "none",
        )

    def on_instrument(self, instrument: Instrument) -> bool:
        """Take the venue's rules of an instrument (the latest win); False if the configuration
        names it (the operator's rules override the venue's) or the rules are those known."""
        instrument_id = instrument.instrument_id
        if instrument_id in self.configured_instruments:
            return False
        if self.instruments.get(instrument_id) == instrument:
            return False
        self.instruments[instrument_id] = instrument
        return True

    def on_account_opened(self, opened: AccountOpened) -> bool:
        """Take a paper account's starting capital as its opening equity; False if known."""
        return self.losses.on_opened(opened) is not None

    def trip_circuit_breaker(
        self, account_id: str, cause: str, details: dict[str, str] | None = None, ts_ns: int = 0
    ) -> None:
        """Halt an account until an operator resets it (RESET_CIRCUIT_BREAKER)."""
        self.breakers[account_id] = Breaker(cause, dict(details or {}), ts_ns)

    def on_portfolio(self, event: PortfolioSnapshot | Position, ts_ns: int) -> Alert | None:
        """Follow an account's equity; trip its breaker on a loss beyond a limit.

        `ts_ns` is the event's time (the envelope's): it decides the UTC day. Returns the
        alert of a trip (once per trip; a tripped account stays tripped until reset).
        """
        tracker = self.losses
        if isinstance(event, PortfolioSnapshot):
            state = tracker.on_snapshot(event, ts_ns)
        else:
            state = tracker.on_position(event, ts_ns)
        account_id = event.account_id
        if state is None or account_id in self.breakers:
            return None
        limits = self.limits_for(account_id)
        breach = check_loss_limits(state, limits.max_daily_loss, limits.max_drawdown_pct)
        if breach is None:
            return None
        self.trip_circuit_breaker(account_id, breach.reason, breach.details, ts_ns)
        log.warning(
            "circuit breaker tripped for %s: %s", account_id, breach.text, extra=breach.details
        )
        return self._trip_alert(account_id, self.breakers[account_id])

    def trip_alert_at(self, account_id: str, ts_ns: int) -> Alert | None:
        """Return the alert of the account's breaker if an event at `ts_ns` tripped it (the
        same alert, id included, as at the trip), else None."""
        breaker = self.breakers.get(account_id)
        if breaker is None or breaker.ts_ns != ts_ns:
            return None
        return self._trip_alert(account_id, breaker)

    @staticmethod
    def _trip_alert(account_id: str, breaker: Breaker) -> Alert:
        text = RiskDenial(breaker.cause, breaker.details).text
        return Alert(
            alert_id=f"CB-{account_id}-{breaker.ts_ns}"[:_MAX_ID],
            severity=AlertSeverity.CRITICAL,
            source_service="risk",
            code="CIRCUIT_BREAKER_TRIPPED",
            message=f"account {account_id} halted until an operator resets it: {text}",
            account_id=account_id,
            details={"cause": breaker.cause, **breaker.details},
            ts_event=breaker.ts_ns,
        )

    # -- queries ----------------------------------------------------------------------------

    def last_price(self, instrument_id: str) -> Decimal | None:
        """Return the last trade price, else the last quote mid, else the last bar close."""
        seen = (
            self.last_trade.get(instrument_id)
            or self.last_mid.get(instrument_id)
            or self.last_close.get(instrument_id)
        )
        return seen[1] if seen is not None else None

    def position(self, account_id: str, instrument_id: str) -> Decimal:
        """Return the signed position from the fills seen so far."""
        return self.positions.get((account_id, instrument_id), Decimal(0))

    def limits_for(self, account_id: str) -> RiskLimits:
        """Return the account's limits (merged once, then cached)."""
        limits = self._limits.get(account_id)
        if limits is None:
            limits = self._limits[account_id] = self.config.limits_for(account_id)
        return limits

    def effective_limits(self, account_id: str, instrument_id: str) -> EffectiveLimits:
        """Return the account's limits for orders in `instrument_id` (merged once, then cached)."""
        key = (account_id, instrument_id)
        limits = self._effective.get(key)
        if limits is None:
            limits = self._effective[key] = self.limits_for(account_id).for_instrument(
                instrument_id
            )
        return limits

    def _sizing_equity(self, account_id: str) -> Decimal | None:
        """The account's equity as risk follows it, else its starting capital (None: neither,
        and the policy's `capital` applies)."""
        state = self.losses.account(account_id)
        equity = state.equity
        return equity if equity is not None else state.opening_equity

    def known_accounts(self) -> list[str]:
        """Accounts with limits of their own, a breaker, or equity risk follows, sorted."""
        accounts = set(self.config.accounts) | set(self.breakers) | set(self.losses.accounts)
        return sorted(accounts)

    def limits_status(self, account_id: str, now_ns: int) -> RiskLimitsStatus:
        """What applies to `account_id` (or EVERYTHING: the default) now."""
        targets = sorted(self.kill_switch)
        if account_id == EVERYTHING:
            return RiskLimitsStatus(
                account_id=EVERYTHING,
                configured=True,
                limits=self.config.default.model_dump(mode="json"),
                kill_switch=EVERYTHING in self.kill_switch,
                kill_switch_targets=targets,
                ts_event=now_ns,
            )
        breaker = self.breakers.get(account_id)
        losses = self.losses.accounts.get(account_id)
        return RiskLimitsStatus(
            account_id=account_id,
            configured=account_id in self.config.accounts,
            limits=self.limits_for(account_id).model_dump(mode="json"),
            kill_switch=EVERYTHING in self.kill_switch or account_id in self.kill_switch,
            kill_switch_targets=targets,
            breaker_tripped=breaker is not None,
            breaker_cause=breaker.cause if breaker is not None else None,
            breaker_details=dict(breaker.details) if breaker is not None else {},
            breaker_ts_ns=breaker.ts_ns if breaker is not None else None,
            opening_equity=losses.opening_equity if losses is not None else None,
            base_currency=losses.base_currency if losses is not None else None,
            ts_event=now_ns,
        )

    def limits_statuses(self, now_ns: int) -> list[RiskLimitsStatus]:
        """The default's status and every known account's."""
        return [
            self.limits_status(EVERYTHING, now_ns),
            *(self.limits_status(a, now_ns) for a in self.known_accounts()),
        ]

    # -- decisions --------------------------------------------------------------------------

    def evaluate(self, intent: OrderIntent, now_ns: int) -> RiskDecision:
        """Approve or deny `intent`; an approval counts as a working order from now on."""
        outcome = self._check(intent, now_ns)
        decision_id = f"D-{intent.intent_id}"
        if len(decision_id) > _MAX_ID:
            decision_id = new_id()
        if isinstance(outcome, RiskDenial):
            return RiskDecision(
                decision_id=decision_id,
                account_id=intent.account_id,
                intent=intent,
                approved=False,
                reason=outcome.reason,
                details=outcome.details,
                ts_event=now_ns,
            )
        side, quantity = outcome
        self.working(intent.account_id).put(
            intent.client_order_id, WorkingOrder(intent.instrument_id, side, quantity)
        )
        if self.limits_for(intent.account_id).max_orders_per_strategy is not None:
            # Only a rate limit reads (and trims) these: without one they would only grow.
            key = (intent.account_id, intent.strategy_id)
            times = self.approvals.get(key)
            if times is None:
                times = self.approvals[key] = deque()
            times.append(now_ns)
        adjusted = quantity if quantity != intent.quantity else None
        derived = side if intent.side is None else None
        if quantity > 0 and now_ns >= 0:
            # What the validated construction below makes, without validating again: the
            # intent was validated, the decision id fits (checked above), the quantity is a
            # positive finite Decimal and the side is set exactly when the intent has none.
            return build(
                RiskDecision,
                {
                    "decision_id": decision_id,
                    "account_id": intent.account_id,
                    "intent": intent,
                    "approved": True,
                    "reason": None,
                    "details": {},
                    "adjusted_quantity": adjusted,
                    "side": derived,
                    "ts_event": now_ns,
                },
            )
        return RiskDecision(
            decision_id=decision_id,
            account_id=intent.account_id,
            intent=intent,
            approved=True,
            adjusted_quantity=adjusted,
            side=derived,
            ts_event=now_ns,
        )

    def restore_approval(self, decision: RiskDecision) -> bool:
        """Count an approval made before as working again, unless its order is working or
        seen finished already; returns whether it was added.

        For an intent redelivered after a restart: the oms may never have got its approval,
        so the tables the engine was loaded from do not hold the order.
        """
        intent = decision.intent
        account_id, cid = intent.account_id, intent.client_order_id
        orders = self.working(account_id)
        if not decision.approved or cid in orders or (account_id, cid) in self._closed:
            return False
        side = decision.side or intent.side
        quantity = decision.adjusted_quantity or intent.quantity
        if side is None or quantity is None:
            return False
        orders.put(cid, WorkingOrder(intent.instrument_id, side, quantity))
        return True

    def _order_for_target(self, intent: OrderIntent) -> RiskDenial | tuple[Side, Decimal]:
        """The order that moves the position to the intent's target, counting working orders."""
        account, instrument_id = intent.account_id, intent.instrument_id
        sized = self._sized_target(intent)
        if isinstance(sized, RiskDenial):
            return sized
        target = sized
        orders = self.working(account)
        working = orders.net(instrument_id, excluding=orders.get(intent.client_order_id))
        delta = target - self.position(account, instrument_id) - working
        if delta == 0:
            return RiskDenial(
                "TARGET_POSITION_ALREADY_REACHED",
                {"target_position": fmt(target), "working": fmt(working)},
            )
        return (Side.BUY, delta) if delta > 0 else (Side.SELL, -delta)

    def _sized_target(self, intent: OrderIntent) -> RiskDenial | Decimal:
        """The intent's target resized by the sizing policy of its account and strategy."""
        target = intent.target_position or Decimal(0)
        policy = self.sizing.policy_for(intent.account_id, intent.strategy_id)
        if policy.method == "none":
            return target
        instrument_id = intent.instrument_id
        series = self.returns.get(instrument_id)
        instrument = self.instruments.get(instrument_id)
        sized = sized_target(
            policy,
            target,
            instrument_id=instrument_id,
            equity=self._sizing_equity(intent.account_id),
            price=intent.limit_price or intent.stop_price or self.last_price(instrument_id),
            returns=[r for _, r in series.returns] if series is not None else [],
            true_ranges=self.true_ranges.get(instrument_id),
            lot_size=instrument.lot_size if instrument is not None else None,
        )
        if not isinstance(sized, RiskDenial):
            log.debug(
                "target sized",
                extra={"intent_id": intent.intent_id, "method": policy.method, "target": sized},
            )
        return sized

    def _check(self, intent: OrderIntent, now_ns: int) -> RiskDenial | tuple[Side, Decimal]:
        """Return the first denial, or the approved side and quantity (rounded to the lot)."""
        account, instrument_id = intent.account_id, intent.instrument_id
        breaker = self.breakers.get(account)
        denial = check_kill_switch(self._kill_switch_for(intent)) or check_circuit_breaker(
            account,
            breaker.cause if breaker is not None else None,
            breaker.details if breaker is not None else None,
        )
        if denial:
            return denial
        if (account, intent.client_order_id) in self._closed:
            return RiskDenial(
                "DUPLICATE_CLIENT_ORDER_ID", {"client_order_id": intent.client_order_id}
            )
        if intent.side is None or intent.quantity is None:
            order = self._order_for_target(intent)
            if isinstance(order, RiskDenial):
                return order
            side, requested = order
        else:
            side, requested = intent.side, intent.quantity
        quantity = requested
        limits = self.effective_limits(account, instrument_id)
        prices = [
            (name, price)
            for name, price in (
                ("limit_price", intent.limit_price),
                ("stop_price", intent.stop_price),
            )
            if price is not None
        ]
        instrument = self.instruments.get(instrument_id)
        if instrument is None:
            if not limits.allow_unknown_instruments:
                return RiskDenial("UNKNOWN_INSTRUMENT", {"instrument_id": instrument_id})
        else:
            for name, price in prices:
                if denial := check_price_on_tick(price, instrument, name):
                    return denial
            quantity = round_to_lot(requested, instrument)
            if denial := check_quantity_rules(quantity, requested, instrument):
                return denial
        if denial := check_max_order_quantity(quantity, limits.max_order_quantity):
            return denial
        last = self.last_price(instrument_id)
        if limits.price_collar_bps is not None and prices:
            if denial := check_reference_price(last, instrument_id, "price_collar"):
                return denial
            assert last is not None
            for name, price in prices:
                if denial := check_price_collar(price, last, limits.price_collar_bps, name):
                    return denial
        min_notional = instrument.min_notional if instrument is not None else Decimal(0)
        if limits.max_order_notional is not None or min_notional > 0:
            # What the order is worth: at its limit, at its trigger, or at the last trade.
            reference = intent.limit_price or intent.stop_price or last
            if denial := check_reference_price(reference, instrument_id, "notional"):
                return denial
            assert reference is not None
            notional = quantity * reference
            if instrument is not None and (denial := check_min_notional(notional, instrument)):
                return denial
            if denial := check_max_order_notional(notional, limits.max_order_notional):
                return denial
        working = self.working(account)
        # A repeated intent must not count itself.
        itself = working.get(intent.client_order_id)
        others = len(working) - (itself is not None)
        if denial := check_max_open_orders(others, limits.max_open_orders):
            return denial
        open_same_side = working.leaves(instrument_id, side, excluding=itself)
        position = self.position(account, instrument_id)
        if denial := check_max_position(
            position, open_same_side, side, quantity, limits.max_position
        ):
            return denial
        account_limits = self.limits_for(account)
        if denial := self._check_order_rate(intent, account_limits, now_ns):
            return denial
        if (
            account_limits.max_gross_exposure is None
            and account_limits.max_net_exposure is None
            and account_limits.max_var is None
        ):
            return side, quantity  # no portfolio limit: the holdings are not needed
        # Other instruments count every working order; this one the worst case in the order's
        # direction, as for the max position.
        before = self._holdings(account)
        before[instrument_id] = position + side.sign * open_same_side
        if denial := self._check_portfolio(
            instrument_id, before, side.sign * quantity, account_limits
        ):
            return denial
        return side, quantity

    def _holdings(self, account_id: str) -> dict[str, Decimal]:
        """Return the account's positions with every working order filled, per instrument."""
        held = {i: q for (a, i), q in self.positions.items() if a == account_id and q}
        for order in self.working(account_id).values():
            signed = order.leaves if order.side is Side.BUY else -order.leaves
            held[order.instrument_id] = held.get(order.instrument_id, Decimal(0)) + signed
        return held

    def _check_order_rate(
        self, intent: OrderIntent, limits: RiskLimits, now_ns: int
    ) -> RiskDenial | None:
        maximum = limits.max_orders_per_strategy
        if maximum is None:
            return None
        times = self.approvals.get((intent.account_id, intent.strategy_id))
        recent = 0
        if times:
            start = now_ns - round(limits.order_rate_window_s * 1_000_000_000)
            while times and times[0] <= start:
                times.popleft()
            recent = len(times)
        return check_order_rate(intent.strategy_id, recent, maximum, limits.order_rate_window_s)

    def _check_portfolio(
        self,
        instrument_id: str,
        before: dict[str, Decimal],
        signed_quantity: Decimal,
        limits: RiskLimits,
    ) -> RiskDenial | None:
        """Gross and net exposure and VaR of the positions (with working orders) after the order.

        `before` holds the account's positions, the order's instrument with its same-side
        working orders; the order adds `signed_quantity` to it.
        """
        if (
            limits.max_gross_exposure is None
            and limits.max_net_exposure is None
            and limits.max_var is None
        ):
            return None
        after = dict(before)
        after[instrument_id] = before.get(instrument_id, Decimal(0)) + signed_quantity
        prices: dict[str, Decimal] = {}
        for held in sorted(i for i in after if after[i] or before.get(i)):
            price = self.last_price(held)
            if denial := check_reference_price(price, held, "exposure"):
                return denial
            assert price is not None
            prices[held] = price
        value_before = {i: q * prices[i] for i, q in before.items() if q}
        value_after = {i: q * prices[i] for i, q in after.items() if q}
        for name, measure in (("gross", _gross), ("net", _net)):
            maximum = getattr(limits, f"max_{name}_exposure")
            if denial := check_exposure(name, measure(value_before), measure(value_after), maximum):
                return denial
        if limits.max_var is None:
            return None
        returns = {i: s.by_bucket() for i, s in self.returns.items() if i in prices}
        method, confidence = limits.var_method, limits.var_confidence
        post = estimate(value_after, returns, method, confidence)
        pre = estimate(value_before, returns, method, confidence) if value_before else None
        old = abs(before.get(instrument_id, Decimal(0)))
        return check_var(
            post.var,
            pre.var if pre is not None else 0.0,
            post.observations,
            limits.max_var,
            method=method,
            confidence=confidence,
            min_observations=limits.var_min_observations,
            reduces=abs(after[instrument_id]) < old,
        )

    def _kill_switch_for(self, intent: OrderIntent) -> str | None:
        for target in (EVERYTHING, intent.account_id, intent.strategy_id):
            if target in self.kill_switch:
                return target
        return None


def _gross(values: dict[str, Decimal]) -> Decimal:
    return sum((abs(v) for v in values.values()), Decimal(0))


def _net(values: dict[str, Decimal]) -> Decimal:
    return abs(sum(values.values(), Decimal(0)))
