"""Markets metadata (tick, lot, min notional) cached in a file, so a restart needs no venue."""

from __future__ import annotations

import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from quantmesh_common.ccxt_context import decimal_guarded
from quantmesh_common.messages import Instrument
from quantmesh_marketdata.normalize import market_to_instrument
from quantmesh_marketdata.venue import ccxt_module

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class CachedMarkets:
    """The markets of one venue as ccxt loaded them, and when (UTC ns)."""

    markets: dict[str, Any]
    fetched_ns: int


class MarketsCache:
    """One JSON file per venue (and sandbox flag) under `directory`, written atomically."""

    def __init__(self, directory: Path | str) -> None:
        self.directory = Path(directory)

    def path(self, exchange_id: str, sandbox: bool = False) -> Path:
        """Where the markets of `exchange_id` are kept."""
        return self.directory / f"{exchange_id}{'-sandbox' if sandbox else ''}.markets.json"

    def load(self, exchange_id: str, sandbox: bool = False) -> CachedMarkets | None:
        """The cached markets, or None if there is no readable cache file."""
        path = self.path(exchange_id, sandbox)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            return CachedMarkets(dict(data["markets"]), int(data["fetched_ns"]))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("markets cache %s is unreadable (%s); ignoring it", path, exc)
            return None

    def save(
        self, exchange_id: str, markets: dict[str, Any], now_ns: int, sandbox: bool = False
    ) -> Path:
        """Write the markets (atomically: a crash leaves the old file or the new one)."""
        path = self.path(exchange_id, sandbox)
        path.parent.mkdir(parents=True, exist_ok=True)
        payload = json.dumps({"fetched_ns": now_ns, "markets": markets}, default=str)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                handle.write(payload)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path


async def load_markets(
    exchange: Any,
    cache: MarketsCache,
    now_ns: int,
    *,
    sandbox: bool = False,
    max_age_ns: int = 24 * 3600 * 1_000_000_000,
) -> tuple[dict[str, Any], str]:
    """Give `exchange` its markets: from a fresh cache, else the venue, else a stale cache.

    Returns the markets and where they came from (`cache`, `venue`, `stale-cache`). Raises
    ccxt's error when the venue is unreachable and nothing is cached. The calls into ccxt run
    under a copy of the caller's decimal context (ccxt would set ROUND_HALF_UP on it).
    """
    ccxt = ccxt_module()
    exchange = decimal_guarded(exchange)
    cached = cache.load(exchange.id, sandbox)
    if cached is not None and now_ns - cached.fetched_ns < max_age_ns:
        exchange.set_markets(cached.markets)
        return cached.markets, "cache"
    try:
        markets = dict(await exchange.load_markets(reload=True))
    except ccxt.BaseError as exc:
        if cached is None:
            raise
        log.warning(
            "%s: markets from the venue failed (%s); using the cached ones", exchange.id, exc
        )
        exchange.set_markets(cached.markets)
        return cached.markets, "stale-cache"
    cache.save(exchange.id, markets, now_ns, sandbox)
    return markets, "venue"


def instruments_of(
    markets: dict[str, Any], venue: str, precision_mode: int, symbols: list[str] | None = None
) -> list[Instrument]:
    """Instrument events for `symbols` (every mappable market when None), sorted by id."""
    chosen = markets if symbols is None else {s: markets[s] for s in symbols if s in markets}
    out = [
        instrument
        for market in chosen.values()
        if (instrument := market_to_instrument(market, venue, precision_mode)) is not None
    ]
    return sorted(out, key=lambda i: i.instrument_id)
