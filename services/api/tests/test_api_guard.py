"""The in-process request checks: token cache, deny-list and rate limits across instances."""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest

from quantmesh_api.guard import DenyList, DenyListUnavailableError, RateLimiter, TokenCache
from quantmesh_api.kv import MemoryKv, RedisKv
from quantmesh_api.security import Role, TokenError, issue_access_token
from quantmesh_common.storage.redis import create_redis

KEY = "k" * 40
T0 = 1_704_067_200.0


class FakeTime:
    """A monotonic and a wall clock the test moves by hand."""

    def __init__(self) -> None:
        self.mono = 100.0
        self.wall = T0 + 30  # mid-window, so a window boundary is never crossed by accident

    def monotonic(self) -> float:
        return self.mono

    def wall_s(self) -> float:
        return self.wall


def _token(ttl_s: int = 60) -> str:
    token, _ = issue_access_token(
        KEY, user_id="u1", username="ann", roles=frozenset({Role.ADMIN}), now_s=1000, ttl_s=ttl_s
    )
    return token


def test_token_cache_when_token_valid_returns_claims_and_remembers_it() -> None:
    cache = TokenCache(KEY)
    token = _token()

    first = cache.decode(token, 1010)
    second = cache.decode(token, 1020)

    assert (first.user_id, first.expires_s) == ("u1", 1060)
    assert second is first
    assert len(cache) == 1


def test_token_cache_when_cached_token_expires_raises_token_error() -> None:
    cache = TokenCache(KEY)
    token = _token(ttl_s=60)
    cache.decode(token, 1010)

    with pytest.raises(TokenError, match="expired"):
        cache.decode(token, 1060)
    assert len(cache) == 0


def test_token_cache_when_cached_token_is_tampered_raises_token_error() -> None:
    cache = TokenCache(KEY)
    token = _token()
    cache.decode(token, 1010)
    head, payload, signature = token.split(".")
    tampered = f"{head}.{payload}.{signature[:-2]}{'AA' if signature[-2:] != 'AA' else 'BB'}"

    with pytest.raises(TokenError, match="invalid token"):
        cache.decode(tampered, 1010)


def test_token_cache_when_full_forgets_the_least_recently_used() -> None:
    cache = TokenCache(KEY, size=2)
    tokens = [_token() for _ in range(3)]
    for token in tokens:
        cache.decode(token, 1010)

    assert len(cache) == 2
    assert tokens[0] not in cache._claims
    assert tokens[2] in cache._claims


async def test_deny_list_when_denied_here_refuses_at_once() -> None:
    kv, t = MemoryKv(), FakeTime()
    deny = DenyList(kv, 0.25, monotonic=t.monotonic, wall_s=t.wall_s)
    assert not await deny.is_denied("j1")

    await deny.deny("j1", 60)

    assert await deny.is_denied("j1")


async def test_deny_list_when_denied_on_another_instance_refuses_after_one_interval() -> None:
    kv, t = MemoryKv(), FakeTime()
    a = DenyList(kv, 0.25, monotonic=t.monotonic, wall_s=t.wall_s)
    b = DenyList(kv, 0.25, monotonic=t.monotonic, wall_s=t.wall_s)
    assert not await b.is_denied("j1")  # b has read the (empty) list now

    await a.deny("j1", 60)
    t.mono += 0.125
    within_interval = await b.is_denied("j1")
    t.mono += 0.125
    after_interval = await b.is_denied("j1")

    assert within_interval is False  # the documented staleness: at most one interval
    assert after_interval is True


class GatedKv(MemoryKv):
    """One instance's view of a shared MemoryKv whose reads wait for `gate` while `gated`."""

    def __init__(self, shared: MemoryKv) -> None:
        super().__init__()
        self.shared = shared
        self.gated = False
        self.gate = asyncio.Event()
        self.reads = 0

    async def _pass(self) -> None:
        self.reads += 1
        if self.gated:
            await self.gate.wait()

    async def deny(self, jti: str, ttl_s: int) -> None:
        await self.shared.deny(jti, ttl_s)

    async def deny_version(self) -> int:
        await self._pass()
        return await self.shared.deny_version()

    async def denied(self) -> dict[str, float]:
        return await self.shared.denied()

    async def count(self, increments: dict[str, int], ttl_s: int) -> dict[str, int]:
        await self._pass()
        return await self.shared.count(increments, ttl_s)


