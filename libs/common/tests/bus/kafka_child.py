"""A consumer process for the crash test: handles slowly, notes each message, waits to be killed.

Usage: python kafka_child.py BOOTSTRAP TOPIC GROUP OUT_FILE
"""

from __future__ import annotations

import asyncio
import sys
from typing import Any, TextIO

from quantmesh_common.bus.kafka import KafkaBus
from quantmesh_common.envelope import Envelope, Event, schemas
from quantmesh_common.topics import TopicRegistry, TopicSpec


@schemas.register
class Tock(Event):
    """Same schema as the test's Tock (schemas are matched by name across processes)."""

    SCHEMA_NAME = "qmtest.kafka.tock"
    key: str
    seq: int


async def main(bootstrap: str, topic: str, group: str, out: TextIO) -> None:
    registry = TopicRegistry([TopicSpec(topic, Tock, "key", 1)])
    bus = KafkaBus(
        "qmtest-child",
        bootstrap,
        registry,
        consumer_config={"session.timeout.ms": 6_000, "heartbeat.interval.ms": 500},
    )

    async def handler(envelope: Envelope[Any]) -> None:
        out.write(f"{envelope.payload.seq}\n")
        out.flush()
        await asyncio.sleep(0.05)

    await bus.subscribe(group, [topic], handler).start()
    await asyncio.Event().wait()


if __name__ == "__main__":
    bootstrap, topic, group, out_path = sys.argv[1:5]
    with open(out_path, "a", encoding="utf-8") as out_file:
        asyncio.run(main(bootstrap, topic, group, out_file))
