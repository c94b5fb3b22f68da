"""ccxt's own parsers fed recorded venue responses, normalised into Tick / Bar / BookSnapshot."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest

from quantmesh_common.messages import AggressorSide, TickKind
from quantmesh_marketdata.normalize import (
    DECIMAL_PLACES,
    TICK_SIZE,
    instrument_id_for,
    market_to_instrument,
    ohlcv_to_bar,
    order_book_to_snapshot,
    ticker_to_quote,
    to_decimal,
    trade_to_tick,
)
from quantmesh_marketdata.venue import ccxt_module

ccxt_async = ccxt_module("ccxt.async_support")
TS_INIT = 1_800_000_000_000_000_000


def _market(market_id: str, symbol: str, kind: str = "spot", **extra: Any) -> dict[str, Any]:
    base, rest = symbol.split("/")
    quote = rest.split(":")[0]
    contract = kind != "spot"
    market: dict[str, Any] = {
        "id": market_id,
        "symbol": symbol,
        "base": base,
        "quote": quote,
        "baseId": base,
        "quoteId": quote,
        "type": kind,
        "spot": not contract,
        "swap": kind == "swap",
        "future": False,
        "option": False,
        "margin": False,
        "contract": contract,
        "linear": True if contract else None,
        "inverse": False if contract else None,
        "settle": quote if contract else None,
        "settleId": quote if contract else None,
        "contractSize": 1 if contract else None,
        "active": True,
        "precision": {"price": 0.01, "amount": 0.00001},
        "limits": {"amount": {"min": 0.00001, "max": None}, "cost": {"min": 5, "max": None}},
        "info": {},
    }
    market.update(extra)
    return market


#: The minimal markets each venue's parser needs for the recorded cases (ccxt's own test harness
#: loads whole markets files, which the fixtures do not carry).
MARKETS = {
    "binance": [_market("BTCUSDT", "BTC/USDT"), _market("BTCUSDT", "BTC/USDT:USDT", "swap")],
    "bybit": [_market("BTCUSDT", "BTC/USDT"), _market("BTCUSDT", "BTC/USDT:USDT", "swap")],
    "okx": [_market("BTC-USDT", "BTC/USDT"), _market("BTC-USDT-SWAP", "BTC/USDT:USDT", "swap")],
    "kraken": [_market("XBTUSDT", "BTC/USDT", altname="XBTUSDT", wsname="XBT/USDT")],
    "coinbase": [_market("BTC-USDC", "BTC/USDC")],
}


async def _ccxt_parse(
    cases: dict[str, Any], venue: str, method: str, index: int = 0
) -> tuple[Any, dict[str, Any]]:
    """Run ccxt's `method` on a recorded case with the HTTP layer answering its recorded reply."""
    case = cases[venue]["methods"][method][index]
    exchange = getattr(ccxt_async, venue)({"enableRateLimit": False})
    exchange.set_markets(MARKETS[venue])

    async def fetch(url: str, method: str = "GET", headers: Any = None, body: Any = None) -> Any:
        return case["httpResponse"]

    exchange.fetch = fetch
    try:
        result = await getattr(exchange, exchange.un_camel_case(method))(*case["input"])
    finally:
        await exchange.close()
    return result, case


@pytest.mark.parametrize(
    ("venue", "instrument_id", "price", "size", "side", "trade_id", "ts_ms"),
    [
        ("binance", "BTC-USDT.BINANCE", "73238.7", "0.00109", "BUYER", "2913537567", 1710327661939),
        (
            "bybit",
            "BTC-USDT.BYBIT_SWAP",
            "51444.4",
            "0.972",
            "BUYER",
            "9afd1288-b444-53f8-8e40-c2f99368ad22",
            1707905515968,
        ),
        ("okx", "BTC-USDT.OKX", "73239.3", "0.0009478", "SELLER", "497859870", 1710327658374),
        ("kraken", "BTC-USDT.KRAKEN", "73324.4", "0.010309", "BUYER", "6324366", 1710327959173),
    ],
)
async def test_trade_to_tick_when_ccxt_parsed_a_recorded_trade_keeps_venue_time_and_exact_values(
    ccxt_cases: dict[str, Any],
    venue: str,
    instrument_id: str,
    price: str,
    size: str,
    side: str,
    trade_id: str,
    ts_ms: int,
) -> None:
    trades, case = await _ccxt_parse(ccxt_cases, venue, "fetchTrades")
    assert trades[0]["price"] == case["parsedResponse"][0]["price"]
    market = next(m for m in MARKETS[venue] if m["symbol"] == case["input"][0])

    tick = trade_to_tick(trades[0], instrument_id_for(market, venue.upper()) or "", TS_INIT)

    assert tick.instrument_id == instrument_id
    assert tick.kind is TickKind.TRADE
    assert (tick.price, tick.size) == (Decimal(price), Decimal(size))
    assert tick.aggressor_side is AggressorSide(side)
    assert tick.trade_id == trade_id
    assert tick.ts_event == ts_ms * 1_000_000
    assert tick.ts_init == TS_INIT


