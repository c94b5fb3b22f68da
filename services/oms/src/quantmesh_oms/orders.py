"""The OMS's orders: created from approved decisions, moved only by the state machine."""

from __future__ import annotations

import heapq
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from decimal import Decimal

from quantmesh_common.bus.base import Emit
from quantmesh_common.messages import (
    CommandType,
    ControlAction,
    ControlCommand,
    ExecAlgo,
    ExecType,
    ExecutionReport,
    Order,
    OrderCommand,
    OrderRequest,
    OrderRequestAction,
    OrderStatus,
    OrderType,
    RiskDecision,
    TimeInForce,
    format_reason,
)
from quantmesh_common.topics import Topic
from quantmesh_common.trusted import build, copy_with
from quantmesh_oms.algo import (
    ALGO_TAG_PREFIX,
    AlgoPlan,
    apportion,
    child_id,
    interval_ns,
    twap_sizes,
)
from quantmesh_oms.state_machine import (
    OrderEvent,
    OrderProgress,
    TransitionRefusedError,
    apply,
    fill,
    replaced,
)

log = logging.getLogger(__name__)

_ZERO = Decimal(0)
_SUBMIT = OrderEvent.SUBMIT.value

#: Non-fill execution reports and the order event each one is.
_REPORT_EVENTS: dict[ExecType, OrderEvent] = {
    ExecType.ACCEPTED: OrderEvent.ACCEPT,
    ExecType.REJECTED: OrderEvent.REJECT,
    ExecType.CANCELED: OrderEvent.CANCELED,
    ExecType.EXPIRED: OrderEvent.EXPIRE,
    ExecType.CANCEL_REJECTED: OrderEvent.CANCEL_REJECTED,
    ExecType.REPLACED: OrderEvent.REPLACED,
}

#: Why an order's cancel is pending: asked for (a request, control), or its GTD time passed.
CANCEL_REQUESTED = "REQUEST"
CANCEL_EXPIRY = "EXPIRE"


class UnknownOrderError(ValueError):
    """A report names a client order id the OMS never created (dead-lettered by the bus)."""


class MismatchedReportError(ValueError):
    """A report whose account or instrument differs from its order's (dead-lettered)."""


#: The reason code of execution's answer to a QUERY for an order the venue does not have.
UNKNOWN_ORDER = "UNKNOWN_ORDER"
#: The stored event of a SUBMIT sent again because the venue did not know the order.
RESUBMIT = "RESUBMIT"
#: The reason code of execution's CANCEL_REJECTED (report id `<command id>-R`) for a CANCEL or
#: REPLACE it had claimed before a crash and did not send again, the order being still open at
#: the venue: whether the command ever reached the venue is unknown.
COMMAND_ALREADY_SENT = "COMMAND_ALREADY_SENT"
#: The stored event of a pending cancel sent again, under a new command id, after it.
CANCEL_RESENT = "CANCEL_RESENT"
#: How often one pending cancel is sent again before its rejection is applied after all: a
#: cancel that keeps meeting crashed executions is a fault for a person, not a loop to run.
MAX_CANCEL_RESENDS = 3
#: Marks a pending cancel's cause sent again, with the count (`<cause>:RESEND<n>`).
_RESEND = ":RESEND"


def query_command(order: Order, command_id: str, now_ns: int) -> OrderCommand:
    """Return the QUERY command asking the venue what it knows of `order`."""
    return OrderCommand(
        command_id=command_id,
        command_type=CommandType.QUERY,
        account_id=order.account_id,
        venue=order.venue,
        instrument_id=order.instrument_id,
        client_order_id=order.client_order_id,
        venue_order_id=order.venue_order_id,
        strategy_id=order.strategy_id,
        side=order.side,
        ts_event=now_ns,
    )


def submit_command(order: Order, command_id: str, now_ns: int) -> OrderCommand:
    """Return the SUBMIT command for `order`: `OrderCommand.for_submit`, not validated again.

    Its values are the order's (a validated model whose terms pass the same checks), the
    command id and the clock's time; the venue is what follows the instrument id's last dot
    (what `_check_venue` relies on too).
    """
    return build(
        OrderCommand,
        {
            "command_id": command_id,
            "command_type": CommandType.SUBMIT,
            "account_id": order.account_id,
            "venue": order.instrument_id.rpartition(".")[2],
            "instrument_id": order.instrument_id,
            "client_order_id": order.client_order_id,
            "venue_order_id": None,
            "strategy_id": order.strategy_id,
            "side": order.side,
            "order_type": order.order_type,
            "quantity": order.quantity,
            "limit_price": order.limit_price,
            "stop_price": order.stop_price,
            "time_in_force": order.time_in_force,
            "expire_time_ns": order.expire_time_ns,
            "post_only": order.post_only,
            "reduce_only": order.reduce_only,
            "new_quantity": None,
            "new_limit_price": None,
            "new_stop_price": None,
            "ts_event": now_ns,
        },
    )


def replace_command(
    order: Order, terms: ReplaceTerms, command_id: str, now_ns: int
) -> OrderCommand:
    """Return the REPLACE command asking the venue to amend `order` to `terms`."""
    return OrderCommand(
        command_id=command_id,
        command_type=CommandType.REPLACE,
        account_id=order.account_id,
        venue=order.venue,
        instrument_id=order.instrument_id,
        client_order_id=order.client_order_id,
        venue_order_id=order.venue_order_id,
        strategy_id=order.strategy_id,
        new_quantity=terms.quantity,
        new_limit_price=terms.limit_price,
        new_stop_price=terms.stop_price,
        ts_event=now_ns,
    )


def submit_command_id(client_order_id: str) -> str:
    """Return the id of an order's SUBMIT command: derived, so a redelivery repeats it exactly."""
    return f"{client_order_id}:SUBMIT"


@dataclass(frozen=True, slots=True)
class ReplaceTerms:
    """The new terms of a replace sent to the venue and not answered yet."""

    quantity: Decimal | None = None
    limit_price: Decimal | None = None
    stop_price: Decimal | None = None
    #: The request that asked for it: its command id is `<client_order_id>:REPLACE:<it>` ("":
    #: stored before it was kept, so the command cannot be sent again).
    request_id: str = ""

    def as_details(self) -> dict[str, str]:
        """Return the terms as strings ("" for unchanged), for the stored event."""
        return {
            "replace_quantity": _fmt_opt(self.quantity),
            "replace_limit_price": _fmt_opt(self.limit_price),
            "replace_stop_price": _fmt_opt(self.stop_price),
            "replace_request_id": self.request_id,
        }

    @classmethod
    def from_details(cls, details: dict[str, str]) -> ReplaceTerms:
        """Return the terms `as_details` wrote."""
        return cls(
            _dec_opt(details.get("replace_quantity", "")),
            _dec_opt(details.get("replace_limit_price", "")),
            _dec_opt(details.get("replace_stop_price", "")),
            details.get("replace_request_id", ""),
        )


