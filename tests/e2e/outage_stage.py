"""A minimal stage run as a process by tests/e2e/test_bus_broker_outage.py.

It replies to every ping with a pong twice: through a transactional subscription (exactly
once) and through a plain one (at least once). Its topics come from QM_OUTAGE_PINGS and
QM_OUTAGE_PONGS, so each test run has its own.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

from quantmesh_common.bus.base import Emit
from quantmesh_common.envelope import Envelope, Event, schemas
from quantmesh_common.runtime import Service, ServiceContext, run
from quantmesh_common.settings import ServiceSettings
from quantmesh_common.topics import TopicRegistry, TopicSpec


@schemas.register
class OutagePing(Event):
    """The stage's input."""

    SCHEMA_NAME = "qmtest.outage.ping"
    key: str
    seq: int


@schemas.register
class OutagePong(Event):
    """A reply; `path` tells which subscription sent it."""

    SCHEMA_NAME = "qmtest.outage.pong"
    key: str
    seq: int
    path: str


class OutageSettings(ServiceSettings):
    """The topics and the group prefix of this run."""

    outage_pings: str = "qmtest.outage.pings"
    outage_pongs: str = "qmtest.outage.pongs"
    outage_group: str = "qmtest.outage"


def outage_registry(pings: str, pongs: str) -> TopicRegistry:
    """The two topics of a run, four partitions each."""
    return TopicRegistry(
        [TopicSpec(pings, OutagePing, "key", 4), TopicSpec(pongs, OutagePong, "key", 4)]
    )


def _reply(pongs: str, path: str) -> Callable[[Envelope[Any]], Sequence[Emit]]:
    def handle(envelope: Envelope[Any]) -> Sequence[Emit]:
        ping = envelope.payload
        return [Emit(pongs, OutagePong(key=ping.key, seq=ping.seq, path=path))]

    return handle


class OutageStage(Service[OutageSettings]):
    """Replies to pings, transactionally and not."""

    name = "outage-stage"
    settings_class = OutageSettings
    topic_registry = outage_registry(
        os.environ.get("QM_OUTAGE_PINGS", "qmtest.outage.pings"),
        os.environ.get("QM_OUTAGE_PONGS", "qmtest.outage.pongs"),
    )

    async def setup(self, ctx: ServiceContext[OutageSettings]) -> None:
        s = ctx.settings
        txn = _reply(s.outage_pongs, "txn")
        plain = _reply(s.outage_pongs, "plain")
        ctx.subscribe(f"{s.outage_group}.txn", [s.outage_pings], txn, transactional=True)
        ctx.subscribe(f"{s.outage_group}.plain", [s.outage_pings], plain)


if __name__ == "__main__":
    run(OutageStage, OutageSettings)
