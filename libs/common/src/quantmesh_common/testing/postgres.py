"""Isolated PostgreSQL for integration tests: a fresh schema per test on the real server."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import psycopg

from quantmesh_common.storage.migrate import apply_migrations

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
