"""The risk stage service (a skeleton: no handlers yet)."""

from __future__ import annotations

from typing import ClassVar

from quantmesh_common.runtime import Service, ServiceContext
from quantmesh_common.topics import Topic
from quantmesh_risk.config import RiskSettings

#: The issue that brings this stage's handlers.
HANDLERS_ISSUE = 4


class RiskService(Service[RiskSettings]):
    """The risk stage, without handlers yet: it serves health and metrics only."""

    name = "risk"
    settings_class = RiskSettings

    #: Input topics (DESIGN.md); nothing is subscribed until the handlers exist.
    consumes: ClassVar[tuple[str, ...]] = (
        Topic.ORDERS_INTENTS,
        Topic.PORTFOLIO_UPDATES,
        Topic.MD_TICKS,
        Topic.CONTROL,
    )
    #: Output topics (DESIGN.md); nothing is published until the handlers exist.
    produces: ClassVar[tuple[str, ...]] = (
        Topic.ORDERS_APPROVED,
        Topic.ORDERS_REJECTED,
        Topic.ALERTS,
    )

    async def setup(self, ctx: ServiceContext[RiskSettings]) -> None:
        """Register no handlers: the stage has none yet, and must not pretend otherwise."""
        ctx.logger.warning(
            "%s has no handlers yet (issue %d): it consumes and produces nothing",
            self.name,
            HANDLERS_ISSUE,
            extra={"consumes": list(self.consumes), "produces": list(self.produces)},
        )
