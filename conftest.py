"""Test session set-up for the whole repository: which real Kafka, PostgreSQL and Redis to use.

Integration and e2e tests run on real parts, found in this order:
1. the addresses in QM_KAFKA_BOOTSTRAP / QM_DATABASE_URL / QM_REDIS_URL (the local stack that
   `make test` starts, or any stack you point them at);
2. otherwise, where a Docker engine answers, testcontainers started here for the session;
3. otherwise none: integration tests are skipped, saying why.
"""

from __future__ import annotations

import decimal
import logging
import os
from collections.abc import Iterator
from typing import Any

import pytest

log = logging.getLogger("quantmesh.tests")

_STACK_VARS = ("QM_KAFKA_BOOTSTRAP", "QM_DATABASE_URL", "QM_REDIS_URL")
_containers: list[Any] = []
_stack_origin = "none"


def _docker_engine_answers() -> bool:
    try:
        import docker  # type: ignore[import-untyped]

        client = docker.from_env(timeout=3)
        return bool(client.ping())
    except Exception:
        return False


def _start_testcontainers() -> None:
    from testcontainers.community.kafka import KafkaContainer
    from testcontainers.community.postgres import PostgresContainer
    from testcontainers.community.redis import RedisContainer

    kafka = KafkaContainer("confluentinc/cp-kafka:7.7.1").with_kraft()
    postgres = PostgresContainer(
        "timescale/timescaledb:2.17.2-pg16",
        username="quantmesh",
        password="quantmesh",
        dbname="quantmesh",
    )
    redis = RedisContainer("redis:7.4-alpine")
    for container in (kafka, postgres, redis):
        container.start()
        _containers.append(container)
    os.environ["QM_KAFKA_BOOTSTRAP"] = kafka.get_bootstrap_server()
    host, port = postgres.get_container_host_ip(), postgres.get_exposed_port(5432)
    os.environ["QM_DATABASE_URL"] = f"postgresql://quantmesh:quantmesh@{host}:{port}/quantmesh"
    rhost, rport = redis.get_container_host_ip(), redis.get_exposed_port(6379)
    os.environ["QM_REDIS_URL"] = f"redis://{rhost}:{rport}/0"
    from quantmesh_common.bus.kafka import ensure_topics
    from quantmesh_common.storage.migrate import apply_migrations
    from quantmesh_common.topics import registry

    ensure_topics(os.environ["QM_KAFKA_BOOTSTRAP"], registry())
    apply_migrations(os.environ["QM_DATABASE_URL"])


def pytest_configure(config: pytest.Config) -> None:
    """Choose the real infrastructure for this session."""
    global _stack_origin
    if all(os.environ.get(name) for name in _STACK_VARS):
        _stack_origin = f"local stack (kafka {os.environ['QM_KAFKA_BOOTSTRAP']})"
    elif os.environ.get("QM_NO_TESTCONTAINERS") != "1" and _docker_engine_answers():
        _start_testcontainers()
        _stack_origin = "testcontainers (a Docker engine answered)"
    else:
        _stack_origin = "none: integration tests skip (no QM_* addresses, no Docker engine)"
    log.warning("infrastructure for this test session: %s", _stack_origin)


def pytest_report_header(config: pytest.Config) -> str:
    """Say in the test log which infrastructure the integration tests use."""
    return f"quantmesh infrastructure: {_stack_origin}"


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Stop the containers this session started."""
    while _containers:
        _containers.pop().stop()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip integration and e2e tests, with the reason, when no infrastructure is available."""
    missing = [name for name in _STACK_VARS if not os.environ.get(name)]
    if not missing:
        return
    reason = f"needs the local stack: {', '.join(missing)} unset (run `make up` or `make test`)"
    for item in items:
        if item.get_closest_marker("integration") or item.get_closest_marker("e2e"):
            item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(autouse=True)
def _decimal_context_of_its_own() -> Iterator[None]:
    """Each test starts from Python's default decimal context and leaves it as it found it.

    ccxt's `decimal_to_precision` sets the calling thread's context to ROUND_HALF_UP (and traps
    Underflow) for good, so a test that reached it changed how every later test's Decimals
    round: a portfolio replay's golden digest differed in a full run and not alone.
    """
    with decimal.localcontext(decimal.Context()):
        yield
