"""Fixtures for the storage tests: a fresh PostgreSQL schema per test, Redis, migration copies."""

from __future__ import annotations

import os
import shutil
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import psycopg
import pytest

from quantmesh_common.storage.migrate import default_directory

TEST_DATABASE = "quantmesh_test"


def free_port() -> int:
    """A TCP port nobody listens on right now, for 'server unreachable' tests."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def with_database(dsn: str, database: str) -> str:
    """`dsn` pointing at another database of the same server."""
    parts = urlsplit(dsn)
    return urlunsplit(parts._replace(path=f"/{database}"))


def with_search_path(dsn: str, *schemas: str) -> str:
    """`dsn` whose sessions use `schemas` as their search_path (libpq `options`)."""
    parts = urlsplit(dsn)
    query = [(k, v) for k, v in parse_qsl(parts.query) if k != "options"]
    query.append(("options", f"-csearch_path={','.join(schemas)}"))
    return urlunsplit(parts._replace(query=urlencode(query)))


@pytest.fixture(scope="session")
def server_dsn() -> str:
    """A DSN for tests: the quantmesh_test database of QM_DATABASE_URL's server if it exists.

    Skips when QM_DATABASE_URL is unset. Tests never touch the database services use.
    """
    base = os.environ.get("QM_TEST_DATABASE_URL") or os.environ.get("QM_DATABASE_URL")
    if not base:
        pytest.skip("QM_DATABASE_URL is not set (start the stack: deploy/local/stack.sh up)")
    candidate = with_database(base, TEST_DATABASE)
    try:
        with psycopg.connect(candidate, connect_timeout=5):
            return candidate
    except psycopg.OperationalError:
        return base  # no quantmesh_test database: fresh schemas still isolate every test


@pytest.fixture
def schema_dsn(server_dsn: str) -> Iterator[str]:
    """A DSN whose search_path is a brand-new schema, dropped after the test."""
    schema = f"qm_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(server_dsn, autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"'.encode())
    try:
        yield with_search_path(server_dsn, schema, "public")
    finally:
        with psycopg.connect(server_dsn, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'.encode())


@pytest.fixture
def migrations_copy(tmp_path: Path) -> Path:
    """A private copy of the real migrations directory, safe to edit."""
    target = tmp_path / "migrations"
    shutil.copytree(default_directory(), target)
    return target


@pytest.fixture
def redis_url() -> str:
    """QM_REDIS_URL, or skip."""
    url = os.environ.get("QM_REDIS_URL")
    if not url:
        pytest.skip("QM_REDIS_URL is not set (start the stack: deploy/local/stack.sh up)")
    return url
