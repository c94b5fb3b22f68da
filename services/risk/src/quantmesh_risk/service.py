"""The risk stage service: every order intent approved or denied, with the reason behind it."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any, ClassVar

from quantmesh_common.bus.base import Emit
from quantmesh_common.clock import Clock, WallClock
from quantmesh_common.envelope import Envelope
from quantmesh_common.ids import new_id
from quantmesh_common.messages import (
    AccountOpened,
    Bar,
    ControlAction,
    ControlCommand,
    ExecutionReport,
    Instrument,
    Order,
    OrderIntent,
    PortfolioSnapshot,
    Position,
    RiskDecision,
    Tick,
)
from quantmesh_common.retention import prune_forever
from quantmesh_common.runtime import Service, ServiceContext
from quantmesh_common.topics import Topic
from quantmesh_risk.config import RiskSettings
from quantmesh_risk.decisions import RECENT_DECISIONS, DecisionLog
from quantmesh_risk.engine import EVERYTHING, RiskEngine
from quantmesh_risk.store import AccountRow, PostgresRiskStore, account_row

log = logging.getLogger(__name__)

#: The issue that brings this stage's handlers; None: they exist.
HANDLERS_ISSUE: int | None = None

#: The order flow of an account: intents, fills, order states and the portfolio's positions and
#: snapshots (all keyed by account_id over 6 partitions, so an account meets in one instance).
GROUP = "risk"
#: What the order-flow group reads.
ORDER_FLOW_TOPICS = (
    Topic.ORDERS_INTENTS,
    Topic.EXEC_REPORTS,
    Topic.ORDERS_UPDATES,
    Topic.PORTFOLIO_UPDATES,
    Topic.PORTFOLIO_SNAPSHOTS,
)
#: Last prices: keyed by instrument, so not co-partitioned with the accounts. A broadcast
#: subscription: every instance reads every instrument (its group name gets a suffix of its own).
MARKET_DATA_GROUP = "risk.md"
#: Prefix of the control group; each process adds a fresh suffix (see setup).
CONTROL_GROUP_PREFIX = "risk.control."
#: Prefix of the accounts group (opened accounts' capital); a fresh suffix per process too.
ACCOUNTS_GROUP_PREFIX = "risk.accounts."
#: Prefix of the instruments group (the venue's trading rules); a fresh suffix per process too.
INSTRUMENTS_GROUP_PREFIX = "risk.instruments."
#: Ticks handled between two chances for the order flow to run (see `on_tick_yielding`).
TICKS_PER_YIELD = 20
#: Stored decisions older than this are deleted (idempotent delivery): a redelivery reaches
#: back to the last committed offset only, seconds to minutes.
DECISION_RETENTION_NS = 24 * 3600 * 1_000_000_000


class StoreFailedError(BaseException):
    """The store refused a change already made in memory: stop consuming, uncommitted.

    Not an Exception, so the bus neither dead-letters nor commits the message; a restarted
    instance rebuilds from the store and handles it again.
    """


class RiskService(Service[RiskSettings]):
    """The risk stage: pre-trade checks, kill switch and circuit breakers."""

    name = "risk"
    settings_class = RiskSettings

    #: Input topics.
    consumes: ClassVar[tuple[str, ...]] = (
        Topic.ORDERS_INTENTS,
        Topic.EXEC_REPORTS,
        Topic.ORDERS_UPDATES,
        Topic.MD_TICKS,
        Topic.CONTROL,
        Topic.PORTFOLIO_UPDATES,
        Topic.PORTFOLIO_SNAPSHOTS,
        Topic.MD_BARS,
        Topic.ACCOUNTS,
        Topic.REF_INSTRUMENTS,
    )
    #: Output topics.
    produces: ClassVar[tuple[str, ...]] = (
        Topic.ORDERS_APPROVED,
        Topic.ORDERS_REJECTED,
        Topic.ALERTS,
        Topic.RISK_LIMITS,
    )

    def __init__(self, settings: RiskSettings) -> None:
        super().__init__(settings)
        self.engine = self._fresh_engine()
        self.clock: Clock = WallClock()
        #: The topics and consumer groups of this instance: the stage's, behind
        #: QM_RISK_TOPIC_PREFIX (empty but in isolated runs).
        prefix = self.prefix = settings.risk_topic_prefix
        self.approved_topic = prefix + Topic.ORDERS_APPROVED
        self.rejected_topic = prefix + Topic.ORDERS_REJECTED
        self.alerts_topic = prefix + Topic.ALERTS
        self.limits_topic = prefix + Topic.RISK_LIMITS
        self.store: PostgresRiskStore | None = None
        #: What the store holds per account, so only changes are written.
        self._saved: dict[str, AccountRow] = {}
        self._applied_resets: set[str] = set()
        #: Accounts whose stored row changed during the consumed batch (written by `flush`).
        self._dirty: dict[str, AccountRow] = {}
        self._ticks = 0
        # The batch hook and a breaker reset (another subscription) write the same rows: one
        # at a time, so an older row never lands after a newer one.
        self._store_lock = asyncio.Lock()
        #: State rebuilds from the store on partition assignment (tests, metrics).
        self.reloads = 0
        #: Idempotent order-flow delivery (QM_ORDER_FLOW_DELIVERY): the decision of every
        #: intent is kept by intent id (and stored by the batch hook), so a redelivered intent
        #: gets it again. None when transactional: a Kafka transaction already publishes each
        #: decision once.
        self.decisions: DecisionLog | None = (
            DecisionLog() if settings.order_flow_delivery == "idempotent" else None
        )
        #: Intents decided again from the log (redelivered): tests, metrics.
        self.redecided = 0

    def _fresh_engine(self) -> RiskEngine:
        """An engine with no state, as the settings make it."""
        settings = self.settings
        return RiskEngine(
            settings.risk_limits,
            settings.risk_instruments,
            var_horizon_ns=settings.var_horizon_ns,
            var_window=settings.risk_var_window,
            sizing=settings.risk_sizing,
            keep_ids=settings.risk_keep_ids,
        )

    async def setup(self, ctx: ServiceContext[RiskSettings]) -> None:
        """Subscribe the order flow (transactional or idempotent), market data and control."""
        self.clock = ctx.clock
        if self.settings.risk_limits.is_unlimited:
            ctx.logger.warning(
                "no risk limits configured (QM_RISK_LIMITS): only halts and instrument rules apply"
            )
        flow: Any = self.on_order_flow
        control: Any = self.on_control
        on_batch = None
        on_assign = None
        if ctx.pg is not None:
            store = PostgresRiskStore(ctx.pg)
            await self.rebuild(store)
            flow, control = self.on_order_flow_held, self.on_control_stored
            on_batch = self.flush
            on_assign = self.reload
            if self.decisions is not None:
                ctx.add_task(
                    lambda: prune_forever(
                        store.prune_decisions, DECISION_RETENTION_NS, "risk decisions"
                    ),
                    "risk.decisions.prune",
                )
        p = self.prefix
        ctx.subscribe(
            p + GROUP,
            [p + t for t in ORDER_FLOW_TOPICS],
            flow,
            on_batch=on_batch,
            on_assign=on_assign,
            **self.settings.order_flow_options(),
        )
        # On Kafka, where a batch can hold hundreds of ticks; in memory each tick is delivered
        # on its own, and the synchronous path keeps backtests fast.
        md: Any = self.on_tick if ctx.settings.bus == "memory" else self.on_tick_yielding
        # Broadcast: each instance needs the prices of every instrument (an account's orders may
        # be for any of them), not the half its share of a group's partitions would give. It
        # reads from the latest offsets and commits nothing: after a (re)start an instrument has
        # no price until its next tick or bar, and a check that needs one denies
        # NO_REFERENCE_PRICE meanwhile.
        ctx.subscribe(
            p + MARKET_DATA_GROUP, [p + Topic.MD_TICKS, p + Topic.MD_BARS], md, broadcast=True
        )
        # A fresh group reads `control` from the beginning at every start, so the kill switch
        # and breaker resets survive a restart: the state is rebuilt from the command history.
        ctx.subscribe(p + CONTROL_GROUP_PREFIX + new_id(), [p + Topic.CONTROL], control)
        # Likewise every opened account's starting capital (a compacted topic, read whole).
        ctx.subscribe(p + ACCOUNTS_GROUP_PREFIX + new_id(), [p + Topic.ACCOUNTS], self.on_account)
        # And the venue's rules of every instrument marketdata loaded (compacted, read whole).
        ctx.subscribe(
            p + INSTRUMENTS_GROUP_PREFIX + new_id(), [p + Topic.REF_INSTRUMENTS], self.on_instrument
        )
        # What applies now; each command, trip and opening republishes what it changed.
        for status in self.engine.limits_statuses(ctx.clock.now_ns()):
            await ctx.bus.publish(self.limits_topic, status, key=status.account_id)

    async def rebuild(self, store: PostgresRiskStore) -> None:
        """Load breakers, loss references, positions and working orders from PostgreSQL."""
        self.store = store
        engine = self.engine
        counts = await store.load(engine)
        self._applied_resets = await store.applied_resets()
        self._saved = {a: account_row(engine, a) for a in engine.losses.accounts}
        if self.decisions is not None:
            counts["decisions"] = self.decisions.load(
                await store.recent_decisions(RECENT_DECISIONS)
            )
        log.info("risk state rebuilt from PostgreSQL", extra=counts)

    async def reload(self, partitions: Sequence[tuple[str, int]]) -> None:
        """Rebuild the accounts' state from the store: the group assigned this member
        `partitions` (the bus's on_assign hook, between batches, before any of their messages).

        The whole account state is rebuilt as at start (breakers, loss references, positions
        and fills, working orders), not only the moved accounts': partitions do not name their
        accounts, and the previous owner stored its rows before committing. The first
        assignment reloads too: on Kafka it comes after the join, on the in-memory bus with the
        member's first message, and another member may have handled the account since this
        one's start. Kept from memory, as no store holds them and they are not per account:
        last prices, VaR returns, bar ranges, order-rate windows, kill switch, instrument rules,
        finished order ids, and each account's opening capital (`accounts`). Carried over
        too: the fills memory counted that the portfolio has not stored yet (added to the
        loaded positions) and the approvals the OMS has not stored yet (still working).
        """
        store = self.store
        assert store is not None
        async with self._store_lock:
            # Nothing is held between batches (the bus ran the batch hook); store it if it were.
            decided = self.decisions.take_pending() if self.decisions is not None else []
            if self._dirty or decided:
                dirty, self._dirty = self._dirty, {}
                try:
                    await store.save_batch(dirty, decided)
                except Exception as exc:
                    raise StoreFailedError(f"risk store failed: {exc}") from exc
            old, engine = self.engine, self._fresh_engine()
            engine.instruments = old.instruments
            engine.returns = old.returns
            engine.true_ranges = old.true_ranges
            engine.last_close = old.last_close
            engine.last_trade = old.last_trade
            engine.last_mid = old.last_mid
            engine.approvals = old.approvals
            engine.kill_switch = old.kill_switch
            try:
                counts = await store.load(engine)
                applied_resets = await store.applied_resets()
                # Counted here, but not yet in the tables the load reads: the portfolio and
                # the OMS store them later (they are facts, whichever member saw them).
                fills = {
                    key: signed
                    for key, signed in old.recent_fills.items()
                    if key not in engine.seen_trades
                }
                stored = await store.stored_fills(fills)
                working = {
                    cid
                    for account_id, orders in old.open_orders.items()
                    for cid, _ in orders.items()
                    if cid not in engine.working(account_id)
                }
                known = await store.known_orders(working)
                # Another member may have decided on intents of these partitions whose
                # offsets it did not commit: they come again, and get the same decisions.
                recent = (
                    await store.recent_decisions(RECENT_DECISIONS)
                    if self.decisions is not None
                    else None
                )
            except Exception as exc:
                raise StoreFailedError(f"risk store failed: {exc}") from exc
            engine.carry_closed(old)
            counts["unstored_fills"] = engine.carry_fills(
                {key: signed for key, signed in fills.items() if key not in stored}
            )
            counts["unstored_approvals"] = engine.carry_working(old, working - known)
            if recent is not None and self.decisions is not None:
                counts["decisions"] = self.decisions.load(recent)
            for account_id, losses in old.losses.accounts.items():
                if losses.opening_equity is not None:
                    kept = engine.losses.account(account_id)
                    kept.opening_equity = losses.opening_equity
                    if kept.base_currency is None:
                        kept.base_currency = losses.base_currency
            self.engine = engine
            self._applied_resets = applied_resets
            self._saved = {a: account_row(engine, a) for a in engine.losses.accounts}
            self.reloads += 1
        log.info(
            "risk state reloaded from PostgreSQL on partition assignment",
            extra={
                **counts,
                "partitions": [f"{topic}:{partition}" for topic, partition in partitions],
            },
        )

    def on_order_flow_held(self, envelope: Envelope[Any]) -> list[Emit]:
        """`on_order_flow`, holding an account's changed breaker and loss references for `flush`.

        Synchronous: the batch hook writes what the batch changed, one row per account.
        """
        out = self.on_order_flow(envelope)
        payload = envelope.payload
        if isinstance(payload, PortfolioSnapshot | Position):
            account_id = payload.account_id
            row = account_row(self.engine, account_id)
            if row != self._saved.get(account_id):
                self._dirty[account_id] = row
            else:
                self._dirty.pop(account_id, None)
        return out

    async def flush(self) -> None:
        """Store the accounts the batch changed and, in idempotent delivery, its decisions, in
        one transaction (the order flow's batch hook).

        Awaited before the batch's output and offsets are committed; if the store fails,
        StoreFailedError crashes the subscription and the batch is redelivered.
        """
        async with self._store_lock:
            decided = self.decisions.take_pending() if self.decisions is not None else []
            if not self._dirty and not decided:
                return
            dirty, self._dirty = self._dirty, {}
            assert self.store is not None
            try:
                await self.store.save_batch(dirty, decided)
            except Exception as exc:
                raise StoreFailedError(f"risk store failed: {exc}") from exc
            self._saved.update(dirty)

    async def on_control_stored(self, envelope: Envelope[Any]) -> list[Emit]:
        """`on_control`; a breaker reset is applied once, whatever replays `control`."""
        payload = envelope.payload
        if (
            not isinstance(payload, ControlCommand)
            or payload.action is not ControlAction.RESET_CIRCUIT_BREAKER
        ):
            return self.on_control(envelope)
        if payload.command_id in self._applied_resets:
            return []  # applied before this start: breakers tripped since must stay tripped
        engine = self.engine
        target = EVERYTHING if payload.target in (EVERYTHING, "risk") else payload.target
        reset = list(engine.breakers) if target == EVERYTHING else [target]
        engine.on_control(payload)
        rows = {a: account_row(engine, a) for a in reset}
        for account_id in rows:
            # Held before the reset, so older than its row: it must not land after it.
            self._dirty.pop(account_id, None)
        assert self.store is not None
        async with self._store_lock:
            try:
                await self.store.apply_reset(payload.command_id, target, envelope.ts_event, rows)
            except Exception as exc:
                raise StoreFailedError(f"risk store failed: {exc}") from exc
            self._applied_resets.add(payload.command_id)
            self._saved.update(rows)
        return self._limits_emits(payload)

    def on_order_flow(self, envelope: Envelope[Any]) -> list[Emit]:
        """Decide on an intent; learn positions from fills and working orders from the OMS."""
        payload = envelope.payload
        if isinstance(payload, OrderIntent):
            decisions = self.decisions
            if decisions is not None:
                known = decisions.get(payload)
                if known is not None:
                    return self._decided_again(known)
            decision = self.engine.evaluate(payload, self.clock.now_ns())
            if decisions is not None:
                decisions.add(decision, store=self.store is not None)
            if decision.approved:
                return [Emit(self.approved_topic, decision)]
            log.info(
                "intent %s denied: %s",
                payload.intent_id,
                decision.reason_text,
                extra={"client_order_id": payload.client_order_id, "reason": decision.reason},
            )
            return [Emit(self.rejected_topic, decision)]
        if isinstance(payload, ExecutionReport):
            self.engine.on_report(payload)
            return []
        if isinstance(payload, Order):
            self.engine.on_order(payload)
            return []
        if isinstance(payload, PortfolioSnapshot | Position):
            alert = self.engine.on_portfolio(payload, envelope.ts_event)
            if alert is None and self.decisions is not None:
                # Redelivered after its trip was stored: its alert may never have been
                # published. The same alert, id included, so a reader can drop a copy.
                alert = self.engine.trip_alert_at(payload.account_id, envelope.ts_event)
            if alert is None:
                return []
            status = self.engine.limits_status(payload.account_id, alert.ts_event)
            return [
                Emit(self.alerts_topic, alert, ts_event=alert.ts_event),
                Emit(self.limits_topic, status, status.account_id, alert.ts_event),
            ]
        raise TypeError(f"risk does not handle {envelope.schema_name} in its order flow")

    def _decided_again(self, decision: RiskDecision) -> list[Emit]:
        """Publish a redelivered intent's decision again; its effects were counted once."""
        self.redecided += 1
        if decision.approved:
            # Counted as working until the oms says otherwise, as when it was first approved
            # (a restart may have lost it: the oms had not stored the order yet).
            self.engine.restore_approval(decision)
            return [Emit(self.approved_topic, decision)]
        return [Emit(self.rejected_topic, decision)]

    async def on_tick_yielding(self, envelope: Envelope[Any]) -> None:
        """`on_tick`, letting the order flow run every TICKS_PER_YIELD ticks.

        Both subscriptions share this process's event loop, and a batch of up to hundreds of
        ticks would otherwise hold every intent behind it until the batch is done.
        """
        self.on_tick(envelope)
        self._ticks += 1
        if self._ticks % TICKS_PER_YIELD == 0:
            await asyncio.sleep(0)

    def on_tick(self, envelope: Envelope[Any]) -> None:
        """Remember the latest price of the instrument; sample its returns for VaR."""
        payload = envelope.payload
        if isinstance(payload, Tick):
            self.engine.on_tick(payload)
        elif isinstance(payload, Bar):
            self.engine.on_bar(payload)
        else:
            raise TypeError(f"risk expected a tick or a bar, got {envelope.schema_name}")

    def on_control(self, envelope: Envelope[Any]) -> list[Emit]:
        """Apply an operator command; republish the limits statuses it changed."""
        payload = envelope.payload
        if not isinstance(payload, ControlCommand):
            raise TypeError(f"risk expected a control command, got {envelope.schema_name}")
        self.engine.on_control(payload)
        return self._limits_emits(payload)

    def _limits_emits(self, command: ControlCommand) -> list[Emit]:
        """The statuses a kill switch or breaker command changed: the default's and the
        target account's, or every known account's for `*` (a kill switch names strategies
        too: every status lists the engaged targets)."""
        if command.action not in (
            ControlAction.KILL_SWITCH_ON,
            ControlAction.KILL_SWITCH_OFF,
            ControlAction.RESET_CIRCUIT_BREAKER,
        ):
            return []
        engine, now = self.engine, command.ts_event
        if command.target in (EVERYTHING, "risk"):
            statuses = engine.limits_statuses(now)
        else:
            statuses = [engine.limits_status(EVERYTHING, now)]
            # A target risk knows no account of may be a strategy: the default's status
            # lists it among the engaged targets, which is where the api looks for it.
            if command.target in engine.known_accounts():
                statuses.append(engine.limits_status(command.target, now))
        return [Emit(self.limits_topic, s, s.account_id, now) for s in statuses]

    def on_account(self, envelope: Envelope[Any]) -> list[Emit]:
        """Take an opened account's starting capital; publish the account's limits status."""
        payload = envelope.payload
        if not isinstance(payload, AccountOpened):
            raise TypeError(f"risk expected an account opening, got {envelope.schema_name}")
        if not self.engine.on_account_opened(payload):
            return []
        status = self.engine.limits_status(payload.account_id, envelope.ts_event)
        return [Emit(self.limits_topic, status, status.account_id, envelope.ts_event)]

    def on_instrument(self, envelope: Envelope[Any]) -> None:
        """Take the venue's trading rules of an instrument, unless the configuration names it."""
        payload = envelope.payload
        if not isinstance(payload, Instrument):
            raise TypeError(f"risk expected an instrument, got {envelope.schema_name}")
        if self.engine.on_instrument(payload):
            log.info(
                "instrument rules of %s from the venue: tick %s, lot %s, min notional %s",
                payload.instrument_id,
                payload.tick_size,
                payload.lot_size,
                payload.min_notional,
            )
