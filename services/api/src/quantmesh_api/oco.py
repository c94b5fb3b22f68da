"""One-cancels-other for the two exits `protect` places on a position that is already open.

The OMS links a stop-loss and a take-profit itself only when they are asked for on the entry
order (OrderIntent.stop_loss_price / take_profit_price). A position opened without them gets
its exits from `protect` as two reduce-only orders, `<base>:SL` and `<base>:TP`; this module
keeps them one-cancels-other from the orders' updates: when one leg fills, the other is
resized to what the position has left (a REPLACE) or, once nothing is left, canceled, through
an `OrderRequest` on `orders.requests`. Request ids follow from the leg and its filled quantity,
so every api instance (each sees every update) sends the same request and the OMS applies it
once; a leg whose sibling is no longer working (e.g. updates replayed at start) sends nothing.
"""

from __future__ import annotations

import logging
from decimal import Decimal
from typing import Any

from quantmesh_api.state import ApiState
from quantmesh_common.messages import Order, OrderRequest, OrderRequestAction
from quantmesh_common.topics import Topic

log = logging.getLogger(__name__)

#: Tags of the protect legs, and the client order id suffix of each.
PROTECT_SL = "PROTECT_SL"
PROTECT_TP = "PROTECT_TP"
_SUFFIX = {PROTECT_SL: "SL", PROTECT_TP: "TP"}
_OTHER = {"SL": "TP", "TP": "SL"}
#: Order states in which a cancel or replace can still reach the venue.
WORKING = frozenset({"INITIALIZED", "SUBMITTED", "ACCEPTED", "PARTIALLY_FILLED"})


def leg_ids(base: str) -> tuple[str, str]:
    """Return the client order ids of the stop-loss and take-profit legs of `base`."""
    return f"{base}:SL", f"{base}:TP"


def sibling_of(order: Order) -> str | None:
    """Return the other leg's client order id if `order` is a protect leg that filled."""
    suffix = _SUFFIX.get(order.tag)
    if suffix is None or order.filled_quantity <= 0:
        return None
    base, _, leg = order.client_order_id.rpartition(":")
    if not base or leg != suffix:
        return None
    return f"{base}:{_OTHER[leg]}"


def request_for(order: Order, sibling: dict[str, Any], now_ns: int) -> OrderRequest | None:
    """Return the request that keeps `sibling` sized to the position `order` left, if any.

    Both legs were sized to the position; the position left is the filled leg's unfilled
    rest less what the sibling filled, so the sibling's new total quantity is the filled
    leg's rest. Nothing left (or no more than the sibling filled): cancel it.
    """
    sibling_id = str(sibling["client_order_id"])
    if sibling["status"] not in WORKING:
        return None
    rest = order.quantity - order.filled_quantity
    sibling_filled = Decimal(sibling["filled_quantity"])
    common: dict[str, Any] = {
        "account_id": order.account_id,
        "client_order_id": sibling_id,
        "requested_by": "api:oco",
        "ts_event": now_ns,
    }
    if rest <= sibling_filled:
        return OrderRequest(
            request_id=f"{sibling_id}:OCO-CANCEL",
            action=OrderRequestAction.CANCEL,
            reason=f"OCO: {order.client_order_id} filled",
            **common,
        )
    if Decimal(sibling["quantity"]) == rest:
        return None
    return OrderRequest(
        request_id=f"{sibling_id}:OCO-{order.filled_quantity.normalize()}",
        action=OrderRequestAction.REPLACE,
        new_quantity=rest,
        reason=f"OCO: {order.client_order_id} filled {order.filled_quantity}",
        **common,
    )


async def follow(state: ApiState, order: Order) -> OrderRequest | None:
    """Send the request that keeps the other leg of a filled protect leg one-cancels-other."""
    sibling_id = sibling_of(order)
    if sibling_id is None:
        return None
    sibling = await state.store.get_order(order.account_id, sibling_id)
    if sibling is None:
        log.warning(
            "OCO: the other leg is not stored; nothing to cancel",
            extra={"account_id": order.account_id, "client_order_id": sibling_id},
        )
        return None
    request = request_for(order, sibling, state.clock.now_ns())
    if request is not None:
        await state.publish(Topic.ORDERS_REQUESTS, request, key=order.account_id)
        log.info(
            "OCO: other leg %s",
            request.action.lower(),
            extra={"account_id": order.account_id, "client_order_id": sibling_id},
        )
    return request
