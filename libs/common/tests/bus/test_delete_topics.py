"""testing.kafka.delete_topics removes topics from the real broker."""

from __future__ import annotations

import time
import uuid

from confluent_kafka.admin import AdminClient
from confluent_kafka.cimpl import NewTopic

from quantmesh_common.testing.kafka import bootstrap_or_skip, delete_topics


def test_the_topics_are_gone_from_the_broker() -> None:
    bootstrap = bootstrap_or_skip()
    names = [f"qmtest.delete.{uuid.uuid4().hex[:10]}.{n}" for n in range(3)]
    admin = AdminClient({"bootstrap.servers": bootstrap})
    for future in admin.create_topics([NewTopic(name, 1, 1) for name in names]).values():
        future.result(30)

    assert delete_topics(bootstrap, names) == 3

    deadline = time.monotonic() + 30
    left = set(names)
    while left and time.monotonic() < deadline:
        left &= set(admin.list_topics(timeout=10).topics)
        time.sleep(0.2)
    assert not left


def test_nothing_to_delete_asks_nothing() -> None:
    assert delete_topics("127.0.0.1:1", []) == 0
