"""Fixtures of the marketdata integration tests: a fresh migrated schema, a Redis key prefix."""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from quantmesh_common.storage.postgres import create_pool
from quantmesh_common.storage.redis import RedisClient, create_redis
from quantmesh_common.testing.postgres import fresh_schema, server_dsn_for_tests


@pytest.fixture(scope="session")
def md_server_dsn() -> str:
    """The quantmesh_test database of QM_DATABASE_URL's server (else that database); or skip."""
    dsn = server_dsn_for_tests()
    if dsn is None:
        pytest.skip("QM_DATABASE_URL is not set (start the stack: deploy/local/stack.sh up)")
    return dsn


@pytest.fixture
def md_dsn(md_server_dsn: str) -> Iterator[str]:
    """A DSN whose search_path is a new schema with every migration applied; dropped after."""
    with fresh_schema(md_server_dsn, "qm_test_md", migrate=True) as dsn:
        yield dsn


@pytest.fixture
async def md_pool(md_dsn: str) -> AsyncIterator[Any]:
    """An asyncpg pool on the test schema."""
    pool = await create_pool(md_dsn, 1, 4, timeout_s=10)
    try:
        yield pool
    finally:
        await pool.close()


@pytest.fixture
def redis_url() -> str:
    """QM_REDIS_URL, or skip."""
    url = os.environ.get("QM_REDIS_URL")
    if not url:
        pytest.skip("QM_REDIS_URL is not set (start the stack: deploy/local/stack.sh up)")
    return url


@pytest.fixture
def redis_prefix() -> str:
    """A key prefix no other test uses."""
    return f"qm-test:{uuid.uuid4().hex[:12]}:md:"


@pytest.fixture
async def md_redis(redis_url: str, redis_prefix: str) -> AsyncIterator[RedisClient]:
    """A Redis client; every key under `redis_prefix` is deleted after the test."""
    client = await create_redis(redis_url, timeout_s=10)
    try:
        yield client
    finally:
        keys = [key async for key in client.scan_iter(match=f"{redis_prefix}*")]
        if keys:
            await client.delete(*keys)
        await client.aclose()


FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="session")
def ccxt_cases() -> dict[str, Any]:
    """ccxt's recorded public REST responses with its parsed results (tests/fixtures/README.md)."""
    cases: dict[str, Any] = json.loads((FIXTURES / "ccxt_public_responses.json").read_text())
    return cases


@pytest.fixture(scope="session")
def binance_exchange_info() -> dict[str, Any]:
    """Binance spot GET /api/v3/exchangeInfo of 2021-10-12, cut to BTCUSDT, ETHBTC, NKNUSDT."""
    info: dict[str, Any] = json.loads(
        (FIXTURES / "binance_exchangeinfo_2021-10-12_subset.json").read_text()
    )
    return info
