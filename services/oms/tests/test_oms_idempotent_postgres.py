"""The oms in idempotent delivery on real PostgreSQL: a restarted instance handed a stored
batch's inputs again publishes the same commands and the orders' states, and stores nothing."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest

from quantmesh_common.bus.base import Emit
from quantmesh_common.envelope import Envelope
from quantmesh_common.messages import CommandType, OrderCommand, OrderRequestAction, OrderStatus
from quantmesh_common.testing import stubs
from quantmesh_common.testing.harness import StageHarness
from quantmesh_common.topics import Topic
from quantmesh_oms.config import OmsSettings
from quantmesh_oms.service import OmsService

pytestmark = pytest.mark.integration

NOW = stubs.TS + 10 * stubs.SECOND_NS


class Instance(StageHarness[OmsService]):
    """A fresh oms process (rebuilt from the store at start) in idempotent delivery."""

    def __init__(self, pool: Any) -> None:
        settings = OmsSettings(bus="memory", http_port=0, order_flow_delivery="idempotent")
        super().__init__(OmsService(settings), now_ns=NOW, pg=pool)

    async def hand(self, *envelopes: Envelope[Any]) -> list[Emit]:
        """Handle `envelopes` as a consumed batch (the handler, then the batch hook)."""
        emits: list[Emit] = []
        for envelope in envelopes:
            emits += await self.service.handle(envelope)
        await self.service.flush()
        return emits


async def _stored(pool: Any) -> tuple[list[Any], list[Any], int]:
    orders = await pool.fetch("SELECT * FROM orders ORDER BY client_order_id")
    events = await pool.fetch("SELECT event_id, payload FROM order_events ORDER BY event_id")
    outbox = await pool.fetchval("SELECT count(*) FROM oms_outbox")
    return [dict(r) for r in orders], [dict(r) for r in events], int(outbox)


def _replace_request() -> Any:
    return stubs.order_request(
        request_id="RQ-2",
        action=OrderRequestAction.REPLACE,
        new_quantity=Decimal("0.3"),
        new_limit_price=Decimal("48000"),
    )


def _cancel_request() -> Any:
    return stubs.order_request(client_order_id="O-2")


async def test_inputs_when_handed_again_to_a_restarted_instance_publish_same_commands_store_nothing(
    oms_pool: Any,
) -> None:
    first = await Instance(oms_pool).start()
    o2 = stubs.limit_order_intent(client_order_id="O-2", intent_id="I-2")
    inputs = [
        *await first.send(
            Topic.ORDERS_APPROVED,
            stubs.risk_decision(intent=stubs.limit_order_intent()),
            stubs.risk_decision(intent=o2, decision_id="D-2"),
        ),
        *await first.send(
            Topic.EXEC_REPORTS,
            stubs.order_accepted(),
            stubs.order_accepted(client_order_id="O-2", report_id="R-0b", venue_order_id="V-2"),
        ),
        *await first.send(Topic.ORDERS_REQUESTS, _replace_request(), _cancel_request()),
    ]
    first_commands: list[OrderCommand] = first.payloads(Topic.ORDERS_COMMANDS)
    stored_before = await _stored(oms_pool)

    second = await Instance(oms_pool).start()
    emits = await second.hand(*inputs)

    commands: list[Any] = [e.payload for e in emits if e.topic == Topic.ORDERS_COMMANDS]
    updates: list[Any] = [e.payload for e in emits if e.topic == Topic.ORDERS_UPDATES]
    assert [c.command_id for c in first_commands] == [
        "O-1:SUBMIT",
        "O-2:SUBMIT",
        "O-1:REPLACE:RQ-2",
        "O-2:CANCEL:RQ-1",
    ]
    # Each decision again: its order's state and the command it waits on, rebuilt with its id;
    # each request again: the command it sent, as stored in its outbox. No SUBMIT: both were
    # acknowledged, only the REPLACE and the CANCEL still wait for the venue.
    assert [c.command_id for c in commands] == [
        "O-1:REPLACE:RQ-2",
        "O-2:CANCEL:RQ-1",
        "O-1:REPLACE:RQ-2",
        "O-2:CANCEL:RQ-1",
    ]
    assert commands[2:] == first_commands[2:]
    assert commands[0].new_quantity == Decimal("0.3")
    states = [(u.client_order_id, u.status, u.quantity) for u in updates]
    accepted = ("O-1", OrderStatus.ACCEPTED, Decimal("0.1"))
    pending = ("O-2", OrderStatus.CANCEL_PENDING, Decimal("0.1"))
    assert states == [accepted, pending, accepted, pending, accepted, pending]
    assert await _stored(oms_pool) == stored_before
    assert second.service.duplicates == 6


async def test_requests_when_repeated_upstream_after_a_restart_rebuild_their_commands_ids(
    oms_pool: Any,
) -> None:
    first = await Instance(oms_pool).start()
    o2 = stubs.limit_order_intent(client_order_id="O-2", intent_id="I-2")
    await first.send(
        Topic.ORDERS_APPROVED,
        stubs.risk_decision(intent=stubs.limit_order_intent()),
        stubs.risk_decision(intent=o2, decision_id="D-2"),
    )
    await first.send(
        Topic.EXEC_REPORTS,
        stubs.order_accepted(),
        stubs.order_accepted(client_order_id="O-2", report_id="R-0b", venue_order_id="V-2"),
    )
    await first.send(Topic.ORDERS_REQUESTS, _replace_request(), _cancel_request())
    stored_before = await _stored(oms_pool)

    # The same requests in new messages (their outputs are not in the outbox under these ids):
    # the commands are rebuilt from the stored state alone.
    second = await Instance(oms_pool).start()
    emits = await second.hand(stubs.envelope(_replace_request()), stubs.envelope(_cancel_request()))

    payloads: list[Any] = [e.payload for e in emits]
    replace, update_1, cancel, update_2 = payloads
    assert (replace.command_type, replace.command_id) == (CommandType.REPLACE, "O-1:REPLACE:RQ-2")
    assert (replace.new_quantity, replace.new_limit_price) == (Decimal("0.3"), Decimal("48000"))
    assert (cancel.command_type, cancel.command_id) == (CommandType.CANCEL, "O-2:CANCEL:RQ-1")
    assert cancel.venue_order_id == "V-2"
    assert (update_1.client_order_id, update_1.status) == ("O-1", OrderStatus.ACCEPTED)
    assert (update_2.client_order_id, update_2.status) == ("O-2", OrderStatus.CANCEL_PENDING)
    assert await _stored(oms_pool) == stored_before