async def test_deny_list_when_half_an_interval_old_answers_without_waiting_and_reads_behind() -> (
    None
):
    shared, t = MemoryKv(), FakeTime()
    kv = GatedKv(shared)
    other = DenyList(shared, 0.25, monotonic=t.monotonic, wall_s=t.wall_s)
    deny = DenyList(kv, 0.25, monotonic=t.monotonic, wall_s=t.wall_s)
    assert not await deny.is_denied("j1")  # read 1, at 100.0
    await other.deny("j1", 60)
    kv.gated = True

    t.mono += 0.125
    # Redis is held: a request that waited for it would not finish within the timeout.
    at_half = await asyncio.wait_for(deny.is_denied("j1"), 1.0)
    kv.gate.set()
    await asyncio.sleep(0.01)  # the background read (read 2, started at 100.125) completes
    kv.gate = asyncio.Event()  # Redis held again
    t.mono += 0.175  # 100.3: the list read at 100.125 is 0.175 s old, fresh without a read
    after_read = await asyncio.wait_for(deny.is_denied("j1"), 1.0)

    assert at_half is False  # the list in hand was read at 100.0, before the logout
    assert after_read is True
    assert kv.reads == 3  # 100.0, 100.125 and, in the background, 100.3
    kv.gate.set()
    await asyncio.sleep(0.01)


async def test_deny_list_when_a_whole_interval_old_waits_for_the_read() -> None:
    shared, t = MemoryKv(), FakeTime()
    kv = GatedKv(shared)
    other = DenyList(shared, 0.25, monotonic=t.monotonic, wall_s=t.wall_s)
    deny = DenyList(kv, 0.25, monotonic=t.monotonic, wall_s=t.wall_s)
    assert not await deny.is_denied("j1")
    await other.deny("j1", 60)
    kv.gated = True
    t.mono += 0.25

    request = asyncio.ensure_future(deny.is_denied("j1"))
    await asyncio.sleep(0.01)
    waited = not request.done()
    kv.gate.set()

    assert waited
    assert await asyncio.wait_for(request, 1.0) is True


async def test_rate_limiter_when_half_an_interval_old_counts_without_waiting_and_syncs_behind() -> (
    None
):
    shared, t = MemoryKv(), FakeTime()
    kv = GatedKv(shared)
    a = RateLimiter(kv, 0.25, monotonic=t.monotonic, wall_s=t.wall_s)
    b = RateLimiter(shared, 0.25, monotonic=t.monotonic, wall_s=t.wall_s)
    await a.hit("ip:x", 4)  # a syncs: Redis 1, a sees 1
    kv.gated = True
    t.mono += 0.125

    # Redis is held for a: a hit that waited for the sync would not finish in the timeout.
    a2 = await asyncio.wait_for(a.hit("ip:x", 4), 1.0)  # 1 + 1 = 2; a's sync starts behind
    await b.hit("ip:x", 4)  # b syncs its first hit: Redis 2
    kv.gate.set()
    await asyncio.sleep(0.01)  # a's sync adds its 1: Redis 3, and a sees 3
    a3 = await a.hit("ip:x", 4)  # 3 + 1 = 4
    a4 = await a.hit("ip:x", 4)  # 3 + 2 = 5 (without b's hit, 4: allowed)

    assert (a2, a3) == (0, 0)
    assert a4 > 0


class FailingKv(MemoryKv):
    """A MemoryKv whose deny-list reads fail while `down` is set."""

    down = False

    async def deny_version(self) -> int:
        if self.down:
            raise ConnectionError("redis down")
        return await super().deny_version()


async def test_deny_list_when_redis_fails_briefly_keeps_the_last_list_then_fails_closed() -> None:
    kv, t = FailingKv(), FakeTime()
    other = DenyList(kv, 0.25, monotonic=t.monotonic, wall_s=t.wall_s)
    deny = DenyList(kv, 0.25, monotonic=t.monotonic, wall_s=t.wall_s)
    await other.deny("j1", 600)
    assert await deny.is_denied("j1")
    kv.down = True

    t.mono += 1.0
    brief = await deny.is_denied("j1")
    t.mono += 10.0

    assert brief is True
    with pytest.raises(DenyListUnavailableError):
        await deny.is_denied("j1")


async def test_rate_limiter_when_one_instance_counts_exactly_up_to_the_limit() -> None:
    kv, t = MemoryKv(), FakeTime()
    limiter = RateLimiter(kv, 0.25, monotonic=t.monotonic, wall_s=t.wall_s)

    answers = [await limiter.hit("user:u1", 3) for _ in range(4)]

    # Window [T0, T0 + 60): at T0 + 30 the retry is 30 s.
    assert answers == [0, 0, 0, 30]