@dataclass(frozen=True, slots=True)
class OcoTerms:
    """The exits an entry order asked for: a STOP (stop-loss) and a LIMIT (take-profit)."""

    stop_loss: Decimal | None = None
    take_profit: Decimal | None = None

    def as_details(self) -> dict[str, str]:
        """Return the terms as strings, for the stored event."""
        return {
            "oco_stop_loss": _fmt_opt(self.stop_loss),
            "oco_take_profit": _fmt_opt(self.take_profit),
        }

    @classmethod
    def from_details(cls, details: dict[str, str]) -> OcoTerms | None:
        """Return the terms `as_details` wrote, or None if there are none."""
        stop = _dec_opt(details.get("oco_stop_loss", ""))
        take = _dec_opt(details.get("oco_take_profit", ""))
        return cls(stop, take) if stop is not None or take is not None else None


#: Suffixes of the OCO legs' client order ids, and their tags.
OCO_STOP_LOSS = "SL"
OCO_TAKE_PROFIT = "TP"
OCO_TAG_PREFIX = "OCO_"


def oco_leg_id(entry_id: str, leg: str) -> str:
    """Return the client order id of an entry's OCO leg (`<entry>:SL` or `<entry>:TP`)."""
    return f"{entry_id}:{leg}"


@dataclass
class ManagedOrder:
    """One order: its last published state, its progress, and the reports already applied."""

    order: Order
    progress: OrderProgress
    report_ids: set[str] = field(default_factory=set)
    trade_ids: set[str] = field(default_factory=set)
    #: Ids of the cancel/replace requests and control commands already applied.
    request_ids: set[str] = field(default_factory=set)
    #: A replace sent and not answered yet (the venue answers amendments in order).
    pending_replace: ReplaceTerms | None = None
    #: Why the order is cancel-pending (CANCEL_REQUESTED or CANCEL_EXPIRY), else None.
    cancel_kind: str | None = None
    #: The request, control command or EXPIRE behind the pending cancel (its command id is
    #: `<client_order_id>:CANCEL:<it>`); meaningful only while `cancel_kind` is set.
    cancel_cause: str | None = None
    #: Number of transitions stored so far (the last event's `seq`).
    seq: int = 0
    #: The OCO exits to attach to the position this (entry) order opens, if asked for.
    oco: OcoTerms | None = None
    #: A TWAP/VWAP parent's schedule (the parent never reaches a venue; its children do).
    algo: AlgoPlan | None = None
    #: A parent's slices sent so far.
    algo_sent: int = 0

    def state_details(self) -> dict[str, str]:
        """Return what a rebuild needs beyond the order row, as strings."""
        details = {"cancel_kind": self.cancel_kind or ""}
        if self.cancel_kind is not None and self.cancel_cause is not None:
            details["cancel_cause"] = self.cancel_cause
        if self.algo is not None:
            details["algo_sent"] = str(self.algo_sent)
        if self.pending_replace is not None:
            details.update(self.pending_replace.as_details())
            details["replace_pending"] = "1"
        if self.oco is not None:
            details.update(self.oco.as_details())
        return details


@dataclass(frozen=True, slots=True)
class OrderChange:
    """One transition the manager applied: the order's new state and what moved it there.

    `key` is unique per order and transition (SUBMIT, DENY, or the report id), so storing a
    change twice can be recognised; `details` holds what a rebuild needs, as strings.
    """

    order: Order
    progress: OrderProgress
    event_type: str
    key: str
    seq: int
    ts_event: int
    details: dict[str, str]


