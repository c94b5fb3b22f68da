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
from quantmesh_signals.handover import Holding, TopicPartitionId
from quantmesh_signals.replay import committed_offsets, last_envelopes, replay_range
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
        #: Where the start-up replay left the engine: per group, the offsets it is exact at.
        self._ends: Offsets = {}
        #: What the data and joint groups' partitions are in the engine (hand-over on Kafka).
        self.data_holding = Holding(self.group, self.data_topics)
        self.joint_holding = Holding(self.joint_group, self.joint_topics)
        #: Hand-overs done after an assignment: messages caught up, rebuilt, strategies rebuilt.
        self.handovers = 0
        self.caught_up = 0
        self.rebuilt = 0
        self.rebuilt_strategies: list[str] = []

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
        # Partitions moving between running instances: the hooks bring their state up to the
        # group's committed offsets (needs the replay: it is what makes the state known).
        hand_over = settings.bus == "kafka" and settings.signals_replay and bool(bootstrap)
        if hand_over:
            self.data_holding.exact = dict(self._ends.get(self.group, {}))
            self.joint_holding.exact = dict(self._ends.get(self.joint_group, {}))
        ctx.subscribe(
            self.group,
            self.data_topics,
            self.on_event,
            on_assign=partial(self._on_assign, self.data_holding, False) if hand_over else None,
        )
        if self.routes_joint and any(type(h.strategy).joint for h in self.engine.hosts.values()):
            ctx.subscribe(
                self.joint_group,
                self.joint_topics,
                self.on_joint,
                on_assign=partial(self._on_assign, self.joint_holding, True) if hand_over else None,
            )
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
        self._ends = ends
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

    async def _on_assign(
        self, holding: Holding, joint: bool, added: Sequence[TopicPartitionId]
    ) -> None:
        """Bring the state of newly assigned partitions up to the group's committed offsets,
        before any of their messages is handled (the bus's on_assign hook; handover.py).

        A partition the engine holds exactly up to an earlier offset (left there by the
        start-up replay) is caught up by replaying the rest into the live engine; one that
        moved here from another instance gets the strategies it carries rebuilt: an engine of
        the same strategies is fed this group's owned partitions from the beginning to the
        committed offsets on a worker thread, and those strategies take its state. The
        group's reading waits meanwhile; the other subscriptions go on.
        """
        bootstrap = self.settings.kafka_bootstrap
        assert bootstrap is not None
        loop = asyncio.get_running_loop()
        started = time.monotonic()
        group = holding.group
        committed = await loop.run_in_executor(
            None, committed_offsets, bootstrap, group, holding.topics
        )
        wanted = holding.needs_last_messages(added, committed)
        last = (
            await loop.run_in_executor(None, last_envelopes, bootstrap, group, wanted)
            if wanted
            else {}
        )
        plan = holding.classify(added, committed, last)
        apply = _apply_joint if joint else _apply_data
        caught = 0
        if plan.catch_up:
            caught = await self._catch_up(bootstrap, group, plan.catch_up, apply)
        # The bus's rebalances are eager (range assignor): `added` is every partition the
        # member owns now, each one's state exact at its committed offset once caught up.
        owned = set(added)
        rebuilt, ids = 0, list[str]()
        if plan.moved:
            ends = {tp: committed[tp] for tp in owned if committed.get(tp, 0) > 0}
            scratch, ids, rebuilt = await loop.run_in_executor(
                None, self._rebuild, bootstrap, group, plan.moved, ends, apply, joint
            )
            self.engine.adopt(scratch, ids)
        holding.assigned(added, committed, rebuilt=bool(plan.moved), owned=owned)
        self.handovers += 1
        self.caught_up += caught
        self.rebuilt += rebuilt
        self.rebuilt_strategies += ids
        log.info(
            "hand-over of %d partitions of group %s: %d caught up (%d messages), %d moved "
            "(%d messages replayed, strategies rebuilt: %s), %d kept, in %.3f s",
            len(added),
            group,
            len(plan.catch_up),
            caught,
            len(plan.moved),
            rebuilt,
            ", ".join(ids) or "none",
            len(plan.kept),
            time.monotonic() - started,
            extra={
                "group": group,
                "caught_up": caught,
                "rebuilt": rebuilt,
                "moved": sorted(plan.moved),
                "strategies": ids,
                "seconds": time.monotonic() - started,
            },
        )

    async def _catch_up(
        self,
        bootstrap: str,
        group: str,
        ranges: dict[TopicPartitionId, tuple[int, int]],
        apply: Callable[[SignalsEngine, Envelope[Any]], None],
    ) -> int:
        """Replay `ranges` into the live engine: read on a worker thread, applied here on the
        event loop in chunks (the other subscriptions' handlers use the engine meanwhile)."""
        loop = asyncio.get_running_loop()
        chunks: asyncio.Queue[list[Envelope[Any]] | None] = asyncio.Queue(maxsize=4)
        chunk: list[Envelope[Any]] = []

        def put(item: list[Envelope[Any]] | None) -> None:
            asyncio.run_coroutine_threadsafe(chunks.put(item), loop).result(CATCH_UP_WAIT_S)

        def collect(envelope: Envelope[Any]) -> None:
            chunk.append(envelope)
            if len(chunk) >= CATCH_UP_CHUNK:
                put(chunk.copy())
                chunk.clear()

        def read() -> int:
            try:
                count = replay_range(
                    bootstrap,
                    group,
                    {tp: end for tp, (_start, end) in ranges.items()},
                    collect,
                    start={tp: start for tp, (start, _end) in ranges.items()},
                )
                if chunk:
                    put(chunk.copy())
                return count
            finally:
                put(None)

        reading = loop.run_in_executor(None, read)
        engine = self.engine
        while (envelopes := await chunks.get()) is not None:
            for envelope in envelopes:
                apply(engine, envelope)
            await asyncio.sleep(0)
        return await reading

    def _rebuild(
        self,
        bootstrap: str,
        group: str,
        moved: set[TopicPartitionId],
        ends: dict[TopicPartitionId, int],
        apply: Callable[[SignalsEngine, Envelope[Any]], None],
        joint: bool,
    ) -> tuple[SignalsEngine, list[str], int]:
        """An engine of the configured strategies fed `ends` (the moved partitions first, to
        learn which strategies they carry), the ids of those strategies and how many messages
        it replayed. Worker thread: it shares nothing with the live engine."""
        scratch = SignalsEngine.from_specs(self.settings.strategies, route_joint=self.routes_joint)
        scratch.start(0)
        touched: set[str] = set()

        def first(envelope: Envelope[Any]) -> None:
            touched.update(scratch.touched_by(envelope.payload))
            apply(scratch, envelope)

        moved_ends = {tp: end for tp, end in ends.items() if tp in moved}
        rest = {tp: end for tp, end in ends.items() if tp not in moved}
        count = replay_range(bootstrap, group, moved_ends, first)
        count += replay_range(bootstrap, group, rest, partial(apply, scratch))
        # Each group rebuilds what it feeds: the data group the directly fed strategies, the
        # joint group the joint ones.
        ids = sorted(i for i in touched if scratch.joint_routed(i) == joint)
        return scratch, ids, count

    async def teardown(self, ctx: ServiceContext[SignalsSettings]) -> None:
        """Stop the strategies, publishing whatever their on_stop asked for."""
        for emit in to_emits(self.engine.stop(ctx.clock.now_ns()), self.prefix, self.instance):
            await ctx.bus.publish(emit.topic, emit.payload, key=emit.key, ts_event=emit.ts_event)

    def on_event(self, envelope: Envelope[Any]) -> list[Emit]:
        """Handle a bar, a tick or an execution report."""
        payload = envelope.payload
        engine = self.engine
        if isinstance(payload, Tick):
            self.data_holding.last_seen[(Tick, payload.instrument_id)] = envelope.event_id
            out = to_emits(engine.on_tick(payload), self.prefix, self.instance)
            key = engine.joint_key(payload.instrument_id) if self.routes_joint else None
            if key is not None:
                out.append(Emit(self.joint_topics[1], payload, key, envelope.ts_event))
            return out
        if isinstance(payload, Bar):
            self.data_holding.last_seen[(Bar, payload.instrument_id)] = envelope.event_id
            out = to_emits(engine.on_bar(payload), self.prefix, self.instance)
            key = engine.joint_key(payload.instrument_id) if self.routes_joint else None
            if key is not None:
                out.append(Emit(self.joint_topics[0], payload, key, envelope.ts_event))
            return out
        if isinstance(payload, ExecutionReport):
            self.data_holding.last_seen[(ExecutionReport, payload.account_id)] = envelope.event_id
            return to_emits(engine.on_report(payload), self.prefix, self.instance)
        return []

    def on_joint(self, envelope: Envelope[Any]) -> list[Emit]:
        """Handle market data re-published for the joint strategies (keyed by their group)."""
        payload = envelope.payload
        if isinstance(payload, Bar):
            self.joint_holding.last_seen[(Bar, payload.instrument_id)] = envelope.event_id
            return to_emits(self.engine.on_joint_bar(payload), self.prefix, self.instance)
        if isinstance(payload, Tick):
            self.joint_holding.last_seen[(Tick, payload.instrument_id)] = envelope.event_id
            return to_emits(self.engine.on_joint_tick(payload), self.prefix, self.instance)
        return []

    def on_control(self, envelope: Envelope[Any]) -> list[Emit]:
        """Handle an operator command."""
        payload = envelope.payload
        if isinstance(payload, ControlCommand):
            return to_emits(self.engine.on_control(payload, self.name), self.prefix, self.instance)
        return []


Handler = Callable[[Envelope[Any]], object]

#: Messages per chunk handed from the catch-up's reading thread to the event loop.
CATCH_UP_CHUNK = 2_000
#: The longest the reading thread waits for the event loop to take a chunk.
CATCH_UP_WAIT_S = 300.0


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
