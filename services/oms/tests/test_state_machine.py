"""The order transition table: every legal move, every illegal one refused, exact fill sums."""

from __future__ import annotations

import itertools
from decimal import Decimal

import pytest

from quantmesh_common.messages import OrderStatus
from quantmesh_oms.state_machine import (
    TRANSITIONS,
    IllegalTransitionError,
    InvalidFillError,
    OrderEvent,
    OrderProgress,
    OverfillError,
    Restore,
    TransitionRefusedError,
    apply,
    fill,
)

S = OrderStatus
E = OrderEvent

# The table as the issue states it, written out by hand rather than read from the code.
EXPECTED_LEGAL: dict[tuple[OrderStatus, OrderEvent], OrderStatus | Restore] = {
    (S.INITIALIZED, E.SUBMIT): S.SUBMITTED,
    (S.INITIALIZED, E.DENY): S.DENIED,
    (S.SUBMITTED, E.ACCEPT): S.ACCEPTED,
    (S.SUBMITTED, E.REJECT): S.REJECTED,
    (S.SUBMITTED, E.PARTIAL_FILL): S.PARTIALLY_FILLED,
    (S.SUBMITTED, E.FILL): S.FILLED,
    (S.SUBMITTED, E.CANCEL_REQUEST): S.CANCEL_PENDING,
    (S.SUBMITTED, E.CANCELED): S.CANCELED,
    (S.SUBMITTED, E.EXPIRE): S.EXPIRED,
    (S.ACCEPTED, E.PARTIAL_FILL): S.PARTIALLY_FILLED,
    (S.ACCEPTED, E.FILL): S.FILLED,
    (S.ACCEPTED, E.CANCEL_REQUEST): S.CANCEL_PENDING,
    (S.ACCEPTED, E.CANCELED): S.CANCELED,
    (S.ACCEPTED, E.EXPIRE): S.EXPIRED,
    (S.PARTIALLY_FILLED, E.PARTIAL_FILL): S.PARTIALLY_FILLED,
    (S.PARTIALLY_FILLED, E.FILL): S.FILLED,
    (S.PARTIALLY_FILLED, E.CANCEL_REQUEST): S.CANCEL_PENDING,
    (S.PARTIALLY_FILLED, E.CANCELED): S.CANCELED,
    (S.PARTIALLY_FILLED, E.EXPIRE): S.EXPIRED,
    (S.CANCEL_PENDING, E.ACCEPT): S.CANCEL_PENDING,
    (S.CANCEL_PENDING, E.REJECT): S.REJECTED,
    (S.CANCEL_PENDING, E.PARTIAL_FILL): S.CANCEL_PENDING,
    (S.CANCEL_PENDING, E.FILL): S.FILLED,
    (S.CANCEL_PENDING, E.CANCELED): S.CANCELED,
    (S.CANCEL_PENDING, E.CANCEL_REJECTED): Restore.PRE_CANCEL,
    (S.CANCEL_PENDING, E.EXPIRE): S.EXPIRED,
    # Replace keeps the status; a REPLACED order was seen by the venue, so it is accepted.
    (S.SUBMITTED, E.REPLACE_REQUEST): S.SUBMITTED,
    (S.ACCEPTED, E.REPLACE_REQUEST): S.ACCEPTED,
    (S.PARTIALLY_FILLED, E.REPLACE_REQUEST): S.PARTIALLY_FILLED,
    (S.SUBMITTED, E.REPLACED): S.ACCEPTED,
    (S.ACCEPTED, E.REPLACED): S.ACCEPTED,
    (S.PARTIALLY_FILLED, E.REPLACED): S.PARTIALLY_FILLED,
    (S.CANCEL_PENDING, E.REPLACED): S.CANCEL_PENDING,
    (S.SUBMITTED, E.REPLACE_REJECTED): S.SUBMITTED,
    (S.ACCEPTED, E.REPLACE_REJECTED): S.ACCEPTED,
    (S.PARTIALLY_FILLED, E.REPLACE_REJECTED): S.PARTIALLY_FILLED,
    (S.CANCEL_PENDING, E.REPLACE_REJECTED): S.CANCEL_PENDING,
}
ILLEGAL = sorted(
    set(itertools.product(OrderStatus, OrderEvent)) - set(EXPECTED_LEGAL),
    key=lambda pair: (pair[0].value, pair[1].value),
)
TERMINAL = [S.DENIED, S.FILLED, S.CANCELED, S.REJECTED, S.EXPIRED]


