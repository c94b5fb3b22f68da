"""The execution stage service (a skeleton: no handlers yet)."""

from __future__ import annotations

from typing import ClassVar

from quantmesh_common.runtime import Service, ServiceContext
from quantmesh_common.topics import Topic
from quantmesh_execution.config import ExecutionSettings

#: The issue that brings this stage's handlers.
HANDLERS_ISSUE = 4


class ExecutionService(Service[ExecutionSettings]):
    """The execution stage, without handlers yet: it serves health and metrics only."""

    name = "execution"
    settings_class = ExecutionSettings

    #: Input topics (DESIGN.md); nothing is subscribed until the handlers exist.
    consumes: ClassVar[tuple[str, ...]] = (
        Topic.ORDERS_COMMANDS,
        Topic.MD_TICKS,
        Topic.MD_BOOKS,
        Topic.CONTROL,
    )
    #: Output topics (DESIGN.md); nothing is published until the handlers exist.
    produces: ClassVar[tuple[str, ...]] = (Topic.EXEC_REPORTS,)

    async def setup(self, ctx: ServiceContext[ExecutionSettings]) -> None:
        """Register no handlers: the stage has none yet, and must not pretend otherwise."""
        ctx.logger.warning(
            "%s has no handlers yet (issue %d): it consumes and produces nothing",
            self.name,
            HANDLERS_ISSUE,
            extra={"consumes": list(self.consumes), "produces": list(self.produces)},
        )
