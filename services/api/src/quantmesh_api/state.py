"""What every request handler reaches: settings, stores, the bus, the projections, the hub."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from quantmesh_api.config import ApiSettings
from quantmesh_api.kv import Kv
from quantmesh_api.live import Hub, Projection
from quantmesh_api.store import ApiStore
from quantmesh_common.bus.base import Bus
from quantmesh_common.clock import Clock
from quantmesh_common.envelope import Envelope, Event

NS = 1_000_000_000


class PublishError(RuntimeError):
    """Kafka did not acknowledge a command in time."""


@dataclass
class ApiState:
    """The gateway's shared state, built once by the service (or a test)."""

    settings: ApiSettings
    store: ApiStore
    kv: Kv
    bus: Bus
    clock: Clock
    projection: Projection = field(default_factory=Projection)
    hub: Hub = field(default_factory=Hub)

    def now_s(self) -> int:
        """Service time in whole seconds (token issue and expiry)."""
        return self.clock.now_ns() // NS

    async def publish(self, topic: str, payload: Event, *, key: str | None = None) -> Envelope[Any]:
        """Publish and wait for the broker's ack, so a 202 means the command is durable."""
        envelope = await self.bus.publish(topic, payload, key=key)
        try:
            await asyncio.wait_for(self.bus.flush(), self.settings.publish_timeout_s)
        except TimeoutError:
            raise PublishError(
                f"no ack from the bus within {self.settings.publish_timeout_s}s"
            ) from None
        return envelope
