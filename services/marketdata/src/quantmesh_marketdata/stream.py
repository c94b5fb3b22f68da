"""ccxt.pro streams of one venue: watch loops with reconnect, stale detection and book resync."""

from __future__ import annotations

import asyncio
import logging
import random
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from quantmesh_common.ccxt_context import decimal_guarded
from quantmesh_common.clock import Clock
from quantmesh_common.envelope import Event
from quantmesh_common.messages import Alert
from quantmesh_common.topics import Topic
from quantmesh_marketdata.health import Backoff, FeedHealth
from quantmesh_marketdata.normalize import (
    NormalizeError,
    order_book_to_snapshot,
    ticker_to_quote,
    trade_to_tick,
)
from quantmesh_marketdata.venue import SymbolMap, VenueConfig, ccxt_module

log = logging.getLogger(__name__)

#: publish(topic, event, ts_event): how the streamer hands events to the bus.
Publish = Callable[[str, Event, int], Awaitable[None]]

#: Venues whose public trade ids are consecutive integers per symbol, so a skip is a gap.
SEQUENTIAL_TRADE_IDS = frozenset({"binance", "binanceus", "binanceusdm", "binancecoinm"})

_RECENT_TRADE_IDS = 2048


@dataclass(frozen=True, slots=True)
class StreamTuning:
    """Reconnect and staleness settings of the watch loops."""

    backoff_base_s: float = 0.5
    backoff_cap_s: float = 30.0
    stale_after_s: float = 30.0
    stale_check_s: float = 1.0


class VenueStreamer:
    """Runs one watch loop per (channel, symbol) and publishes normalised events.

    A failed watch (connection lost or refused) raises FEED_DISCONNECTED once and retries after
    an exponential backoff with jitter; ccxt.pro opens a new connection and subscribes again.
    A book whose update sequence breaks (ccxt raises InvalidNonce / ChecksumError and drops it)
    raises BOOK_RESYNC and is watched again at once, which makes ccxt fetch a new snapshot and
    apply the buffered deltas after it. A trade seen before (a replay after a reconnect) is
    not published twice.
    """

    def __init__(
        self,
        exchange: Any,
        config: VenueConfig,
        symbols: SymbolMap,
        publish: Publish,
        clock: Clock,
        tuning: StreamTuning | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.exchange = decimal_guarded(exchange)  # ccxt must not change our decimal context
        self.config = config
        self.symbols = symbols
        self.publish = publish
        self.clock = clock
        self.tuning = tuning or StreamTuning()
        self.rng = rng or random.Random()
        self.health = FeedHealth(
            config.venue,
            int(self.tuning.stale_after_s * 1e9),
            sequential_trade_ids=config.exchange_id in SEQUENTIAL_TRADE_IDS,
        )
        self.published = 0
        self.reconnects = 0
        self.resyncs = 0
        self._seen: dict[str, tuple[set[str], deque[str]]] = {}

    async def run(self) -> None:
        """Watch every configured channel and symbol until cancelled; closes the exchange."""
        now = self.clock.now_ns()
        loops = []
        for channel in self.config.channels:
            for symbol in self.config.symbols:
                self.health.register(channel, self.symbols.instrument_id(symbol), now)
                loops.append(self._watch_loop(channel, symbol))
        try:
            await asyncio.gather(self._stale_loop(), *loops)
        finally:
            await self.exchange.close()

    async def _stale_loop(self) -> None:
        while True:
            await self.clock.sleep(self.tuning.stale_check_s)
            await self._alerts(self.health.check_stale(self.clock.now_ns()))

    async def _alerts(self, alerts: list[Alert]) -> None:
        for alert in alerts:
            log.log(30 if alert.severity != "INFO" else 20, "%s: %s", alert.code, alert.message)
            await self.publish(Topic.ALERTS, alert, alert.ts_event)

    async def _watch_loop(self, channel: str, symbol: str) -> None:
        ccxt = ccxt_module()
        instrument_id = self.symbols.instrument_id(symbol)
        backoff = Backoff(self.tuning.backoff_base_s, self.tuning.backoff_cap_s, rng=self.rng)
        while True:
            try:
                events = await self._watch_once(channel, symbol, instrument_id)
            except ccxt.InvalidNonce as exc:  # before NetworkError: InvalidNonce is one
                self.resyncs += 1
                await self._alerts(
                    self.health.on_book_gap(instrument_id, str(exc), self.clock.now_ns())
                )
                continue
            except (ccxt.NetworkError, ccxt.ExchangeError, OSError) as exc:
                delay = backoff.next_delay()
                self.reconnects += 1
                log.info(
                    "%s %s %s: %s; retry in %.2f s", self.config.venue, channel, symbol, exc, delay
                )
                await self._alerts(
                    self.health.on_disconnect(
                        channel,
                        instrument_id,
                        str(exc) or type(exc).__name__,
                        delay,
                        self.clock.now_ns(),
                    )
                )
                await self.clock.sleep(delay)
                continue
            except (NormalizeError, ValueError) as exc:
                # e.g. a crossed book: not worth a reconnect, but never silently dropped
                log.warning(
                    "%s %s %s: unusable update skipped: %s", self.config.venue, channel, symbol, exc
                )
                continue
            backoff.reset()
            await self._alerts(self.health.on_update(channel, instrument_id, self.clock.now_ns()))
            for topic, event, ts_event in events:
                await self.publish(topic, event, ts_event)
                self.published += 1

    async def _watch_once(
        self, channel: str, symbol: str, instrument_id: str
    ) -> list[tuple[str, Event, int]]:
        if channel == "trades":
            trades = await self.exchange.watch_trades(symbol)
            now = self.clock.now_ns()
            out: list[tuple[str, Event, int]] = []
            for trade in trades:
                if self._duplicate(instrument_id, trade.get("id")):
                    continue
                try:
                    tick = trade_to_tick(trade, instrument_id, now)
                except (NormalizeError, ValueError) as exc:
                    log.warning("%s trade skipped: %s", instrument_id, exc)
                    continue
                await self._alerts(self.health.on_trade_id(instrument_id, tick.trade_id, now))
                out.append((Topic.MD_TICKS, tick, tick.ts_event))
            return out
        if channel == "ticker":
            ticker = await self.exchange.watch_ticker(symbol)
            quote = ticker_to_quote(ticker, instrument_id, self.clock.now_ns())
            return [] if quote is None else [(Topic.MD_TICKS, quote, quote.ts_event)]
        if channel == "bidask":
            quotes = await self.exchange.watch_bids_asks([symbol])
            best = (quotes or {}).get(symbol)
            quote = (
                None if best is None else ticker_to_quote(best, instrument_id, self.clock.now_ns())
            )
            return [] if quote is None else [(Topic.MD_TICKS, quote, quote.ts_event)]
        if channel == "book":
            book = await self.exchange.watch_order_book(symbol)
            snapshot = order_book_to_snapshot(
                book, instrument_id, self.config.book_depth, self.clock.now_ns()
            )
            return [(Topic.MD_BOOKS, snapshot, snapshot.ts_event)]
        raise ValueError(f"unknown channel {channel!r}")

    def _duplicate(self, instrument_id: str, trade_id: Any) -> bool:
        if trade_id is None:
            return False
        seen, order = self._seen.setdefault(instrument_id, (set(), deque()))
        key = str(trade_id)
        if key in seen:
            return True
        seen.add(key)
        order.append(key)
        if len(order) > _RECENT_TRADE_IDS:
            seen.discard(order.popleft())
        return False
