"""The marketdata stage service: the synthetic feed, paused through `control`, and the recorder."""

from __future__ import annotations

from typing import Any, ClassVar

from quantmesh_common.bus.base import Emit
from quantmesh_common.envelope import Envelope
from quantmesh_common.messages import Bar, ControlAction, ControlCommand
from quantmesh_common.runtime import Service, ServiceContext
from quantmesh_common.topics import Topic
from quantmesh_marketdata.config import MarketDataSettings
from quantmesh_marketdata.feed import SyntheticFeed
from quantmesh_marketdata.recorder import PostgresSink, Recorder, RedisLatest
from quantmesh_marketdata.synthetic import GbmParams

#: None: the stage has handlers (venues and the scheduler are still to come: README).
HANDLERS_ISSUE: int | None = None


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
    )

    def __init__(self, settings: MarketDataSettings) -> None:
        super().__init__(settings)
        self.feeding = settings.feed_autostart
        self.published = 0
        self.recorder: Recorder | None = None

    async def setup(self, ctx: ServiceContext[MarketDataSettings]) -> None:
        """Subscribe to `control`; run the feed as a background task when one is configured."""
        ctx.subscribe(f"{self.name}.control", [Topic.CONTROL], self.on_control)
        if self.settings.feed == "synthetic":
            ctx.add_task(lambda: self._run_synthetic(ctx), "synthetic-feed")
        else:
            ctx.logger.warning("QM_FEED=none: marketdata publishes nothing until a feed is set")
        if self.settings.recorder == "on":
            self._setup_recorder(ctx)

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
        ctx.subscribe(f"{self.name}.recorder", [Topic.MD_TICKS, Topic.MD_BARS], recorder.handle)
        ctx.add_task(recorder.run, "recorder-flush")

    async def teardown(self, ctx: ServiceContext[MarketDataSettings]) -> None:
        """Store what the recorder still buffers (its subscription has stopped by now)."""
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
        if command.action is ControlAction.COLLECTOR_START:
            self.feeding = True
        elif command.action is ControlAction.COLLECTOR_STOP:
            self.feeding = False
        return []

    async def _run_synthetic(self, ctx: ServiceContext[MarketDataSettings]) -> None:
        s = self.settings
        params = GbmParams(
            start_price=s.start_price,
            volatility=s.volatility,
            interval_ns=int(1_000_000_000 / s.feed_rate),
        )
        feed = SyntheticFeed(s.instrument_ids(), params, ctx.clock.now_ns(), s.seed, s.bar_interval)
        pause = 1.0 / s.feed_rate
        while True:
            if not self.feeding:
                await ctx.clock.sleep(0.1)
                continue
            for topic, event in feed.step():
                ts = event.ts_close if isinstance(event, Bar) else event.ts_event  # type: ignore[attr-defined]
                await ctx.bus.publish(topic, event, ts_event=ts)
                self.published += 1
            await ctx.clock.sleep(pause)