class OrderManager:
    """All orders of this OMS instance, by client order id.

    Every change goes through the state machine; a refused change is logged and leaves the
    order as it was. Methods return the events to publish.
    """

    def __init__(self) -> None:
        self.orders: dict[str, ManagedOrder] = {}
        self._changes: list[OrderChange] = []
        self._expiries = ExpiryIndex()
        #: (due time, parent id) of each slicing parent's next slice.
        self._slices: list[tuple[int, str]] = []
        #: Set by a handler that recognised its input as already applied (a decision for an
        #: existing order, a report or request id applied before); the caller resets it.
        self.duplicate = False

    @property
    def expiries(self) -> ExpiryIndex:
        """Return the index of open GTD orders by expiry time."""
        return self._expiries

    def take_changes(self) -> list[OrderChange]:
        """Return the transitions applied since the last call, oldest first, and forget them."""
        changes, self._changes = self._changes, []
        return changes

    def restore(self, managed: ManagedOrder) -> None:
        """Put an order rebuilt from storage back under management (replacing any copy)."""
        self.orders[managed.order.client_order_id] = managed
        self._index_expiry(managed.order)
        if managed.algo is not None and _slicing(managed):
            heapq.heappush(
                self._slices,
                (managed.algo.due_ns(managed.algo_sent), managed.order.client_order_id),
            )

    def forget(self, client_order_id: str) -> None:
        """Drop an order from memory (its stored state becomes the truth again)."""
        self.orders.pop(client_order_id, None)
        self._expiries.discard(client_order_id)

    def forget_accounts(self, keep: Callable[[str], bool]) -> int:
        """Drop from memory every order of an account `keep` refuses; returns how many.

        An OCO group and an algo parent's children share their account, so they go together.
        """
        dropped = [cid for cid, m in self.orders.items() if not keep(m.order.account_id)]
        for client_order_id in dropped:
            self.forget(client_order_id)
        return len(dropped)

    def _index_expiry(self, order: Order) -> None:
        if (
            order.time_in_force is TimeInForce.GTD
            and order.expire_time_ns is not None
            and not order.status.is_terminal
        ):
            self._expiries.add(order.client_order_id, order.expire_time_ns)
        else:
            self._expiries.discard(order.client_order_id)

    def get(self, client_order_id: str) -> Order | None:
        """Return the current state of an order, or None if it is unknown."""
        managed = self.orders.get(client_order_id)
        return managed.order if managed is not None else None

    # -- approved decisions -----------------------------------------------------------------

    def on_decision(
        self,
        decision: RiskDecision,
        now_ns: int,
        volume_weights: Sequence[Decimal] | None = None,
        profile_note: str = "",
    ) -> list[Emit]:
        """Create the order of an approved decision and submit it; nothing if it exists already.

        An intent with `algo` becomes a parent whose first slice is sent now; a VWAP parent's
        slices follow `volume_weights` (one per slice), or are equal (TWAP) without them, with
        `profile_note` saying why. ValueError (so the message is dead-lettered) if the decision
        is a rejection or carries no side and quantity.
        """
        if not decision.approved:
            raise ValueError(f"decision {decision.decision_id} on orders.approved is a rejection")
        intent = decision.intent
        existing = self.orders.get(intent.client_order_id)
        if existing is not None:
            # Idempotent on the client order id: a redelivered (or repeated) decision for an
            # order we already have must not reach the venue a second time.
            self.duplicate = True
            log.info(
                "order %s exists (status %s); decision %s ignored",
                intent.client_order_id,
                existing.order.status,
                decision.decision_id,
                extra={"client_order_id": intent.client_order_id},
            )
            return []
        side, quantity = decision.order_side, decision.order_quantity
        if side is None or quantity is None:
            raise ValueError(
                f"decision {decision.decision_id} has no side and quantity (a target-position "
                "intent must be sized by risk)"
            )
        progress = OrderProgress(quantity=quantity)
        # Every value is the validated decision's or its intent's (whose checks cover the
        # order's: the terms, a positive quantity), or the clock's: not validated again.
        order = build(
            Order,
            {
                "client_order_id": intent.client_order_id,
                "venue_order_id": None,
                "account_id": intent.account_id,
                "strategy_id": intent.strategy_id,
                "instrument_id": intent.instrument_id,
                "intent_id": intent.intent_id,
                "parent_order_id": None,
                "side": side,
                "order_type": intent.order_type,
                "quantity": quantity,
                "filled_quantity": _ZERO,
                "avg_fill_price": None,
                "limit_price": intent.limit_price,
                "stop_price": intent.stop_price,
                "time_in_force": intent.time_in_force,
                "expire_time_ns": intent.expire_time_ns,
                "post_only": intent.post_only,
                "reduce_only": intent.reduce_only,
                "status": progress.status,
                "reason": None,
                "tag": intent.tag,
                "ts_init": now_ns,
                "ts_last": now_ns,
                "algo_slices_sent": None,
                "algo_slices_total": None,
            },
        )
        denial = _local_denial(order, now_ns)
        if denial is not None:
            progress = apply(progress, OrderEvent.DENY)
            order = copy_with(order, {"status": progress.status, "reason": denial})
            managed = self.orders[order.client_order_id] = ManagedOrder(order, progress)
            self._record(managed, OrderEvent.DENY.value, OrderEvent.DENY.value, {})
            log.warning("order %s denied: %s", order.client_order_id, denial)
            return [Emit(Topic.ORDERS_UPDATES, order)]
        if intent.algo is not None:
            return self._start_parent(order, decision, volume_weights, profile_note, now_ns)
        oco = None
        if intent.stop_loss_price is not None or intent.take_profit_price is not None:
            oco = OcoTerms(intent.stop_loss_price, intent.take_profit_price)
        return self._submit_new(order, now_ns, oco)

    def _submit_new(self, order: Order, now_ns: int, oco: OcoTerms | None = None) -> list[Emit]:
        progress = apply(OrderProgress(quantity=order.quantity), OrderEvent.SUBMIT)
        order = copy_with(order, {"status": progress.status})
        managed = self.orders[order.client_order_id] = ManagedOrder(order, progress, oco=oco)
        self._index_expiry(order)
        self._record(managed, _SUBMIT, _SUBMIT, {})
        command = submit_command(order, submit_command_id(order.client_order_id), now_ns)
        return [Emit(Topic.ORDERS_COMMANDS, command), Emit(Topic.ORDERS_UPDATES, order)]

    # -- execution reports ------------------------------------------------------------------

    def on_report(self, report: ExecutionReport, now_ns: int) -> list[Emit]:
        """Apply a venue report to its order; returns the new order state, or nothing.

        Nothing is emitted for a report already applied (same report id or trade id) or one
        the state machine refuses (logged). UnknownOrderError for an order we never created.
        """
        managed = self.orders.get(report.client_order_id)
        if managed is None:
            raise UnknownOrderError(
                f"execution report {report.report_id} for unknown client order id "
                f"{report.client_order_id!r}"
            )
        order = managed.order
        if report.account_id != order.account_id or report.instrument_id != order.instrument_id:
            raise MismatchedReportError(
                f"report {report.report_id} is for {report.account_id}/{report.instrument_id}, "
                f"order {order.client_order_id} is {order.account_id}/{order.instrument_id}"
            )
        is_fill = report.exec_type.is_fill
        if report.report_id in managed.report_ids or (
            is_fill and report.trade_id in managed.trade_ids
        ):
            self.duplicate = True
            log.info(
                "report %s already applied to %s; ignored",
                report.report_id,
                order.client_order_id,
                extra={"client_order_id": order.client_order_id},
            )
            return []
        if report.exec_type is ExecType.REJECTED and (report.reason or "").startswith(
            UNKNOWN_ORDER
        ):
            return self._on_unknown_at_venue(managed, report, now_ns)
        if (
            report.exec_type is ExecType.CANCEL_REJECTED
            and (order.status.is_terminal or order.status is not OrderStatus.CANCEL_PENDING)
            and managed.pending_replace is None
        ):
            # The venue refused a cancel of an order that is over, or one we never asked to
            # cancel (e.g. the venue's own cancel-all raced ours): nothing to apply.
            log.info(
                "order %s is %s: cancel rejection %s ignored (%s)",
                order.client_order_id,
                order.status,
                report.report_id,
                report.reason,
                extra={"client_order_id": order.client_order_id},
            )
            return []
        if (
            report.exec_type is ExecType.CANCEL_REJECTED
            and managed.pending_replace is None
            and _has_code(report.reason, COMMAND_ALREADY_SENT)
        ):
            # A pending replace answered so keeps the rejection below (REPLACE_REJECTED): its
            # terms may be stale by now, and the requester can ask again.
            resent = self._resend_cancel(managed, report, now_ns)
            if resent is not None:
                return resent
        try:
            progress = self._advance(managed, report)
        except TransitionRefusedError as refused:
            log.error(
                "order %s: report %s (%s) refused, order left %s: %s",
                order.client_order_id,
                report.report_id,
                report.exec_type,
                order.status,
                refused,
                extra={
                    "client_order_id": order.client_order_id,
                    "reason": refused.code,
                    "details": refused.details,
                },
            )
            return []
        changes = _order_changes(order, progress, report, now_ns)
        event_type = report.exec_type.value
        if report.exec_type is ExecType.REPLACED:
            terms = managed.pending_replace or ReplaceTerms()
            if terms.limit_price is not None:
                changes["limit_price"] = terms.limit_price
            if terms.stop_price is not None:
                changes["stop_price"] = terms.stop_price
            changes["quantity"] = progress.quantity
            managed.pending_replace = None
        elif report.exec_type is ExecType.CANCEL_REJECTED and managed.pending_replace is not None:
            event_type = OrderEvent.REPLACE_REJECTED.value
            managed.pending_replace = None
        elif managed.cancel_kind is not None and progress.status is not OrderStatus.CANCEL_PENDING:
            managed.cancel_kind = None
        if progress.status is OrderStatus.EXPIRED and report.exec_type is ExecType.CANCELED:
            changes["reason"] = format_reason(
                "GTD_EXPIRED", {"expire_time_ns": str(order.expire_time_ns)}
            )
        managed.progress = progress
        managed.report_ids.add(report.report_id)
        if is_fill and report.trade_id is not None:
            managed.trade_ids.add(report.trade_id)
        updated = copy_with(order, changes)
        managed.order = updated
        details = {"report_id": report.report_id}
        if is_fill and report.trade_id is not None:
            details["trade_id"] = report.trade_id
        if is_fill:
            details["last_qty"] = _fmt(report.last_qty)
            details["last_price"] = _fmt(report.last_price or Decimal(0))
        self._record(managed, event_type, report.report_id, details, ts_event=report.ts_event)
        if updated.status is not report.order_status:
            log.warning(
                "order %s is %s here, %s at the venue",
                order.client_order_id,
                updated.status,
                report.order_status,
                extra={"client_order_id": order.client_order_id},
            )
        return [
            Emit(Topic.ORDERS_UPDATES, updated),
            *self._sync_oco(updated, now_ns),
            *self._sync_parent(updated, report, now_ns),
        ]

    def _resend_cancel(
        self, managed: ManagedOrder, report: ExecutionReport, now_ns: int
    ) -> list[Emit] | None:
        """Send a cancel-pending order's cancel again after execution answered it
        COMMAND_ALREADY_SENT; None when the rejection is to be applied as any other.

        Someone asked for the cancel and the order is still open at the venue, so dropping it
        would leave the order working. The new command id is the cancel's first one with
        `:RESEND<n>` appended (n counted in the cause, which is stored, so it survives a
        restart): derived from the state the report found, and the report id is applied with
        it, so a redelivered report sends nothing new. After MAX_CANCEL_RESENDS of one cancel
        the rejection is applied (ERROR). A rejection of another command than the pending
        cancel (an older cancel, a replace answered already) leaves that cancel waiting for its
        own answer.
        """
        order = managed.order
        client_order_id = order.client_order_id
        cause = managed.cancel_cause
        if cause is None and managed.cancel_kind == CANCEL_EXPIRY:
            cause = CANCEL_EXPIRY
        if managed.cancel_kind is None or cause is None:
            log.warning(
                "order %s: %s, but the pending cancel's id is not known; rejection applied",
                client_order_id,
                report.reason,
                extra={"client_order_id": client_order_id},
            )
            return None
        pending = f"{client_order_id}:CANCEL:{cause}"
        if report.report_id != f"{pending}-R":
            log.warning(
                "order %s: %s answers another command than the pending cancel %s; ignored",
                client_order_id,
                report.reason,
                pending,
                extra={"client_order_id": client_order_id},
            )
            return []
        base, _, count = cause.rpartition(_RESEND)
        if not (base and count.isdigit()):
            base, count = cause, "0"
        sent = int(count)
        if sent >= MAX_CANCEL_RESENDS:
            log.error(
                "order %s: cancel %s sent %d times again and still answered %s; the cancel is "
                "given up and the order left working at the venue",
                client_order_id,
                base,
                sent,
                report.reason,
                extra={"client_order_id": client_order_id, "command_id": pending},
            )
            return None
        new_cause = f"{base}{_RESEND}{sent + 1}"
        try:
            command = OrderCommand.for_cancel(
                order, command_id=f"{client_order_id}:CANCEL:{new_cause}", ts_event=now_ns
            )
        except ValueError as invalid:  # the id grew past what an Identifier allows
            log.error(
                "order %s: cancel %s cannot be sent again (%s); rejection applied",
                client_order_id,
                pending,
                invalid,
                extra={"client_order_id": client_order_id},
            )
            return None
        managed.cancel_cause = new_cause
        managed.report_ids.add(report.report_id)
        log.warning(
            "order %s: %s; cancel sent again as %s",
            client_order_id,
            report.reason,
            command.command_id,
            extra={"client_order_id": client_order_id, "command_id": command.command_id},
        )
        self._record(
            managed,
            CANCEL_RESENT,
            report.report_id,
            {
                "report_id": report.report_id,
                "reason": report.reason or "",
                "command_id": command.command_id,
            },
            ts_event=report.ts_event,
        )
        return [Emit(Topic.ORDERS_COMMANDS, command)]

    # -- duplicates (idempotent delivery) ---------------------------------------------------

    def waiting_commands(self, managed: ManagedOrder, now_ns: int) -> list[OrderCommand]:
        """Return the commands of an order the venue has not answered yet, with their ids.

        Its SUBMIT until the venue acknowledged the order (SUBMITTED; cancel-pending from
        SUBMITTED with no venue order id yet), then a pending REPLACE, then a pending CANCEL
        (the order they were sent in: no replace is accepted once a cancel is pending). A
        TWAP/VWAP parent never reaches a venue: none (its children are orders of their own).
        """
        order = managed.order
        status = order.status
        if managed.algo is not None or status.is_terminal:
            return []
        client_order_id = order.client_order_id
        commands: list[OrderCommand] = []
        if status is OrderStatus.SUBMITTED or (
            status is OrderStatus.CANCEL_PENDING
            and managed.progress.status_before_cancel is OrderStatus.SUBMITTED
            and order.venue_order_id is None
        ):
            commands.append(submit_command(order, submit_command_id(client_order_id), now_ns))
        terms = managed.pending_replace
        if terms is not None and terms.request_id:
            command_id = f"{client_order_id}:REPLACE:{terms.request_id}"
            commands.append(replace_command(order, terms, command_id, now_ns))
        if status is OrderStatus.CANCEL_PENDING and managed.cancel_kind is not None:
            cause = managed.cancel_cause
            if cause is None and managed.cancel_kind == CANCEL_EXPIRY:
                cause = CANCEL_EXPIRY
            if cause is not None:
                command_id = f"{client_order_id}:CANCEL:{cause}"
                commands.append(
                    OrderCommand.for_cancel(order, command_id=command_id, ts_event=now_ns)
                )
        return commands

    def replay(
        self, outputs: Sequence[Emit], client_order_id: str, now_ns: int, *, derive: bool
    ) -> list[Emit]:
        """Return what to publish again for an input that was applied before (a duplicate).

        `outputs` are those stored for this very message (its outbox, if it is a redelivery
        of what this stage consumed): each command among them that its order still waits on
        is published again as it was, and every order they name as its current state (never
        an older one, which would take readers back). The order the input names is published
        as its current state too, and, with `derive` (a decision or request), the commands it
        still waits on, rebuilt with their ids. Not for a report: execution answers a repeated
        command by publishing its reports again, which would repeat the command again.
        """
        emits: list[Emit] = []
        sent: set[str] = set()
        named: list[str] = []
        for emit in outputs:
            payload = emit.payload
            if isinstance(payload, OrderCommand):
                managed = self.orders.get(payload.client_order_id)
                if managed is not None and any(
                    c.command_id == payload.command_id
                    for c in self.waiting_commands(managed, now_ns)
                ):
                    emits.append(emit)
                    sent.add(payload.command_id)
            elif isinstance(payload, Order) and payload.client_order_id not in named:
                named.append(payload.client_order_id)
        if client_order_id not in named:
            named.append(client_order_id)
        managed = self.orders.get(client_order_id)
        if derive and managed is not None:
            for command in self.waiting_commands(managed, now_ns):
                if command.command_id not in sent:
                    emits.append(Emit(Topic.ORDERS_COMMANDS, command))
        for order_id in named:
            order = self.get(order_id)
            if order is not None:
                emits.append(Emit(Topic.ORDERS_UPDATES, order))
        return emits

    # -- OCO exits attached to a position ----------------------------------------------------

    def related_ids(self, client_order_id: str) -> list[str]:
        """Return the orders a report for `client_order_id` may touch: its OCO entry and legs."""
        managed = self.orders.get(client_order_id)
        if managed is None:
            return []
        order = managed.order
        parent_id = _algo_parent_of(order)
        if parent_id is not None:
            return [parent_id]
        entry_id = _oco_entry_of(order)
        if entry_id is None and managed.oco is not None:
            entry_id = order.client_order_id
        if entry_id is None:
            return []
        ids = [entry_id, oco_leg_id(entry_id, OCO_STOP_LOSS), oco_leg_id(entry_id, OCO_TAKE_PROFIT)]
        return [i for i in ids if i != client_order_id]

    def _sync_oco(self, order: Order, now_ns: int) -> list[Emit]:
        """Keep an entry's OCO legs on its position: create, resize or cancel them.

        The position is what the entry filled minus what its legs filled. The first fill of
        the entry creates the legs (reduce-only, opposite side) sized to it; later fills of the
        entry, or partial fills of a leg, replace the working legs' quantity so that each
        leaves exactly the position; once the position is closed (a leg filled), the other
        leg is canceled. A leg with a replace or cancel in flight is resized when it answers.
        """
        entry_id = _oco_entry_of(order) or order.client_order_id
        entry = self.orders.get(entry_id)
        if entry is None or entry.oco is None:
            return []
        legs = {
            kind: self.orders.get(oco_leg_id(entry_id, kind))
            for kind in (OCO_STOP_LOSS, OCO_TAKE_PROFIT)
        }
        position = entry.order.filled_quantity - sum(
            (leg.order.filled_quantity for leg in legs.values() if leg is not None), Decimal(0)
        )
        if all(leg is None for leg in legs.values()):
            if position <= 0:
                return []
            emits: list[Emit] = []
            for kind, price in (
                (OCO_STOP_LOSS, entry.oco.stop_loss),
                (OCO_TAKE_PROFIT, entry.oco.take_profit),
            ):
                if price is not None:
                    emits += self._submit_new(
                        _oco_leg(entry.order, kind, price, position, now_ns), now_ns
                    )
            return emits
        emits = []
        for leg in legs.values():
            if leg is None or not leg.order.status.is_open:
                continue
            if leg.order.status is OrderStatus.CANCEL_PENDING or leg.pending_replace is not None:
                continue
            if position <= 0:
                emits += self._cancel(leg, f"OCO-{leg.seq + 1}", CANCEL_REQUESTED, now_ns)
                continue
            wanted = leg.order.filled_quantity + position
            if leg.order.quantity != wanted:
                request = OrderRequest(
                    request_id=f"OCO-{leg.seq + 1}",
                    action=OrderRequestAction.REPLACE,
                    account_id=leg.order.account_id,
                    client_order_id=leg.order.client_order_id,
                    new_quantity=wanted,
                    requested_by="oms-oco",
                    reason=format_reason("OCO_POSITION", {"position": _fmt(position)}),
                    ts_event=now_ns,
                )
                emits += self._replace(leg, request, now_ns)
        return emits

    # -- reconciliation with the venue ------------------------------------------------------

    def reconcile(self, start_id: str, now_ns: int) -> list[Emit]:
        """Ask the venue about every open order (a QUERY each); resend unsent GTD cancels.

        Run once at start, after the rebuild. Execution answers a QUERY with the order's
        reports under their original report and trade ids (applied only if new here), or one
        REJECTED `UNKNOWN_ORDER` (see `_on_unknown_at_venue`). A GTD expiry stores the order
        cancel-pending before its CANCEL is published, so a crash between the two left that
        CANCEL unsent: it goes again with its own command id (the venue drops a repeat).
        """
        emits: list[Emit] = []
        for managed in self.orders.values():
            order = managed.order
            if not order.status.is_open or managed.algo is not None:
                continue  # a parent is not at any venue: its children are queried
            emits.append(
                Emit(
                    Topic.ORDERS_COMMANDS,
                    query_command(order, f"{order.client_order_id}:QUERY:{start_id}", now_ns),
                )
            )
            if order.status is OrderStatus.CANCEL_PENDING and managed.cancel_kind == CANCEL_EXPIRY:
                # The cancel's current id: one sent again (`_resend_cancel`) has its own.
                cause = managed.cancel_cause or CANCEL_EXPIRY
                command_id = f"{order.client_order_id}:CANCEL:{cause}"
                emits.append(
                    Emit(
                        Topic.ORDERS_COMMANDS,
                        OrderCommand.for_cancel(order, command_id=command_id, ts_event=now_ns),
                    )
                )
        return emits

    def _on_unknown_at_venue(
        self, managed: ManagedOrder, report: ExecutionReport, now_ns: int
    ) -> list[Emit]:
        """The venue has no such order (a QUERY's answer).

        Never acknowledged (SUBMITTED): its SUBMIT is sent again with its own command id, so
        execution's sent-log lets it reach the venue at most once (and answers REJECTED
        `ORDER_NOT_FOUND_AT_VENUE` if it had been claimed and lost). Acknowledged before
        (the venue lost it, e.g. a simulated venue restarted): it works nowhere, so it is
        CANCELED with the venue's reason. Over here already: nothing.
        """
        order = managed.order
        status = order.status
        if status.is_terminal:
            log.info(
                "order %s is %s; venue does not know it (%s)",
                order.client_order_id,
                status,
                report.reason,
                extra={"client_order_id": order.client_order_id},
            )
            return []
        managed.report_ids.add(report.report_id)
        details = {"report_id": report.report_id}
        if status is OrderStatus.SUBMITTED:
            log.warning(
                "order %s unknown at the venue: SUBMIT sent again",
                order.client_order_id,
                extra={"client_order_id": order.client_order_id},
            )
            self._record(managed, RESUBMIT, report.report_id, details, ts_event=report.ts_event)
            command = submit_command(order, submit_command_id(order.client_order_id), now_ns)
            return [Emit(Topic.ORDERS_COMMANDS, command)]
        try:
            progress = apply(managed.progress, OrderEvent.CANCELED)
        except TransitionRefusedError as refused:
            log.error("order %s: %s refused: %s", order.client_order_id, report.reason, refused)
            return []
        managed.progress = progress
        managed.cancel_kind = None
        updated = copy_with(
            order,
            {
                "status": progress.status,
                "reason": report.reason,
                "ts_last": max(now_ns, order.ts_init),
            },
        )
        managed.order = updated
        log.warning(
            "order %s (%s here) unknown at the venue: canceled",
            order.client_order_id,
            status,
            extra={"client_order_id": order.client_order_id},
        )
        self._record(
            managed, OrderEvent.CANCELED.value, report.report_id, details, ts_event=report.ts_event
        )
        return [Emit(Topic.ORDERS_UPDATES, updated)]

    # -- cancel and replace ------------------------------------------------------------------

    def on_request(self, request: OrderRequest, now_ns: int) -> list[Emit]:
        """Apply a cancel or replace request; returns the command and the new order state.

        Nothing for a request already applied (same request id), for an order that is over,
        or for a request the order's state refuses (logged). UnknownOrderError for an order we
        never created, MismatchedReportError for another account's order.
        """
        managed = self.orders.get(request.client_order_id)
        if managed is None:
            raise UnknownOrderError(
                f"request {request.request_id} for unknown client order id "
                f"{request.client_order_id!r}"
            )
        if request.account_id != managed.order.account_id:
            raise MismatchedReportError(
                f"request {request.request_id} is for account {request.account_id}, order "
                f"{request.client_order_id} is {managed.order.account_id}"
            )
        if request.request_id in managed.request_ids:
            self.duplicate = True
            return []
        if managed.algo is not None:
            if request.action is OrderRequestAction.CANCEL:
                return self._cancel_parent(managed, request.request_id, now_ns)
            log.warning(
                "order %s is a %s parent: replace %s refused",
                managed.order.client_order_id,
                managed.algo.algo,
                request.request_id,
                extra={"client_order_id": managed.order.client_order_id},
            )
            return []
        if request.action is OrderRequestAction.CANCEL:
            return self._cancel(managed, request.request_id, CANCEL_REQUESTED, now_ns)
        return self._replace(managed, request, now_ns)

    def on_control(self, command: ControlCommand, now_ns: int) -> list[Emit]:
        """CANCEL_ALL_ORDERS: cancel every open order it targets (account, strategy or all).

        Only orders created at or before the command's time are canceled, so replaying the
        control history after a restart leaves newer orders alone; an order this command
        already canceled once (its cancel may have been refused since) is left alone too.
        Other actions: nothing.
        """
        if command.action is not ControlAction.CANCEL_ALL_ORDERS:
            return []
        emits: list[Emit] = []
        for managed in list(self.orders.values()):
            order = managed.order
            if (
                order.status.is_terminal
                or order.ts_init > command.ts_event
                or command.command_id in managed.request_ids
                or not command.applies_to(order.account_id, order.strategy_id)
            ):
                continue
            if managed.algo is not None:
                emits += self._cancel_parent(managed, command.command_id, now_ns)
                continue
            emits += self._cancel(managed, command.command_id, CANCEL_REQUESTED, now_ns)
        return emits

    def expire_due(self, now_ns: int) -> list[Emit]:
        """Cancel every open GTD order whose expiry time has come (EXPIRED once canceled).

        Reads the expiry index, so a call with nothing due costs O(1). A due order whose cancel
        is already pending (a request) stays indexed: if that cancel is refused it expires then.
        """
        emits: list[Emit] = []
        for client_order_id in self._expiries.due(now_ns):
            managed = self.orders.get(client_order_id)
            if managed is None or not managed.order.status.is_open:
                continue
            if managed.order.status is OrderStatus.CANCEL_PENDING:
                self._expiries.hold(client_order_id)
                continue
            emits += self._cancel(managed, CANCEL_EXPIRY, CANCEL_EXPIRY, now_ns)
        return emits

    # -- TWAP / VWAP parents -----------------------------------------------------------------

    def _start_parent(
        self,
        order: Order,
        decision: RiskDecision,
        volume_weights: Sequence[Decimal] | None,
        profile_note: str,
        now_ns: int,
    ) -> list[Emit]:
        """Accept a TWAP/VWAP parent: plan its slices from now and send the first one."""
        intent = decision.intent
        algo, slices, duration = intent.algo, intent.algo_slices, intent.algo_duration_s
        assert algo is not None  # the model requires the other two with it
        assert slices is not None
        assert duration is not None
        reason = None
        if (
            algo is ExecAlgo.VWAP
            and volume_weights is not None
            and len(volume_weights) == slices
            and sum(volume_weights) > 0
        ):
            sizes = apportion(order.quantity, volume_weights, intent.algo_lot_size)
        else:
            sizes = twap_sizes(order.quantity, slices, intent.algo_lot_size)
            if algo is ExecAlgo.VWAP:
                reason = format_reason(
                    "VWAP_FALLBACK_TWAP", {"why": profile_note or "no volume profile"}
                )
                log.warning(
                    "VWAP parent %s sliced equally: %s",
                    order.client_order_id,
                    reason,
                    extra={"client_order_id": order.client_order_id},
                )
        plan = AlgoPlan(algo, now_ns, interval_ns(duration, slices), sizes)
        progress = apply(OrderProgress(quantity=order.quantity), OrderEvent.SUBMIT)
        order = copy_with(
            order,
            {
                "status": progress.status,
                "reason": reason,
                "algo_slices_sent": 0,
                "algo_slices_total": slices,
            },
        )
        managed = self.orders[order.client_order_id] = ManagedOrder(order, progress, algo=plan)
        self._record(managed, OrderEvent.SUBMIT.value, OrderEvent.SUBMIT.value, plan.as_details())
        return [Emit(Topic.ORDERS_UPDATES, order), *self._send_slice(managed, now_ns)]

    def slices_due(self, now_ns: int) -> list[Emit]:
        """Send every parent's slices whose time has come (all of them after a long pause).

        Reads a heap of next due times, so a call with nothing due costs O(1).
        """
        emits: list[Emit] = []
        heap = self._slices
        while heap and heap[0][0] <= now_ns:
            due, parent_id = heapq.heappop(heap)
            managed = self.orders.get(parent_id)
            if managed is None or managed.algo is None or not _slicing(managed):
                continue
            if managed.algo.due_ns(managed.algo_sent) != due:
                continue  # a stale entry (the parent was restored twice)
            emits += self._send_slice(managed, now_ns)
        return emits

    def _send_slice(self, managed: ManagedOrder, now_ns: int) -> list[Emit]:
        plan = managed.algo
        assert plan is not None
        parent = managed.order
        k = managed.algo_sent
        size = plan.sizes[k]
        managed.algo_sent = k + 1
        updated = copy_with(parent, {"algo_slices_sent": k + 1, "ts_last": now_ns})
        managed.order = updated
        self._record(managed, "SLICE", f"SLICE:{k + 1}", {"slice_quantity": _fmt(size)})
        emits: list[Emit] = []
        if size > 0:  # a lot size can leave a slice empty: it counts as sent
            emits += self._submit_new(_child(updated, plan.algo, k + 1, size, now_ns), now_ns)
        emits.append(Emit(Topic.ORDERS_UPDATES, updated))
        if k + 1 < len(plan.sizes):
            heapq.heappush(self._slices, (plan.due_ns(k + 1), parent.client_order_id))
        else:
            emits += self._finish_parent(managed, now_ns)
        return emits

    def _working_children(self, managed: ManagedOrder) -> list[ManagedOrder]:
        parent_id = managed.order.client_order_id
        children = (
            self.orders.get(child_id(parent_id, n)) for n in range(1, managed.algo_sent + 1)
        )
        return [c for c in children if c is not None and c.order.status.is_open]

    def _sync_parent(self, child: Order, report: ExecutionReport, now_ns: int) -> list[Emit]:
        """Carry a child's fill to its parent; end the parent once nothing of it works."""
        parent_id = _algo_parent_of(child)
        if parent_id is None:
            return []
        parent = self.orders.get(parent_id)
        if parent is None or parent.algo is None:
            log.warning("child %s: parent %s not found", child.client_order_id, parent_id)
            return []
        emits: list[Emit] = []
        if report.is_fill:
            assert report.last_price is not None  # the model guarantees it for fills
            try:
                progress = fill(parent.progress, report.last_qty, report.last_price)
            except TransitionRefusedError as refused:
                log.error(
                    "parent %s: fill of %s refused: %s", parent_id, child.client_order_id, refused
                )
                return []
            parent.progress = progress
            order = parent.order
            updated = copy_with(
                order,
                {
                    "status": progress.status,
                    "filled_quantity": progress.filled_quantity,
                    "avg_fill_price": progress.avg_fill_price,
                    "ts_last": max(now_ns, order.ts_init),
                },
            )
            parent.order = updated
            self._record(
                parent,
                report.exec_type.value,
                f"{child.client_order_id}:{report.report_id}",
                {
                    "child_report_id": report.report_id,
                    "last_qty": _fmt(report.last_qty),
                    "last_price": _fmt(report.last_price),
                },
                ts_event=report.ts_event,
            )
            emits.append(Emit(Topic.ORDERS_UPDATES, updated))
        return emits + self._finish_parent(parent, now_ns)

    def _cancel_parent(self, managed: ManagedOrder, cause: str, now_ns: int) -> list[Emit]:
        """Stop slicing and cancel the working children; the parent is CANCELED once they end."""
        order = managed.order
        if order.status is OrderStatus.CANCEL_PENDING or order.status.is_terminal:
            return []
        managed.progress = apply(managed.progress, OrderEvent.CANCEL_REQUEST)
        managed.cancel_kind = CANCEL_REQUESTED
        managed.cancel_cause = cause
        managed.request_ids.add(cause)
        updated = copy_with(order, {"status": managed.progress.status, "ts_last": now_ns})
        managed.order = updated
        self._record(
            managed, OrderEvent.CANCEL_REQUEST.value, f"CANCEL:{cause}", {"request_id": cause}
        )
        emits = [Emit(Topic.ORDERS_UPDATES, updated)]
        for child in self._working_children(managed):
            emits += self._cancel(child, cause, CANCEL_REQUESTED, now_ns)
        return emits + self._finish_parent(managed, now_ns)

    def _finish_parent(self, managed: ManagedOrder, now_ns: int) -> list[Emit]:
        """CANCELED once no child works and either a cancel is pending or every slice is sent.

        A parent whose children filled it is FILLED by the last fill already.
        """
        plan, order = managed.algo, managed.order
        if plan is None or order.status.is_terminal or self._working_children(managed):
            return []
        asked = order.status is OrderStatus.CANCEL_PENDING
        if not asked and managed.algo_sent < len(plan.sizes):
            return []
        progress = apply(managed.progress, OrderEvent.CANCELED)
        managed.progress = progress
        managed.cancel_kind = None
        reason = format_reason(
            "ALGO_CANCELED" if asked else "ALGO_INCOMPLETE",
            {
                "filled_quantity": _fmt(progress.filled_quantity),
                "quantity": _fmt(progress.quantity),
                "slices_sent": str(managed.algo_sent),
            },
        )
        updated = copy_with(order, {"status": progress.status, "reason": reason, "ts_last": now_ns})
        managed.order = updated
        self._record(managed, OrderEvent.CANCELED.value, "END", {})
        return [Emit(Topic.ORDERS_UPDATES, updated)]

    def _cancel(self, managed: ManagedOrder, cause: str, kind: str, now_ns: int) -> list[Emit]:
        order = managed.order
        if order.status is OrderStatus.CANCEL_PENDING or order.status.is_terminal:
            log.info(
                "order %s is %s: cancel %s has nothing to do",
                order.client_order_id,
                order.status,
                cause,
                extra={"client_order_id": order.client_order_id},
            )
            return []
        try:
            progress = apply(managed.progress, OrderEvent.CANCEL_REQUEST)
        except TransitionRefusedError as refused:
            log.warning("order %s: cancel %s refused: %s", order.client_order_id, cause, refused)
            return []
        managed.progress = progress
        managed.cancel_kind = kind
        managed.cancel_cause = cause
        managed.request_ids.add(cause)
        updated = copy_with(order, {"status": progress.status, "ts_last": now_ns})
        managed.order = updated
        key = f"CANCEL:{cause}"
        self._record(managed, OrderEvent.CANCEL_REQUEST.value, key, {"request_id": cause})
        command = OrderCommand.for_cancel(
            updated, command_id=f"{order.client_order_id}:{key}", ts_event=now_ns
        )
        return [Emit(Topic.ORDERS_COMMANDS, command), Emit(Topic.ORDERS_UPDATES, updated)]

    def _replace(self, managed: ManagedOrder, request: OrderRequest, now_ns: int) -> list[Emit]:
        order = managed.order
        problem = _replace_problem(managed, request)
        if problem is None:
            try:
                progress = apply(managed.progress, OrderEvent.REPLACE_REQUEST)
            except TransitionRefusedError as refused:
                problem = str(refused)
        if problem is not None:
            log.warning(
                "order %s: replace %s refused: %s",
                order.client_order_id,
                request.request_id,
                problem,
                extra={"client_order_id": order.client_order_id},
            )
            return []
        terms = ReplaceTerms(
            request.new_quantity,
            request.new_limit_price,
            request.new_stop_price,
            request.request_id,
        )
        managed.progress = progress
        managed.pending_replace = terms
        managed.request_ids.add(request.request_id)
        updated = copy_with(order, {"ts_last": now_ns})
        managed.order = updated
        key = f"REPLACE:{request.request_id}"
        self._record(
            managed, OrderEvent.REPLACE_REQUEST.value, key, {"request_id": request.request_id}
        )
        command = replace_command(order, terms, f"{order.client_order_id}:{key}", now_ns)
        return [Emit(Topic.ORDERS_COMMANDS, command), Emit(Topic.ORDERS_UPDATES, updated)]

    def _record(
        self,
        managed: ManagedOrder,
        event_type: str,
        key: str,
        details: dict[str, str],
        *,
        ts_event: int | None = None,
    ) -> None:
        managed.seq += 1
        order = managed.order
        if order.status.is_terminal:
            self._expiries.discard(order.client_order_id)
        elif order.client_order_id in self._expiries.held:
            # A pending cancel of a due GTD order was refused: it expires at the next check.
            self._expiries.release(
                order.client_order_id, order.status is OrderStatus.CANCEL_PENDING
            )
        self._changes.append(
            OrderChange(
                order=order,
                progress=managed.progress,
                event_type=event_type,
                key=key,
                seq=managed.seq,
                ts_event=order.ts_last if ts_event is None else ts_event,
                details={**details, **managed.state_details()},
            )
        )

    @staticmethod
    def _advance(managed: ManagedOrder, report: ExecutionReport) -> OrderProgress:
        progress = managed.progress
        if report.is_fill:
            assert report.last_price is not None  # the model guarantees it for fills
            return fill(progress, report.last_qty, report.last_price)
        if report.exec_type is ExecType.REPLACED:
            terms = managed.pending_replace
            return replaced(progress, terms.quantity if terms is not None else None)
        if report.exec_type is ExecType.CANCEL_REJECTED and managed.pending_replace is not None:
            # Amendments are answered in the order they were sent: the replace came first.
            return apply(progress, OrderEvent.REPLACE_REJECTED)
        if report.exec_type is ExecType.CANCELED and managed.cancel_kind == CANCEL_EXPIRY:
            return apply(progress, OrderEvent.EXPIRE)
        event = _REPORT_EVENTS.get(report.exec_type)
        if event is None:
            raise TransitionRefusedError(
                {"exec_type": report.exec_type.value, "why": "not supported by the OMS"}
            )
        return apply(progress, event)


