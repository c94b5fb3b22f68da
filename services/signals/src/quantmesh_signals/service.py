"""The signals stage service: runs the configured strategies over bars and ticks."""

from __future__ import annotations

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

#: None: the stage has its handlers (the generic stage suite then requires subscriptions).
HANDLERS_ISSUE: int | None = None

#: Consumer group of the market-data and execution-report subscription.
GROUP = "signals"
#: Consumer group of the control subscription, kept apart so that it can become one group
#: per instance (every instance must see every command) without touching the data path.
CONTROL_GROUP = "signals.control"


def to_emits(events: Sequence[Event]) -> list[Emit]:
    """Route what the strategies produced to its topic, stamped with its own event time."""
    emits: list[Emit] = []
    for event in events:
        if isinstance(event, OrderIntent):
            emits.append(Emit(Topic.ORDERS_INTENTS, event, ts_event=event.ts_event))
        elif isinstance(event, Signal):
            emits.append(Emit(Topic.SIGNALS, event, ts_event=event.ts_event))
        else:  # pragma: no cover - the context only ever builds the two above
            raise TypeError(f"strategies cannot publish {type(event).__name__}")
    return emits


class SignalsService(Service[SignalsSettings]):
    """Feeds md.bars and md.ticks to the strategies configured in QM_STRATEGIES, their fills
    from exec.reports, and halt/resume/kill-switch commands from control; publishes their
    order intents (and a Signal whenever a target changes)."""

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
        self.engine = SignalsEngine.from_specs(settings.strategies)

    async def setup(self, ctx: ServiceContext[SignalsSettings]) -> None:
        """Start the strategies and subscribe the data and control handlers."""
        for emit in to_emits(self.engine.start(ctx.clock.now_ns())):
            await ctx.bus.publish(emit.topic, emit.payload, ts_event=emit.ts_event)
        ctx.logger.info(
            "running %d strategies",
            len(self.engine.hosts),
            extra={"strategies": list(self.engine.hosts)},
        )
        ctx.subscribe(GROUP, [Topic.MD_BARS, Topic.MD_TICKS, Topic.EXEC_REPORTS], self.on_event)
        ctx.subscribe(CONTROL_GROUP, [Topic.CONTROL], self.on_control)

    async def teardown(self, ctx: ServiceContext[SignalsSettings]) -> None:
        """Stop the strategies, publishing whatever their on_stop asked for."""
        for emit in to_emits(self.engine.stop(ctx.clock.now_ns())):
            await ctx.bus.publish(emit.topic, emit.payload, ts_event=emit.ts_event)

    def on_event(self, envelope: Envelope[Any]) -> list[Emit]:
        """Handle a bar, a tick or an execution report."""
        payload = envelope.payload
        if isinstance(payload, Bar):
            return to_emits(self.engine.on_bar(payload))
        if isinstance(payload, Tick):
            return to_emits(self.engine.on_tick(payload))
        if isinstance(payload, ExecutionReport):
            return to_emits(self.engine.on_report(payload))
        return []

    def on_control(self, envelope: Envelope[Any]) -> list[Emit]:
        """Handle an operator command."""
        payload = envelope.payload
        if isinstance(payload, ControlCommand):
            return to_emits(self.engine.on_control(payload, self.name))
        return []
