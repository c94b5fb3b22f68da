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

    async def deny(self, jti: str, ttl_s: int) -> None: ...
    async def is_denied(self, jti: str) -> bool: ...
    async def hit(self, bucket: str, limit: int, window_s: int) -> int:
        """Count a request; return 0 if allowed, else the seconds until the window resets."""
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
        await self.client.set(f"{self.prefix}deny:{jti}", "1", ex=max(1, ttl_s))

    async def is_denied(self, jti: str) -> bool:
        return bool(await self.client.exists(f"{self.prefix}deny:{jti}"))

    async def hit(self, bucket: str, limit: int, window_s: int) -> int:
        window = int(time.time()) // window_s
        key = f"{self.prefix}rl:{bucket}:{window}"
        pipe = self.client.pipeline(transaction=False)
        pipe.incr(key)
        pipe.expire(key, window_s + 1)
        count, _ = await pipe.execute()
        if int(count) <= limit:
            return 0
        return max(1, (window + 1) * window_s - int(time.time()))

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
        self.values[f"deny:{jti}"] = (time.monotonic() + ttl_s, True)

    async def is_denied(self, jti: str) -> bool:
        return bool(self._get(f"deny:{jti}"))

    async def hit(self, bucket: str, limit: int, window_s: int) -> int:
        window = int(time.time()) // window_s
        key = f"rl:{bucket}:{window}"
        count = int(self._get(key) or 0) + 1
        self.values[key] = (time.monotonic() + window_s + 1, count)
        if count <= limit:
            return 0
        return max(1, (window + 1) * window_s - int(time.time()))

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