class ExpiryIndex:
    """Open GTD orders by expiry time: a heap with lazy deletion, so nothing due is O(1).

    `discard` only forgets the live entry; its heap entry is dropped when it reaches the top,
    or when stale entries outnumber the live ones (the heap is then rebuilt).
    """

    def __init__(self) -> None:
        self._heap: list[tuple[int, str]] = []
        self._live: dict[str, int] = {}
        #: Due orders whose cancel was already pending when they came due.
        self.held: set[str] = set()

    def __len__(self) -> int:
        return len(self._live) + len(self.held)

    def __contains__(self, client_order_id: object) -> bool:
        return client_order_id in self._live or client_order_id in self.held

    def add(self, client_order_id: str, expire_time_ns: int) -> None:
        """Index an order (again) under its expiry time."""
        if self._live.get(client_order_id) == expire_time_ns or client_order_id in self.held:
            return
        self._live[client_order_id] = expire_time_ns
        heapq.heappush(self._heap, (expire_time_ns, client_order_id))
        if len(self._heap) > 2 * len(self._live) + 64:
            self._heap = [(t, c) for c, t in self._live.items()]
            heapq.heapify(self._heap)

    def discard(self, client_order_id: str) -> None:
        """Forget an order (over, or dropped from memory)."""
        self._live.pop(client_order_id, None)
        self.held.discard(client_order_id)

    def due(self, now_ns: int) -> list[str]:
        """Remove and return the orders whose expiry time is at or before `now_ns`."""
        found: list[str] = []
        heap = self._heap
        while heap and heap[0][0] <= now_ns:
            expire_time_ns, client_order_id = heapq.heappop(heap)
            if self._live.get(client_order_id) == expire_time_ns:
                del self._live[client_order_id]
                found.append(client_order_id)
        return found

    def hold(self, client_order_id: str) -> None:
        """Keep a due order aside while its (requested) cancel is pending."""
        self.held.add(client_order_id)

    def release(self, client_order_id: str, still_pending: bool) -> None:
        """A held order changed: due again at once unless its cancel is still pending."""
        if still_pending:
            return
        self.held.discard(client_order_id)
        self._live[client_order_id] = 0
        heapq.heappush(self._heap, (0, client_order_id))


