"""The OMS's orders: created from approved decisions, moved only by the state machine."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from decimal import Decimal

from quantmesh_common.bus.base import Emit
from quantmesh_common.messages import (
    ExecType,
    ExecutionReport,
    Order,
    OrderCommand,
    OrderStatus,
    RiskDecision,
    TimeInForce,
    format_reason,
)
from quantmesh_common.topics import Topic
from quantmesh_oms.state_machine import (
    OrderEvent,
    OrderProgress,
    TransitionRefusedError,
    apply,
    fill,
)

log = logging.getLogger(__name__)

#: Non-fill execution reports and the order event each one is.
_REPORT_EVENTS: dict[ExecType, OrderEvent] = {
    ExecType.ACCEPTED: OrderEvent.ACCEPT,
    ExecType.REJECTED: OrderEvent.REJECT,
    ExecType.CANCELED: OrderEvent.CANCELED,
    ExecType.EXPIRED: OrderEvent.EXPIRE,
    ExecType.CANCEL_REJECTED: OrderEvent.CANCEL_REJECTED,
}


class UnknownOrderError(ValueError):
    """A report names a client order id the OMS never created (dead-lettered by the bus)."""


class MismatchedReportError(ValueError):
    """A report whose account or instrument differs from its order's (dead-lettered)."""


def submit_command_id(client_order_id: str) -> str:
    """Return the id of an order's SUBMIT command: derived, so a redelivery repeats it exactly."""
    return f"{client_order_id}:SUBMIT"


@dataclass
class ManagedOrder:
    """One order: its last published state, its progress, and the reports already applied."""

    order: Order
    progress: OrderProgress
    report_ids: set[str] = field(default_factory=set)
    trade_ids: set[str] = field(default_factory=set)


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

    def take_changes(self) -> list[OrderChange]:
        """Return the transitions applied since the last call, oldest first, and forget them."""
        changes, self._changes = self._changes, []
        return changes

    def restore(self, managed: ManagedOrder) -> None:
        """Put an order rebuilt from storage back under management (replacing any copy)."""
        self.orders[managed.order.client_order_id] = managed

    def forget(self, client_order_id: str) -> None:
        """Drop an order from memory (its stored state becomes the truth again)."""
        self.orders.pop(client_order_id, None)

    def get(self, client_order_id: str) -> Order | None:
        """Return the current state of an order, or None if it is unknown."""
        managed = self.orders.get(client_order_id)
        return managed.order if managed is not None else None

    # -- approved decisions -----------------------------------------------------------------

    def on_decision(self, decision: RiskDecision, now_ns: int) -> list[Emit]:
        """Create the order of an approved decision and submit it; nothing if it exists already.

        ValueError (so the message is dead-lettered) if the decision is a rejection or carries
        no side and quantity.
        """
        if not decision.approved:
            raise ValueError(f"decision {decision.decision_id} on orders.approved is a rejection")
        intent = decision.intent
        existing = self.orders.get(intent.client_order_id)
        if existing is not None:
            # Idempotent on the client order id: a redelivered (or repeated) decision for an
            # order we already have must not reach the venue a second time.
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
        order = Order(
            client_order_id=intent.client_order_id,
            account_id=intent.account_id,
            strategy_id=intent.strategy_id,
            instrument_id=intent.instrument_id,
            intent_id=intent.intent_id,
            side=side,
            order_type=intent.order_type,
            quantity=quantity,
            limit_price=intent.limit_price,
            stop_price=intent.stop_price,
            time_in_force=intent.time_in_force,
            expire_time_ns=intent.expire_time_ns,
            post_only=intent.post_only,
            reduce_only=intent.reduce_only,
            status=progress.status,
            tag=intent.tag,
            ts_init=now_ns,
            ts_last=now_ns,
        )
        denial = _local_denial(order, now_ns)
        if denial is not None:
            progress = apply(progress, OrderEvent.DENY)
            order = order.model_copy(update={"status": progress.status, "reason": denial})
            self.orders[order.client_order_id] = ManagedOrder(order, progress)
            self._record(order, progress, OrderEvent.DENY.value, OrderEvent.DENY.value, 1, {})
            log.warning("order %s denied: %s", order.client_order_id, denial)
            return [Emit(Topic.ORDERS_UPDATES, order)]
        progress = apply(progress, OrderEvent.SUBMIT)
        order = order.model_copy(update={"status": progress.status})
        self.orders[order.client_order_id] = ManagedOrder(order, progress)
        self._record(order, progress, OrderEvent.SUBMIT.value, OrderEvent.SUBMIT.value, 1, {})
        command = OrderCommand.for_submit(
            order, command_id=submit_command_id(order.client_order_id), ts_event=now_ns
        )
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
        if report.report_id in managed.report_ids or (
            report.is_fill and report.trade_id in managed.trade_ids
        ):
            log.info(
                "report %s already applied to %s; ignored",
                report.report_id,
                order.client_order_id,
                extra={"client_order_id": order.client_order_id},
            )
            return []
        try:
            progress = self._advance(managed.progress, report)
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
        managed.progress = progress
        managed.report_ids.add(report.report_id)
        if report.is_fill and report.trade_id is not None:
            managed.trade_ids.add(report.trade_id)
        updated = order.model_copy(update=_order_changes(order, progress, report, now_ns))
        managed.order = updated
        details = {"report_id": report.report_id}
        if report.is_fill and report.trade_id is not None:
            details["trade_id"] = report.trade_id
        if report.is_fill:
            details["last_qty"] = _fmt(report.last_qty)
            details["last_price"] = _fmt(report.last_price or Decimal(0))
        self._record(
            updated,
            progress,
            report.exec_type.value,
            report.report_id,
            1 + len(managed.report_ids),
            details,
            ts_event=report.ts_event,
        )
        if updated.status is not report.order_status:
            log.warning(
                "order %s is %s here, %s at the venue",
                order.client_order_id,
                updated.status,
                report.order_status,
                extra={"client_order_id": order.client_order_id},
            )
        return [Emit(Topic.ORDERS_UPDATES, updated)]

    def _record(
        self,
        order: Order,
        progress: OrderProgress,
        event_type: str,
        key: str,
        seq: int,
        details: dict[str, str],
        *,
        ts_event: int | None = None,
    ) -> None:
        self._changes.append(
            OrderChange(
                order=order,
                progress=progress,
                event_type=event_type,
                key=key,
                seq=seq,
                ts_event=order.ts_last if ts_event is None else ts_event,
                details=details,
            )
        )

    @staticmethod
    def _advance(progress: OrderProgress, report: ExecutionReport) -> OrderProgress:
        if report.is_fill:
            assert report.last_price is not None  # the model guarantees it for fills
            return fill(progress, report.last_qty, report.last_price)
        event = _REPORT_EVENTS.get(report.exec_type)
        if event is None:
            raise TransitionRefusedError(
                {"exec_type": report.exec_type.value, "why": "not supported by the OMS yet"}
            )
        return apply(progress, event)


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
