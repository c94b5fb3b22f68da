"""ccxt's unified structures (trade, ticker, order book, OHLCV row, market) to quantmesh events."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from decimal import ROUND_HALF_EVEN, Context, Decimal, InvalidOperation
from typing import Any

from quantmesh_common.messages import (
    AggressorSide,
    Bar,
    BookLevel,
    BookSnapshot,
    Instrument,
    Tick,
    TickKind,
    bar_interval_ns,
    make_instrument_id,
)

log = logging.getLogger(__name__)

NS_PER_MS = 1_000_000

# ccxt.base.decimal_to_precision constants, repeated so this module needs no ccxt import.
DECIMAL_PLACES = 2
SIGNIFICANT_DIGITS = 3
TICK_SIZE = 4

#: Python's default context, stated: the thread's may have been changed (ccxt sets ROUND_HALF_UP).
_MID = Context(prec=28, rounding=ROUND_HALF_EVEN)

_SIDES = {"buy": AggressorSide.BUYER, "sell": AggressorSide.SELLER}


class NormalizeError(ValueError):
    """A ccxt structure that cannot become a quantmesh event (missing price, bad market)."""


def to_decimal(value: Any) -> Decimal | None:
    """Return `value` (ccxt float, int or numeric string) as an exact Decimal; None stays None.

    A float goes through repr, its shortest round-tripping form, so 61837.63 becomes
    Decimal('61837.63') rather than the binary expansion.
    """
    if value is None:
        return None
    if isinstance(value, Decimal):
        return value
    try:
        result = Decimal(repr(value)) if isinstance(value, float) else Decimal(str(value))
    except InvalidOperation as exc:
        raise NormalizeError(f"not a number: {value!r}") from exc
    if not result.is_finite():
        raise NormalizeError(f"not a finite number: {value!r}")
    return result


def _required(value: Any, what: str) -> Decimal:
    result = to_decimal(value)
    if result is None:
        raise NormalizeError(f"{what} is missing")
    return result


def ms_to_ns(ms: Any) -> int | None:
    """Return a ccxt millisecond timestamp in ns (None if ccxt had none)."""
    if ms is None:
        return None
    return int(ms) * NS_PER_MS


def venue_name(exchange_id: str) -> str:
    """Return the quantmesh venue name of a ccxt exchange id: `binance` -> `BINANCE`."""
    return exchange_id.strip().upper().replace("-", "_")


def instrument_id_for(market: Mapping[str, Any], venue: str) -> str | None:
    """Return our instrument id for a ccxt market, or None for a market we do not map (options).

    Spot `BTC/USDT` on BINANCE is `BTC-USDT.BINANCE`. Contracts get their kind in the venue part,
    so they never collide with spot: a linear swap `BTC/USDT:USDT` is `BTC-USDT.BINANCE_SWAP`, an
    inverse one `BTC-USD.BINANCE_SWAP_INV`, a future `BTC-USDT.BINANCE_FUT_240628`.
    """
    kind = market.get("type")
    base, quote = market.get("base"), market.get("quote")
    if not base or not quote:
        return None
    if kind == "spot" or not market.get("contract"):
        suffix = ""
    elif kind == "swap":
        suffix = "_SWAP"
    elif kind == "future":
        expiry = str(market.get("expiryDatetime") or "")[2:10].replace("-", "")
        suffix = f"_FUT_{expiry}" if expiry else "_FUT"
    else:
        return None
    if market.get("contract") and market.get("inverse"):
        suffix += "_INV"
    try:
        return make_instrument_id(str(base), str(quote), venue + suffix)
    except ValueError:
        return None


def _venue_of(instrument_id: str) -> str:
    return instrument_id.rsplit(".", 1)[-1]


def trade_to_tick(trade: Mapping[str, Any], instrument_id: str, ts_init: int) -> Tick:
    """A ccxt trade as a TRADE tick; `ts_event` is the venue's time (ours when it sent none)."""
    ts_event = ms_to_ns(trade.get("timestamp"))
    trade_id = trade.get("id")
    return Tick(
        instrument_id=instrument_id,
        venue=_venue_of(instrument_id),
        kind=TickKind.TRADE,
        price=_required(trade.get("price"), "trade price"),
        size=_required(trade.get("amount"), "trade amount"),
        aggressor_side=_SIDES.get(str(trade.get("side")), AggressorSide.NO_AGGRESSOR),
        trade_id=None if trade_id is None else str(trade_id),
        ts_event=ts_init if ts_event is None else ts_event,
        ts_init=ts_init,
    )


