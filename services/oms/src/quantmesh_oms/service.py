"""The oms stage service: approved decisions become orders and venue commands; reports move them."""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import Callable, Sequence
from decimal import Decimal
from typing import Any, ClassVar

from quantmesh_common.bus.base import Emit, Subscription, partition_of
from quantmesh_common.clock import Clock, WallClock
from quantmesh_common.envelope import Envelope
from quantmesh_common.ids import new_id
from quantmesh_common.messages import (
    ControlAction,
    ControlCommand,
    ExecAlgo,
    ExecutionReport,
    OrderRequest,
    RiskDecision,
)
from quantmesh_common.retention import prune_forever
from quantmesh_common.runtime import Service, ServiceContext
from quantmesh_common.topics import Topic, TopicRegistry, registry
from quantmesh_oms.algo import interval_ns
from quantmesh_oms.config import OmsSettings
from quantmesh_oms.orders import OrderChange, OrderManager
from quantmesh_oms.profile import VolumeProfiles
from quantmesh_oms.store import (
    InMemoryOrderStore,
    NoOrderStore,
    OrderStore,
    OutboxEntry,
    PendingSave,
    PostgresOrderStore,
)

log = logging.getLogger(__name__)

#: The issue that brings this stage's handlers; None: they exist.
HANDLERS_ISSUE: int | None = None

#: The consumer group of the order flow (decisions and reports of an account, co-partitioned).
GROUP = "oms"
#: Prefix of the control group; each process adds a fresh suffix, so every instance sees every
#: operator command (each cancels the orders it owns).
CONTROL_GROUP_PREFIX = "oms.control."
#: How often (seconds of the service clock) open GTD orders are checked for expiry and
#: TWAP/VWAP parents for due slices.
EXPIRY_INTERVAL_S = 1.0
#: How much later than the oms's clock another stage's clock may run (ns): a decision created
#: more than this after the newest order the store may hold is for a new order.
CLOCK_SKEW_NS = 60 * 1_000_000_000
#: Outbox rows stored longer ago than this are deleted: an input is redelivered only back to
#: the last committed offset (seconds to minutes), and only then is its outbox read.
OUTBOX_RETENTION_NS = 24 * 3600 * 1_000_000_000


class OrderStoreUnavailableError(BaseException):
    """The order store failed: a crash, not a poison message.

    A BaseException, so the bus neither dead-letters the message nor commits it: the
    subscription stops, the service faults and the message is redelivered once it restarts.
    """


