"""Kafka helpers for tests and benchmarks: a stage's topics under a prefix, its instances in one
group, waits, and plain-client relays to measure the bus against."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from typing import Any, Generic, TypeVar

from confluent_kafka import Consumer, Producer
from confluent_kafka.admin import AdminClient

from quantmesh_common.bus.kafka import DEFAULT_PRODUCER_CONFIG, KafkaBus, ensure_topics
from quantmesh_common.runtime import Service, ServiceRunner
from quantmesh_common.topics import TopicRegistry, registry

#: How long a test waits for something the broker does (a rebalance, a delivery) by default.
WAIT_S = 90.0

SV = TypeVar("SV", bound=Service[Any])


def bootstrap_or_skip() -> str:
    """QM_KAFKA_BOOTSTRAP; the calling test is skipped when it is not set."""
    import pytest  # only tests call this: the library itself does not need pytest

    bootstrap = os.environ.get("QM_KAFKA_BOOTSTRAP")
    if not bootstrap:
        pytest.skip("QM_KAFKA_BOOTSTRAP is not set (start the stack: deploy/local/stack.sh up)")
    return bootstrap


async def until(condition: Callable[[], bool], what: str, timeout: float = WAIT_S) -> None:
    """Return once `condition()` holds; fail naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.1)


async def publish_until(
    bus: KafkaBus,
    topic: str,
    payload: Callable[[int], Any],
    condition: Callable[[], bool],
    rounds: int = 120,
) -> None:
    """Publish `payload(0)`, `payload(1)`, ... on `topic` until `condition()` holds within half a
    second of one, `rounds` at the most; the caller checks the condition afterwards.

    A broadcast subscription starts at the latest offsets, resolved at its member's first
    fetch: what was published before that it never reads, so a test publishes until it does.
    """
    for n in range(rounds):
        await bus.publish(topic, payload(n))
        await bus.flush()
        with contextlib.suppress(AssertionError):
            await until(condition, f"{topic} read", 0.5)
            return


def kafka_settings(database_url: str | None) -> dict[str, Any]:
    """What every stage instance a test runs on the stack's broker is configured with: its
    bus, `database_url` (None: state in memory only), health on a loopback port of the OS's."""
    return {
        "bus": "kafka",
        "kafka_bootstrap": os.environ["QM_KAFKA_BOOTSTRAP"],
        "database_url": database_url,
        "http_host": "127.0.0.1",
        "http_port": 0,
    }


def delete_topics(bootstrap: str, topics: Iterable[str]) -> int:
    """Delete `topics` from the broker, waiting for each; return how many were deleted.

    One that stays behind is harmless to the caller, so failures are not raised; but the
    admin client must outlive its futures: a temporary one is destroyed at once and every
    future fails with _DESTROY, which left every topic of every run on the dev broker.
    """
    names = list(topics)
    if not names:
        return 0
    admin = AdminClient({"bootstrap.servers": bootstrap})
    deleted = 0
    for future in admin.delete_topics(names).values():
        with contextlib.suppress(Exception):
            future.result(timeout=30)
            deleted += 1
    return deleted


@contextlib.asynccontextmanager
async def prefixed_topics(
    bootstrap: str, stem: str, topics: Iterable[str]
) -> AsyncIterator[tuple[str, TopicRegistry]]:
    """`topics` of the platform's registry renamed under a fresh `qmtest.<stem>.<id>.` prefix,
    created on the broker (with their dead-letter twins) and deleted afterwards.

    Yields the prefix and the renamed registry: a stage given the prefix (its
    QM_<STAGE>_TOPIC_PREFIX) reads and writes only these, in consumer groups of its own.
    """
    prefix = f"qmtest.{stem}.{uuid.uuid4().hex[:10]}."
    names = registry().prefixed(prefix, tuple(topics))
    await asyncio.get_running_loop().run_in_executor(None, ensure_topics, bootstrap, names)
    try:
        yield prefix, names
    finally:
        await asyncio.to_thread(delete_topics, bootstrap, names.all_topic_names())


def stage_topics(stem: str, stage: type[Service[Any]]) -> Any:
    """A pytest fixture: `prefixed_topics` of every topic `stage` consumes or produces, on the
    stack's broker (skipped without one). A test module binds it as `topics = stage_topics(...)`.
    """
    import pytest

    @pytest.fixture(name="topics")
    async def topics() -> AsyncIterator[tuple[str, TopicRegistry]]:
        async with prefixed_topics(
            bootstrap_or_skip(), stem, (*stage.consumes, *stage.produces)
        ) as made:
            yield made

    return topics


