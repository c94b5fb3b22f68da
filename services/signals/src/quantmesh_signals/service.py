"""The signals stage service: runs the configured strategies over bars and ticks."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any, ClassVar

from quantmesh_common.bus.base import Emit
from quantmesh_common.envelope import Envelope, Event
from quantmesh_common.messages import (
    Bar,
    ControlCommand,
    ExecutionReport,
    OrderIntent,
    Signal,
    Tick,
)
from quantmesh_common.runtime import Service, ServiceContext
from quantmesh_common.topics import Topic
from quantmesh_signals.config import SignalsSettings
from quantmesh_signals.engine import SignalsEngine
from quantmesh_signals.replay import replay_consumed

#: None: the stage has its handlers (the generic stage suite then requires subscriptions).
HANDLERS_ISSUE: int | None = None

#: Default consumer group of the market-data and execution-report subscription
#: (QM_SIGNALS_GROUP); instances sharing it split the instruments between them.
GROUP = "signals"


def to_emits(events: Sequence[Event], prefix: str = "") -> list[Emit]:
    """Route what the strategies produced to its topic, stamped with its own event time.

    Keys are given explicitly (intents by account, signals by instrument, as the registry
    has them) so that prefixed topic names keep the same partitioning.
    """
    emits: list[Emit] = []
    for event in events:
        if isinstance(event, OrderIntent):
            emits.append(
                Emit(prefix + Topic.ORDERS_INTENTS, event, event.account_id, event.ts_event)
            )
        elif isinstance(event, Signal):
            emits.append(Emit(prefix + Topic.SIGNALS, event, event.instrument_id, event.ts_event))
        else:  # pragma: no cover - the context only ever builds the two above
            raise TypeError(f"strategies cannot publish {type(event).__name__}")
    return emits


class SignalsService(Service[SignalsSettings]):
    """Feeds md.bars and md.ticks to the strategies configured in QM_STRATEGIES, their fills
    from exec.reports, and halt/resume/kill-switch commands from control; publishes their
    order intents (and a Signal whenever a target changes).

    Groups (QM_SIGNALS_GROUP = `g`): `g` reads market data and fills, split by instrument
    between instances; `g.joint` reads the re-published data of joint strategies (Kafka
    only); `g.control.<QM_SIGNALS_INSTANCE>` reads every command, one group per instance.
    """

    name = "signals"
    settings_class = SignalsSettings

    consumes: ClassVar[tuple[str, ...]] = (
        Topic.MD_TICKS,
        Topic.MD_BARS,
        Topic.EXEC_REPORTS,
        Topic.CONTROL,
    )
    produces: ClassVar[tuple[str, ...]] = (
        Topic.SIGNALS,
        Topic.ORDERS_INTENTS,
    )

    def __init__(self, settings: SignalsSettings) -> None:
        super().__init__(settings)
        # Re-keying through a topic only makes sense where instances can split the data.
        self.routes_joint = settings.bus == "kafka"
        self.engine = SignalsEngine.from_specs(settings.strategies, route_joint=self.routes_joint)
        prefix = self.prefix = settings.signals_topic_prefix
        self.group = settings.signals_group
        self.joint_group = f"{self.group}.joint"
        self.control_group = f"{self.group}.control.{settings.signals_instance}"
        self.data_topics = [prefix + t for t in (Topic.MD_BARS, Topic.MD_TICKS, Topic.EXEC_REPORTS)]
        self.joint_topics = [prefix + Topic.SIGNALS_JOINT_BARS, prefix + Topic.SIGNALS_JOINT_TICKS]
        self.control_topics = [prefix + Topic.CONTROL]
        self.replayed = 0

    async def setup(self, ctx: ServiceContext[SignalsSettings]) -> None:
        """Start the strategies, rebuild their state, subscribe the data and control handlers."""
        for emit in to_emits(self.engine.start(ctx.clock.now_ns()), self.prefix):
            await ctx.bus.publish(emit.topic, emit.payload, key=emit.key, ts_event=emit.ts_event)
        settings = ctx.settings
        if settings.bus == "kafka" and settings.signals_replay and settings.kafka_bootstrap:
            await asyncio.get_running_loop().run_in_executor(
                None, self._replay, settings.kafka_bootstrap
            )
        ctx.logger.info(
            "running %d strategies",
            len(self.engine.hosts),
            extra={"strategies": list(self.engine.hosts), "replayed": self.replayed},
        )
        ctx.subscribe(self.group, self.data_topics, self.on_event)
        if self.routes_joint and any(type(h.strategy).joint for h in self.engine.hosts.values()):
            ctx.subscribe(self.joint_group, self.joint_topics, self.on_joint)
        ctx.subscribe(self.control_group, self.control_topics, self.on_control)

    def _replay(self, bootstrap: str) -> None:
        """Feed the engine what this service's groups consumed before: output discarded.

        Commands last, so the switches end as the last commands left them (their timing
        relative to the data is not known across topics).
        """
        joint = self.routes_joint and any(
            type(h.strategy).joint for h in self.engine.hosts.values()
        )
        plan = [(self.group, self.data_topics, self.on_event)]
        if joint:
            plan.append((self.joint_group, self.joint_topics, self.on_joint))
        plan.append((self.control_group, self.control_topics, self.on_control))
        for group, topics, handle in plan:
            self.replayed += replay_consumed(bootstrap, group, topics, handle)

    async def teardown(self, ctx: ServiceContext[SignalsSettings]) -> None:
        """Stop the strategies, publishing whatever their on_stop asked for."""
        for emit in to_emits(self.engine.stop(ctx.clock.now_ns()), self.prefix):
            await ctx.bus.publish(emit.topic, emit.payload, key=emit.key, ts_event=emit.ts_event)

    def on_event(self, envelope: Envelope[Any]) -> list[Emit]:
        """Handle a bar, a tick or an execution report."""
        payload = envelope.payload
        engine = self.engine
        if isinstance(payload, Tick):
            out = to_emits(engine.on_tick(payload), self.prefix)
            key = engine.joint_key(payload.instrument_id) if self.routes_joint else None
            if key is not None:
                out.append(Emit(self.joint_topics[1], payload, key, envelope.ts_event))
            return out
        if isinstance(payload, Bar):
            out = to_emits(engine.on_bar(payload), self.prefix)
            key = engine.joint_key(payload.instrument_id) if self.routes_joint else None
            if key is not None:
                out.append(Emit(self.joint_topics[0], payload, key, envelope.ts_event))
            return out
        if isinstance(payload, ExecutionReport):
            return to_emits(engine.on_report(payload), self.prefix)
        return []

    def on_joint(self, envelope: Envelope[Any]) -> list[Emit]:
        """Handle market data re-published for the joint strategies (keyed by their group)."""
        payload = envelope.payload
        if isinstance(payload, Bar):
            return to_emits(self.engine.on_joint_bar(payload), self.prefix)
        if isinstance(payload, Tick):
            return to_emits(self.engine.on_joint_tick(payload), self.prefix)
        return []

    def on_control(self, envelope: Envelope[Any]) -> list[Emit]:
        """Handle an operator command."""
        payload = envelope.payload
        if isinstance(payload, ControlCommand):
            return to_emits(self.engine.on_control(payload, self.name), self.prefix)
        return []
