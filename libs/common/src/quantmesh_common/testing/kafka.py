"""Kafka helpers for tests: a service's topics under a prefix of their own, and waiting."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterable

from confluent_kafka.admin import AdminClient

from quantmesh_common.bus.kafka import ensure_topics
from quantmesh_common.topics import TopicRegistry, registry

#: How long a test waits for something the broker does (a rebalance, a delivery) by default.
WAIT_S = 90.0


async def until(condition: Callable[[], bool], what: str, timeout: float = WAIT_S) -> None:
    """Return once `condition()` holds; fail naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.1)


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
        futures = AdminClient({"bootstrap.servers": bootstrap}).delete_topics(
            names.all_topic_names()
        )
        for future in futures.values():
            with contextlib.suppress(Exception):  # a topic left behind is harmless
                future.result(timeout=30)