class KafkaMember(Generic[SV]):
    """One instance of a stage, as its process runs it, on a Kafka bus of its own.

    The bus is named `name` (the `source` of what it publishes). Instances of one stage given
    the same topic prefix share its consumer groups, so the broker splits the partitions
    between them; `stop` leaves them, as a process that stops does.
    """

    def __init__(self, name: str, service: SV, names: TopicRegistry) -> None:
        self.name = name
        self.service = service
        self.bus = KafkaBus(name, service.settings.kafka_bootstrap or "", registry=names)
        self.runner = ServiceRunner(service, service.settings, bus=self.bus)
        self.stopped = False

    def assignment(
        self, group: str | None = None, topic: str | None = None
    ) -> list[tuple[str, int]]:
        """The (topic, partition)s this instance owns now, of consumer group `group` (its full
        name) and of `topic` where given; none before its start or after its stop."""
        ctx = self.runner.ctx
        if ctx is None or self.stopped:
            return []
        return [
            (t, p)
            for s in ctx.subscriptions
            if group in (None, s.group)
            for t, p in s.assignment()
            if topic in (None, t)
        ]

    def partitions(self, topic: str) -> set[int]:
        """The partitions of `topic` this instance owns now, in any of its groups."""
        return {p for _, p in self.assignment(topic=topic)}

    async def stop(self) -> None:
        """Stop the service and close its bus (once; again is a no-op)."""
        if not self.stopped:
            self.stopped = True
            await self.runner.stop()
            await self.bus.close()


async def until_split(
    members: Sequence[KafkaMember[Any]],
    total: int,
    what: str,
    *,
    group: str | None = None,
    topic: str | None = None,
) -> None:
    """Wait until `members` split the `total` partitions of `group` / `topic` between them:
    each owns some, none owns one another does, and together they own them all."""

    def split() -> bool:
        owned = [m.assignment(group, topic) for m in members]
        union = {tp for tps in owned for tp in tps}
        return all(owned) and sum(map(len, owned)) == len(union) == total

    await until(split, what)


async def start_split(
    members: Sequence[KafkaMember[Any]],
    total: int,
    what: str,
    *,
    group: str | None = None,
    topic: str | None = None,
) -> None:
    """Start `members` one after the other, then wait until they split the partitions
    (`until_split`)."""
    for member in members:
        await member.runner.start()
    await until_split(members, total, what, group=group, topic=topic)


#: A plain producer with the bus's client settings (idempotence, acks, one request in flight)
#: and no linger: what a benchmark's yardstick produces with.
PLAIN_PRODUCER_CONFIG: dict[str, Any] = {
    **{k: v for k, v in DEFAULT_PRODUCER_CONFIG.items() if k != "delivery.report.only.error"},
    "linger.ms": 0,
}


def plain_consumer(
    bootstrap: str, group: str, topic: str, config: dict[str, Any] | None = None
) -> Consumer:
    """A plain read_committed consumer of `topic` in `group`, returned once it has partitions."""
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": group,
            "auto.offset.reset": "earliest",
            "isolation.level": "read_committed",
            "enable.auto.commit": True,
            **(config or {}),
        }
    )
    consumer.subscribe([topic])
    while not consumer.assignment():
        consumer.poll(0.1)
    return consumer


def plain_relay(
    bootstrap: str,
    source: str,
    target: str,
    ready: Any,
    stop: Any,
    producer_config: dict[str, Any] | None = None,
    consumer_config: dict[str, Any] | None = None,
) -> None:
    """Pass every message of `source` on to `target` unread, with plain confluent-kafka, until
    `stop` (an Event) is set; `ready` is set once it has its partitions. The same hop as a
    stage's with no envelope, bus or handler: a benchmark's floor."""
    consumer = plain_consumer(bootstrap, f"{source}.relay", source, consumer_config)
    producer = Producer(
        {"bootstrap.servers": bootstrap, **PLAIN_PRODUCER_CONFIG, **(producer_config or {})}
    )
    ready.set()
    while not stop.is_set():
        msg = consumer.poll(0.1)
        if msg is not None and msg.error() is None:
            producer.produce(target, msg.value(), msg.key())
            producer.poll(0)
    producer.flush(10)
    consumer.close()
