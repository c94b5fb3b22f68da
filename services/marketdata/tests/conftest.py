"""Fixtures of the marketdata integration tests: a fresh migrated schema, a Redis key prefix."""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from quantmesh_common.storage.redis import RedisClient, create_redis
from quantmesh_common.testing.postgres import migrated_schema_fixtures

md_dsn, md_pool = migrated_schema_fixtures("qm_test_md", dsn="md_dsn", pool="md_pool")


@pytest.fixture
def redis_url() -> str:
    """QM_REDIS_URL, or skip."""
    url = os.environ.get("QM_REDIS_URL")
    if not url:
        pytest.skip("QM_REDIS_URL is not set (start the stack: deploy/local/stack.sh up)")
    return url


@pytest.fixture
def redis_prefix() -> str:
    """A key prefix no other test uses."""
    return f"qm-test:{uuid.uuid4().hex[:12]}:md:"


@pytest.fixture
async def md_redis(redis_url: str, redis_prefix: str) -> AsyncIterator[RedisClient]:
    """A Redis client; every key under `redis_prefix` is deleted after the test."""
    client = await create_redis(redis_url, timeout_s=10)
    try:
        yield client
    finally:
        keys = [key async for key in client.scan_iter(match=f"{redis_prefix}*")]
        if keys:
            await client.delete(*keys)
        await client.aclose()


FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="session")
def ccxt_cases() -> dict[str, Any]:
    """ccxt's recorded public REST responses with its parsed results (tests/fixtures/README.md)."""
    cases: dict[str, Any] = json.loads((FIXTURES / "ccxt_public_responses.json").read_text())
    return cases


@pytest.fixture(scope="session")
def binance_exchange_info() -> dict[str, Any]:
    """Binance spot GET /api/v3/exchangeInfo of 2021-10-12, cut to BTCUSDT, ETHBTC, NKNUSDT."""
    info: dict[str, Any] = json.loads(
        (FIXTURES / "binance_exchangeinfo_2021-10-12_subset.json").read_text()
    )
    return info


def _json(name: str) -> Any:
    return json.loads((FIXTURES / name).read_text())


#: freqtrade's UNITTEST/BTC 1-minute candles [ms, o, h, l, c, v], served as Binance ETHBTC klines.
RECORDED_CANDLES: list[list[float]] = _json("unittest-btc_1m_ohlcv_head.json")
#: Binance XRP/ETH aggregate trades of 2019-10-11 (fields a, p, q, f, l, T, m, M).
RECORDED_AGG_TRADES: list[dict[str, Any]] = _json("binance_xrpeth_aggtrades_2019-10-11_head.json")


class FakeBinance:
    """Recorded rows behind Binance's REST paths; counts requests and can fail some with 503."""

    def __init__(self, exchange_info: dict[str, Any]) -> None:
        self.exchange_info = exchange_info
        self.requests: list[dict[str, str]] = []
        self.fail_next = 0
        self.port = 0

    def _window(self, request: web.Request) -> tuple[int, int, int]:
        query = request.query
        self.requests.append(dict(query))
        start = int(query.get("startTime", 0))
        end = int(query.get("endTime", 2**62))
        return start, end, int(query.get("limit", 500))

    async def klines(self, request: web.Request) -> web.Response:
        start, end, limit = self._window(request)
        if self.fail_next:
            self.fail_next -= 1
            return web.Response(status=503, text="Service Unavailable")
        rows = [r for r in RECORDED_CANDLES if start <= r[0] <= end][:limit]
        body = [
            [int(r[0]), *(repr(v) for v in r[1:6]), int(r[0]) + 59_999, "0", 1, "0", "0", "0"]
            for r in rows
        ]
        return web.json_response(body)

    async def agg_trades(self, request: web.Request) -> web.Response:
        start, end, limit = self._window(request)
        return web.json_response([t for t in RECORDED_AGG_TRADES if start <= t["T"] <= end][:limit])

    async def info(self, request: web.Request) -> web.Response:
        return web.json_response(self.exchange_info)


@pytest.fixture
async def venue(binance_exchange_info: dict[str, Any]) -> AsyncIterator[FakeBinance]:
    """A loopback Binance REST server of recorded rows (exchangeInfo, klines, aggTrades)."""
    fake = FakeBinance(binance_exchange_info)
    app = web.Application()
    app.router.add_get("/api/v3/exchangeInfo", fake.info)
    app.router.add_get("/api/v3/klines", fake.klines)
    app.router.add_get("/api/v3/aggTrades", fake.agg_trades)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    fake.port = runner.addresses[0][1]
    yield fake
    await runner.cleanup()
