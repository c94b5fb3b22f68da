"""A stage's own setup code on a retaining in-memory bus with a simulated clock, for tests;
and a stage's instances on the real Kafka, marked by a broadcast market-data group."""

from __future__ import annotations

import os
import zlib
from collections.abc import Callable, Mapping, Sequence
from decimal import Decimal
from typing import Any, Generic, Self, TypeVar

from quantmesh_common.bus.base import Bus, Subscription
from quantmesh_common.bus.kafka import KafkaBus
from quantmesh_common.bus.memory import InMemoryBus
from quantmesh_common.clock import Clock, SimulatedClock
from quantmesh_common.envelope import Envelope
from quantmesh_common.health import HealthServer
from quantmesh_common.runtime import Service, ServiceContext
from quantmesh_common.testing import stubs
from quantmesh_common.testing.kafka import KafkaMember, publish_until, start_split, until
from quantmesh_common.topics import Topic, TopicRegistry

SV = TypeVar("SV", bound=Service[Any])
KM = TypeVar("KM", bound=KafkaMember[Any])

_BASES = ("BTC", "ETH", "SOL", "XRP", "ADA", "DOGE", "LTC", "DOT", "AVAX", "LINK", "BNB", "TRX")
#: One mark an instrument, priced 101, 102, ...: their ticks fall on partitions of both halves
#: of `md.ticks` (crc32 % 12, librdkafka's default partitioner), so two instances that split it
#: in a group would each miss some; `mark_every_instance` checks that they do fall so.
MARKS: Mapping[str, Decimal] = {
    f"{base}-USDT.SIM": Decimal(n) for n, base in enumerate(_BASES, start=101)
}
#: Ticked until every instance reads it: "latest" is resolved at a member's first fetch.
_PROBE = "PRB-USDT.SIM"
_PROBE_ROUNDS = 120


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


async def mark_every_instance(
    members: Sequence[KM],
    price: Callable[[KM, str], Decimal | None],
    topics: tuple[str, TopicRegistry],
    *,
    group: str,
    total: int,
    what: str,
    broadcast: str,
    partitions: int,
    feed: str,
) -> None:
    """For Kafka tests that a broadcast market-data group reaches every instance: tick MARKS."""
    # `members` split the `total` partitions of their stage's own group `group` (`what` names
    # that in a failure), each owns all `partitions` of the broadcast group `broadcast`; a bus
    # named `feed` ticks them. `price(member, instrument)` is what a member read, None before.
    prefix, names = topics
    ticks = prefix + Topic.MD_TICKS
    halves = {zlib.crc32(i.encode()) % names.partitions(ticks) < 6 for i in MARKS}
    assert halves == {True, False}
    bus = KafkaBus(feed, os.environ["QM_KAFKA_BOOTSTRAP"], registry=names)
    await bus.start()
    try:
        await start_split(members, total, what, group=group)
        await until(
            lambda: all(len(m.assignment(broadcast)) == partitions for m in members),
            "each instance assigned every market-data partition",
        )
        await publish_until(
            bus,
            ticks,
            lambda n: stubs.tick(instrument_id=_PROBE, price=Decimal(n + 1)),
            lambda: all(price(m, _PROBE) is not None for m in members),
            _PROBE_ROUNDS,
        )
        assert all(price(m, _PROBE) is not None for m in members), "an instance never read a tick"

        for instrument_id, mark in MARKS.items():
            await bus.publish(ticks, stubs.tick(instrument_id=instrument_id, price=mark))
        await bus.flush()
        await until(
            lambda: all(price(m, x) is not None for m in members for x in MARKS),
            "every tick in both instances",
        )
    finally:
        for member in members:
            await member.stop()
        await bus.close()