def _replace_problem(managed: ManagedOrder, request: OrderRequest) -> str | None:
    order = managed.order
    if managed.pending_replace is not None:
        return format_reason("REPLACE_ALREADY_PENDING", {"client_order_id": order.client_order_id})
    if request.new_limit_price is not None and order.order_type not in (
        OrderType.LIMIT,
        OrderType.STOP_LIMIT,
    ):
        return format_reason("NO_LIMIT_PRICE_TO_REPLACE", {"order_type": order.order_type.value})
    if request.new_stop_price is not None and order.order_type not in (
        OrderType.STOP,
        OrderType.STOP_LIMIT,
    ):
        return format_reason("NO_STOP_PRICE_TO_REPLACE", {"order_type": order.order_type.value})
    if request.new_quantity is not None and request.new_quantity <= order.filled_quantity:
        return format_reason(
            "QUANTITY_NOT_ABOVE_FILLED",
            {"new_quantity": _fmt(request.new_quantity), "filled": _fmt(order.filled_quantity)},
        )
    return None


def _has_code(reason: str | None, code: str) -> bool:
    """Return True if `reason` (as `format_reason` writes it) has the code `code`."""
    return reason is not None and (reason == code or reason.startswith(code + ":"))


def _fmt_opt(value: Decimal | None) -> str:
    return "" if value is None else _fmt(value)


