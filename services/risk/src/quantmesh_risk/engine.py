"""The risk stage's state (prices, positions, working orders, halts) and its decision pipeline."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from decimal import Decimal

from quantmesh_common.ids import new_id
from quantmesh_common.messages import (
    ControlAction,
    ControlCommand,
    ExecutionReport,
    Instrument,
    Order,
    OrderIntent,
    RiskDecision,
    Side,
    Tick,
    TickKind,
)
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
    fmt,
    round_to_lot,
)
from quantmesh_risk.limits import RiskConfig, RiskLimits

log = logging.getLogger(__name__)

#: A kill switch or reset aimed at every account.
EVERYTHING = "*"
#: Identifier length limit of the messages (decision ids derived from intent ids must fit).
_MAX_ID = 128


@dataclass(slots=True)
class WorkingOrder:
    """An order that may still fill: approved here, or reported open by the OMS."""

    instrument_id: str
    side: Side
    leaves: Decimal


class RiskEngine:
    """Pre-trade risk for every account this instance owns: plain state, no I/O.

    Sources of state: last prices from `md.ticks`; positions from fills on `exec.reports`
    (each trade id counted once), which also shrink or end the working order they fill;
    working orders from this engine's own approvals and the OMS's `orders.updates`; kill
    switch and circuit-breaker resets from `control`.
    """

    def __init__(self, config: RiskConfig, instruments: Iterable[Instrument] = ()) -> None:
        self.config = config
        self.instruments = {i.instrument_id: i for i in instruments}
        self.last_trade: dict[str, tuple[int, Decimal]] = {}
        self.last_mid: dict[str, tuple[int, Decimal]] = {}
        self.positions: dict[tuple[str, str], Decimal] = {}
        self.open_orders: dict[str, dict[str, WorkingOrder]] = {}
        #: Targets of engaged kill switches: EVERYTHING, an account id or a strategy id.
        self.kill_switch: set[str] = set()
        #: Tripped circuit breakers: account id -> cause.
        self.breakers: dict[str, str] = {}
        self._trades: set[tuple[str, str, str]] = set()
        self._closed: set[tuple[str, str]] = set()
        self._limits: dict[str, RiskLimits] = {}

    # -- state updates ----------------------------------------------------------------------

    def on_tick(self, tick: Tick) -> None:
        """Remember the latest trade price (or quote mid) of the instrument."""
        book = self.last_trade if tick.kind is TickKind.TRADE else self.last_mid
        seen = book.get(tick.instrument_id)
        if seen is None or tick.ts_event >= seen[0]:
            book[tick.instrument_id] = (tick.ts_event, tick.price)

    def on_report(self, report: ExecutionReport) -> None:
        """Apply a venue report: a fill moves the position and the working order together.

        Both change in one step because Kafka keeps no order between `exec.reports` and
        `orders.updates`: counting a fill in the position while its order still counted as
        working would size the next target-position order as if the fill happened twice.
        """
        orders = self.open_orders.get(report.account_id, {})
        cid = report.client_order_id
        if report.is_fill and report.trade_id is not None:
            trade = (report.account_id, report.instrument_id, report.trade_id)
            if trade not in self._trades:
                self._trades.add(trade)
                key = (report.account_id, report.instrument_id)
                self.positions[key] = (
                    self.positions.get(key, Decimal(0)) + report.side.sign * report.last_qty
                )
                working = orders.get(cid)
                if working is not None:
                    leaves = working.leaves - report.last_qty
                    if leaves > 0:
                        orders[cid] = WorkingOrder(working.instrument_id, working.side, leaves)
                    else:
                        del orders[cid]
        if report.order_status.is_terminal:
            orders.pop(cid, None)
            self._closed.add((report.account_id, cid))

    def on_order(self, order: Order) -> None:
        """Track the OMS's view of an order: working (with what is left) or finished."""
        orders = self.open_orders.setdefault(order.account_id, {})
        key = (order.account_id, order.client_order_id)
        if order.status.is_terminal:
            orders.pop(order.client_order_id, None)
            self._closed.add(key)
        elif key not in self._closed:  # a late update must not revive a finished order
            current = orders.get(order.client_order_id)
            leaves = order.leaves_quantity
            if current is not None:
                leaves = min(leaves, current.leaves)  # fills may be ahead of the OMS's view
            orders[order.client_order_id] = WorkingOrder(order.instrument_id, order.side, leaves)

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
            if target == EVERYTHING:
                self.breakers.clear()
            else:
                self.breakers.pop(target, None)
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

    def trip_circuit_breaker(self, account_id: str, cause: str) -> None:
        """Halt an account until an operator resets it (RESET_CIRCUIT_BREAKER)."""
        self.breakers[account_id] = cause

    # -- queries ----------------------------------------------------------------------------

    def last_price(self, instrument_id: str) -> Decimal | None:
        """Return the last trade price, else the last quote mid, else None."""
        seen = self.last_trade.get(instrument_id) or self.last_mid.get(instrument_id)
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

    # -- decisions --------------------------------------------------------------------------

    def evaluate(self, intent: OrderIntent, now_ns: int) -> RiskDecision:
        """Approve or deny `intent`; an approval counts as a working order from now on."""
        outcome = self._check(intent)
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
        self.open_orders.setdefault(intent.account_id, {})[intent.client_order_id] = WorkingOrder(
            intent.instrument_id, side, quantity
        )
        return RiskDecision(
            decision_id=decision_id,
            account_id=intent.account_id,
            intent=intent,
            approved=True,
            adjusted_quantity=quantity if quantity != intent.quantity else None,
            side=side if intent.side is None else None,
            ts_event=now_ns,
        )

    def _order_for_target(self, intent: OrderIntent) -> RiskDenial | tuple[Side, Decimal]:
        """The order that moves the position to the intent's target, counting working orders."""
        account, instrument_id = intent.account_id, intent.instrument_id
        target = intent.target_position or Decimal(0)
        working = sum(
            (
                o.leaves if o.side is Side.BUY else -o.leaves
                for cid, o in self.open_orders.get(account, {}).items()
                if o.instrument_id == instrument_id and cid != intent.client_order_id
            ),
            Decimal(0),
        )
        delta = target - self.position(account, instrument_id) - working
        if delta == 0:
            return RiskDenial(
                "TARGET_POSITION_ALREADY_REACHED",
                {"target_position": fmt(target), "working": fmt(working)},
            )
        return (Side.BUY, delta) if delta > 0 else (Side.SELL, -delta)

    def _check(self, intent: OrderIntent) -> RiskDenial | tuple[Side, Decimal]:
        """Return the first denial, or the approved side and quantity (rounded to the lot)."""
        account, instrument_id = intent.account_id, intent.instrument_id
        denial = check_kill_switch(self._kill_switch_for(intent)) or check_circuit_breaker(
            account, self.breakers.get(account)
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
        limits = self.limits_for(account).for_instrument(instrument_id)
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
        others = {
            cid: order
            for cid, order in self.open_orders.get(account, {}).items()
            if cid != intent.client_order_id  # a repeated intent must not count itself
        }
        if denial := check_max_open_orders(len(others), limits.max_open_orders):
            return denial
        open_same_side = sum(
            (
                o.leaves
                for o in others.values()
                if o.instrument_id == instrument_id and o.side is side
            ),
            Decimal(0),
        )
        position = self.position(account, instrument_id)
        if denial := check_max_position(
            position, open_same_side, side, quantity, limits.max_position
        ):
            return denial
        return side, quantity

    def _kill_switch_for(self, intent: OrderIntent) -> str | None:
        for target in (EVERYTHING, intent.account_id, intent.strategy_id):
            if target in self.kill_switch:
                return target
        return None
