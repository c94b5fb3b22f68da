"""A tiny service run as a real process by the runtime tests: `python example_service.py`.

It subscribes to md.ticks, publishes one tick from a background task once running, and logs
each tick it handles, so a test can watch the whole path: config, bus, handler, logs, stop.
"""

from __future__ import annotations

import logging
from typing import Any

from pydantic import Field

from quantmesh_common.bus.base import Emit
from quantmesh_common.envelope import Envelope
from quantmesh_common.runtime import Service, ServiceContext, run
from quantmesh_common.settings import ServiceSettings
from quantmesh_common.testing import stubs
from quantmesh_common.topics import Topic

log = logging.getLogger("example")


class ExampleSettings(ServiceSettings):
    """The example's settings: a per-service default port and one extra field."""

    http_port: int = Field(default=8199, ge=0, le=65535)
    example_publish: bool = True


class ExampleService(Service[ExampleSettings]):
    """Counts the ticks it sees."""

    name = "example"
    settings_class = ExampleSettings

    def __init__(self, settings: ExampleSettings) -> None:
        super().__init__(settings)
        self.handled = 0

    async def setup(self, ctx: ServiceContext[ExampleSettings]) -> None:
        ctx.subscribe("example", [Topic.MD_TICKS], self.on_tick)
        ctx.add_readiness_check("example", lambda: True)
        if ctx.settings.example_publish:

            async def publish_one() -> None:
                env = await ctx.bus.publish(Topic.MD_TICKS, stubs.tick())
                log.info("published tick", extra={"published_event_id": env.event_id})

            ctx.add_task(publish_one, "publisher")

    def on_tick(self, env: Envelope[Any]) -> list[Emit]:
        self.handled += 1
        log.info("handled tick", extra={"price": env.payload.price, "handled": self.handled})
        return []


def main() -> None:
    """Run the example service."""
    run(ExampleService, ExampleSettings)


if __name__ == "__main__":
    main()