def _dec_opt(value: str) -> Decimal | None:
    return Decimal(value) if value else None


def _order_changes(
    order: Order, progress: OrderProgress, report: ExecutionReport, now_ns: int
) -> dict[str, object]:
    changes: dict[str, object] = {
        "status": progress.status,
        "filled_quantity": progress.filled_quantity,
        "avg_fill_price": progress.avg_fill_price,
        "ts_last": max(now_ns, order.ts_init),
    }
    if order.venue_order_id is None and report.venue_order_id is not None:
        changes["venue_order_id"] = report.venue_order_id
    if report.reason and progress.status in (
        OrderStatus.REJECTED,
        OrderStatus.CANCELED,
        OrderStatus.EXPIRED,
    ):
        changes["reason"] = report.reason
    return changes


def _fmt(value: Decimal) -> str:
    return format(value, "f")


def _local_denial(order: Order, now_ns: int) -> str | None:
    """Return why the OMS refuses to send `order` at all, or None."""
    if (
        order.time_in_force is TimeInForce.GTD
        and order.expire_time_ns is not None
        and order.expire_time_ns <= now_ns
    ):
        return format_reason(
            "EXPIRE_TIME_IN_PAST",
            {"expire_time_ns": str(order.expire_time_ns), "now_ns": str(now_ns)},
        )
    return None


