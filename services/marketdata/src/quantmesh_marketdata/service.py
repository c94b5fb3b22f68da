"""The marketdata stage service (a skeleton: no handlers yet)."""

from __future__ import annotations

from typing import ClassVar

from quantmesh_common.runtime import Service, ServiceContext
from quantmesh_common.topics import Topic
from quantmesh_marketdata.config import MarketDataSettings

#: The issue that brings this stage's handlers.
HANDLERS_ISSUE = 3


class MarketDataService(Service[MarketDataSettings]):
    """The marketdata stage, without handlers yet: it serves health and metrics only."""

    name = "marketdata"
    settings_class = MarketDataSettings

    #: Input topics (DESIGN.md); nothing is subscribed until the handlers exist.
    consumes: ClassVar[tuple[str, ...]] = (Topic.CONTROL,)
    #: Output topics (DESIGN.md); nothing is published until the handlers exist.
    produces: ClassVar[tuple[str, ...]] = (
        Topic.MD_TICKS,
        Topic.MD_BARS,
        Topic.MD_BOOKS,
    )

    async def setup(self, ctx: ServiceContext[MarketDataSettings]) -> None:
        """Register no handlers: the stage has none yet, and must not pretend otherwise."""
        ctx.logger.warning(
            "%s has no handlers yet (issue %d): it consumes and produces nothing",
            self.name,
            HANDLERS_ISSUE,
            extra={"consumes": list(self.consumes), "produces": list(self.produces)},
        )
