"""Fixtures of the oms integration tests: a fresh migrated schema of quantmesh_test per test."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from quantmesh_common.storage.postgres import create_pool
from quantmesh_common.testing.postgres import fresh_schema, server_dsn_for_tests


@pytest.fixture(scope="session")
def oms_server_dsn() -> str:
    """The quantmesh_test database of QM_DATABASE_URL's server (else that database); or skip."""
    dsn = server_dsn_for_tests()
    if dsn is None:
        pytest.skip("QM_DATABASE_URL is not set (start the stack: deploy/local/stack.sh up)")
    return dsn


@pytest.fixture
def oms_dsn(oms_server_dsn: str) -> Iterator[str]:
    """A DSN whose search_path is a new schema with every migration applied; dropped after."""
    with fresh_schema(oms_server_dsn, "qm_test_oms", migrate=True) as dsn:
        yield dsn


@pytest.fixture
async def oms_pool(oms_dsn: str) -> AsyncIterator[Any]:
    """An asyncpg pool on the test schema."""
    pool = await create_pool(oms_dsn, 1, 4, timeout_s=10)
    try:
        yield pool
    finally:
        await pool.close()
