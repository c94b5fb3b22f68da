"""One ccxt venue by configuration: exchange id, symbols, channels, sandbox, URL overrides.

The exchanges made here are wrapped in `DecimalGuarded` (quantmesh_common.ccxt_context): each
method called on them runs under a copy of the caller's decimal context, because ccxt's
decimal_to_precision sets ROUND_HALF_UP on the current context in place and never undoes it.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from quantmesh_common.ccxt_context import ccxt_decimal_context, decimal_guarded
from quantmesh_marketdata.normalize import instrument_id_for, venue_name

CHANNELS = ("trades", "ticker", "bidask", "book")


@dataclass(frozen=True, slots=True)
class VenueConfig:
    """What to collect from one venue.

    `url_overrides` maps a dotted path inside ccxt's `urls` to a URL, e.g.
    `{"api.ws.spot": "ws://127.0.0.1:9000/ws", "api.public": "http://127.0.0.1:9001/api/v3"}`:
    how tests (and a proxy) point the real ccxt client somewhere else.
    """

    exchange_id: str
    symbols: tuple[str, ...] = ()
    channels: tuple[str, ...] = ("trades",)
    sandbox: bool = False
    book_depth: int = 20
    options: Mapping[str, Any] = field(default_factory=dict)
    url_overrides: Mapping[str, str] = field(default_factory=dict)
    rate_limit: bool = True

    @property
    def venue(self) -> str:
        """Our venue name, e.g. BINANCE."""
        return venue_name(self.exchange_id)


def parse_url_overrides(value: str) -> dict[str, str]:
    """Parse QM_VENUE_URLS: a JSON object of dotted `urls` path -> URL; ValueError if bad."""
    if not value.strip():
        return {}
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not JSON: {exc}") from exc
    if not isinstance(parsed, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in parsed.items()
    ):
        raise ValueError('must be a JSON object of strings, e.g. {"api.ws.spot": "ws://..."}')
    return parsed


def apply_url_overrides(exchange: Any, overrides: Mapping[str, str]) -> None:
    """Replace entries of `exchange.urls` (after sandbox mode, which swaps `urls['api']`)."""
    for path, url in overrides.items():
        parts = path.split(".")
        node = exchange.urls
        for part in parts[:-1]:
            child = node.get(part)
            if not isinstance(child, dict):
                child = {}
                node[part] = child
            node = child
        node[parts[-1]] = url


def ccxt_module(name: str = "ccxt") -> Any:
    """Import a ccxt module (ccxt ships no type information, so it is typed Any here)."""
    return importlib.import_module(name)


def _exchange_options(config: VenueConfig) -> dict[str, Any]:
    return {
        "enableRateLimit": config.rate_limit,
        "newUpdates": True,
        "options": dict(config.options),
    }


def make_rest_exchange(config: VenueConfig) -> Any:
    """A `ccxt.async_support` exchange for REST calls (markets, backfill), decimal-guarded."""
    return _make(ccxt_module("ccxt.async_support"), config)


def make_stream_exchange(config: VenueConfig) -> Any:
    """A `ccxt.pro` exchange for the watch_* streams, decimal-guarded."""
    return _make(ccxt_module("ccxt.pro"), config)


def _make(module: Any, config: VenueConfig) -> Any:
    with ccxt_decimal_context():
        exchange = getattr(module, config.exchange_id)(_exchange_options(config))
        if config.sandbox:
            exchange.set_sandbox_mode(True)
    apply_url_overrides(exchange, config.url_overrides)
    return decimal_guarded(exchange)


def check_exchange_id(exchange_id: str) -> str:
    """Return `exchange_id` if ccxt.pro knows it; ValueError naming a few it does know."""
    if exchange_id not in ccxt_module("ccxt.pro").exchanges:
        raise ValueError(
            f"{exchange_id!r} is not a ccxt.pro exchange "
            "(e.g. binance, bybit, okx, kraken, coinbase)"
        )
    return exchange_id


class SymbolMap:
    """ccxt symbol <-> our instrument id, from the venue's loaded markets."""

    def __init__(self, markets: Mapping[str, Mapping[str, Any]], venue: str) -> None:
        self._to_id: dict[str, str] = {}
        self._to_symbol: dict[str, str] = {}
        for symbol, market in markets.items():
            instrument_id = instrument_id_for(market, venue)
            if instrument_id is not None:
                self._to_id[symbol] = instrument_id
                self._to_symbol[instrument_id] = symbol

    def instrument_id(self, symbol: str) -> str:
        """Our id of a ccxt symbol; KeyError if the venue has no such (mappable) market."""
        try:
            return self._to_id[symbol]
        except KeyError:
            raise KeyError(f"no market {symbol!r} on this venue") from None

    def symbol(self, instrument_id: str) -> str:
        """The ccxt symbol of one of our instrument ids; KeyError if unknown."""
        try:
            return self._to_symbol[instrument_id]
        except KeyError:
            raise KeyError(f"no market for instrument {instrument_id!r}") from None

    def __contains__(self, symbol: object) -> bool:
        return symbol in self._to_id