def _slicing(managed: ManagedOrder) -> bool:
    """Return True if a parent still has slices to send (open, no cancel asked)."""
    status = managed.order.status
    return (
        managed.algo is not None
        and status.is_open
        and status is not OrderStatus.CANCEL_PENDING
        and managed.algo_sent < len(managed.algo.sizes)
    )


def _algo_parent_of(order: Order) -> str | None:
    """Return the parent's client order id if `order` is a TWAP/VWAP child, else None."""
    if order.parent_order_id is not None and order.tag.startswith(ALGO_TAG_PREFIX):
        return order.parent_order_id
    return None


def _child(parent: Order, algo: ExecAlgo, n: int, quantity: Decimal, now_ns: int) -> Order:
    """Return a parent's `n`-th child order (1-based): the parent's terms for `quantity`."""
    return Order(
        client_order_id=child_id(parent.client_order_id, n),
        account_id=parent.account_id,
        strategy_id=parent.strategy_id,
        instrument_id=parent.instrument_id,
        intent_id=parent.intent_id,
        parent_order_id=parent.client_order_id,
        side=parent.side,
        order_type=parent.order_type,
        quantity=quantity,
        limit_price=parent.limit_price,
        time_in_force=parent.time_in_force,
        post_only=parent.post_only,
        reduce_only=parent.reduce_only,
        status=OrderStatus.INITIALIZED,
        tag=ALGO_TAG_PREFIX + algo.value,
        ts_init=now_ns,
        ts_last=now_ns,
    )


