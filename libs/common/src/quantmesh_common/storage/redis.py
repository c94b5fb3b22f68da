"""The asyncio Redis client services use, created only once Redis answers PING."""

from __future__ import annotations

from typing import Any, TypeAlias

from redis.asyncio import Redis

from quantmesh_common.health import wait_for_dependency
from quantmesh_common.settings import redact_url

#: A `redis.asyncio.Redis` client. Typed loosely because the obsolete `types-redis` stubs in the
#: dev environment shadow the types redis itself ships, and the two disagree (generic or not,
#: `aclose`); make this `Redis` once those stubs are gone.
RedisClient: TypeAlias = Any


async def create_redis(
    url: str,
    *,
    timeout_s: float = 30.0,
    socket_timeout_s: float = 5.0,
) -> RedisClient:
    """Create a redis.asyncio client (str responses) once the server answers PING.

    Retries with backoff for at most `timeout_s`, then raises DependencyUnavailableError naming
    the server (password redacted).
    """

    async def connect() -> RedisClient:
        client: RedisClient = Redis.from_url(
            url,
            decode_responses=True,
            socket_timeout=socket_timeout_s,
            socket_connect_timeout=socket_timeout_s,
            health_check_interval=30,
        )
        try:
            await ping(client)
        except BaseException:
            await client.aclose()
            raise
        return client

    return await wait_for_dependency("redis", redact_url(url), connect, timeout_s=timeout_s)


async def ping(client: RedisClient) -> None:
    """Raise unless Redis answers PING (a readiness check)."""
    if not await client.ping():
        raise RuntimeError("PING was not answered")
