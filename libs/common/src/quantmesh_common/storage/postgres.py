"""The asyncpg connection pool services use, created only once PostgreSQL answers."""

from __future__ import annotations

import json
from typing import Any

import asyncpg

from quantmesh_common.health import wait_for_dependency
from quantmesh_common.settings import redact_url


async def _init_connection(conn: Any) -> None:
    # JSON columns come back as Python objects instead of strings.
    for type_name in ("json", "jsonb"):
        await conn.set_type_codec(
            type_name, encoder=json.dumps, decoder=json.loads, schema="pg_catalog"
        )


async def _keep_session(conn: Any) -> None:
    """Give a released connection back as it is (asyncpg still rolls back an open transaction).

    asyncpg's default reset runs `SELECT pg_advisory_unlock_all(); CLOSE ALL; UNLISTEN *;
    RESET ALL` at every release: a round trip per `pool.fetchval` or `acquire()`, as many as
    the work itself for a one-statement batch write. Nothing here leaves session state behind
    on a pooled connection (no LISTEN, no session advisory lock, no session-level SET, cursors
    only inside transactions); code that does must use its own connection.
    """


async def create_pool(
    dsn: str,
    min_size: int = 1,
    max_size: int = 10,
    *,
    timeout_s: float = 30.0,
    command_timeout_s: float | None = 30.0,
) -> Any:
    """Create an asyncpg pool once PostgreSQL accepts connections and answers `SELECT 1`.

    Retries with backoff for at most `timeout_s`, then raises DependencyUnavailableError naming
    the server (password redacted). NUMERIC columns map to Decimal (asyncpg's default) and
    json/jsonb to Python objects. Returns an `asyncpg.Pool`.
    """

    async def connect() -> Any:
        pool = await asyncpg.create_pool(
            dsn,
            min_size=min_size,
            max_size=max_size,
            command_timeout=command_timeout_s,
            init=_init_connection,
            reset=_keep_session,
        )
        try:
            await ping(pool)
        except BaseException:
            await pool.close()
            raise
        return pool

    return await wait_for_dependency(
        "postgres", redact_url(dsn), connect, timeout_s=timeout_s, attempt_timeout_s=10.0
    )


async def ping(pool: Any) -> None:
    """Raise unless the pool can run `SELECT 1` (a readiness check)."""
    value = await pool.fetchval("SELECT 1")
    if value != 1:
        raise RuntimeError(f"SELECT 1 returned {value!r}")
