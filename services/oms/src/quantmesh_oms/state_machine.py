"""The order state machine: one explicit transition table, exact fill accounting, typed refusals."""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import ROUND_HALF_EVEN, Context, Decimal
from enum import StrEnum

from quantmesh_common.messages import OrderStatus


class OrderEvent(StrEnum):
    """What can happen to an order: an OMS decision, a command sent, or a venue report."""

    SUBMIT = "SUBMIT"
    DENY = "DENY"
    ACCEPT = "ACCEPT"
    REJECT = "REJECT"
    PARTIAL_FILL = "PARTIAL_FILL"
    FILL = "FILL"
    CANCEL_REQUEST = "CANCEL_REQUEST"
    CANCELED = "CANCELED"
    CANCEL_REJECTED = "CANCEL_REJECTED"
    EXPIRE = "EXPIRE"
    REPLACE_REQUEST = "REPLACE_REQUEST"
    REPLACED = "REPLACED"
    REPLACE_REJECTED = "REPLACE_REJECTED"

    @property
    def is_fill(self) -> bool:
        """Return True for PARTIAL_FILL and FILL: they need a quantity and a price."""
        return self in (OrderEvent.PARTIAL_FILL, OrderEvent.FILL)


class Restore(enum.Enum):
    """A transition target that is not a fixed status."""

    #: Back to where the order stood before its cancel request (the venue refused the cancel).
    PRE_CANCEL = "PRE_CANCEL"


_S = OrderStatus
_E = OrderEvent

#: The only legal transitions: (status, event) -> next status. Anything absent is refused.
#: Terminal statuses (DENIED, FILLED, CANCELED, REJECTED, EXPIRED) have no exits.
TRANSITIONS: Mapping[tuple[OrderStatus, OrderEvent], OrderStatus | Restore] = {
    # Created by the OMS; leaves at once, towards the venue or refused locally.
    (_S.INITIALIZED, _E.SUBMIT): _S.SUBMITTED,
    (_S.INITIALIZED, _E.DENY): _S.DENIED,
    # Sent, not yet acknowledged. Venues may fill, cancel (IOC/FOK) or expire an order before
    # (or without) an acknowledgement reaching us, so those are legal here too.
    (_S.SUBMITTED, _E.ACCEPT): _S.ACCEPTED,
    (_S.SUBMITTED, _E.REJECT): _S.REJECTED,
    (_S.SUBMITTED, _E.PARTIAL_FILL): _S.PARTIALLY_FILLED,
    (_S.SUBMITTED, _E.FILL): _S.FILLED,
    (_S.SUBMITTED, _E.CANCEL_REQUEST): _S.CANCEL_PENDING,
    (_S.SUBMITTED, _E.CANCELED): _S.CANCELED,
    (_S.SUBMITTED, _E.EXPIRE): _S.EXPIRED,
    # Working at the venue.
    (_S.ACCEPTED, _E.PARTIAL_FILL): _S.PARTIALLY_FILLED,
    (_S.ACCEPTED, _E.FILL): _S.FILLED,
    (_S.ACCEPTED, _E.CANCEL_REQUEST): _S.CANCEL_PENDING,
    (_S.ACCEPTED, _E.CANCELED): _S.CANCELED,
    (_S.ACCEPTED, _E.EXPIRE): _S.EXPIRED,
    (_S.PARTIALLY_FILLED, _E.PARTIAL_FILL): _S.PARTIALLY_FILLED,
    (_S.PARTIALLY_FILLED, _E.FILL): _S.FILLED,
    (_S.PARTIALLY_FILLED, _E.CANCEL_REQUEST): _S.CANCEL_PENDING,
    (_S.PARTIALLY_FILLED, _E.CANCELED): _S.CANCELED,
    (_S.PARTIALLY_FILLED, _E.EXPIRE): _S.EXPIRED,
    # A cancel is in flight; the venue's reports for the order race it. A late ack or a partial
    # fill leaves the cancel pending; a reject, a complete fill or an expiry end the order.
    (_S.CANCEL_PENDING, _E.ACCEPT): _S.CANCEL_PENDING,
    (_S.CANCEL_PENDING, _E.REJECT): _S.REJECTED,
    (_S.CANCEL_PENDING, _E.PARTIAL_FILL): _S.CANCEL_PENDING,
    (_S.CANCEL_PENDING, _E.FILL): _S.FILLED,
    (_S.CANCEL_PENDING, _E.CANCELED): _S.CANCELED,
    (_S.CANCEL_PENDING, _E.CANCEL_REJECTED): Restore.PRE_CANCEL,
    (_S.CANCEL_PENDING, _E.EXPIRE): _S.EXPIRED,
    # Amending a working order (replace): the status stays, the terms change on REPLACED. The
    # venue answers a replace sent before a cancel first, so both may arrive cancel-pending.
    (_S.SUBMITTED, _E.REPLACE_REQUEST): _S.SUBMITTED,
    (_S.ACCEPTED, _E.REPLACE_REQUEST): _S.ACCEPTED,
    (_S.PARTIALLY_FILLED, _E.REPLACE_REQUEST): _S.PARTIALLY_FILLED,
    (_S.SUBMITTED, _E.REPLACED): _S.ACCEPTED,
    (_S.ACCEPTED, _E.REPLACED): _S.ACCEPTED,
    (_S.PARTIALLY_FILLED, _E.REPLACED): _S.PARTIALLY_FILLED,
    (_S.CANCEL_PENDING, _E.REPLACED): _S.CANCEL_PENDING,
    (_S.SUBMITTED, _E.REPLACE_REJECTED): _S.SUBMITTED,
    (_S.ACCEPTED, _E.REPLACE_REJECTED): _S.ACCEPTED,
    (_S.PARTIALLY_FILLED, _E.REPLACE_REJECTED): _S.PARTIALLY_FILLED,
    (_S.CANCEL_PENDING, _E.REPLACE_REJECTED): _S.CANCEL_PENDING,
}