@pytest.mark.parametrize(
    ("venue", "bid", "ask", "mid", "bid_size", "ts_ms"),
    [
        ("binance", "73369.83", "73369.84", "73369.835", "6.27086", 1710328245391),
        ("okx", "73384.7", "73384.8", "73384.75", "0.0655768", 1710328243709),
        ("coinbase", "66367.58", "66367.59", "66367.585", None, 1713952598063),
    ],
)
async def test_ticker_to_quote_when_ccxt_parsed_a_recorded_ticker_gives_mid_and_top_of_book(
    ccxt_cases: dict[str, Any],
    venue: str,
    bid: str,
    ask: str,
    mid: str,
    bid_size: str | None,
    ts_ms: int,
) -> None:
    ticker, _ = await _ccxt_parse(ccxt_cases, venue, "fetchTicker")
    instrument_id = instrument_id_for(MARKETS[venue][0], venue.upper()) or ""

    quote = ticker_to_quote(ticker, instrument_id, TS_INIT)

    assert quote is not None
    assert quote.kind is TickKind.QUOTE
    assert (quote.bid, quote.ask, quote.price) == (Decimal(bid), Decimal(ask), Decimal(mid))
    assert quote.bid_size == (None if bid_size is None else Decimal(bid_size))
    assert quote.ts_event == ts_ms * 1_000_000


def test_ticker_to_quote_when_a_side_is_missing_returns_none() -> None:
    assert ticker_to_quote({"bid": 1.5, "ask": None}, "BTC-USDT.BINANCE", 1) is None


async def test_order_book_when_binance_spot_recorded_keeps_levels_nonce_and_our_time(
    ccxt_cases: dict[str, Any],
) -> None:
    book, _ = await _ccxt_parse(ccxt_cases, "binance", "fetchOrderBook", 0)

    snapshot = order_book_to_snapshot(book, "BTC-USDT.BINANCE", 5, TS_INIT)

    assert [(lv.price, lv.size) for lv in snapshot.bids] == [
        (Decimal("42574.3"), Decimal("0.0107")),
        (Decimal("42574.2"), Decimal("0.00646")),
    ]
    assert [(lv.price, lv.size) for lv in snapshot.asks] == [
        (Decimal("42574.31"), Decimal("0.0087")),
        (Decimal("42574.8"), Decimal("0.00893")),
    ]
    assert snapshot.sequence == 25445101
    # Binance's spot depth reply has no time: ours stands in for the venue's.
    assert snapshot.ts_event == TS_INIT


async def test_order_book_when_okx_levels_carry_counts_and_depth_is_one_keeps_the_top(
    ccxt_cases: dict[str, Any],
) -> None:
    book, _ = await _ccxt_parse(ccxt_cases, "okx", "fetchOrderBook", 0)

    snapshot = order_book_to_snapshot(book, "BTC-USDT.OKX_SWAP", 1, TS_INIT)

    assert [(lv.price, lv.size) for lv in snapshot.bids] == [(Decimal("43466.3"), Decimal("13807"))]
    assert [(lv.price, lv.size) for lv in snapshot.asks] == [(Decimal("43466.4"), Decimal("14881"))]
    assert snapshot.ts_event == 1706612067750 * 1_000_000


def test_order_book_when_a_level_has_zero_size_skips_it() -> None:
    book = {"bids": [[10.0, 0.0], [9.5, 2.0]], "asks": [[11.0, 1.0]], "nonce": 7, "timestamp": 5}

    snapshot = order_book_to_snapshot(book, "BTC-USDT.BINANCE", 10, TS_INIT)

    assert [lv.price for lv in snapshot.bids] == [Decimal("9.5")]
    assert (snapshot.sequence, snapshot.ts_event) == (7, 5_000_000)


