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
from quantmesh_oms.store import InMemoryOrderStore, OrderStore, OutboxEntry, PostgresOrderStore

log = logging.getLogger(__name__)

#: The issue that brings this stage's handlers; None: they exist.
HANDLERS_ISSUE: int | None = None

#: The consumer group of the order flow (decisions and reports of an account, co-partitioned).
GROUP = "oms"


class OrderStoreUnavailableError(BaseException):
    """The order store failed: a crash, not a poison message.

    A BaseException, so the bus neither dead-letters the message nor commits it: the
    subscription stops, the service faults and the message is redelivered once it restarts.
    """


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
        await self.rebuild()
        ctx.subscribe(GROUP, list(self.consumes), self.handle, transactional=True)

    async def rebuild(self) -> int:
        """Load every open order from the store into the book; returns how many."""
        opened = await self.store.load_open()
        for managed in opened:
            self.orders.restore(managed)
        log.info("rebuilt %d open orders from %s", len(opened), type(self.store).__name__)
        return len(opened)

    async def handle(self, envelope: Envelope[Any]) -> list[Emit]:
        """Route one message to the order manager; store its changes and outputs before emitting.

        An unexpected message is dead-lettered. The changes and the outputs (the outbox, keyed
        by the message's event id) are stored in one transaction; a redelivered message whose
        changes are already applied changes nothing, and its stored outputs are emitted again,
        so a crash between the database commit and the bus commit loses nothing. If the store
        fails, the order is dropped from memory (reloaded from the store on its next message)
        and OrderStoreUnavailableError stops the subscription without committing the message.
        """
        payload = envelope.payload
        if isinstance(payload, RiskDecision):
            client_order_id = payload.intent.client_order_id
        elif isinstance(payload, ExecutionReport):
            client_order_id = payload.client_order_id
        else:
            raise TypeError(f"oms does not handle {envelope.schema_name}")
        self.orders.take_changes()  # nothing may leak from a message that raised
        try:
            if self.orders.get(client_order_id) is None:
                # Only open orders are rebuilt at start: a closed one is fetched when named, so
                # a redelivered decision for it is not submitted twice.
                stored = await self.store.load(client_order_id)
                if stored is not None:
                    self.orders.restore(stored)
        except Exception as exc:
            raise OrderStoreUnavailableError(f"loading order {client_order_id}: {exc!r}") from exc
        now = self.clock.now_ns()
        if isinstance(payload, RiskDecision):
            emits = self.orders.on_decision(payload, now)
        else:
            emits = self.orders.on_report(payload, now)
        return await self._commit(envelope, emits, now, [client_order_id])

    async def _commit(
        self, envelope: Envelope[Any], emits: list[Emit], now: int, touched: list[str]
    ) -> list[Emit]:
        """Store the manager's changes with `emits` as the outbox of `envelope`; return the emits.

        Nothing changed and nothing to emit: the outputs stored for this envelope, if any (a
        redelivery), else nothing.
        """
        changes = self.orders.take_changes()
        try:
            if changes:
                outbox = OutboxEntry(envelope.event_id, envelope.schema_name, tuple(emits), now)
                await self.store.save(
                    changes,
                    correlation_id=envelope.correlation_id,
                    causation_id=envelope.event_id,
                    outbox=outbox,
                )
                return emits
            if not emits:
                stored = await self.store.load_outbox(envelope.event_id)
                if stored:
                    log.warning(
                        "%s %s was applied before; its %d outputs are published again",
                        envelope.schema_name,
                        envelope.event_id,
                        len(stored),
                    )
                    return stored
        except Exception as exc:
            for client_order_id in {c.order.client_order_id for c in changes} | set(touched):
                self.orders.forget(client_order_id)
            raise OrderStoreUnavailableError(f"storing {envelope.event_id}: {exc!r}") from exc
        return emits