async def test_rate_limiter_when_two_instances_share_a_bucket_the_limit_holds_after_a_sync() -> (
    None
):
    kv, t = MemoryKv(), FakeTime()
    a = RateLimiter(kv, 0.25, monotonic=t.monotonic, wall_s=t.wall_s)
    b = RateLimiter(kv, 0.25, monotonic=t.monotonic, wall_s=t.wall_s)
    # a: hit 1 syncs (Redis 1), hits 2-3 local (1 + 2 = 3). b: hit 1 syncs (Redis 2), hits
    # 2-3 local (2 + 2 = 4): both under 5, each blind to the other's unsynced hits.
    first = [await a.hit("ip:x", 5) for _ in range(3)] + [await b.hit("ip:x", 5) for _ in range(3)]

    t.mono += 0.25
    a4 = await a.hit("ip:x", 5)  # syncs a's 3 pending: Redis 5 -> 5 allowed
    b4 = await b.hit("ip:x", 5)  # syncs b's 3 pending: Redis 8 -> refused
    a5 = await a.hit("ip:x", 5)  # local: 5 + 1 = 6 -> refused

    assert first == [0] * 6
    assert (a4, b4 > 0, a5 > 0) == (0, True, True)


async def test_rate_limiter_when_the_window_turns_starts_again_from_zero() -> None:
    kv, t = MemoryKv(), FakeTime()
    limiter = RateLimiter(kv, 0.25, monotonic=t.monotonic, wall_s=t.wall_s)
    await limiter.hit("user:u1", 1)
    refused = await limiter.hit("user:u1", 1)

    t.wall += 30  # T0 + 60: the next window
    t.mono += 30
    allowed = await limiter.hit("user:u1", 1)

    assert (refused > 0, allowed) == (True, 0)


class BrokenKv(MemoryKv):
    """A MemoryKv whose counters always fail."""

    async def count(self, increments: dict[str, int], ttl_s: int) -> dict[str, int]:
        raise ConnectionError("redis down")


async def test_rate_limiter_when_redis_fails_limits_hold_per_instance() -> None:
    t = FakeTime()
    limiter = RateLimiter(BrokenKv(), 0.25, monotonic=t.monotonic, wall_s=t.wall_s)

    answers = [await limiter.hit("user:u1", 2) for _ in range(3)]

    assert answers[:2] == [0, 0]
    assert answers[2] > 0


# ----------------------------------------------------------------------- real Redis --


@pytest.fixture
async def redis_kvs() -> AsyncIterator[tuple[Any, RedisKv, RedisKv]]:
    """Two api instances' Kv on the real Redis under one unique prefix; keys removed after."""
    url = os.environ.get("QM_REDIS_URL")
    if not url:
        pytest.skip("QM_REDIS_URL is not set")
    prefix = f"qmtest:apiguard:{uuid.uuid4().hex[:8]}:"
    client_a, client_b = await create_redis(url), await create_redis(url)
    try:
        yield client_a, RedisKv(client_a, prefix, prefix + "md:"), RedisKv(client_b, prefix, "x")
    finally:
        keys = [k async for k in client_a.scan_iter(match=prefix + "*")]
        if keys:
            await client_a.delete(*keys)
        await client_a.aclose()
        await client_b.aclose()


@pytest.mark.integration
async def test_deny_list_on_redis_when_denied_on_one_instance_the_other_refuses(
    redis_kvs: tuple[Any, RedisKv, RedisKv],
) -> None:
    _, kv_a, kv_b = redis_kvs
    t = FakeTime()
    a = DenyList(kv_a, 0.25, monotonic=t.monotonic)
    b = DenyList(kv_b, 0.25, monotonic=t.monotonic)
    assert not await b.is_denied("jti-1")

    await a.deny("jti-1", 60)
    t.mono += 0.25

    assert await b.is_denied("jti-1")
    assert not await b.is_denied("jti-2")


@pytest.mark.integration
async def test_rate_limiter_on_redis_when_two_instances_share_a_user_the_total_is_counted(
    redis_kvs: tuple[Any, RedisKv, RedisKv],
) -> None:
    _, kv_a, kv_b = redis_kvs
    t = FakeTime()
    a = RateLimiter(kv_a, 0.25, monotonic=t.monotonic, wall_s=t.wall_s)
    b = RateLimiter(kv_b, 0.25, monotonic=t.monotonic, wall_s=t.wall_s)
    for _ in range(4):
        await a.hit("user:u1", 6)

    t.mono += 0.25
    await a.hit("user:u1", 6)  # a syncs: Redis holds a's 5 hits
    b_first = await b.hit("user:u1", 6)  # b syncs: 6
    b_second = await b.hit("user:u1", 6)  # 7 > 6

    assert b_first == 0
    assert b_second > 0
