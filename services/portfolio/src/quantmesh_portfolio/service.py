"""The portfolio stage service (a skeleton: no handlers yet)."""

from __future__ import annotations

from typing import ClassVar

from quantmesh_common.runtime import Service, ServiceContext
from quantmesh_common.topics import Topic
from quantmesh_portfolio.config import PortfolioSettings

#: The issue that brings this stage's handlers.
HANDLERS_ISSUE = 4


class PortfolioService(Service[PortfolioSettings]):
    """The portfolio stage, without handlers yet: it serves health and metrics only."""

    name = "portfolio"
    settings_class = PortfolioSettings

    #: Input topics (DESIGN.md); nothing is subscribed until the handlers exist.
    consumes: ClassVar[tuple[str, ...]] = (
        Topic.EXEC_REPORTS,
        Topic.MD_TICKS,
        Topic.MD_BARS,
        Topic.CONTROL,
    )
    #: Output topics (DESIGN.md); nothing is published until the handlers exist.
    produces: ClassVar[tuple[str, ...]] = (
        Topic.PORTFOLIO_UPDATES,
        Topic.PORTFOLIO_SNAPSHOTS,
    )

    async def setup(self, ctx: ServiceContext[PortfolioSettings]) -> None:
        """Register no handlers: the stage has none yet, and must not pretend otherwise."""
        ctx.logger.warning(
            "%s has no handlers yet (issue %d): it consumes and produces nothing",
            self.name,
            HANDLERS_ISSUE,
            extra={"consumes": list(self.consumes), "produces": list(self.produces)},
        )
