"""Fixtures for the storage tests: a fresh PostgreSQL schema per test, Redis, migration copies."""

from __future__ import annotations

import os
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from quantmesh_common.storage.migrate import default_directory
from quantmesh_common.testing.postgres import fresh_schema, server_dsn_for_tests


def free_port() -> int:
    """A TCP port nobody listens on right now, for 'server unreachable' tests."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="session")
def server_dsn() -> str:
    """A DSN for tests: the quantmesh_test database of QM_DATABASE_URL's server if it exists.

    Skips when QM_DATABASE_URL is unset. Tests never touch the database services use.
    """
    dsn = server_dsn_for_tests()
    if dsn is None:
        pytest.skip("QM_DATABASE_URL is not set (start the stack: deploy/local/stack.sh up)")
    return dsn


@pytest.fixture
def schema_dsn(server_dsn: str) -> Iterator[str]:
    """A DSN whose search_path is a brand-new schema, dropped after the test."""
    with fresh_schema(server_dsn) as dsn:
        yield dsn


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
