"""A stage's own setup code on a retaining in-memory bus with a simulated clock, for tests."""

from __future__ import annotations

from typing import Any, Generic, Self, TypeVar

from quantmesh_common.bus.base import Bus, Subscription
from quantmesh_common.bus.memory import InMemoryBus
from quantmesh_common.clock import Clock, SimulatedClock
from quantmesh_common.envelope import Envelope
from quantmesh_common.health import HealthServer
from quantmesh_common.runtime import Service, ServiceContext

SV = TypeVar("SV", bound=Service[Any])


def context(
    service: Service[Any],
    bus: Bus,
    clock: Clock,
    *,
    settings: Any = None,
    pg: Any = None,
    redis: Any = None,
) -> ServiceContext[Any]:
    """The context `service.setup` gets from its runner, here on `bus` and `clock`, with
    `settings` (the service's own by default)."""
    return ServiceContext(
        settings=service.settings if settings is None else settings,
        bus=bus,
        clock=clock,
        health=HealthServer(type(service).name or "test", version="test"),
        pg=pg,
        redis=redis,
    )


async def deliver(bus: InMemoryBus, topic: str, *payloads: Any) -> list[Envelope[Any]]:
    """Publish `payloads` on `topic`, then deliver until the bus is idle."""
    sent = [await bus.publish(topic, payload) for payload in payloads]
    await bus.run_until_idle()
    return sent


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
        ctx = context(
            self.service,
            self.bus,
            self.clock,
            settings=self.settings,
            pg=self._pg,
            redis=self._redis,
        )
        await self.service.setup(ctx)
        for subscription in ctx.subscriptions:
            await subscription.start()
        return self

    async def send(self, topic: str, *payloads: Any) -> list[Envelope[Any]]:
        """Publish `payloads` on `topic`, then deliver until the bus is idle."""
        return await deliver(self.bus, topic, *payloads)

    def payloads(self, topic: str) -> list[Any]:
        """Every payload published on `topic` so far, in order."""
        return [envelope.payload for envelope in self.bus.messages(topic)]


class GroupMember(Generic[SV]):
    """One instance of a stage set up on a bus that other instances of it share.

    Its subscriptions join the stage's consumer groups there, so the bus splits the groups'
    partitions between the members (and moves them as members join and leave), as Kafka does
    between the processes of a scaled-out stage. Subclass it for what a test reads of a stage.
    """

    def __init__(self, service: SV, ctx: ServiceContext[Any]) -> None:
        self.service = service
        self.ctx = ctx

    @classmethod
    async def prepare(cls, service: SV, bus: Bus, clock: Clock, pg: Any = None) -> Self:
        """Run the service's setup (a stage with a store loads it here), joining nothing yet."""
        ctx = context(service, bus, clock, pg=pg)
        await service.setup(ctx)
        return cls(service, ctx)

    @classmethod
    async def join(cls, service: SV, bus: Bus, clock: Clock, pg: Any = None) -> Self:
        """Set the service up and join its groups: the bus rebalances them at once."""
        member = await cls.prepare(service, bus, clock, pg)
        await member.start()
        return member

    @property
    def subscriptions(self) -> list[Subscription]:
        """The subscriptions the service's setup registered, in order."""
        return list(self.ctx.subscriptions)

    def subscription(self, group: str) -> Subscription:
        """The subscription of consumer group `group`."""
        return next(s for s in self.subscriptions if s.group == group)

    async def start(self) -> None:
        """Join every group the service subscribed in."""
        for subscription in self.subscriptions:
            await subscription.start()

    async def leave(self) -> None:
        """Leave every group, as a member that stops does: the others take its partitions."""
        for subscription in self.subscriptions:
            await subscription.stop()
