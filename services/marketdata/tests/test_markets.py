"""Markets metadata cache: the first start asks the venue (loopback), a restart needs no venue."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from quantmesh_marketdata.markets import MarketsCache, instruments_of, load_markets
from quantmesh_marketdata.venue import VenueConfig, ccxt_module, make_rest_exchange

NOW = 1_700_000_000_000_000_000
HOUR = 3_600_000_000_000


@pytest.fixture
async def venue(binance_exchange_info: dict[str, Any]) -> AsyncIterator[dict[str, int]]:
    state = {"requests": 0, "port": 0}

    async def exchange_info(request: web.Request) -> web.Response:
        state["requests"] += 1
        return web.json_response(binance_exchange_info)

    app = web.Application()
    app.router.add_get("/api/v3/exchangeInfo", exchange_info)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    state["port"] = runner.addresses[0][1]
    yield state
    await runner.cleanup()


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def _exchange(port: int) -> Any:
    config = VenueConfig(
        "binance",
        options={"fetchMarkets": {"types": ["spot"]}},
        url_overrides={"api.public": f"http://127.0.0.1:{port}/api/v3"},
        rate_limit=False,
    )
    return make_rest_exchange(config)


async def test_load_markets_when_no_cache_asks_the_venue_and_writes_the_cache(
    venue: dict[str, int], tmp_path: Path
) -> None:
    cache = MarketsCache(tmp_path)
    exchange = _exchange(venue["port"])
    try:
        markets, source = await load_markets(exchange, cache, NOW)
    finally:
        await exchange.close()

    assert source == "venue"
    assert sorted(markets) == ["BTC/USDT", "ETH/BTC", "NKN/USDT", "XRP/ETH"]
    assert venue["requests"] == 1
    cached = cache.load("binance")
    assert cached is not None
    assert (sorted(cached.markets), cached.fetched_ns) == (sorted(markets), NOW)


async def test_load_markets_when_restarted_without_venue_uses_the_cache(
    venue: dict[str, int], tmp_path: Path
) -> None:
    cache = MarketsCache(tmp_path)
    first = _exchange(venue["port"])
    try:
        await load_markets(first, cache, NOW)
    finally:
        await first.close()
    restarted = _exchange(_closed_port())

    try:
        markets, source = await load_markets(restarted, cache, NOW + HOUR)
        market = restarted.market("BTC/USDT")
    finally:
        await restarted.close()

    assert source == "cache"
    assert market["id"] == "BTCUSDT"
    assert venue["requests"] == 1
    assert sorted(markets) == ["BTC/USDT", "ETH/BTC", "NKN/USDT", "XRP/ETH"]


async def test_load_markets_when_cache_is_old_and_venue_down_falls_back_to_it(
    venue: dict[str, int], tmp_path: Path
) -> None:
    cache = MarketsCache(tmp_path)
    first = _exchange(venue["port"])
    try:
        await load_markets(first, cache, NOW)
    finally:
        await first.close()
    restarted = _exchange(_closed_port())

    try:
        _, source = await load_markets(restarted, cache, NOW + 25 * HOUR)
    finally:
        await restarted.close()

    assert source == "stale-cache"


async def test_load_markets_when_no_cache_and_venue_down_raises(tmp_path: Path) -> None:
    exchange = _exchange(_closed_port())
    try:
        with pytest.raises(ccxt_module().NetworkError):
            await load_markets(exchange, MarketsCache(tmp_path), NOW)
    finally:
        await exchange.close()


def test_cache_when_file_is_corrupt_is_ignored(tmp_path: Path) -> None:
    cache = MarketsCache(tmp_path)
    cache.path("binance").write_text("{not json")

    assert cache.load("binance") is None


async def test_instruments_of_when_markets_cached_gives_trading_rules(
    venue: dict[str, int], tmp_path: Path
) -> None:
    exchange = _exchange(venue["port"])
    try:
        markets, _ = await load_markets(exchange, MarketsCache(tmp_path), NOW)
        mode = exchange.precisionMode
    finally:
        await exchange.close()

    instruments = instruments_of(markets, "BINANCE", mode, ["NKN/USDT", "ETH/BTC", "XYZ/USDT"])

    assert [i.instrument_id for i in instruments] == ["ETH-BTC.BINANCE", "NKN-USDT.BINANCE"]
    eth = instruments[0]
    # exchangeInfo 2021-10-12, ETHBTC: tickSize 0.000001, stepSize 0.0001, minNotional 0.0001
    assert (eth.tick_size, eth.lot_size, eth.min_notional) == (
        Decimal("0.000001"),
        Decimal("0.0001"),
        Decimal("0.0001"),
    )