class OmsService(Service[OmsSettings]):
    """The oms stage: one state machine per order, idempotent on the client order id."""

    name = "oms"
    settings_class = OmsSettings

    #: Input topics: the order flow (one transactional group) and `control` (CANCEL_ALL_ORDERS).
    consumes: ClassVar[tuple[str, ...]] = (
        Topic.ORDERS_APPROVED,
        Topic.EXEC_REPORTS,
        Topic.ORDERS_REQUESTS,
        Topic.CONTROL,
    )
    #: The topics of the transactional order-flow group, all keyed by account.
    order_flow: ClassVar[tuple[str, ...]] = (
        Topic.ORDERS_APPROVED,
        Topic.EXEC_REPORTS,
        Topic.ORDERS_REQUESTS,
    )
    #: Output topics.
    produces: ClassVar[tuple[str, ...]] = (Topic.ORDERS_COMMANDS, Topic.ORDERS_UPDATES)

    def __init__(self, settings: OmsSettings) -> None:
        super().__init__(settings)
        self.orders = OrderManager()
        self.clock: Clock = WallClock()
        self.store: OrderStore = InMemoryOrderStore()
        self.profiles = VolumeProfiles(None, hourly=settings.vwap_hourly_profile())
        # Handlers and the expiry task interleave at their awaits (the store): one at a time,
        # so an order's changes are stored in the order they were applied.
        self._lock = asyncio.Lock()
        #: True: the order flow's changes and outbox are held per consumed batch and stored in
        #: one transaction by `flush`, the batch hook, before the batch commits (setup turns
        #: it on with PostgreSQL); False: stored per message.
        self.batched = False
        self._pending: list[PendingSave] = []
        #: The orders the held saves touched (forgotten from memory if storing them fails).
        self._pending_orders: set[str] = set()
        #: Terminal orders still in memory, oldest first (evicted past `keep_terminal` once
        #: stored; the store answers for them after that). None: every order stays in memory.
        self._terminal: OrderedDict[str, int] | None = None
        self.keep_terminal = settings.oms_keep_terminal
        #: The newest order creation time the store may hold that memory does not: the store's
        #: latest at start, raised by each eviction. None: ask the store for every unknown id.
        self.stored_high_water: int | None = None
        #: Reads of the store for an order id memory did not know (tests, metrics).
        self.lookups = 0
        #: Order books rebuilt from the store on partition assignment (tests, metrics).
        self.reloads = 0
        #: The topics and consumer groups of this instance: the stage's, behind
        #: QM_OMS_TOPIC_PREFIX (empty but in isolated runs).
        self.prefix = settings.oms_topic_prefix
        #: The order flow's subscription when its partitions split the accounts between
        #: instances (with PostgreSQL, the shared store); None: this instance has every account.
        self._flow: Subscription | None = None
        self._flow_topics = frozenset(self.prefix + t for t in self.order_flow)
        self._partition_count = 1
        self._partition_cache: dict[str, int] = {}
        #: The order-flow partitions whose open orders were last loaded from the store, and
        #: those memory was last cut down to (the timers act only on orders of owned ones).
        self._loaded_for: frozenset[int] = frozenset()
        self._pruned_for: frozenset[int] | None = None
        #: Every CANCEL_ALL_ORDERS seen (the control topic is read whole at each start): applied
        #: again to the orders a reload brings in, as their previous owner may not have had them.
        self._controls: list[ControlCommand] = []
        self._bus: Any = None
        #: Checks of the timers run so far (tests, metrics).
        self.timer_runs = 0
        #: QM_ORDER_FLOW_DELIVERY=idempotent: the order flow's output is published after its
        #: batch is stored, without a transaction, so an input may come again after its
        #: effects were stored (and its output lost, or published): a duplicate publishes the
        #: current state of its orders and the commands they still wait on (`_replay`).
        self.idempotent = settings.order_flow_delivery == "idempotent"
        #: Duplicates recognised in idempotent mode (tests, metrics).
        self.duplicates = 0

    async def setup(self, ctx: ServiceContext[OmsSettings]) -> None:
        """Rebuild open orders from the store, then consume decisions and reports.

        The store is PostgreSQL when the context has a pool (QM_DATABASE_URL), else memory.
        One group over the order flow's topics, keyed by account: transactional, or with its
        output after the batch hook (QM_ORDER_FLOW_DELIVERY).
        """
        self.clock = ctx.clock
        if ctx.pg is not None:
            store = self.store = PostgresOrderStore(ctx.pg)
            self.batched = True
            self._terminal = OrderedDict()
            ctx.add_task(
                lambda: prune_forever(store.prune_outbox, OUTBOX_RETENTION_NS, "oms outbox rows"),
                "oms.outbox.prune",
            )
        elif self.settings.oms_forget_terminal:
            # Nothing reads an order back in a one-process backtest: keep only the open ones
            # and the latest terminal ones (their relatives may still need them).
            self.store = NoOrderStore()
            self._terminal = OrderedDict()
        settings = self.settings
        self.profiles = VolumeProfiles(
            ctx.pg,
            hourly=settings.vwap_hourly_profile(),
            lookback_days=settings.oms_vwap_lookback_days,
            bar_interval=settings.oms_vwap_bar_interval,
        )
        await self.rebuild()
        p = self.prefix
        flow = ctx.subscribe(
            p + GROUP,
            [p + t for t in self.order_flow],
            self.handle,
            on_batch=self.flush if self.batched else None,
            # Only a shared store (PostgreSQL) holds what another member applied.
            on_assign=self.reload if ctx.pg is not None else None,
            on_revoke=self.release if ctx.pg is not None else None,
            **self.settings.order_flow_options(),
        )
        bus = self._bus = ctx.bus
        if ctx.pg is not None:
            # Instances split the accounts by partition only when they share the store.
            self._flow = flow
            topics = getattr(bus, "topics", None)
            names = topics if isinstance(topics, TopicRegistry) else registry()
            counts = {names.partitions(t) for t in self._flow_topics}
            if len(counts) > 1:
                log.warning("the order flow's topics differ in partitions: %s", sorted(counts))
            self._partition_count = names.partitions(p + Topic.ORDERS_APPROVED)
        # A fresh group reads `control` from the beginning at each start; replaying an old
        # CANCEL_ALL_ORDERS touches only orders created before it, which it already canceled.
        ctx.subscribe(p + CONTROL_GROUP_PREFIX + new_id(), [p + Topic.CONTROL], self.on_control)

        async def expire_loop() -> None:
            while True:
                await self.clock.sleep(EXPIRY_INTERVAL_S)
                await self.run_timers(bus)

        ctx.add_task(expire_loop, "gtd-expiry")

        async def reconcile_once() -> None:
            await self.publish_reconciliation(bus)

        ctx.add_task(reconcile_once, "reconcile")

    async def rebuild(self) -> int:
        """Load every open order from the store into the book; returns how many.

        With eviction on, also read the store's newest order time (`stored_high_water`).
        """
        if self._terminal is not None:
            self.stored_high_water = await self.store.high_water()
        opened = await self.store.load_open()
        for managed in opened:
            self.orders.restore(managed)
        log.info("rebuilt %d open orders from %s", len(opened), type(self.store).__name__)
        return len(opened)

    async def reload(self, partitions: Sequence[tuple[str, int]]) -> None:
        """Rebuild the order book from the store: the group assigned this member `partitions`
        (the bus's on_assign hook, between batches, before any of their messages).

        Every order in memory is dropped and the open ones loaded again, as at start: the
        previous owner of a partition stored each batch before committing it, so the store
        holds the latest state of the orders this member had only a stale copy of (loaded at
        its start, or from before it last lost the partition), and the newest order time
        (`stored_high_water`) that tells a new decision from a redelivered one. The first
        assignment reloads too: another member may have moved the orders since this one's
        start. Kept: the VWAP volume profiles (a cache of recorded bars). Then only the orders
        of the accounts whose partitions this member owns are kept (`follow_partitions`).
        """
        async with self._lock:
            # Nothing is held between batches (the bus ran the batch hook); store it if it were.
            await self._flush_locked()
            opened = await self._reload_locked()
        log.info(
            "oms orders reloaded from the store on partition assignment",
            extra={
                "open_orders": opened,
                "partitions": [f"{topic}:{partition}" for topic, partition in partitions],
            },
        )

    async def _reload_locked(self) -> int:
        self.orders = OrderManager()
        if self._terminal is not None:
            self._terminal = OrderedDict()
        try:
            opened = await self.rebuild()
        except Exception as exc:
            raise OrderStoreUnavailableError(f"reloading open orders: {exc!r}") from exc
        self.reloads += 1
        owned = self.owned_partitions()
        if owned is not None:
            self._loaded_for = owned
            self._prune(owned)
            await self._reapply_controls_locked()
        return opened

    async def release(self, partitions: Sequence[tuple[str, int]]) -> None:
        """Before the group gives `partitions` to another member (the bus's on_revoke hook).

        Waits for a timer or `control` action in flight (they hold the lock across their store
        write and publish), stores what is buffered, and drops the orders of those partitions,
        so nothing of this member's about them lands after the next owner loaded them.
        """
        async with self._lock:
            owned = self.owned_partitions()
            if owned is None:
                return
            topics = self._flow_topics
            revoked = {partition for topic, partition in partitions if topic in topics}
            await self._flush_locked()
            self._prune(owned - revoked)

    def owned_partitions(self) -> frozenset[int] | None:
        """The order flow's partitions this member owns now (None: every account is its own).

        None without a shared store: then one instance runs and has every account.
        """
        flow = self._flow
        if flow is None:
            return None
        topics = self._flow_topics
        return frozenset(partition for topic, partition in flow.assignment() if topic in topics)

    def partition_of_account(self, account_id: str) -> int:
        """The order-flow partition an account's messages are keyed to."""
        partition = self._partition_cache.get(account_id)
        if partition is None:
            partition = partition_of(account_id, self._partition_count)
            self._partition_cache[account_id] = partition
        return partition

    async def follow_partitions(self) -> None:
        """Keep in memory exactly the open orders of the accounts this member owns now.

        Called under the lock by the timers and `control` before they act: a partition this
        member was given and has not loaded since (the bus calls on_assign only before a
        message of it, and an idle partition may have none) is loaded from the store now, so
        its GTD expiries and TWAP/VWAP slices continue here; the orders of partitions it lost
        are dropped, so they are no longer timed here (their new owner loads them).
        """
        owned = self.owned_partitions()
        if owned is None:
            return
        if not owned <= self._loaded_for:
            await self._flush_locked()
            opened = await self._reload_locked()
            log.info(
                "oms orders reloaded from the store for partitions assigned without a message",
                extra={"open_orders": opened, "partitions": sorted(owned)},
            )
        elif owned != self._pruned_for:
            await self._flush_locked()
            self._prune(owned)

    def _prune(self, owned: frozenset[int]) -> None:
        self._pruned_for = owned
        # A partition given back later is reloaded then: this copy would be stale.
        self._loaded_for = self._loaded_for & owned
        dropped = self.orders.forget_accounts(
            lambda account_id: self.partition_of_account(account_id) in owned
        )
        if dropped:
            log.info(
                "dropped %d orders of accounts on partitions this member no longer owns",
                dropped,
                extra={"partitions": sorted(owned)},
            )

    async def _reapply_controls_locked(self) -> None:
        """Apply every CANCEL_ALL_ORDERS seen to the orders just loaded; store, then publish.

        The member that owned them when the command came may have been between assignments
        (or left before acting): the owner now cancels what is still open, once (a canceled
        order is cancel-pending or over, and its request id is stored).
        """
        if not self._controls or self._bus is None:
            return
        self.orders.take_changes()
        now = self.clock.now_ns()
        emits: list[Emit] = []
        for command in self._controls:
            emits += self.orders.on_control(command, now)
        await self._store_and_publish_locked(self._bus, emits, now, "CANCEL_ALL_ORDERS again")

    async def handle(self, envelope: Envelope[Any]) -> list[Emit]:
        """Route one message to the order manager; store its changes and outputs before emitting.

        An unexpected message is dead-lettered. The changes and the outputs (the outbox, keyed
        by the message's event id) are stored in one transaction; a redelivered message whose
        changes are already applied changes nothing, and its stored outputs are emitted again,
        so a crash between the database commit and the bus commit loses nothing. If the store
        fails, the order is dropped from memory (reloaded from the store on its next message)
        and OrderStoreUnavailableError stops the subscription without committing the message.
        """
        payload = envelope.payload
        if isinstance(payload, RiskDecision):
            client_order_id = payload.intent.client_order_id
        elif isinstance(payload, ExecutionReport | OrderRequest):
            client_order_id = payload.client_order_id
        else:
            raise TypeError(f"oms does not handle {envelope.schema_name}")
        async with self._lock:
            return self._prefixed(await self._handle(envelope, client_order_id))

    def _prefixed(self, emits: list[Emit]) -> list[Emit]:
        """The emits sent to this instance's topics (QM_OMS_TOPIC_PREFIX)."""
        p = self.prefix
        if not p:
            return emits
        return [Emit(p + e.topic, e.payload, e.key, e.ts_event) for e in emits]

    async def _handle(self, envelope: Envelope[Any], client_order_id: str) -> list[Emit]:
        payload = envelope.payload
        self.orders.take_changes()  # nothing may leak from a message that raised
        self.orders.duplicate = False
        try:
            if self.orders.get(client_order_id) is None and self._may_be_stored(envelope):
                # Only open orders are rebuilt at start: a closed one is fetched when named, so
                # a redelivered decision for it is not submitted twice.
                self.lookups += 1
                stored = await self.store.load(client_order_id)
                if stored is not None:
                    self.orders.restore(stored)
            # An OCO entry and its legs move together: have all of them in memory.
            for related in self.orders.related_ids(client_order_id):
                if self.orders.get(related) is None:
                    stored = await self.store.load(related)
                    if stored is not None:
                        self.orders.restore(stored)
        except Exception as exc:
            raise OrderStoreUnavailableError(f"loading order {client_order_id}: {exc!r}") from exc
        now = self.clock.now_ns()
        if isinstance(payload, RiskDecision):
            weights, note = await self._vwap_weights(payload, now)
            emits = self.orders.on_decision(payload, now, weights, note)
        elif isinstance(payload, ExecutionReport):
            emits = self.orders.on_report(payload, now)
        else:
            emits = self.orders.on_request(payload, now)
        if self.idempotent and self.orders.duplicate:
            derive = not isinstance(payload, ExecutionReport)
            return await self._replay(envelope, client_order_id, now, derive=derive)
        return await self._commit(envelope, emits, now, [client_order_id])

    async def _replay(
        self, envelope: Envelope[Any], client_order_id: str, now: int, *, derive: bool
    ) -> list[Emit]:
        """Publish again what readers need of an input applied before; store nothing.

        Idempotent delivery: the input may be redelivered after its batch was stored, its
        output lost (a crash before it was acknowledged) or published (a crash before the
        offsets were committed), or come twice from upstream. Its stored outputs, if this very
        message was consumed before, give the commands to repeat; `OrderManager.replay` keeps
        the ones still unanswered (same command ids, so execution sends each once) and
        publishes the current state of the orders (same client order ids).
        """
        self.duplicates += 1
        self.orders.take_changes()
        outputs = self._held_outbox(envelope.event_id)
        if outputs is None:
            try:
                outputs = await self.store.load_outbox(envelope.event_id)
            except Exception as exc:
                raise OrderStoreUnavailableError(
                    f"reading the outbox of {envelope.event_id}: {exc!r}"
                ) from exc
        emits = self.orders.replay(outputs or (), client_order_id, now, derive=derive)
        log.info(
            "%s %s for %s was applied before: %d outputs published again",
            envelope.schema_name,
            envelope.event_id,
            client_order_id,
            len(emits),
            extra={"client_order_id": client_order_id},
        )
        return emits

    def _may_be_stored(self, envelope: Envelope[Any]) -> bool:
        """False when the store cannot hold the order this message names and memory does not.

        Only a decision can tell: it is created before its order, so one created more than
        CLOCK_SKEW_NS after the newest order the store may hold beyond memory (at start, or
        evicted since) is for a new order. Reports and requests always ask the store.
        """
        if self._terminal is None or not isinstance(envelope.payload, RiskDecision):
            return True
        floor = self.stored_high_water
        return floor is not None and envelope.ts_init <= floor + CLOCK_SKEW_NS

    def _track_terminal(self, changes: list[OrderChange] | tuple[OrderChange, ...]) -> None:
        terminal = self._terminal
        if terminal is None:
            return
        for change in changes:
            order = change.order
            if order.status.is_terminal:
                terminal[order.client_order_id] = order.ts_init
                terminal.move_to_end(order.client_order_id)

    def _evict(self) -> None:
        """Drop the oldest stored terminal orders past `keep_terminal` from memory.

        Called only once their changes are stored: the store answers for them from then on.
        An OCO group or an algo parent with a relative still open stays (they move together).
        """
        terminal = self._terminal
        if terminal is None:
            return
        kept: list[tuple[str, int]] = []
        while len(terminal) > self.keep_terminal:
            client_order_id, ts_init = terminal.popitem(last=False)
            related = self.orders.related_ids(client_order_id)
            if client_order_id in self._pending_orders or any(
                (o := self.orders.get(r)) is not None and not o.status.is_terminal for r in related
            ):
                kept.append((client_order_id, ts_init))
                continue
            self.orders.forget(client_order_id)
            floor = self.stored_high_water
            self.stored_high_water = ts_init if floor is None else max(floor, ts_init)
        # Not evictable yet: tried again after the orders tracked since.
        terminal.update(kept)

    async def _vwap_weights(
        self, decision: RiskDecision, now: int
    ) -> tuple[list[Decimal] | None, str]:
        """Return the volume weights of a new VWAP parent's slices (None: slice equally, why)."""
        intent = decision.intent
        if (
            intent.algo is not ExecAlgo.VWAP
            or intent.algo_slices is None
            or intent.algo_duration_s is None
            or self.orders.get(intent.client_order_id) is not None
        ):
            return None, ""
        step = interval_ns(intent.algo_duration_s, intent.algo_slices)
        weights, source = await self.profiles.weights(
            intent.instrument_id, now, step, intent.algo_slices
        )
        log.info(
            "VWAP parent %s: volume profile %s",
            intent.client_order_id,
            source,
            extra={"client_order_id": intent.client_order_id},
        )
        return weights, source

    async def on_control(self, envelope: Envelope[Any]) -> list[Emit]:
        """CANCEL_ALL_ORDERS: cancel the open orders of this instance that it targets.

        With instances splitting the accounts, only the orders of the accounts this one owns
        (`follow_partitions` first); the command is kept and applied again to the orders a
        later reload brings in. Not transactional and without an outbox: a replay at start
        changes nothing (the orders are cancel-pending or over), and the execution stage
        cancels at the venue on the same command by itself.
        """
        payload = envelope.payload
        if not isinstance(payload, ControlCommand):
            raise TypeError(f"oms does not handle {envelope.schema_name} on control")
        async with self._lock:
            await self.follow_partitions()
            self.orders.take_changes()
            emits = self.orders.on_control(payload, self.clock.now_ns())
            if payload.action is ControlAction.CANCEL_ALL_ORDERS and all(
                c.command_id != payload.command_id for c in self._controls
            ):
                self._controls.append(payload)
            return self._prefixed(
                await self._commit(envelope, emits, self.clock.now_ns(), [], outbox=False)
            )

    async def publish_reconciliation(self, bus: Any, start_id: str | None = None) -> list[Emit]:
        """Send a QUERY for every open order (and resend unsent GTD cancels), in one transaction.

        Run once after the rebuild; the answers come back on `exec.reports` and are applied
        like any report (idempotent on report and trade ids). Nothing is stored: a crash
        before the publish means the next start queries again.
        """
        async with self._lock:
            emits = self.orders.reconcile(start_id or new_id(), self.clock.now_ns())
            if not emits:
                return []
            p = self.prefix
            async with bus.transaction() as tx:
                for emit in emits:
                    await tx.publish(
                        p + emit.topic, emit.payload, key=emit.key, ts_event=emit.ts_event
                    )
        log.info("reconciliation: %d commands sent for the rebuilt open orders", len(emits))
        return emits

    async def run_timers(self, bus: Any) -> list[Emit]:
        """One check of the timers (every EXPIRY_INTERVAL_S of the oms clock): GTD expiries,
        then TWAP/VWAP slices, each on the orders of the accounts this instance owns."""
        emits = [*await self.publish_expiries(bus), *await self.publish_slices(bus)]
        self.timer_runs += 1
        return emits

    async def publish_expiries(self, bus: Any) -> list[Emit]:
        """Cancel the GTD orders whose time has come; publish in one bus transaction.

        The changes are stored first; a crash before the publish leaves the orders
        cancel-pending without their CANCEL sent (the venue expires GTD orders itself too).
        """
        return await self._publish_timed(bus, OrderManager.expire_due, "GTD expiries")

    async def publish_slices(self, bus: Any) -> list[Emit]:
        """Send the TWAP/VWAP slices whose time has come; publish in one bus transaction.

        The changes are stored first; a crash before the publish leaves a child SUBMITTED
        without its SUBMIT sent, which the reconciliation at the next start sends again (the
        venue does not know it).
        """
        return await self._publish_timed(bus, OrderManager.slices_due, "TWAP/VWAP slices")

    async def flush(self) -> None:
        """Store the changes and outbox held for the consumed batch, in one transaction.

        The order flow's batch hook: awaited after the batch's handlers, before its output and
        offsets are committed. If the store fails, the batch's orders are dropped from memory
        (reloaded from the store on their next message) and OrderStoreUnavailableError
        crashes the subscription: nothing of the batch is committed, and it is redelivered.
        """
        async with self._lock:
            await self._flush_locked()

    async def _flush_locked(self) -> None:
        pending, self._pending = self._pending, []
        touched, self._pending_orders = self._pending_orders, set()
        if not pending:
            return
        try:
            await self.store.save_many(pending)
        except Exception as exc:
            for client_order_id in touched:
                self.orders.forget(client_order_id)
            raise OrderStoreUnavailableError(
                f"storing a batch of {len(pending)} messages: {exc!r}"
            ) from exc
        for held in pending:
            self._track_terminal(held.changes)
        self._evict()

    async def _publish_timed(
        self, bus: Any, due: Callable[[OrderManager, int], list[Emit]], what: str
    ) -> list[Emit]:
        async with self._lock:
            # What the current batch holds goes first: an order's changes reach the store in
            # the order they were applied.
            await self._flush_locked()
            # Only the orders of the accounts this instance owns now are in memory to be timed.
            await self.follow_partitions()
            self.orders.take_changes()
            now = self.clock.now_ns()
            # The manager is looked up now: following the partitions may have replaced it.
            emits = due(self.orders, now)
            return await self._store_and_publish_locked(bus, emits, now, what)

    async def _store_and_publish_locked(
        self, bus: Any, emits: list[Emit], now: int, what: str
    ) -> list[Emit]:
        """Store the manager's changes, then publish `emits` in one bus transaction."""
        changes = self.orders.take_changes()
        if not changes:
            return []
        try:
            await self.store.save(changes)
        except Exception as exc:
            for change in changes:
                self.orders.forget(change.order.client_order_id)
            raise OrderStoreUnavailableError(f"storing {what}: {exc!r}") from exc
        self._track_terminal(changes)
        self._evict()
        p = self.prefix
        async with bus.transaction() as tx:
            for emit in emits:
                await tx.publish(p + emit.topic, emit.payload, key=emit.key, ts_event=now)
        return emits

    async def _commit(
        self,
        envelope: Envelope[Any],
        emits: list[Emit],
        now: int,
        touched: list[str],
        *,
        outbox: bool = True,
    ) -> list[Emit]:
        """Store the manager's changes with `emits` as the outbox of `envelope`; return the emits.

        Nothing changed and nothing to emit: the outputs stored for this envelope, if any (a
        redelivery), else nothing.
        """
        changes = self.orders.take_changes()
        if changes and outbox and self.batched:
            # Held for the batch hook (`flush`), which stores it before the batch commits.
            self._pending.append(
                PendingSave(
                    tuple(changes),
                    envelope.correlation_id,
                    envelope.event_id,
                    OutboxEntry(envelope.event_id, envelope.schema_name, tuple(emits), now),
                )
            )
            self._pending_orders.update(c.order.client_order_id for c in changes)
            return emits
        try:
            if changes:
                # Stored now (a message outside the batched flow): after what the batch holds.
                await self._flush_locked()
                entry = OutboxEntry(envelope.event_id, envelope.schema_name, tuple(emits), now)
                await self.store.save(
                    changes,
                    correlation_id=envelope.correlation_id,
                    causation_id=envelope.event_id,
                    outbox=entry if outbox else None,
                )
                self._track_terminal(changes)
                self._evict()
                return emits
            if not emits and outbox:
                held = self._held_outbox(envelope.event_id)
                if held is not None:
                    return held
                stored = await self.store.load_outbox(envelope.event_id)
                if stored:
                    log.warning(
                        "%s %s was applied before; its %d outputs are published again",
                        envelope.schema_name,
                        envelope.event_id,
                        len(stored),
                    )
                    return stored
        except Exception as exc:
            for client_order_id in {c.order.client_order_id for c in changes} | set(touched):
                self.orders.forget(client_order_id)
            raise OrderStoreUnavailableError(f"storing {envelope.event_id}: {exc!r}") from exc
        return emits

    def _held_outbox(self, input_id: str) -> list[Emit] | None:
        """Return the outputs held (not yet stored) for a message delivered twice in a batch."""
        for pending in self._pending:
            if pending.outbox is not None and pending.outbox.input_id == input_id:
                return list(pending.outbox.emits)
        return None
