"""ccxt's ROUND_HALF_UP stays inside the venue's exchanges (real ccxt, loopback recorded data).

ccxt's decimal_to_precision (behind price_to_precision, amount_to_precision) sets rounding on
the current decimal context in place; the exchanges `venue.py` makes, `load_markets` and
`Backfill` run every ccxt call under a copy of the caller's context, so our Decimals keep
Python's default (ROUND_HALF_EVEN). The server is conftest's `venue`: Binance's exchangeInfo
of 2021-10-12 (BTCUSDT tick 0.01, step 0.00001) and recorded klines, on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import decimal
from decimal import Decimal
from pathlib import Path
from typing import Any

from quantmesh_common.clock import WallClock
from quantmesh_common.envelope import Event
from quantmesh_common.messages import Bar
from quantmesh_marketdata.backfill import Backfill, BackfillJob, FileCursorStore
from quantmesh_marketdata.health import Backoff
from quantmesh_marketdata.markets import MarketsCache, load_markets
from quantmesh_marketdata.normalize import ticker_to_quote
from quantmesh_marketdata.venue import VenueConfig, make_rest_exchange, make_stream_exchange

NOW = 1_700_000_000_000_000_000
MS = 1_000_000
#: 2.000000000000000000000000001 / 2 = 1.0000000000000000000000000005: a tie at 28 digits.
TIE = Decimal("2.000000000000000000000000001")
#: What our two rounding-dependent computations give under Python's default context.
HALF_EVEN = (Decimal(2), Decimal("1.000000000000000000000000000"))


def ours() -> tuple[Decimal, Decimal]:
    """2.5 to a whole number (3 half-up) and a 28-digit mid on a tie (...001 half-up)."""
    return Decimal("2.5").quantize(Decimal("1")), TIE / 2


def settings(context: decimal.Context) -> tuple[Any, ...]:
    traps = tuple(sorted((t.__name__, on) for t, on in context.traps.items()))
    return (context.prec, context.rounding, context.Emin, context.Emax, context.clamp, traps)


def _config(port: int) -> VenueConfig:
    return VenueConfig(
        "binance",
        options={"fetchMarkets": {"types": ["spot"]}},
        url_overrides={"api.public": f"http://127.0.0.1:{port}/api/v3"},
        rate_limit=False,
    )


async def test_rest_exchange_when_ccxt_rounds_a_price_leaves_our_decimal_context_unchanged(
    venue: Any, tmp_path: Path
) -> None:
    before = decimal.getcontext()
    expected = settings(before)
    assert ours() == HALF_EVEN
    exchange = make_rest_exchange(_config(venue.port))
    try:
        await load_markets(exchange, MarketsCache(tmp_path), NOW)
        price = exchange.price_to_precision("BTC/USDT", 61837.635)
        amount = exchange.amount_to_precision("BTC/USDT", 0.123456)
    finally:
        await exchange.close()

    assert (price, amount) == ("61837.64", "0.12345")  # ccxt: half-up to the tick, truncated
    assert decimal.getcontext() is before
    assert settings(before) == expected
    assert ours() == HALF_EVEN


async def test_stream_exchange_when_markets_come_from_the_cache_keeps_our_decimal_context(
    venue: Any, tmp_path: Path
) -> None:
    cache = MarketsCache(tmp_path)
    first = make_rest_exchange(_config(venue.port))
    try:
        await load_markets(first, cache, NOW)
    finally:
        await first.close()
    expected = settings(decimal.getcontext())
    exchange = make_stream_exchange(_config(venue.port))
    try:
        markets, source = await load_markets(exchange, cache, NOW)  # ccxt's set_markets
        price = exchange.price_to_precision("BTC/USDT", "0.125")
    finally:
        await exchange.close()

    assert (source, "BTC/USDT" in markets, price) == ("cache", True, "0.13")
    assert settings(decimal.getcontext()) == expected
    assert ours() == HALF_EVEN


async def test_backfill_when_run_in_a_task_of_its_own_keeps_the_creating_tasks_context(
    venue: Any, tmp_path: Path
) -> None:
    expected = settings(decimal.getcontext())
    exchange = make_rest_exchange(_config(venue.port))
    await load_markets(exchange, MarketsCache(tmp_path), NOW)
    published: list[Event] = []

    async def publish(topic: str, event: Event, ts_event: int) -> None:
        published.append(event)

    job = BackfillJob(
        job_id="bf-decimal",
        kind="ohlcv",
        symbol="ETH/BTC",
        instrument_id="ETH-BTC.BINANCE",
        venue="BINANCE",
        timeframe="1m",
        start_ns=1_509_836_520_000 * MS,  # the first recorded candle, 2017-11-04 23:02
        end_ns=1_509_836_700_000 * MS,  # three minutes later
        page_limit=50,
    )
    backfill = Backfill(
        exchange, job, FileCursorStore(tmp_path / "c.json"), publish, WallClock(), Backoff()
    )

    async def collector() -> str:
        # A marketdata task: a backfill, then a price rounded the venue's way.
        await backfill.run()
        rounded: str = exchange.price_to_precision("ETH/BTC", "0.0000015")
        return rounded

    try:
        # A task shares its creator's Context object until it sets one of its own: a change
        # ccxt made to that object in place would reach this task too.
        rounded = await asyncio.create_task(collector())
    finally:
        await exchange.close()

    bars = [e for e in published if isinstance(e, Bar)]
    assert [b.ts_open // MS for b in bars] == [
        1_509_836_520_000,
        1_509_836_580_000,
        1_509_836_640_000,
    ]
    assert rounded == "0.000002"  # half-up to the 0.000001 tick
    assert settings(decimal.getcontext()) == expected
    assert ours() == HALF_EVEN


def test_ticker_to_quote_when_the_thread_rounds_half_up_takes_the_half_even_mid() -> None:
    ticker = {"bid": "1", "ask": "1.000000000000000000000000001", "timestamp": 1_700_000_000_000}
    half_up = decimal.Context(rounding=decimal.ROUND_HALF_UP)  # as ccxt leaves a context

    with decimal.localcontext(half_up):
        quote = ticker_to_quote(ticker, "BTC-USDT.BINANCE", NOW)

    assert quote is not None
    assert quote.price == Decimal("1.000000000000000000000000000")  # half-up: ...001