def ticker_to_quote(ticker: Mapping[str, Any], instrument_id: str, ts_init: int) -> Tick | None:
    """A ccxt ticker's best bid/ask as a QUOTE tick (price = mid); None without both sides."""
    bid, ask = to_decimal(ticker.get("bid")), to_decimal(ticker.get("ask"))
    if bid is None or ask is None or bid <= 0 or ask <= 0 or bid > ask:
        return None
    ts_event = ms_to_ns(ticker.get("timestamp"))
    return Tick(
        instrument_id=instrument_id,
        venue=_venue_of(instrument_id),
        kind=TickKind.QUOTE,
        price=_MID.divide(bid + ask, 2),
        size=Decimal(0),
        bid=bid,
        ask=ask,
        bid_size=to_decimal(ticker.get("bidVolume")),
        ask_size=to_decimal(ticker.get("askVolume")),
        ts_event=ts_init if ts_event is None else ts_event,
        ts_init=ts_init,
    )


def _levels(side: Sequence[Sequence[Any]], depth: int) -> list[BookLevel]:
    levels: list[BookLevel] = []
    for entry in side:
        size = _required(entry[1], "book size")
        if size > 0:  # a zero size is a deletion a venue may still show
            levels.append(BookLevel(price=_required(entry[0], "book price"), size=size))
            if len(levels) == depth:
                break
    return levels


def order_book_to_snapshot(
    book: Mapping[str, Any], instrument_id: str, depth: int, ts_init: int
) -> BookSnapshot:
    """The top `depth` levels of a ccxt order book; `sequence` is ccxt's nonce (0 without)."""
    ts_event = ms_to_ns(book.get("timestamp"))
    nonce = book.get("nonce")
    return BookSnapshot(
        instrument_id=instrument_id,
        bids=_levels(book.get("bids") or [], depth),
        asks=_levels(book.get("asks") or [], depth),
        sequence=int(nonce) if nonce is not None and int(nonce) >= 0 else 0,
        depth=depth,
        ts_event=ts_init if ts_event is None else ts_event,
        ts_init=ts_init,
    )


def ohlcv_to_bar(row: Sequence[Any], instrument_id: str, timeframe: str) -> Bar:
    """A ccxt OHLCV row `[ms, open, high, low, close, volume]` as a Bar of `timeframe`."""
    if len(row) < 5 or row[0] is None:
        raise NormalizeError(f"OHLCV row {list(row)!r} has no time or prices")
    ts_open = int(row[0]) * NS_PER_MS
    volume = to_decimal(row[5]) if len(row) > 5 else None
    return Bar(
        instrument_id=instrument_id,
        interval=timeframe,
        open=_required(row[1], "open"),
        high=_required(row[2], "high"),
        low=_required(row[3], "low"),
        close=_required(row[4], "close"),
        volume=volume if volume is not None else Decimal(0),
        ts_open=ts_open,
        ts_close=ts_open + bar_interval_ns(timeframe),
    )


def _increment(value: Any, precision_mode: int) -> Decimal | None:
    number = to_decimal(value)
    if number is None:
        return None
    if precision_mode == DECIMAL_PLACES:
        return Decimal(1).scaleb(-int(number))
    if precision_mode == TICK_SIZE:
        return number
    return None  # significant digits: no fixed increment


def market_to_instrument(
    market: Mapping[str, Any], venue: str, precision_mode: int
) -> Instrument | None:
    """A ccxt market's trading rules as an Instrument; None if it lacks a tick or lot size."""
    instrument_id = instrument_id_for(market, venue)
    if instrument_id is None:
        return None
    precision = market.get("precision") or {}
    limits = market.get("limits") or {}
    amount_limits = limits.get("amount") or {}
    cost_limits = limits.get("cost") or {}
    tick = _increment(precision.get("price"), precision_mode)
    lot = _increment(precision.get("amount"), precision_mode)
    if tick is None or lot is None or tick <= 0 or lot <= 0:
        log.debug("market %s has no tick or lot size; skipped", market.get("symbol"))
        return None
    min_qty = to_decimal(amount_limits.get("min"))
    max_qty = to_decimal(amount_limits.get("max"))
    min_notional = to_decimal(cost_limits.get("min"))
    try:
        return Instrument(
            instrument_id=instrument_id,
            venue=_venue_of(instrument_id),
            symbol=str(market["symbol"]),
            base=instrument_id.split("-", 1)[0],
            quote=instrument_id.split("-", 1)[1].split(".", 1)[0],
            tick_size=tick,
            lot_size=lot,
            min_notional=min_notional if min_notional is not None and min_notional > 0 else 0,
            min_quantity=min_qty if min_qty is not None and min_qty > 0 else None,
            max_quantity=max_qty if max_qty is not None and max_qty > 0 else None,
            maker_fee=to_decimal(market.get("maker")),
            taker_fee=to_decimal(market.get("taker")),
        )
    except ValueError as exc:
        log.debug("market %s is not a valid instrument: %s", market.get("symbol"), exc)
        return None