def _progress(status: OrderStatus) -> OrderProgress:
    """An order of 1 in `status`; half filled where the status implies a fill happened."""
    if status in (S.PARTIALLY_FILLED, S.CANCELED, S.EXPIRED, S.CANCEL_PENDING):
        return OrderProgress(
            quantity=Decimal(1),
            status=status,
            filled_quantity=Decimal("0.5"),
            filled_notional=Decimal("50"),
            status_before_cancel=S.PARTIALLY_FILLED if status is S.CANCEL_PENDING else None,
        )
    if status is S.FILLED:
        return OrderProgress(
            quantity=Decimal(1),
            status=status,
            filled_quantity=Decimal(1),
            filled_notional=Decimal(100),
        )
    return OrderProgress(quantity=Decimal(1), status=status)


def _do(progress: OrderProgress, event: OrderEvent) -> OrderProgress:
    """Apply `event`; a fill event fills a quarter (PARTIAL_FILL) or the rest (FILL) at 100."""
    if event is E.PARTIAL_FILL:
        return fill(progress, Decimal("0.25"), Decimal(100))
    if event is E.FILL:
        rest = progress.quantity - progress.filled_quantity
        return fill(progress, rest if rest > 0 else Decimal("0.25"), Decimal(100))
    return apply(progress, event)


def test_transition_table_when_read_equals_the_specified_table() -> None:
    assert dict(TRANSITIONS) == EXPECTED_LEGAL


@pytest.mark.parametrize(
    ("status", "event"), list(EXPECTED_LEGAL), ids=lambda v: getattr(v, "value", v)
)
def test_transition_when_legal_moves_to_the_table_target(
    status: OrderStatus, event: OrderEvent
) -> None:
    progress = _progress(status)

    after = _do(progress, event)

    expected = EXPECTED_LEGAL[(status, event)]
    if expected is Restore.PRE_CANCEL:
        # _progress puts a pending cancel on a half-filled order.
        expected = S.PARTIALLY_FILLED
    assert after.status is expected


@pytest.mark.parametrize(("status", "event"), ILLEGAL, ids=lambda v: getattr(v, "value", v))
def test_transition_when_illegal_is_refused_and_nothing_changes(
    status: OrderStatus, event: OrderEvent
) -> None:
    progress = _progress(status)

    with pytest.raises(TransitionRefusedError) as refused:
        _do(progress, event)

    assert isinstance(refused.value, IllegalTransitionError)
    assert refused.value.code == "ILLEGAL_TRANSITION"
    assert refused.value.details["status"] == status.value
    if not (status is S.FILLED and event.is_fill):  # any fill of a filled order reads as FILL
        assert refused.value.details["event"] == event.value
    assert progress == _progress(status)


def test_illegal_set_when_counted_covers_the_cross_product_minus_the_legal_set() -> None:
    assert len(ILLEGAL) == 10 * 13 - 37


@pytest.mark.parametrize("status", TERMINAL, ids=lambda s: s.value)
def test_terminal_status_when_any_event_arrives_has_no_exit(status: OrderStatus) -> None:
    exits = [event for event in OrderEvent if (status, event) in TRANSITIONS]

    assert exits == []
    assert status.is_terminal


def test_fills_when_accumulated_sum_quantity_and_average_price_exactly() -> None:
    progress = apply(OrderProgress(quantity=Decimal("0.1")), E.SUBMIT)

    progress = fill(progress, Decimal("0.04"), Decimal("49000.00"))
    after_first = progress
    progress = fill(progress, Decimal("0.06"), Decimal("49010.00"))

    # 0.04 x 49000 + 0.06 x 49010 = 1960 + 2940.6 = 4900.6; / 0.1 = 49006.
    assert after_first.status is S.PARTIALLY_FILLED
    assert after_first.avg_fill_price == Decimal("49000")
    assert progress.status is S.FILLED
    assert progress.filled_quantity == Decimal("0.10")
    assert progress.filled_notional == Decimal("4900.6000")
    assert progress.avg_fill_price == Decimal("49006")
    assert progress.leaves_quantity == 0


