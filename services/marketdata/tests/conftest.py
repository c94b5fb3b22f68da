"""Fixtures of the marketdata integration tests: a fresh migrated schema, a Redis key prefix."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import psycopg
import pytest

from quantmesh_common.storage.migrate import apply_migrations
from quantmesh_common.storage.postgres import create_pool
from quantmesh_common.storage.redis import RedisClient, create_redis

TEST_DATABASE = "quantmesh_test"


def _with_database(dsn: str, database: str) -> str:
    return urlunsplit(urlsplit(dsn)._replace(path=f"/{database}"))


def _with_search_path(dsn: str, *schemas: str) -> str:
    parts = urlsplit(dsn)
    query = [(k, v) for k, v in parse_qsl(parts.query) if k != "options"]
    query.append(("options", f"-csearch_path={','.join(schemas)}"))
    return urlunsplit(parts._replace(query=urlencode(query)))


@pytest.fixture(scope="session")
def md_server_dsn() -> str:
    """The quantmesh_test database of QM_DATABASE_URL's server (else that database); or skip."""
    base = os.environ.get("QM_TEST_DATABASE_URL") or os.environ.get("QM_DATABASE_URL")
    if not base:
        pytest.skip("QM_DATABASE_URL is not set (start the stack: deploy/local/stack.sh up)")
    candidate = _with_database(base, TEST_DATABASE)
    try:
        with psycopg.connect(candidate, connect_timeout=5):
            return candidate
    except psycopg.OperationalError:
        return base  # a fresh schema per test still isolates it


@pytest.fixture
def md_dsn(md_server_dsn: str) -> Iterator[str]:
    """A DSN whose search_path is a new schema with every migration applied; dropped after."""
    schema = f"qm_test_md_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(md_server_dsn, autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"'.encode())
    dsn = _with_search_path(md_server_dsn, schema, "public")
    try:
        apply_migrations(dsn)
        yield dsn
    finally:
        with psycopg.connect(md_server_dsn, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'.encode())


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