def _oco_entry_of(order: Order) -> str | None:
    """Return the entry's client order id if `order` is an OCO leg, else None."""
    if order.parent_order_id is not None and order.tag.startswith(OCO_TAG_PREFIX):
        return order.parent_order_id
    return None


def _oco_leg(entry: Order, kind: str, price: Decimal, quantity: Decimal, now_ns: int) -> Order:
    """Return a new OCO leg of `entry`: a STOP (stop-loss) or LIMIT (take-profit) exit."""
    is_stop = kind == OCO_STOP_LOSS
    return Order(
        client_order_id=oco_leg_id(entry.client_order_id, kind),
        account_id=entry.account_id,
        strategy_id=entry.strategy_id,
        instrument_id=entry.instrument_id,
        intent_id=entry.intent_id,
        parent_order_id=entry.client_order_id,
        side=entry.side.opposite,
        order_type=OrderType.STOP if is_stop else OrderType.LIMIT,
        quantity=quantity,
        stop_price=price if is_stop else None,
        limit_price=None if is_stop else price,
        time_in_force=TimeInForce.GTC,
        reduce_only=True,
        status=OrderStatus.INITIALIZED,
        tag=OCO_TAG_PREFIX + kind,
        ts_init=now_ns,
        ts_last=now_ns,
    )
