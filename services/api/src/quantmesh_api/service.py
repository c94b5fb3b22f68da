"""The api stage service (a skeleton: no handlers yet)."""

from __future__ import annotations

from typing import ClassVar

from quantmesh_api.config import ApiSettings
from quantmesh_common.runtime import Service, ServiceContext
from quantmesh_common.topics import Topic

#: The issue that brings this stage's handlers.
HANDLERS_ISSUE = 6


class ApiService(Service[ApiSettings]):
    """The api stage, without handlers yet: it serves health and metrics only."""

    name = "api"
    settings_class = ApiSettings

    #: Input topics (DESIGN.md); nothing is subscribed until the handlers exist.
    consumes: ClassVar[tuple[str, ...]] = (
        Topic.ORDERS_UPDATES,
        Topic.EXEC_REPORTS,
        Topic.PORTFOLIO_UPDATES,
        Topic.PORTFOLIO_SNAPSHOTS,
        Topic.ALERTS,
    )
    #: Output topics (DESIGN.md); nothing is published until the handlers exist.
    produces: ClassVar[tuple[str, ...]] = (
        Topic.CONTROL,
        Topic.ORDERS_INTENTS,
    )

    async def setup(self, ctx: ServiceContext[ApiSettings]) -> None:
        """Register no handlers: the stage has none yet, and must not pretend otherwise."""
        ctx.logger.warning(
            "%s has no handlers yet (issue %d): it consumes and produces nothing",
            self.name,
            HANDLERS_ISSUE,
            extra={"consumes": list(self.consumes), "produces": list(self.produces)},
        )
