"""The oms stage service: approved decisions become orders and venue commands; reports move them."""

from __future__ import annotations

import logging
from typing import Any, ClassVar

from quantmesh_common.bus.base import Emit
from quantmesh_common.clock import Clock, WallClock
from quantmesh_common.envelope import Envelope
from quantmesh_common.messages import ExecutionReport, RiskDecision
from quantmesh_common.runtime import Service, ServiceContext
from quantmesh_common.topics import Topic
from quantmesh_oms.config import OmsSettings
from quantmesh_oms.orders import OrderManager
from quantmesh_oms.store import InMemoryOrderStore, OrderStore, PostgresOrderStore

log = logging.getLogger(__name__)

#: The issue that brings this stage's handlers; None: they exist.
HANDLERS_ISSUE: int | None = None

#: The consumer group of the order flow (decisions and reports of an account, co-partitioned).
GROUP = "oms"


class OmsService(Service[OmsSettings]):
    """The oms stage: one state machine per order, idempotent on the client order id."""

    name = "oms"
    settings_class = OmsSettings

    #: Input topics. `control` (cancel all on the kill switch) is not consumed yet.
    consumes: ClassVar[tuple[str, ...]] = (Topic.ORDERS_APPROVED, Topic.EXEC_REPORTS)
    #: Output topics.
    produces: ClassVar[tuple[str, ...]] = (Topic.ORDERS_COMMANDS, Topic.ORDERS_UPDATES)

    def __init__(self, settings: OmsSettings) -> None:
        super().__init__(settings)
        self.orders = OrderManager()
        self.clock: Clock = WallClock()
        self.store: OrderStore = InMemoryOrderStore()

    async def setup(self, ctx: ServiceContext[OmsSettings]) -> None:
        """Rebuild open orders from the store, then consume decisions and reports.

        The store is PostgreSQL when the context has a pool (QM_DATABASE_URL), else memory.
        One transactional group over both topics, keyed by account.
        """
        self.clock = ctx.clock
        if ctx.pg is not None:
            self.store = PostgresOrderStore(ctx.pg)
        opened = await self.store.load_open()
        for managed in opened:
            self.orders.restore(managed)
        log.info("rebuilt %d open orders from %s", len(opened), type(self.store).__name__)
        ctx.subscribe(GROUP, list(self.consumes), self.handle, transactional=True)

    async def handle(self, envelope: Envelope[Any]) -> list[Emit]:
        """Route one message to the order manager and store what it changed before emitting.

        An unexpected message is dead-lettered. If storing fails, the order is dropped from
        memory (reloaded from the store on its next message) and the error propagates, so the
        message is not acknowledged as applied.
        """
        payload = envelope.payload
        if isinstance(payload, RiskDecision):
            client_order_id = payload.intent.client_order_id
        elif isinstance(payload, ExecutionReport):
            client_order_id = payload.client_order_id
        else:
            raise TypeError(f"oms does not handle {envelope.schema_name}")
        self.orders.take_changes()  # nothing may leak from a message that raised
        if self.orders.get(client_order_id) is None:
            # Only open orders are rebuilt at start: a closed one is fetched when named, so a
            # redelivered decision for it is not submitted twice.
            stored = await self.store.load(client_order_id)
            if stored is not None:
                self.orders.restore(stored)
        now = self.clock.now_ns()
        if isinstance(payload, RiskDecision):
            emits = self.orders.on_decision(payload, now)
        else:
            emits = self.orders.on_report(payload, now)
        changes = self.orders.take_changes()
        if changes:
            try:
                await self.store.save(
                    changes, correlation_id=envelope.correlation_id, causation_id=envelope.event_id
                )
            except BaseException:
                self.orders.forget(client_order_id)
                raise
        return emits
