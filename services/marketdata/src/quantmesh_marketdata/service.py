"""The marketdata stage service: synthetic, venue or file feed, collection scheduler, recorder."""

from __future__ import annotations

import dataclasses
import gc
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

from quantmesh_common.bus.base import Emit
from quantmesh_common.envelope import Envelope, Event
from quantmesh_common.messages import Bar, ControlAction, ControlCommand, Tick, TickKind
from quantmesh_common.runtime import Service, ServiceContext
from quantmesh_common.topics import Topic, TopicSpec, registry
from quantmesh_marketdata.backfill import FileCursorStore
from quantmesh_marketdata.bars import BarAggregator
from quantmesh_marketdata.config import MarketDataSettings
from quantmesh_marketdata.feed import SyntheticFeed
from quantmesh_marketdata.health import Backoff
from quantmesh_marketdata.markets import MarketsCache, instruments_of, load_markets
from quantmesh_marketdata.recorder import PostgresSink, Recorder, RedisLatest
from quantmesh_marketdata.replay import Pacer, file_records
from quantmesh_marketdata.scheduler import CollectionScheduler, CollectRequest
from quantmesh_marketdata.stream import StreamTuning, VenueStreamer
from quantmesh_marketdata.synthetic import GbmParams
from quantmesh_marketdata.venue import (
    SymbolMap,
    check_exchange_id,
    make_rest_exchange,
    make_stream_exchange,
)

#: None: the stage has handlers.
HANDLERS_ISSUE: int | None = None
#: The most lag (ns) the synthetic feed makes up at full speed once it is behind its schedule.
MAX_CATCH_UP_NS = 1_000_000_000


