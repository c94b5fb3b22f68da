"""The oms stage service (a skeleton: no handlers yet)."""

from __future__ import annotations

from typing import ClassVar

from quantmesh_common.runtime import Service, ServiceContext
from quantmesh_common.topics import Topic
from quantmesh_oms.config import OmsSettings

#: The issue that brings this stage's handlers.
HANDLERS_ISSUE = 4


class OmsService(Service[OmsSettings]):
    """The oms stage, without handlers yet: it serves health and metrics only."""

    name = "oms"
    settings_class = OmsSettings

    #: Input topics (DESIGN.md); nothing is subscribed until the handlers exist.
    consumes: ClassVar[tuple[str, ...]] = (
        Topic.ORDERS_APPROVED,
        Topic.EXEC_REPORTS,
        Topic.CONTROL,
    )
    #: Output topics (DESIGN.md); nothing is published until the handlers exist.
    produces: ClassVar[tuple[str, ...]] = (
        Topic.ORDERS_COMMANDS,
        Topic.ORDERS_UPDATES,
    )

    async def setup(self, ctx: ServiceContext[OmsSettings]) -> None:
        """Register no handlers: the stage has none yet, and must not pretend otherwise."""
        ctx.logger.warning(
            "%s has no handlers yet (issue %d): it consumes and produces nothing",
            self.name,
            HANDLERS_ISSUE,
            extra={"consumes": list(self.consumes), "produces": list(self.produces)},
        )
