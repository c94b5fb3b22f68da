"""A stage's own setup code on a retaining in-memory bus with a simulated clock, for tests."""

from __future__ import annotations

from typing import Any, Generic, Self, TypeVar

from quantmesh_common.bus.memory import InMemoryBus
from quantmesh_common.clock import SimulatedClock
from quantmesh_common.envelope import Envelope
from quantmesh_common.health import HealthServer
from quantmesh_common.runtime import Service, ServiceContext

SV = TypeVar("SV", bound=Service[Any])


class StageHarness(Generic[SV]):
    """Runs `service.setup` against an InMemoryBus(retain=True) and a SimulatedClock.

    `send` publishes and delivers everything that follows; `payloads(topic)` reads back what
    was published there. `pg` / `redis` are handed to the service context as they are.
    """

    def __init__(self, service: SV, *, now_ns: int, pg: Any = None, redis: Any = None) -> None:
        self.service = service
        self.settings = service.settings
        self.clock = SimulatedClock(now_ns)
        self.bus = InMemoryBus("test", clock=self.clock, retain=True)
        self._pg = pg
        self._redis = redis

    async def start(self) -> Self:
        """Run the stage's setup and join its subscriptions."""
        ctx = ServiceContext(
            settings=self.settings,
            bus=self.bus,
            clock=self.clock,
            health=HealthServer(type(self.service).name or "test", version="test"),
            pg=self._pg,
            redis=self._redis,
        )
        await self.service.setup(ctx)
        for subscription in ctx.subscriptions:
            await subscription.start()
        return self

    async def send(self, topic: str, *payloads: Any) -> list[Envelope[Any]]:
        """Publish `payloads` on `topic`, then deliver until the bus is idle."""
        sent = [await self.bus.publish(topic, payload) for payload in payloads]
        await self.bus.run_until_idle()
        return sent

    def payloads(self, topic: str) -> list[Any]:
        """Every payload published on `topic` so far, in order."""
        return [envelope.payload for envelope in self.bus.messages(topic)]