class MarketDataService(Service[MarketDataSettings]):
    """Publishes ticks and bars from the configured feed; `control` starts and stops it.

    With QM_RECORDER=on, consumer group `marketdata.recorder` also records md.ticks and md.bars
    (whoever published them) to PostgreSQL and keeps latest prices in Redis. Those topics are
    not listed in `consumes`: they are this stage's own output, which `consumes` must not repeat.
    """

    name = "marketdata"
    settings_class = MarketDataSettings

    consumes: ClassVar[tuple[str, ...]] = (Topic.CONTROL,)
    produces: ClassVar[tuple[str, ...]] = (
        Topic.MD_TICKS,
        Topic.MD_BARS,
        Topic.MD_BOOKS,
        Topic.REF_INSTRUMENTS,
        Topic.MD_COLLECTOR,
        Topic.ALERTS,
    )

    def __init__(self, settings: MarketDataSettings) -> None:
        super().__init__(settings)
        self.feeding = settings.feed_autostart
        self.published = 0
        self.recorder: Recorder | None = None
        self.streamer: VenueStreamer | None = None
        self.scheduler: CollectionScheduler | None = None
        self._bars: dict[str, BarAggregator] = {}
        self.prefix = settings.marketdata_topic_prefix
        #: Events the file replay (QM_FEED=replay) published; `replay_done` once it has ended.
        self.replayed = 0
        self.replay_done = False
        self._specs: dict[str, TopicSpec | None] = {}

    async def setup(self, ctx: ServiceContext[MarketDataSettings]) -> None:
        """Subscribe to `control`; run the feed as a background task when one is configured."""
        p = self.prefix
        ctx.subscribe(f"{p}{self.name}.control", [p + Topic.CONTROL], self.on_control_async)
        self._ctx = ctx
        state = Path(self.settings.collector_state_dir)
        self.scheduler = CollectionScheduler(
            self._collector_exchange,
            FileCursorStore(state / "cursors.json"),
            lambda topic, event, ts: self._publish(ctx, topic, event, ts),
            ctx.clock,
        )
        if self.settings.feed == "synthetic":
            ctx.add_task(lambda: self._run_synthetic(ctx), "synthetic-feed")
        elif self.settings.feed == "venue":
            ctx.add_task(lambda: self._run_venue(ctx), "venue-feed")
        elif self.settings.feed == "replay":
            ctx.add_task(lambda: self._run_replay(ctx), "replay-feed")
        else:
            ctx.logger.warning("QM_FEED=none: marketdata publishes nothing until a feed is set")
        if self.settings.recorder == "on":
            self._setup_recorder(ctx)
        # What exists now (modules, pydantic's schemas) lives as long as the process: frozen
        # out of the collector's sight, a full collection (tens of ms) no longer walks it.
        # Garbage is collected first, so none of it is kept for good.
        gc.collect()
        gc.freeze()

    def _setup_recorder(self, ctx: ServiceContext[MarketDataSettings]) -> None:
        s = self.settings
        recorder = Recorder(
            PostgresSink(ctx.require_pg()),
            RedisLatest(ctx.require_redis(), s.redis_prefix),
            ctx.clock,
            batch_rows=s.recorder_batch_rows,
            flush_interval_s=s.recorder_flush_ms / 1000,
        )
        self.recorder = recorder
        p = self.prefix
        ctx.subscribe(
            f"{p}{self.name}.recorder", [p + Topic.MD_TICKS, p + Topic.MD_BARS], recorder.handle
        )
        ctx.add_task(recorder.run, "recorder-flush")

    async def teardown(self, ctx: ServiceContext[MarketDataSettings]) -> None:
        """Stop the scheduler; store what the recorder still buffers."""
        if self.scheduler is not None:
            await self.scheduler.stop()
        if self.recorder is not None:
            # Unconditional: flush() first waits for a flush the timer task has in flight, which
            # would otherwise be cancelled between storing its rows and updating Redis.
            result = await self.recorder.flush()
            ctx.logger.info("recorder flushed %d ticks, %d bars", result.ticks, result.bars)

    def on_control(self, envelope: Envelope[Any]) -> list[Emit]:
        """COLLECTOR_START / COLLECTOR_STOP for target '*' or this service pause the feed."""
        command: ControlCommand = envelope.payload
        if command.target not in ("*", self.name):
            return []
        if command.action is ControlAction.COLLECTOR_START and not command.params:
            self.feeding = True
        elif command.action is ControlAction.COLLECTOR_STOP:
            self.feeding = False
        return []

    async def on_control_async(self, envelope: Envelope[Any]) -> list[Emit]:
        """The feed switch above, plus the scheduler.

        COLLECTOR_START with params (symbols, timeframes, interval, since, until, lookback,
        venue: see CollectRequest) starts collection; COLLECTOR_STOP stops it and the feed.
        Unusable params are answered with a FAILED CollectorStatus naming the reason.
        """
        emits = self.on_control(envelope)
        command: ControlCommand = envelope.payload
        if command.target not in ("*", self.name) or self.scheduler is None:
            return emits
        if command.action is ControlAction.COLLECTOR_START and command.params:
            try:
                request = CollectRequest.from_params(command.params)
            except ValueError as exc:
                await self.scheduler.rejected(str(exc))
                return emits
            await self.scheduler.start(request)
        elif command.action is ControlAction.COLLECTOR_STOP:
            await self.scheduler.stop()
        return emits

    async def _publish(
        self, ctx: ServiceContext[MarketDataSettings], topic: str, event: Event, ts_event: int
    ) -> None:
        await self._send(ctx, topic, event, ts_event)
        self.published += 1

    async def _send(
        self,
        ctx: ServiceContext[MarketDataSettings],
        topic: str,
        event: Event,
        ts_event: int | None = None,
    ) -> None:
        """Publish on `topic` (prefixed), keyed as the registry keys the unprefixed topic."""
        if not self.prefix:
            await ctx.bus.publish(topic, event, ts_event=ts_event)
            return
        try:
            spec = self._specs[topic]
        except KeyError:
            spec = self._specs[topic] = registry().get(topic)
        key = spec.key_of(event) if spec is not None else None
        await ctx.bus.publish(self.prefix + topic, event, key=key, ts_event=ts_event)

    async def _collector_exchange(self, venue: str | None) -> tuple[Any, str]:
        """A REST exchange with markets loaded (cache first) for the scheduler's backfills."""
        s = self.settings
        config = s.venue_config()
        if venue and venue.strip().lower() != config.exchange_id:
            config = dataclasses.replace(
                config, exchange_id=check_exchange_id(venue.strip().lower()), url_overrides={}
            )
        if not config.exchange_id:
            raise ValueError("no venue: set QM_VENUE or params.venue")
        exchange = make_rest_exchange(config)
        try:
            await load_markets(
                exchange,
                MarketsCache(s.markets_cache_dir),
                self._ctx.clock.now_ns(),
                sandbox=config.sandbox,
                max_age_ns=int(s.markets_max_age_h * 3600e9),
            )
        except BaseException:
            await exchange.close()
            raise
        return exchange, config.venue

    async def _run_venue(self, ctx: ServiceContext[MarketDataSettings]) -> None:
        """Markets (cache first, retried until loaded), Instrument events, then the streams."""
        s = self.settings
        config = s.venue_config()
        exchange = make_stream_exchange(config)
        backoff = Backoff(base_s=s.venue_backoff_s, cap_s=s.venue_backoff_max_s)
        while True:
            try:
                markets, source = await load_markets(
                    exchange,
                    MarketsCache(s.markets_cache_dir),
                    ctx.clock.now_ns(),
                    sandbox=config.sandbox,
                    max_age_ns=int(s.markets_max_age_h * 3600e9),
                )
                break
            except Exception as exc:  # unreachable venue and nothing cached: keep trying
                delay = backoff.next_delay()
                ctx.logger.warning("%s markets: %s; retry in %.1f s", config.venue, exc, delay)
                await ctx.clock.sleep(delay)
        symbols = SymbolMap(markets, config.venue)
        known = tuple(sym for sym in config.symbols if sym in symbols)
        missing = sorted(set(config.symbols) - set(known))
        if missing:
            ctx.logger.error("QM_VENUE_SYMBOLS not on %s: %s", config.venue, ", ".join(missing))
        ctx.logger.info("%s: %d markets from the %s", config.venue, len(markets), source)
        for instrument in instruments_of(
            markets, config.venue, exchange.precisionMode, list(known)
        ):
            await self._send(ctx, Topic.REF_INSTRUMENTS, instrument)
        if not known:
            await exchange.close()
            return
        self.streamer = VenueStreamer(
            exchange,
            dataclasses.replace(config, symbols=known),
            symbols,
            lambda topic, event, ts: self._publish_venue(ctx, topic, event, ts),
            ctx.clock,
            StreamTuning(
                backoff_base_s=s.venue_backoff_s,
                backoff_cap_s=s.venue_backoff_max_s,
                stale_after_s=s.venue_stale_s,
            ),
        )
        await self.streamer.run()

    async def _publish_venue(
        self, ctx: ServiceContext[MarketDataSettings], topic: str, event: Event, ts_event: int
    ) -> None:
        """Publish a venue event (dropped while paused), and bars from its trades."""
        if not self.feeding and topic != Topic.ALERTS:
            return
        await self._publish(ctx, topic, event, ts_event)
        if isinstance(event, Tick) and event.kind is TickKind.TRADE:
            aggregator = self._bars.get(event.instrument_id)
            if aggregator is None:
                aggregator = BarAggregator(event.instrument_id, self.settings.bar_interval)
                self._bars[event.instrument_id] = aggregator
            for bar in aggregator.update(event):
                await self._publish(ctx, Topic.MD_BARS, bar, bar.ts_close)

    async def _run_synthetic(self, ctx: ServiceContext[MarketDataSettings]) -> None:
        s = self.settings
        params = GbmParams(
            start_price=s.start_price,
            volatility=s.volatility,
            interval_ns=int(1_000_000_000 / s.feed_rate),
        )
        clock = ctx.clock
        feed = SyntheticFeed(s.instrument_ids(), params, clock.now_ns(), s.seed, s.bar_interval)
        period_ns = int(1_000_000_000 / s.feed_rate)
        # Steps are due on a schedule, so the time spent publishing a step counts towards its
        # period: a fixed pause after each step ran the feed slower than QM_FEED_RATE (915 of
        # 2,000 ticks/s asked in bench_rss). Behind schedule the feed runs flat out, but never
        # makes up more than MAX_CATCH_UP_NS of lag in a burst (after a stall; none after a pause).
        due = clock.now_ns()
        while True:
            if not self.feeding:
                await clock.sleep(0.1)
                due = clock.now_ns()
                continue
            for topic, event in feed.step():
                ts = event.ts_close if isinstance(event, Bar) else event.ts_event  # type: ignore[attr-defined]
                await self._send(ctx, topic, event, ts)
                self.published += 1
            due += period_ns
            now = clock.now_ns()
            if due > now:
                await clock.sleep((due - now) / 1_000_000_000)
            else:
                await clock.sleep(0)  # the stage's other tasks still get their turn
                due = max(due, now - MAX_CATCH_UP_NS)

    async def _run_replay(self, ctx: ServiceContext[MarketDataSettings]) -> None:
        """Publish the events of QM_REPLAY_FILE once, paced by QM_REPLAY_SPEED in event time.

        The file is the first instrument's; a pause (COLLECTOR_STOP) holds the replay where it
        is, and the pacing restarts from the next event on resume.
        """
        s = self.settings
        path = Path(s.replay_file)
        instrument_id = s.instrument_ids()[0]
        speed = s.replay_speed or None
        pacer = Pacer(ctx.clock, speed)
        publish = ctx.bus.publish
        # A bus that can queue without a coroutine (Kafka's, while its producer has room) is
        # asked first; None from it means nothing was queued, and `publish` waits for room.
        publish_nowait: Callable[..., Envelope[Any] | None] | None = getattr(
            ctx.bus, "publish_nowait", None
        )
        prefix = self.prefix
        # Per topic: its prefixed name, and the key of the unprefixed topic as _send finds it,
        # looked up once rather than per event. Every event of the file is `instrument_id`'s,
        # so a topic keyed by instrument has that one key; the spec is kept (to key each
        # event) only for a topic keyed by another field.
        routes: dict[str, tuple[str, TopicSpec | None, str | None]] = {}
        for topic, event, ts in file_records(path, instrument_id, s.bar_interval):
            while not self.feeding:
                pacer = Pacer(ctx.clock, speed)
                await ctx.clock.sleep(0.1)
            if speed is not None:
                await pacer.wait(ts)
            if prefix:
                try:
                    name, spec, key = routes[topic]
                except KeyError:
                    name, spec, key = routes[topic] = _replay_route(prefix, topic, instrument_id)
                if spec is not None:
                    key = spec.key_of(event)
                if (
                    publish_nowait is None
                    or publish_nowait(name, event, key=key, ts_event=ts) is None
                ):
                    await publish(name, event, key=key, ts_event=ts)
            elif publish_nowait is None or publish_nowait(topic, event, ts_event=ts) is None:
                await publish(topic, event, ts_event=ts)
            self.published += 1
            self.replayed += 1
            if self.replayed % 1_000 == 0:
                # A replay as fast as possible must still let the stage's other tasks run.
                await ctx.clock.sleep(0)
        self.replay_done = True
        ctx.logger.info(
            "replayed %d events of %s",
            self.replayed,
            path,
            extra={"file": str(path), "events": self.replayed},
        )


def _replay_route(
    prefix: str, topic: str, instrument_id: str
) -> tuple[str, TopicSpec | None, str | None]:
    """(prefixed name, spec to key each event by or None, the key when it is the same for
    every event) of a replay's `topic`, all of whose events are `instrument_id`'s."""
    spec = registry().get(topic)
    if spec is None:
        return prefix + topic, None, None
    if spec.key_field == "instrument_id":
        return prefix + topic, None, instrument_id
    return prefix + topic, spec, None