def test_fills_when_average_does_not_terminate_round_half_even_at_28_digits() -> None:
    progress = apply(OrderProgress(quantity=Decimal(3)), E.SUBMIT)

    progress = fill(progress, Decimal(1), Decimal(1))
    progress = fill(progress, Decimal(2), Decimal(2))

    # (1 + 4) / 3 = 1.666..., 28 significant digits, last one rounded up.
    assert progress.avg_fill_price == Decimal("1.666666666666666666666666667")
    assert progress.filled_notional == Decimal(5)


def test_fills_when_many_small_ones_sum_without_drift() -> None:
    progress = apply(OrderProgress(quantity=Decimal("1.0")), E.SUBMIT)

    for _ in range(10):
        progress = fill(progress, Decimal("0.1"), Decimal("0.3"))

    assert progress.status is S.FILLED
    assert progress.filled_quantity == Decimal("1.0")
    assert progress.avg_fill_price == Decimal("0.3")


def test_fill_when_it_exceeds_the_order_quantity_is_refused_as_overfill() -> None:
    progress = fill(
        apply(OrderProgress(quantity=Decimal(1)), E.SUBMIT), Decimal("0.7"), Decimal(10)
    )

    with pytest.raises(OverfillError) as refused:
        fill(progress, Decimal("0.30000001"), Decimal(10))

    assert refused.value.code == "OVERFILL"
    assert refused.value.details == {
        "quantity": "1",
        "filled_quantity": "0.7",
        "fill_quantity": "0.30000001",
    }
    assert progress.filled_quantity == Decimal("0.7")
    assert progress.status is S.PARTIALLY_FILLED


def test_fill_when_exactly_the_rest_completes_the_order() -> None:
    progress = fill(
        apply(OrderProgress(quantity=Decimal(1)), E.SUBMIT), Decimal("0.7"), Decimal(10)
    )

    done = fill(progress, Decimal("0.3"), Decimal(10))

    assert done.status is S.FILLED
    assert done.leaves_quantity == 0


@pytest.mark.parametrize(
    ("quantity", "price"),
    [(Decimal(0), Decimal(10)), (Decimal(-1), Decimal(10)), (Decimal(1), Decimal(0))],
)
def test_fill_when_quantity_or_price_not_positive_is_refused(
    quantity: Decimal, price: Decimal
) -> None:
    progress = apply(OrderProgress(quantity=Decimal(2)), E.SUBMIT)

    with pytest.raises(InvalidFillError):
        fill(progress, quantity, price)


def test_apply_when_given_a_fill_event_refuses_it_without_quantities() -> None:
    progress = apply(OrderProgress(quantity=Decimal(2)), E.SUBMIT)

    with pytest.raises(InvalidFillError):
        apply(progress, E.FILL)


def test_cancel_rejected_when_nothing_filled_restores_the_pre_cancel_status() -> None:
    accepted = apply(apply(OrderProgress(quantity=Decimal(1)), E.SUBMIT), E.ACCEPT)
    pending = apply(accepted, E.CANCEL_REQUEST)

    restored = apply(pending, E.CANCEL_REJECTED)

    assert pending.status is S.CANCEL_PENDING
    assert pending.status_before_cancel is S.ACCEPTED
    assert restored.status is S.ACCEPTED
    assert restored.status_before_cancel is None


def test_cancel_rejected_when_a_fill_raced_the_cancel_restores_partially_filled() -> None:
    accepted = apply(apply(OrderProgress(quantity=Decimal(1)), E.SUBMIT), E.ACCEPT)
    pending = apply(accepted, E.CANCEL_REQUEST)
    pending = fill(pending, Decimal("0.4"), Decimal(10))

    restored = apply(pending, E.CANCEL_REJECTED)

    assert pending.status is S.CANCEL_PENDING
    assert restored.status is S.PARTIALLY_FILLED
    assert restored.filled_quantity == Decimal("0.4")