@pytest.mark.parametrize(
    ("venue", "bar_open", "high", "low", "close", "volume"),
    [
        ("binance", "43519.34", "43936", "43171", "43488.71", "20.55495"),
        ("okx", "43377.1", "43500", "43220.9", "43495.9", "7137.30786672"),
        ("kraken", "43366.3", "43529.2", "43234.2", "43485", "12.51327406"),
    ],
)
async def test_ohlcv_to_bar_when_ccxt_parsed_recorded_candles_spans_the_hour(
    ccxt_cases: dict[str, Any],
    venue: str,
    bar_open: str,
    high: str,
    low: str,
    close: str,
    volume: str,
) -> None:
    rows, _ = await _ccxt_parse(ccxt_cases, venue, "fetchOHLCV")

    bar = ohlcv_to_bar(rows[0], "BTC-USDT." + venue.upper(), "1h")

    assert (bar.open, bar.high, bar.low, bar.close, bar.volume) == tuple(
        Decimal(v) for v in (bar_open, high, low, close, volume)
    )
    # 1706630400000 ms = 2024-01-30T16:00:00Z; the bar ends an hour later.
    assert bar.ts_open == 1_706_630_400_000_000_000
    assert bar.ts_close == 1_706_634_000_000_000_000


@pytest.mark.parametrize(
    ("market", "expected"),
    [
        (_market("BTCUSDT", "BTC/USDT"), "BTC-USDT.BINANCE"),
        (_market("BTCUSDT", "BTC/USDT:USDT", "swap"), "BTC-USDT.BINANCE_SWAP"),
        (
            _market("BTCUSD_PERP", "BTC/USD:BTC", "swap", linear=False, inverse=True),
            "BTC-USD.BINANCE_SWAP_INV",
        ),
        (
            _market(
                "BTCUSDT_240628",
                "BTC/USDT:USDT-240628",
                "future",
                expiryDatetime="2024-06-28T08:00:00.000Z",
            ),
            "BTC-USDT.BINANCE_FUT_240628",
        ),
        (_market("BTC-240628-60000-C", "BTC/USDT:USDT-240628-60000-C", "option"), None),
    ],
)
def test_instrument_id_for_when_market_kinds_differ_keeps_them_apart(
    market: dict[str, Any], expected: str | None
) -> None:
    assert instrument_id_for(market, "BINANCE") == expected


async def test_market_to_instrument_when_ccxt_parsed_binance_exchange_info_has_trading_rules(
    binance_exchange_info: dict[str, Any],
) -> None:
    exchange = ccxt_async.binance({"options": {"fetchMarkets": {"types": ["spot"]}}})

    async def fetch(url: str, method: str = "GET", headers: Any = None, body: Any = None) -> Any:
        return binance_exchange_info

    exchange.fetch = fetch
    try:
        markets = await exchange.load_markets()
    finally:
        await exchange.close()

    instrument = market_to_instrument(markets["BTC/USDT"], "BINANCE", exchange.precisionMode)

    assert instrument is not None
    assert instrument.instrument_id == "BTC-USDT.BINANCE"
    # exchangeInfo filters: PRICE_FILTER tickSize 0.01, LOT_SIZE stepSize 0.00001 / minQty
    # 0.00001 / maxQty 9000, MIN_NOTIONAL minNotional 10; ccxt's default fees 0.1 %.
    assert (instrument.tick_size, instrument.lot_size) == (Decimal("0.01"), Decimal("0.00001"))
    assert instrument.min_notional == Decimal("10.0")
    assert (instrument.min_quantity, instrument.max_quantity) == (
        Decimal("0.00001"),
        Decimal("9000.0"),
    )
    assert (instrument.maker_fee, instrument.taker_fee) == (Decimal("0.001"), Decimal("0.001"))


def test_market_to_instrument_when_precision_is_decimal_places_converts_to_increments() -> None:
    market = _market("XBTUSDT", "BTC/USDT", precision={"price": 1, "amount": 8})

    instrument = market_to_instrument(market, "KRAKEN", DECIMAL_PLACES)

    assert instrument is not None
    assert (instrument.tick_size, instrument.lot_size) == (Decimal("0.1"), Decimal("1E-8"))


def test_market_to_instrument_when_tick_size_missing_returns_none() -> None:
    market = _market("BTCUSDT", "BTC/USDT", precision={"price": None, "amount": 0.1})

    assert market_to_instrument(market, "BINANCE", TICK_SIZE) is None


def test_to_decimal_when_float_uses_its_shortest_form() -> None:
    assert to_decimal(61837.63) == Decimal("61837.63")
    assert to_decimal("0.00001") == Decimal("0.00001")
    assert to_decimal(None) is None
