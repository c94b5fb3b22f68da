"""Fixtures of the oms integration tests: a fresh migrated schema of quantmesh_test per test."""

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

TEST_DATABASE = "quantmesh_test"


def _with_database(dsn: str, database: str) -> str:
    return urlunsplit(urlsplit(dsn)._replace(path=f"/{database}"))


def _with_search_path(dsn: str, *schemas: str) -> str:
    parts = urlsplit(dsn)
    query = [(k, v) for k, v in parse_qsl(parts.query) if k != "options"]
    query.append(("options", f"-csearch_path={','.join(schemas)}"))
    return urlunsplit(parts._replace(query=urlencode(query)))


@pytest.fixture(scope="session")
def oms_server_dsn() -> str:
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
def oms_dsn(oms_server_dsn: str) -> Iterator[str]:
    """A DSN whose search_path is a new schema with every migration applied; dropped after."""
    schema = f"qm_test_oms_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(oms_server_dsn, autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"'.encode())
    dsn = _with_search_path(oms_server_dsn, schema, "public")
    try:
        apply_migrations(dsn)
        yield dsn
    finally:
        with psycopg.connect(oms_server_dsn, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'.encode())


@pytest.fixture
async def oms_pool(oms_dsn: str) -> AsyncIterator[Any]:
    """An asyncpg pool on the test schema."""
    pool = await create_pool(oms_dsn, 1, 4, timeout_s=10)
    try:
        yield pool
    finally:
        await pool.close()
