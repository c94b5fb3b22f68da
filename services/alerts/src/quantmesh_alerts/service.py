"""The alerts stage service (a skeleton: no handlers yet)."""

from __future__ import annotations

from typing import ClassVar

from quantmesh_alerts.config import AlertsSettings
from quantmesh_common.runtime import Service, ServiceContext
from quantmesh_common.topics import Topic

#: The issue that brings this stage's handlers.
HANDLERS_ISSUE = 4


class AlertsService(Service[AlertsSettings]):
    """The alerts stage, without handlers yet: it serves health and metrics only."""

    name = "alerts"
    settings_class = AlertsSettings

    #: Input topics (DESIGN.md); nothing is subscribed until the handlers exist.
    consumes: ClassVar[tuple[str, ...]] = (
        Topic.ORDERS_REJECTED,
        Topic.EXEC_REPORTS,
        Topic.ALERTS,
        Topic.CONTROL,
    )
    #: Output topics (DESIGN.md); nothing is published until the handlers exist.
    # Notifications leave through webhook / Telegram / e-mail, not the bus.
    produces: ClassVar[tuple[str, ...]] = ()

    async def setup(self, ctx: ServiceContext[AlertsSettings]) -> None:
        """Register no handlers: the stage has none yet, and must not pretend otherwise."""
        ctx.logger.warning(
            "%s has no handlers yet (issue %d): it consumes and produces nothing",
            self.name,
            HANDLERS_ISSUE,
            extra={"consumes": list(self.consumes), "produces": list(self.produces)},
        )
