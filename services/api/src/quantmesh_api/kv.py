"""The api's Redis state: token deny-list, rate-limit buckets, idempotency keys, latest prices.

`RedisKv` is the real one; `MemoryKv` keeps the same contract in a dict for unit tests and a
development run without QM_REDIS_URL (then limits and idempotency hold per process only).
"""

from __future__ import annotations

import json
import time
from typing import Any, Protocol

from quantmesh_common.storage.redis import RedisClient


class Kv(Protocol):
    """Short-lived shared state of every api instance."""

    async def deny(self, jti: str, ttl_s: int) -> None:
        """Revoke an access token id for `ttl_s` seconds and bump the deny-list version."""
        ...

    async def deny_version(self) -> int:
        """A number that changes whenever a token id is denied (0 before any)."""
        ...

    async def denied(self) -> dict[str, float]:
        """Every live revoked token id with its expiry (epoch seconds)."""
        ...

    async def count(self, increments: dict[str, int], ttl_s: int) -> dict[str, int]:
        """Add to rate-limit counters (kept `ttl_s`); return every counter's new total."""
        ...

    async def claim(self, key: str, record: dict[str, Any], ttl_s: int) -> dict[str, Any] | None:
        """Store `record` under `key` unless one is there; return the existing one, else None."""
        ...

    async def put(self, key: str, record: dict[str, Any], ttl_s: int) -> None: ...
    async def forget(self, key: str) -> None: ...
    async def get(self, key: str) -> dict[str, Any] | None: ...
    async def set_add(self, key: str, member: str) -> None: ...
    async def set_remove(self, key: str, member: str) -> None: ...
    async def set_members(self, key: str) -> set[str]: ...
    async def latest_prices(self, instrument_ids: list[str] | None) -> list[dict[str, str]]:
        """The marketdata recorder's latest price hashes (all instruments when None)."""
        ...


class RedisKv:
    """Kv on Redis; keys under `prefix`, prices read under the marketdata `md_prefix`."""

    def __init__(self, client: RedisClient, prefix: str, md_prefix: str) -> None:
        self.client = client
        self.prefix = prefix
        self.md_prefix = md_prefix

    async def deny(self, jti: str, ttl_s: int) -> None:
        now = time.time()
        key = f"{self.prefix}denied"
        pipe = self.client.pipeline(transaction=True)
        pipe.zadd(key, {jti: now + max(1, ttl_s)})
        # Expired ids go on each write, so the set holds one access-token lifetime of logouts.
        pipe.zremrangebyscore(key, "-inf", now)
        pipe.incr(f"{self.prefix}denied:version")
        await pipe.execute()

    async def deny_version(self) -> int:
        raw = await self.client.get(f"{self.prefix}denied:version")
        return int(raw) if raw else 0

    async def denied(self) -> dict[str, float]:
        rows = await self.client.zrangebyscore(
            f"{self.prefix}denied", time.time(), "+inf", withscores=True
        )
        return {str(jti): float(score) for jti, score in rows}

    async def count(self, increments: dict[str, int], ttl_s: int) -> dict[str, int]:
        if not increments:
            return {}
        pipe = self.client.pipeline(transaction=False)
        for bucket, n in increments.items():
            key = f"{self.prefix}rl:{bucket}"
            pipe.incrby(key, n)
            pipe.expire(key, ttl_s)
        results = await pipe.execute()
        return {b: int(results[2 * i]) for i, b in enumerate(increments)}

    async def claim(self, key: str, record: dict[str, Any], ttl_s: int) -> dict[str, Any] | None:
        full = f"{self.prefix}{key}"
        if await self.client.set(full, json.dumps(record), nx=True, ex=ttl_s):
            return None
        existing = await self.client.get(full)
        return json.loads(existing) if existing else None

    async def put(self, key: str, record: dict[str, Any], ttl_s: int) -> None:
        await self.client.set(f"{self.prefix}{key}", json.dumps(record), ex=ttl_s)

    async def forget(self, key: str) -> None:
        await self.client.delete(f"{self.prefix}{key}")

    async def get(self, key: str) -> dict[str, Any] | None:
        raw = await self.client.get(f"{self.prefix}{key}")
        return json.loads(raw) if raw else None

    async def set_add(self, key: str, member: str) -> None:
        await self.client.sadd(f"{self.prefix}{key}", member)

    async def set_remove(self, key: str, member: str) -> None:
        await self.client.srem(f"{self.prefix}{key}", member)

    async def set_members(self, key: str) -> set[str]:
        return set(await self.client.smembers(f"{self.prefix}{key}"))

    async def latest_prices(self, instrument_ids: list[str] | None) -> list[dict[str, str]]:
        ids = instrument_ids
        if ids is None:
            ids = sorted(await self.client.smembers(f"{self.md_prefix}instruments"))
        if not ids:
            return []
        pipe = self.client.pipeline(transaction=False)
        for instrument_id in ids:
            pipe.hgetall(f"{self.md_prefix}latest:{instrument_id}")
        rows = await pipe.execute()
        return [
            {"instrument_id": instrument_id, **row}
            for instrument_id, row in zip(ids, rows, strict=True)
            if row
        ]


class MemoryKv:
    """Kv in a dict, with expiry on read; `prices` is filled by tests."""

    def __init__(self) -> None:
        self.values: dict[str, tuple[float, Any]] = {}
        self.sets: dict[str, set[str]] = {}
        self.prices: dict[str, dict[str, str]] = {}
        self.deny_list: dict[str, float] = {}
        self.version = 0

    def _get(self, key: str) -> Any:
        item = self.values.get(key)
        if item is None:
            return None
        expires, value = item
        if expires < time.monotonic():
            del self.values[key]
            return None
        return value

    async def deny(self, jti: str, ttl_s: int) -> None:
        self.deny_list[jti] = time.time() + max(1, ttl_s)
        self.version += 1

    async def deny_version(self) -> int:
        return self.version

    async def denied(self) -> dict[str, float]:
        now = time.time()
        return {jti: e for jti, e in self.deny_list.items() if e > now}

    async def count(self, increments: dict[str, int], ttl_s: int) -> dict[str, int]:
        totals: dict[str, int] = {}
        for bucket, n in increments.items():
            key = f"rl:{bucket}"
            totals[bucket] = int(self._get(key) or 0) + n
            self.values[key] = (time.monotonic() + ttl_s, totals[bucket])
        return totals

    async def claim(self, key: str, record: dict[str, Any], ttl_s: int) -> dict[str, Any] | None:
        existing = self._get(key)
        if existing is not None:
            return dict(existing)
        self.values[key] = (time.monotonic() + ttl_s, dict(record))
        return None

    async def put(self, key: str, record: dict[str, Any], ttl_s: int) -> None:
        self.values[key] = (time.monotonic() + ttl_s, dict(record))

    async def forget(self, key: str) -> None:
        self.values.pop(key, None)

    async def get(self, key: str) -> dict[str, Any] | None:
        value = self._get(key)
        return dict(value) if value is not None else None

    async def set_add(self, key: str, member: str) -> None:
        self.sets.setdefault(key, set()).add(member)

    async def set_remove(self, key: str, member: str) -> None:
        self.sets.get(key, set()).discard(member)

    async def set_members(self, key: str) -> set[str]:
        return set(self.sets.get(key, set()))

    async def latest_prices(self, instrument_ids: list[str] | None) -> list[dict[str, str]]:
        ids = sorted(self.prices) if instrument_ids is None else instrument_ids
        return [{"instrument_id": i, **self.prices[i]} for i in ids if i in self.prices]
