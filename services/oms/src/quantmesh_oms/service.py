"""The oms stage service: approved decisions become orders and venue commands; reports move them."""

from __future__ import annotations

from typing import Any, ClassVar

from quantmesh_common.bus.base import Emit
from quantmesh_common.clock import Clock, WallClock
from quantmesh_common.envelope import Envelope
from quantmesh_common.messages import ExecutionReport, RiskDecision
from quantmesh_common.runtime import Service, ServiceContext
from quantmesh_common.topics import Topic
from quantmesh_oms.config import OmsSettings
from quantmesh_oms.orders import OrderManager

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

    async def setup(self, ctx: ServiceContext[OmsSettings]) -> None:
        """Consume decisions and reports in one transactional group, keyed by account."""
        self.clock = ctx.clock
        ctx.subscribe(GROUP, list(self.consumes), self.handle, transactional=True)

    def handle(self, envelope: Envelope[Any]) -> list[Emit]:
        """Route one message to the order manager; an unexpected one is dead-lettered."""
        payload = envelope.payload
        now = self.clock.now_ns()
        if isinstance(payload, RiskDecision):
            return self.orders.on_decision(payload, now)
        if isinstance(payload, ExecutionReport):
            return self.orders.on_report(payload, now)
        raise TypeError(f"oms does not handle {envelope.schema_name}")