# Fill notionals are summed at a precision no real price x size reaches, so they stay exact;
# the average is then one division, rounded half-even at 28 significant digits.
_EXACT = Context(prec=200, rounding=ROUND_HALF_EVEN)
_AVERAGE = Context(prec=28, rounding=ROUND_HALF_EVEN)


class TransitionRefusedError(Exception):
    """A change the state machine will not apply; the order is left exactly as it was.

    `code` is UPPER_SNAKE and `details` holds the values behind it, as strings.
    """

    code = "TRANSITION_REFUSED"

    def __init__(self, details: Mapping[str, str]) -> None:
        self.details = dict(details)
        super().__init__(self.code + ": " + ", ".join(f"{k}={v}" for k, v in details.items()))


class IllegalTransitionError(TransitionRefusedError):
    """The transition table has no entry for (status, event)."""

    code = "ILLEGAL_TRANSITION"


class OverfillError(TransitionRefusedError):
    """A fill would take the filled quantity above the order quantity."""

    code = "OVERFILL"


class InvalidFillError(TransitionRefusedError):
    """A fill whose quantity or price is not strictly positive, or a fill event without one."""

    code = "INVALID_FILL"


@dataclass(frozen=True, slots=True)
class OrderProgress:
    """Where one order stands: its status and its exact fill totals."""

    quantity: Decimal
    status: OrderStatus = OrderStatus.INITIALIZED
    filled_quantity: Decimal = Decimal(0)
    #: Sum of fill quantity x fill price, exact.
    filled_notional: Decimal = Decimal(0)
    #: The status the order had when its cancel was requested (for a refused cancel).
    status_before_cancel: OrderStatus | None = None

    @property
    def avg_fill_price(self) -> Decimal | None:
        """Return the quantity-weighted average fill price, or None before any fill."""
        if self.filled_quantity == 0:
            return None
        return _AVERAGE.divide(self.filled_notional, self.filled_quantity)

    @property
    def leaves_quantity(self) -> Decimal:
        """Return the quantity still working: zero once the order is terminal."""
        return Decimal(0) if self.status.is_terminal else self.quantity - self.filled_quantity


