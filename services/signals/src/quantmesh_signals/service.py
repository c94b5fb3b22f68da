"""The signals stage service: runs the configured strategies over bars and ticks."""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any, ClassVar

from quantmesh_common.bus.base import Emit
from quantmesh_common.envelope import Envelope, Event
from quantmesh_common.messages import (
    Bar,
    ControlCommand,
    ExecutionReport,
    OrderIntent,
    Signal,
    StrategyStatus,
    Tick,
)
from quantmesh_common.runtime import Service, ServiceContext
from quantmesh_common.topics import Topic, registry
from quantmesh_signals.config import SignalsSettings
from quantmesh_signals.engine import SignalsEngine
from quantmesh_signals.replay import committed_offsets, replay_range
from quantmesh_signals.snapshot import Offsets, Snapshot, SnapshotStore, config_digest

log = logging.getLogger(__name__)

#: None: the stage has its handlers (the generic stage suite then requires subscriptions).
HANDLERS_ISSUE: int | None = None

#: Default consumer group of the market-data and execution-report subscription
#: (QM_SIGNALS_GROUP); instances sharing it split the instruments between them.
GROUP = "signals"


def to_emits(events: Sequence[Event], prefix: str = "", instance: str = "") -> list[Emit]:
    """Route what the strategies produced to its topic, stamped with its own event time.

    Keys are given explicitly (intents by account, signals by instrument, statuses by
    strategy, as the registry has them) so that prefixed topic names keep the same
    partitioning. A status is stamped with the publishing `instance`.
    """
    emits: list[Emit] = []
    for event in events:
        if isinstance(event, OrderIntent):
            emits.append(
                Emit(prefix + Topic.ORDERS_INTENTS, event, event.account_id, event.ts_event)
            )
        elif isinstance(event, Signal):
            emits.append(Emit(prefix + Topic.SIGNALS, event, event.instrument_id, event.ts_event))
        elif isinstance(event, StrategyStatus):
            status = event.model_copy(update={"instance": instance})
            emits.append(Emit(prefix + Topic.STRATEGIES, status, event.strategy_id, event.ts_event))
        else:  # pragma: no cover - the engine only ever builds the three above
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
        Topic.STRATEGIES,
    )

    def __init__(self, settings: SignalsSettings) -> None:
        super().__init__(settings)
        # Re-keying through a topic only makes sense where instances can split the data.
        self.routes_joint = settings.bus == "kafka"
        self.engine = SignalsEngine.from_specs(settings.strategies, route_joint=self.routes_joint)
        prefix = self.prefix = settings.signals_topic_prefix
        self.instance = settings.signals_instance
        self.group = settings.signals_group
        self.joint_group = f"{self.group}.joint"
        self.control_group = f"{self.group}.control.{settings.signals_instance}"
        self.data_topics = [prefix + t for t in (Topic.MD_BARS, Topic.MD_TICKS, Topic.EXEC_REPORTS)]
        self.joint_topics = [prefix + Topic.SIGNALS_JOINT_BARS, prefix + Topic.SIGNALS_JOINT_TICKS]
        self.control_topics = [prefix + Topic.CONTROL]
        self.replayed = 0
        #: True when the start-up state came from a snapshot (then only its tail was replayed).
        self.restored = False
        self.snapshots_taken = 0
        self._config = config_digest(settings.strategies, self.routes_joint)
        self._store = (
            SnapshotStore(
                Path(settings.signals_snapshot_dir), f"{self.group}.{settings.signals_instance}"
            )
            if settings.signals_snapshot_dir
            else None
        )
        #: The engine as of the last snapshot, advanced by each periodic checkpoint.
        self._shadow: Snapshot | None = None

    async def setup(self, ctx: ServiceContext[SignalsSettings]) -> None:
        """Start the strategies, rebuild their state, subscribe the data and control handlers."""
        for emit in to_emits(self.engine.start(ctx.clock.now_ns()), self.prefix, self.instance):
            await ctx.bus.publish(emit.topic, emit.payload, key=emit.key, ts_event=emit.ts_event)
        settings = ctx.settings
        bootstrap = settings.kafka_bootstrap
        if settings.bus == "kafka" and bootstrap:
            await asyncio.get_running_loop().run_in_executor(
                None, self._ensure_status_topic, bootstrap
            )
        if settings.bus == "kafka" and settings.signals_replay and bootstrap:
            await asyncio.get_running_loop().run_in_executor(None, self._replay, bootstrap)
            if self._store is not None:
                ctx.add_task(lambda: self._snapshot_loop(ctx, bootstrap), "snapshots")
        # After the replay, so each status says what the strategy runs with now.
        for emit in to_emits(self.engine.statuses(ctx.clock.now_ns()), self.prefix, self.instance):
            await ctx.bus.publish(emit.topic, emit.payload, key=emit.key, ts_event=emit.ts_event)
        # Acknowledged before the handlers run: a status answering a command goes out through
        # the subscription's own producer, and could otherwise reach the compacted topic
        # before this one (seen on a loaded host), leaving the stale start status the latest.
        await ctx.bus.flush()
        ctx.logger.info(
            "running %d strategies",
            len(self.engine.hosts),
            extra={
                "strategies": list(self.engine.hosts),
                "replayed": self.replayed,
                "from_snapshot": self.restored,
            },
        )
        ctx.subscribe(self.group, self.data_topics, self.on_event)
        if self.routes_joint and any(type(h.strategy).joint for h in self.engine.hosts.values()):
            ctx.subscribe(self.joint_group, self.joint_topics, self.on_joint)
        ctx.subscribe(self.control_group, self.control_topics, self.on_control)
        # What exists now (modules, pydantic's schemas, the strategies) lives as long as the
        # process: frozen out of the collector's sight, a full collection no longer walks it
        # (46 ms here, during which ticks wait; a 98 ms one made a burst of late intents).
        # Garbage is collected first, so none of it is kept for good.
        gc.collect()
        gc.freeze()

    def _ensure_status_topic(self, bootstrap: str) -> None:
        """Create the (compacted) strategies topic if it is missing: the stage's statuses
        must not fault it where topics were made before the topic existed (or prefixed)."""
        from quantmesh_common.bus.kafka import ensure_topics

        ensure_topics(bootstrap, registry().prefixed(self.prefix, [Topic.STRATEGIES]))

    def _plan(self, engine: SignalsEngine) -> list[tuple[str, list[str], Handler]]:
        """The groups to replay, their topics and what applies their messages to `engine`
        (output discarded: it was published by the run that consumed them).

        Commands last, so the switches end as the last commands left them (their timing
        relative to the data is not known across topics).
        """
        plan: list[tuple[str, list[str], Handler]] = [
            (self.group, self.data_topics, partial(_apply_data, engine))
        ]
        if self.routes_joint and any(type(h.strategy).joint for h in engine.hosts.values()):
            plan.append((self.joint_group, self.joint_topics, partial(_apply_joint, engine)))
        plan.append(
            (self.control_group, self.control_topics, partial(_apply_control, engine, self.name))
        )
        return plan

    def _replay(self, bootstrap: str) -> None:
        """Rebuild the engine: from the snapshot plus what was consumed since, else from
        everything this service's groups consumed; then snapshot it (offsets known exactly)."""
        plan = self._plan(self.engine)
        ends = {group: committed_offsets(bootstrap, group, topics) for group, topics, _ in plan}
        snapshot = self._store.load(self._config) if self._store is not None else None
        if snapshot is not None and not _covers(snapshot.offsets, ends):
            log.warning("the snapshot is ahead of the committed offsets: replaying everything")
            snapshot = None
        if snapshot is not None:
            self.engine = snapshot.engine
            self.restored = True
            plan = self._plan(self.engine)
        start: Offsets = snapshot.offsets if snapshot is not None else {}
        for group, _topics, apply in plan:
            self.replayed += replay_range(
                bootstrap, group, ends[group], apply, start=start.get(group)
            )
        if self._store is not None:
            self._shadow = Snapshot(self._config, self.engine, ends, time.time_ns()).copy()
            self._store.save(self._shadow)
            self.snapshots_taken += 1

    def checkpoint(self, bootstrap: str) -> int:
        """Advance the shadow engine over what the groups committed since the last snapshot
        and store it as the new snapshot; return how many messages it replayed.

        Runs on a worker thread: the shadow shares nothing with the live engine.
        """
        shadow, store = self._shadow, self._store
        if shadow is None or store is None:
            return 0
        plan = self._plan(shadow.engine)
        ends = {group: committed_offsets(bootstrap, group, topics) for group, topics, _ in plan}
        if not _covers(shadow.offsets, ends):
            log.warning("committed offsets went back (group reset?): snapshot not advanced")
            return 0
        replayed = 0
        for group, _topics, apply in plan:
            replayed += replay_range(
                bootstrap, group, ends[group], apply, start=shadow.offsets.get(group)
            )
        shadow.offsets = {group: {**shadow.offsets.get(group, {}), **ends[group]} for group in ends}
        shadow.taken_ns = time.time_ns()
        store.save(shadow)
        self.snapshots_taken += 1
        return replayed

    async def _snapshot_loop(self, ctx: ServiceContext[SignalsSettings], bootstrap: str) -> None:
        """Take a snapshot every QM_SIGNALS_SNAPSHOT_INTERVAL_S; a failed one is logged."""
        loop = asyncio.get_running_loop()
        while True:
            await ctx.clock.sleep(ctx.settings.signals_snapshot_interval_s)
            try:
                replayed = await loop.run_in_executor(None, self.checkpoint, bootstrap)
            except Exception:
                ctx.logger.exception("snapshot failed; the previous one stays")
                continue
            ctx.logger.info("snapshot taken", extra={"replayed": replayed})

    async def teardown(self, ctx: ServiceContext[SignalsSettings]) -> None:
        """Stop the strategies, publishing whatever their on_stop asked for."""
        for emit in to_emits(self.engine.stop(ctx.clock.now_ns()), self.prefix, self.instance):
            await ctx.bus.publish(emit.topic, emit.payload, key=emit.key, ts_event=emit.ts_event)

    def on_event(self, envelope: Envelope[Any]) -> list[Emit]:
        """Handle a bar, a tick or an execution report."""
        payload = envelope.payload
        engine = self.engine
        if isinstance(payload, Tick):
            out = to_emits(engine.on_tick(payload), self.prefix, self.instance)
            key = engine.joint_key(payload.instrument_id) if self.routes_joint else None
            if key is not None:
                out.append(Emit(self.joint_topics[1], payload, key, envelope.ts_event))
            return out
        if isinstance(payload, Bar):
            out = to_emits(engine.on_bar(payload), self.prefix, self.instance)
            key = engine.joint_key(payload.instrument_id) if self.routes_joint else None
            if key is not None:
                out.append(Emit(self.joint_topics[0], payload, key, envelope.ts_event))
            return out
        if isinstance(payload, ExecutionReport):
            return to_emits(engine.on_report(payload), self.prefix, self.instance)
        return []

    def on_joint(self, envelope: Envelope[Any]) -> list[Emit]:
        """Handle market data re-published for the joint strategies (keyed by their group)."""
        payload = envelope.payload
        if isinstance(payload, Bar):
            return to_emits(self.engine.on_joint_bar(payload), self.prefix, self.instance)
        if isinstance(payload, Tick):
            return to_emits(self.engine.on_joint_tick(payload), self.prefix, self.instance)
        return []

    def on_control(self, envelope: Envelope[Any]) -> list[Emit]:
        """Handle an operator command."""
        payload = envelope.payload
        if isinstance(payload, ControlCommand):
            return to_emits(self.engine.on_control(payload, self.name), self.prefix, self.instance)
        return []


Handler = Callable[[Envelope[Any]], object]


def _apply_data(engine: SignalsEngine, envelope: Envelope[Any]) -> None:
    payload = envelope.payload
    if isinstance(payload, Tick):
        engine.on_tick(payload)
    elif isinstance(payload, Bar):
        engine.on_bar(payload)
    elif isinstance(payload, ExecutionReport):
        engine.on_report(payload)


def _apply_joint(engine: SignalsEngine, envelope: Envelope[Any]) -> None:
    payload = envelope.payload
    if isinstance(payload, Bar):
        engine.on_joint_bar(payload)
    elif isinstance(payload, Tick):
        engine.on_joint_tick(payload)


def _apply_control(engine: SignalsEngine, service: str, envelope: Envelope[Any]) -> None:
    if isinstance(envelope.payload, ControlCommand):
        engine.on_control(envelope.payload, service)


def _covers(snapshot: Offsets, committed: Offsets) -> bool:
    """True if every partition of the snapshot is committed at least as far as it got."""
    return all(
        committed.get(group, {}).get(tp, 0) >= offset
        for group, offsets in snapshot.items()
        for tp, offset in offsets.items()
    )
