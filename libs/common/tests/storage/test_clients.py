"""The asyncpg pool and the Redis client against the real servers, and their bounded waits."""

from __future__ import annotations

import time
from decimal import Decimal

import pytest

from quantmesh_common.health import DependencyUnavailableError
from quantmesh_common.storage.postgres import create_pool, ping
from quantmesh_common.storage.redis import create_redis
from quantmesh_common.storage.redis import ping as redis_ping

from .conftest import free_port


@pytest.mark.integration
async def test_create_pool_when_server_up_answers_queries_with_exact_types(
    server_dsn: str,
) -> None:
    pool = await create_pool(server_dsn, 1, 2, timeout_s=10)
    try:
        await ping(pool)
        number = await pool.fetchval("SELECT 0.1::numeric + 0.2::numeric")
        document = await pool.fetchval("""SELECT '{"a": [1, "2.50"]}'::jsonb""")
    finally:
        await pool.close()

    assert number == Decimal("0.3")
    assert document == {"a": [1, "2.50"]}


async def test_create_pool_when_server_unreachable_raises_naming_it_within_bound() -> None:
    port = free_port()
    dsn = f"postgresql://qm:hunter2@127.0.0.1:{port}/qm"

    started = time.monotonic()
    with pytest.raises(DependencyUnavailableError) as caught:
        await create_pool(dsn, timeout_s=1.0)

    assert str(caught.value).startswith(
        f"postgres unreachable at postgresql://qm:***@127.0.0.1:{port}"
    )
    assert "hunter2" not in str(caught.value)
    assert time.monotonic() - started < 5.0


@pytest.mark.integration
async def test_create_redis_when_server_up_round_trips_strings(redis_url: str) -> None:
    client = await create_redis(redis_url, timeout_s=10)
    try:
        await redis_ping(client)
        await client.set("qm:test:clients", "50000.10", ex=30)
        value = await client.get("qm:test:clients")
    finally:
        await client.aclose()

    assert value == "50000.10"


async def test_create_redis_when_server_unreachable_raises_naming_it_within_bound() -> None:
    port = free_port()

    started = time.monotonic()
    with pytest.raises(
        DependencyUnavailableError, match=f"redis unreachable at redis://127.0.0.1:{port}"
    ):
        await create_redis(f"redis://127.0.0.1:{port}/0", timeout_s=1.0)

    assert time.monotonic() - started < 5.0
