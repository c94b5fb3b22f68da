"""Isolated PostgreSQL for integration tests: a fresh schema per test on the real server."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import psycopg

from quantmesh_common.storage.migrate import apply_migrations
from quantmesh_common.storage.postgres import create_pool

#: The database tests use on the stack's server, so they never touch the one services use.
TEST_DATABASE = "quantmesh_test"


def with_database(dsn: str, database: str) -> str:
    """`dsn` pointing at another database of the same server."""
    return urlunsplit(urlsplit(dsn)._replace(path=f"/{database}"))


def with_search_path(dsn: str, *schemas: str) -> str:
    """`dsn` whose sessions use `schemas` as their search_path (libpq `options`)."""
    parts = urlsplit(dsn)
    query = [(k, v) for k, v in parse_qsl(parts.query) if k != "options"]
    query.append(("options", f"-csearch_path={','.join(schemas)}"))
    return urlunsplit(parts._replace(query=urlencode(query)))


def server_dsn_for_tests() -> str | None:
    """The quantmesh_test database of QM_DATABASE_URL's server, else that URL; None if unset.

    QM_TEST_DATABASE_URL overrides. Without a quantmesh_test database the fresh schema per
    test still isolates every test.
    """
    base = os.environ.get("QM_TEST_DATABASE_URL") or os.environ.get("QM_DATABASE_URL")
    if not base:
        return None
    candidate = with_database(base, TEST_DATABASE)
    try:
        with psycopg.connect(candidate, connect_timeout=5):
            return candidate
    except psycopg.OperationalError:
        return base


@contextmanager
def fresh_schema(
    server_dsn: str, prefix: str = "qm_test", *, migrate: bool = False
) -> Iterator[str]:
    """Yield a DSN whose search_path is a new schema (migrated if asked); drop it afterwards."""
    schema = f"{prefix}_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(server_dsn, autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"'.encode())
    dsn = with_search_path(server_dsn, schema, "public")
    try:
        if migrate:
            apply_migrations(dsn)
        yield dsn
    finally:
        with psycopg.connect(server_dsn, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'.encode())


def server_dsn_or_skip() -> str:
    """`server_dsn_for_tests()`; the calling test is skipped when no server is configured."""
    import pytest  # only tests call this: the benches use this module without pytest

    dsn = server_dsn_for_tests()
    if dsn is None:
        pytest.skip("QM_DATABASE_URL is not set (start the stack: deploy/local/stack.sh up)")
    return dsn


@asynccontextmanager
async def pool_on(dsn: str, max_size: int = 4) -> AsyncIterator[Any]:
    """An asyncpg pool of 1 to `max_size` connections on `dsn`, closed afterwards."""
    pool = await create_pool(dsn, 1, max_size, timeout_s=10)
    try:
        yield pool
    finally:
        await pool.close()


def migrated_schema_fixtures(
    prefix: str, *, dsn: str, pool: str, max_size: int = 4
) -> tuple[Any, Any]:
    """Two pytest fixtures for a conftest to bind: `dsn`, a DSN whose search_path is a fresh
    schema (named after `prefix`) of the test server with every migration applied, dropped
    after the test (skipped without a server); and `pool`, an asyncpg pool on that schema.

    e.g. `oms_dsn, oms_pool = migrated_schema_fixtures("qm_test_oms", dsn="oms_dsn",
    pool="oms_pool")`.
    """
    import pytest

    @pytest.fixture(name=dsn)
    def schema_dsn() -> Iterator[str]:
        with fresh_schema(server_dsn_or_skip(), prefix, migrate=True) as migrated:
            yield migrated

    @pytest.fixture(name=pool)
    async def schema_pool(request: pytest.FixtureRequest) -> AsyncIterator[Any]:
        async with pool_on(request.getfixturevalue(dsn), max_size) as created:
            yield created

    return schema_dsn, schema_pool
