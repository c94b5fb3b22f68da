"""Fixtures of the risk integration tests: a fresh migrated schema of quantmesh_test."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from quantmesh_common.storage.postgres import create_pool
from quantmesh_common.testing.postgres import fresh_schema, server_dsn_for_tests


@pytest.fixture
def risk_dsn() -> Iterator[str]:
    """A DSN whose search_path is a new schema with every migration applied; dropped after."""
    server = server_dsn_for_tests()
    if server is None:
        pytest.skip("QM_DATABASE_URL is not set (start the stack: deploy/local/stack.sh up)")
    with fresh_schema(server, "qm_test_risk", migrate=True) as dsn:
        yield dsn


@pytest.fixture
async def risk_pool(risk_dsn: str) -> AsyncIterator[Any]:
    """An asyncpg pool on the test schema."""
    pool = await create_pool(risk_dsn, 1, 4, timeout_s=10)
    try:
        yield pool
    finally:
        await pool.close()
