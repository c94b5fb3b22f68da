"""The mesh end to end on the real stack: every stage starts, is ready, and stops cleanly."""

from __future__ import annotations

import pytest
from confluent_kafka.admin import AdminClient

from quantmesh_common.launcher import SERVICES
from quantmesh_common.topics import registry
from tests.e2e.conftest import Mesh, kafka_bootstrap

pytestmark = pytest.mark.e2e


def test_every_registered_topic_and_its_dead_letter_twin_exist_on_the_broker() -> None:
    admin = AdminClient({"bootstrap.servers": kafka_bootstrap()})

    metadata = admin.list_topics(timeout=10)

    for spec in registry():
        for name in (spec.name, spec.name + ".dlq"):
            assert name in metadata.topics, f"{name} missing: run quantmesh-topics create"
            assert len(metadata.topics[name].partitions) == spec.partitions, name


async def test_every_stage_starts_on_the_stack_is_ready_and_stops_on_sigterm(
    mesh: Mesh, database_url: str
) -> None:
    # Arrange: every service as its own process, on the real Kafka, PostgreSQL and Redis.
    for name in SERVICES:
        await mesh.start(name, {"QM_DATABASE_URL": database_url})

    # Act: wait until every stage says it is ready, read its metrics, then SIGTERM them all.
    await mesh.wait_ready()
    metrics = {name: (await mesh.get(name, "/metrics"))[1] for name in SERVICES}
    codes = await mesh.stop()

    # Assert: each stage identified itself in its metrics, logged JSON, and exited 0.
    for name, stage in mesh.stages.items():
        assert f'quantmesh_service_info{{service="{name}"' in metrics[name], name
        assert codes[name] == 0, f"{name} exited {codes[name]}: {stage.tail(2000)}"
        assert any(line.get("service") == name for line in stage.log_records()), name
