"""The signals stage service (a skeleton: no handlers yet)."""

from __future__ import annotations

from typing import ClassVar

from quantmesh_common.runtime import Service, ServiceContext
from quantmesh_common.topics import Topic
from quantmesh_signals.config import SignalsSettings

#: The issue that brings this stage's handlers.
HANDLERS_ISSUE = 3


class SignalsService(Service[SignalsSettings]):
    """The signals stage, without handlers yet: it serves health and metrics only."""

    name = "signals"
    settings_class = SignalsSettings

    #: Input topics (DESIGN.md); nothing is subscribed until the handlers exist.
    consumes: ClassVar[tuple[str, ...]] = (
        Topic.MD_TICKS,
        Topic.MD_BARS,
        Topic.MD_BOOKS,
        Topic.CONTROL,
    )
    #: Output topics (DESIGN.md); nothing is published until the handlers exist.
    produces: ClassVar[tuple[str, ...]] = (
        Topic.SIGNALS,
        Topic.ORDERS_INTENTS,
    )

    async def setup(self, ctx: ServiceContext[SignalsSettings]) -> None:
        """Register no handlers: the stage has none yet, and must not pretend otherwise."""
        ctx.logger.warning(
            "%s has no handlers yet (issue %d): it consumes and produces nothing",
            self.name,
            HANDLERS_ISSUE,
            extra={"consumes": list(self.consumes), "produces": list(self.produces)},
        )