def target_of(status: OrderStatus, event: OrderEvent) -> OrderStatus | Restore:
    """Return the table's target for (status, event); IllegalTransitionError if there is none."""
    target = TRANSITIONS.get((status, event))
    if target is None:
        raise IllegalTransitionError({"status": status.value, "event": event.value})
    return target


def apply(progress: OrderProgress, event: OrderEvent) -> OrderProgress:
    """Return `progress` after a non-fill `event`; raises TransitionRefusedError if illegal.

    Fills carry a quantity and a price: apply them with `fill`.
    """
    if event.is_fill:
        raise InvalidFillError({"event": event.value, "why": "use fill() with quantity and price"})
    target = target_of(progress.status, event)
    # Built field by field, not with `dataclasses.replace` (which looks the fields up again on
    # every call): this runs on every order's every change.
    quantity, filled, notional = (
        progress.quantity,
        progress.filled_quantity,
        progress.filled_notional,
    )
    if isinstance(target, Restore):
        return OrderProgress(quantity, _restored(progress), filled, notional, None)
    if target is OrderStatus.CANCEL_PENDING and progress.status is not OrderStatus.CANCEL_PENDING:
        return OrderProgress(quantity, target, filled, notional, progress.status)
    return OrderProgress(quantity, target, filled, notional, progress.status_before_cancel)


def replaced(progress: OrderProgress, new_quantity: Decimal | None) -> OrderProgress:
    """Return `progress` after the venue accepted a replace (new quantity if given).

    A new quantity at or below the filled quantity is refused (the venue should have).
    """
    target = target_of(progress.status, OrderEvent.REPLACED)
    assert isinstance(target, OrderStatus), "REPLACED never restores a status"
    quantity = progress.quantity if new_quantity is None else new_quantity
    if quantity <= progress.filled_quantity:
        raise OverfillError(
            {"new_quantity": _fmt(quantity), "filled_quantity": _fmt(progress.filled_quantity)}
        )
    return OrderProgress(
        quantity,
        target,
        progress.filled_quantity,
        progress.filled_notional,
        progress.status_before_cancel,
    )


def fill(progress: OrderProgress, quantity: Decimal, price: Decimal) -> OrderProgress:
    """Return `progress` after a fill of `quantity` at `price`; raises TransitionRefusedError.

    The event is FILL when the fill completes the order, PARTIAL_FILL when some remains; a fill
    beyond the order quantity is refused (OverfillError) and nothing is applied.
    """
    if not (quantity.is_finite() and price.is_finite()) or quantity <= 0 or price <= 0:
        raise InvalidFillError({"fill_quantity": str(quantity), "fill_price": str(price)})
    filled = _EXACT.add(progress.filled_quantity, quantity)
    # Legality first: a fill of an order that is already over is illegal, not an overfill.
    event = OrderEvent.FILL if filled >= progress.quantity else OrderEvent.PARTIAL_FILL
    target = target_of(progress.status, event)
    if filled > progress.quantity:
        raise OverfillError(
            {
                "quantity": _fmt(progress.quantity),
                "filled_quantity": _fmt(progress.filled_quantity),
                "fill_quantity": _fmt(quantity),
            }
        )
    assert isinstance(target, OrderStatus), "no fill transition restores a status"
    return OrderProgress(
        progress.quantity,
        target,
        filled,
        _EXACT.add(progress.filled_notional, _EXACT.multiply(quantity, price)),
        progress.status_before_cancel,
    )


def _restored(progress: OrderProgress) -> OrderStatus:
    # A fill may have arrived while the cancel was pending: the order is then partly filled,
    # whatever it was before the request.
    if progress.filled_quantity > 0:
        return OrderStatus.PARTIALLY_FILLED
    return progress.status_before_cancel or OrderStatus.SUBMITTED


def _fmt(value: Decimal) -> str:
    return format(value, "f")
