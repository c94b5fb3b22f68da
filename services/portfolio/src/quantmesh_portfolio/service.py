"""The portfolio stage service: fills to positions, marks to P&L, snapshots on event time."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable, Sequence
from decimal import Decimal
from typing import Any, ClassVar

from quantmesh_common.bus.base import Emit, Subscription, partition_of
from quantmesh_common.envelope import Envelope
from quantmesh_common.messages import (
    AccountOpened,
    Bar,
    ControlAction,
    ControlCommand,
    ExecutionReport,
    PerformanceReport,
    PortfolioSnapshot,
    Position,
    Tick,
)
from quantmesh_common.runtime import Service, ServiceContext
from quantmesh_common.topics import Topic, TopicRegistry, registry
from quantmesh_portfolio.config import PortfolioSettings
from quantmesh_portfolio.performance import ClosedTrip, NoPerformanceTracker, PerformanceTracker
from quantmesh_portfolio.positions import Account, Portfolio, fill_key
from quantmesh_portfolio.store import PortfolioBatch, PostgresPortfolioStore

#: The issue that brings this stage's handlers; None: they exist.
HANDLERS_ISSUE: int | None = None

log = logging.getLogger("quantmesh.portfolio")

#: The group of the market data (marks), a broadcast subscription: every instance reads every
#: instrument, as its accounts may hold any of them (the group name gets a suffix per member).
MARKET_DATA_GROUP = "portfolio.md"
#: The group of `control` (REPORT_PERFORMANCE), a broadcast subscription too: `control` has one
#: partition, which a shared group would give one instance, and each reports its own accounts.
CONTROL_GROUP = "portfolio.control"


class PortfolioHandlers:
    """The stage's domain handler over one `Portfolio`: an envelope in, the events to emit out.

    Snapshots follow event time, not the wall clock: the time of a fill (`ts_event`), a tick
    (`ts_event`) or a bar (`ts_close`, when its close is known). Boundaries are the multiples
    of the interval since the epoch. The snapshot at boundary B holds the state after every
    event with time <= B; it is emitted, stamped B, when the first event after B arrives and
    before that event is applied. Several boundaries crossed by one gap give one snapshot, at
    the last of them (nothing changed in between). No events, no snapshots.

    Performance reports (one per account and per strategy in it) go out with the snapshots of
    a boundary that is a multiple of `report_interval_ns`, or that a gap carried past one, and
    at once on a `REPORT_PERFORMANCE` control command (stamped with the command's time).

    With `owns` set, snapshots and reports cover only the accounts it accepts (the instances
    of a group split the accounts by partition); None: every account held.
    """

    def __init__(
        self,
        portfolio: Portfolio,
        snapshot_interval_ns: int,
        *,
        tracker: PerformanceTracker | None = None,
        report_interval_ns: int | None = None,
        topic_prefix: str = "",
    ) -> None:
        if snapshot_interval_ns <= 0:
            raise ValueError("snapshot_interval_ns must be positive")
        self.portfolio = portfolio
        #: Where the outputs go: the stage's topics, behind QM_PORTFOLIO_TOPIC_PREFIX.
        self.updates_topic = topic_prefix + Topic.PORTFOLIO_UPDATES
        self.snapshots_topic = topic_prefix + Topic.PORTFOLIO_SNAPSHOTS
        self.performance_topic = topic_prefix + Topic.PORTFOLIO_PERFORMANCE
        self.interval_ns = snapshot_interval_ns
        #: The next boundary to snapshot at; None until the first event.
        self.next_snapshot_ns: int | None = None
        self.tracker = tracker or PerformanceTracker(snapshot_interval_ns)
        self.report_interval_ns = report_interval_ns or snapshot_interval_ns
        if self.report_interval_ns <= 0:
            raise ValueError("report_interval_ns must be positive")
        self._report_bucket: int | None = None
        #: What the last call changed, for the store: closed trips and strategy curve points.
        self.closed_trips: list[ClosedTrip] = []
        self.strategy_points: list[tuple[str, str, int, Decimal]] = []
        self.applied_fill = False
        self.duplicate_fill = False
        #: The account an `AccountOpened` seeded in the last call, for the store.
        self.opened_account: Account | None = None
        #: Which accounts this instance snapshots and reports (None: every one it holds).
        self.owns: Callable[[str], bool] | None = None
        #: A boundary snapshotted before a restart, with what was stored at it: published as
        #: it was when the boundary is crossed again, instead of computed from a later state.
        self.stored_boundary: (
            tuple[int, dict[str, PortfolioSnapshot], list[PerformanceReport]] | None
        ) = None
        #: The stored events the last call published again (not to be stored again).
        self.republished: list[PortfolioSnapshot | PerformanceReport] = []

    def resume_at(self, boundary: int) -> None:
        """Resume the schedules at a boundary snapshotted and stored before a restart.

        It counts as due again: the first event after it publishes what `stored_boundary`
        then holds for it, and the schedules carry on from there. Events not after it (inputs
        redelivered from before it) snapshot nothing, where a fresh schedule would start at
        the first of them and snapshot the boundary anew from the state after all of them.
        """
        self.next_snapshot_ns = boundary
        self._report_bucket = boundary // self.report_interval_ns

    def owned_accounts(self) -> list[str]:
        """The accounts held that this instance snapshots and reports, sorted."""
        owns = self.owns
        if owns is None:
            return sorted(self.portfolio.accounts)
        return sorted(a for a in self.portfolio.accounts if owns(a))

    def __call__(self, envelope: Envelope[Any]) -> list[Emit]:
        """Handle one envelope of exec.reports, md.ticks or md.bars."""
        payload = envelope.payload
        self.closed_trips = []
        self.strategy_points = []
        self.applied_fill = False
        self.duplicate_fill = False
        self.opened_account = None
        self.republished = []
        if isinstance(payload, ExecutionReport):
            out = self._snapshots_due(payload.ts_event)
            if payload.is_fill:
                position = self.portfolio.apply_fill(payload)
                if position is None:
                    out += self._already_applied(payload)
                else:
                    self.applied_fill = True
                    self.closed_trips = self.tracker.on_fill(payload)
                    out.append(Emit(self.updates_topic, position, ts_event=payload.ts_event))
            return out
        if isinstance(payload, Tick):
            out = self._snapshots_due(payload.ts_event)
            self._mark(payload.instrument_id, payload.price, payload.ts_event)
            return out
        if isinstance(payload, Bar):
            out = self._snapshots_due(payload.ts_close)
            self._mark(payload.instrument_id, payload.close, payload.ts_close)
            return out
        if isinstance(payload, ControlCommand):
            return self._control(payload)
        if isinstance(payload, AccountOpened):
            return self._opened(payload)
        # Raising sends the message to the dead-letter topic of where it came from.
        raise TypeError(f"portfolio cannot handle {type(payload).__name__}")

    def _already_applied(self, report: ExecutionReport) -> list[Emit]:
        self.duplicate_fill = True
        log.info(
            "fill already applied; ignored",
            extra={
                "account_id": report.account_id,
                "trade_id": report.trade_id,
                "report_id": report.report_id,
            },
        )
        return []

    def _opened(self, opened: AccountOpened) -> list[Emit]:
        # Not a clock event: its time (the api's wall clock) does not move the snapshot schedule.
        account = self.portfolio.open_account(opened)
        extra = {"account_id": opened.account_id, "owner": opened.owner}
        if account is None:
            log.info("account opened before; its opening is not applied again", extra=extra)
            return []
        self.opened_account = account
        cash = {c: str(a) for c, a in sorted(opened.starting_cash.items())}
        log.info("account cash seeded from its opening", extra={**extra, "cash": cash})
        return []

    def _mark(self, instrument_id: str, price: Decimal, ts_ns: int) -> None:
        if self.portfolio.mark(instrument_id, price, ts_ns):
            self.tracker.mark(instrument_id, price)

    def _control(self, command: ControlCommand) -> list[Emit]:
        if command.action is not ControlAction.REPORT_PERFORMANCE:
            return []
        accounts = self.owned_accounts()
        if not command.applies_to("portfolio"):
            accounts = [a for a in accounts if a == command.target]
        log.info(
            "performance reports requested",
            extra={"target": command.target, "accounts": accounts, "by": command.issued_by},
        )
        return self._reports(accounts, command.ts_event)

    def _reports(self, accounts: list[str], ts_ns: int) -> list[Emit]:
        out: list[Emit] = []
        for account_id in accounts:
            base = self.portfolio.accounts[account_id].base_currency
            for scope in self.tracker.scopes(account_id):
                report = self.tracker.report(scope, base, ts_ns)
                out.append(Emit(self.performance_topic, report, ts_event=ts_ns))
        return out

    def _snapshots_due(self, ts_ns: int) -> list[Emit]:
        interval = self.interval_ns
        boundary = self.next_snapshot_ns
        if boundary is None:
            self.next_snapshot_ns = -(-ts_ns // interval) * interval  # first boundary >= ts
            return []
        if ts_ns <= boundary:
            return []
        at = (ts_ns - 1) // interval * interval  # last boundary before ts (>= `boundary`)
        self.next_snapshot_ns = at + interval
        portfolio = self.portfolio
        out: list[Emit] = []
        accounts = self.owned_accounts()
        stored, self.stored_boundary = self.stored_boundary, None
        again: dict[str, PortfolioSnapshot] = {}
        again_reports: list[PerformanceReport] = []
        if stored is not None and stored[0] == at:
            again = stored[1]
            again_reports = [r for r in stored[2] if r.account_id in again]
        for account_id in accounts:
            if account_id in again:
                # Stored before a restart (its effects on peaks and curves with it): the same
                # event again, which its readers recognise by account and time.
                snapshot = again[account_id]
                out.append(Emit(self.snapshots_topic, snapshot, ts_event=at))
                self.republished.append(snapshot)
                continue
            snapshot = portfolio.snapshot(account_id, at)
            out.append(Emit(self.snapshots_topic, snapshot, ts_event=at))
            account = portfolio.accounts[account_id]
            points = self.tracker.on_snapshot(
                account_id,
                at,
                snapshot.equity,
                base=account.base_currency,
                capital=account.capital,
                rate=portfolio.rate,
            )
            self.strategy_points += [(account_id, s, ts, eq) for s, (ts, eq) in points]
        bucket = at // self.report_interval_ns
        last = self._report_bucket
        if again_reports:
            out += [Emit(self.performance_topic, r, ts_event=at) for r in again_reports]
            self.republished += again_reports
        if at % self.report_interval_ns == 0 or (last is not None and bucket > last):
            out += self._reports([a for a in accounts if a not in again], at)
        self._report_bucket = bucket
        return out


def _event_time(payload: Any) -> int | None:
    """The time an input moves the snapshot schedule to (None: it does not move it)."""
    if isinstance(payload, ExecutionReport | Tick):
        return payload.ts_event
    if isinstance(payload, Bar):
        return payload.ts_close
    return None


class StoreFailedError(BaseException):
    """The store refused what the handler applied in memory: stop consuming, uncommitted.

    A BaseException, not an Exception, so the bus neither dead-letters the message nor commits
    it: the stage stops and, restarted, rebuilds its memory from the store and gets the
    message again.
    """


class PersistentHandlers:
    """`PortfolioHandlers` whose applied fills and snapshots are stored before they are emitted.

    A fill applied before this process started (its key loaded from the store) and delivered
    again has the position stored with it published once more: the crash may have come between
    the database commit and the Kafka commit, so that position may never have gone out.
    """

    def __init__(
        self,
        handlers: PortfolioHandlers,
        store: PostgresPortfolioStore,
        restored_fills: set[tuple[str, str, str]] | None = None,
        *,
        batched: bool = False,
        keep_fills: int | None = None,
        start_high_water: int | None = None,
    ) -> None:
        self.handlers = handlers
        self.store = store
        self.restored_fills = restored_fills if restored_fills is not None else set()
        #: None: every applied fill key stays in memory. A number (batched only): keys past the
        #: newest `keep_fills` leave `Portfolio.seen_fills` once stored; the store answers for
        #: a fill not newer than the newest key memory may lack (`floor`).
        self.keep_fills = keep_fills
        #: The newest fill time applied before this start.
        self.start_high_water = start_high_water
        self.floor = start_high_water
        self._recent: dict[tuple[str, str, str], int] = {}
        #: Store reads for a fill memory could not answer (tests, metrics).
        self.lookups = 0
        #: True: effects are held in `batch` and stored by `flush`, the batch hook, in one
        #: transaction before the batch commits; False: stored per message.
        self.batched = batched
        self.batch = PortfolioBatch()
        #: Held while handling a message, storing and reloading: the fills', the market
        #: data's and `control`'s subscriptions each handle and flush (their batches interleave
        #: on the event loop); two transactions writing the same accounts' rows at once could
        #: deadlock or land out of order, and a message handled while a reload awaits the
        #: store would change the portfolio the reload is replacing.
        self.lock = asyncio.Lock()
        #: Awaited (lock held) before each message: the service's `follow_partitions`, which
        #: keeps in memory the accounts this instance owns now. None: it has every account.
        self.follow: Callable[[], Awaitable[None]] | None = None
        #: The boundary the schedules resumed at (`PortfolioHandlers.resume_at`), until an
        #: event crosses it: what was stored at it is read then, to be published again.
        self.republish_at: int | None = None
        #: True (idempotent delivery): a fill applied before this start republishes its stored
        #: position only when the very message that applied it (same event id) comes again,
        #: as the bus redelivers it; a copy under another envelope (execution re-emitting an
        #: order's reports) is only dropped: its first position went out with the original.
        self.same_message_only = False

    async def flush(self) -> None:
        """Store what the consumed batch changed, in one transaction (the batch hook)."""
        async with self.lock:
            await self.store_held()

    async def store_held(self) -> None:
        """`flush` without taking the lock: the caller holds it."""
        batch, self.batch = self.batch, PortfolioBatch()
        if not batch:
            return
        handlers = self.handlers
        try:
            stored = await self.store.save_batch(batch, handlers.portfolio, handlers.tracker)
        except Exception as exc:
            raise StoreFailedError(f"portfolio store failed: {exc}") from exc
        if stored < len(batch.fills):
            log.warning(
                "fills already stored by another writer",
                extra={"fills": len(batch.fills), "stored": stored},
            )
        if self.keep_fills is not None:
            for key, ts, _, _ in batch.fills:
                self._remember(key, ts)

    def restart(self, high_water: int | None) -> None:
        """Start over from the state just loaded from the store into the handlers' portfolio.

        Every loaded fill key counts as applied before this (re)start: delivered again, its
        stored position is published once more. `high_water` is the newest stored fill time.
        """
        portfolio = self.handlers.portfolio
        self.restored_fills = set(portfolio.seen_fills)
        self.start_high_water = self.floor = high_water
        self._recent = {}
        for key in portfolio.seen_fills:
            # At most `keep_fills`, all from before the (re)start (evicted like the rest).
            self.start_key(key)

    def start_key(self, key: tuple[str, str, str]) -> None:
        """Track a key loaded at start (its time is taken as the start's newest)."""
        if self.keep_fills is not None and self.start_high_water is not None:
            self._recent[key] = self.start_high_water

    def _remember(self, key: tuple[str, str, str], ts: int) -> None:
        """Track a stored fill key; forget the oldest past `keep_fills` (the store has them)."""
        keep = self.keep_fills
        assert keep is not None
        recent = self._recent
        recent[key] = ts
        if len(recent) <= keep:
            return
        seen = self.handlers.portfolio.seen_fills
        while len(recent) > keep:
            old = next(iter(recent))
            old_ts = recent.pop(old)
            seen.discard(old)
            self.floor = old_ts if self.floor is None else max(self.floor, old_ts)

    async def _known_before(self, envelope: Envelope[Any]) -> None:
        """Put a fill's key in memory if the store has it and memory may not (bounded only).

        Only a fill not newer than `floor` can be stored without being in memory. One found
        that is not newer than this start's newest is treated as applied before the start:
        its stored position is published again, as for a key loaded at start.
        """
        payload = envelope.payload
        if (
            self.keep_fills is None
            or self.floor is None
            or not isinstance(payload, ExecutionReport)
            or not payload.is_fill
            or payload.ts_event > self.floor
        ):
            return
        key = fill_key(payload)
        portfolio = self.handlers.portfolio
        if key in portfolio.seen_fills:
            return
        self.lookups += 1
        try:
            found = await self.store.is_applied(key)
        except Exception as exc:
            raise StoreFailedError(f"portfolio store failed: {exc}") from exc
        if not found:
            return
        portfolio.seen_fills.add(key)
        self._remember(key, payload.ts_event)
        start = self.start_high_water
        if start is not None and payload.ts_event <= start:
            self.restored_fills.add(key)

    async def _stored_boundary(self, envelope: Envelope[Any]) -> None:
        """Read what was stored at the boundary the schedules resumed at, if this envelope
        crosses it (the handlers publish it again)."""
        at = self.republish_at
        ts = _event_time(envelope.payload)
        if at is None or ts is None:
            return
        handlers = self.handlers
        if handlers.next_snapshot_ns != at:
            self.republish_at = None  # the schedule moved on without crossing it
            return
        if ts <= at:
            return
        self.republish_at = None
        try:
            snapshots, reports = await self.store.stored_boundary(at, handlers.owned_accounts())
        except Exception as exc:
            raise StoreFailedError(f"portfolio store failed: {exc}") from exc
        handlers.stored_boundary = (at, snapshots, reports)
        log.info(
            "snapshot boundary stored before the restart crossed again: published as stored",
            extra={"boundary": at, "accounts": sorted(snapshots), "reports": len(reports)},
        )

    def _fresh(self, out: list[Emit]) -> tuple[list[PortfolioSnapshot], list[PerformanceReport]]:
        """The snapshots and reports of `out` the handlers computed (not stored ones again)."""
        again = {id(event) for event in self.handlers.republished}
        snapshots: list[PortfolioSnapshot] = []
        reports: list[PerformanceReport] = []
        for emit in out:
            event = emit.payload
            if id(event) in again:
                continue
            if isinstance(event, PortfolioSnapshot):
                snapshots.append(event)
            elif isinstance(event, PerformanceReport):
                reports.append(event)
        return snapshots, reports

    def _hold(self, envelope: Envelope[Any], out: list[Emit]) -> None:
        handlers = self.handlers
        portfolio = handlers.portfolio
        payload = envelope.payload
        batch = self.batch
        snapshots, reports = self._fresh(out)
        if snapshots:
            batch.snapshots.append((snapshots, list(handlers.strategy_points)))
        if handlers.applied_fill:
            assert isinstance(payload, ExecutionReport)
            ts = payload.ts_event
            account = portfolio.accounts[payload.account_id]
            book = account.positions[payload.instrument_id]
            # The position the fill emitted (the book as it is now), not a second one built.
            emitted = next(e.payload for e in out if isinstance(e.payload, Position))
            position = json.loads(emitted.model_dump_json())
            batch.fills.append((fill_key(payload), ts, position, envelope.event_id))
            batch.books[(book.account_id, book.instrument_id)] = (book, ts)
            batch.accounts[account.account_id] = (account, ts)
            for trip_book in handlers.tracker.books_of(payload):
                key = (trip_book.account_id, trip_book.strategy_id, trip_book.instrument_id)
                batch.trip_books[key] = (trip_book, ts)
            batch.trips += handlers.closed_trips
        batch.reports += reports
        if handlers.opened_account is not None:
            assert isinstance(payload, AccountOpened)
            batch.opened.append((handlers.opened_account, payload.ts_event))

    async def __call__(self, envelope: Envelope[Any]) -> list[Emit]:
        """Handle one envelope, then store its effects (one transaction per kind), or hold
        them for the batch's `flush` when batched; first follow the partitions owned now."""
        async with self.lock:
            if self.follow is not None:
                await self.follow()
            return await self._handle(envelope)

    async def _handle(self, envelope: Envelope[Any]) -> list[Emit]:
        handlers = self.handlers
        if self.keep_fills is not None:
            await self._known_before(envelope)
        if self.republish_at is not None:
            await self._stored_boundary(envelope)
        out = handlers(envelope)
        if self.batched:
            self._hold(envelope, out)
            if handlers.duplicate_fill:
                await self._republish(envelope, out)
            return out
        portfolio = handlers.portfolio
        payload = envelope.payload
        snapshots, reports = self._fresh(out)
        applied = handlers.applied_fill
        try:
            if snapshots:
                await self.store.save_snapshots(
                    snapshots, portfolio, handlers.tracker, handlers.strategy_points
                )
            if applied:
                assert isinstance(payload, ExecutionReport)
                account = portfolio.accounts[payload.account_id]
                book = account.positions[payload.instrument_id]
                stored = await self.store.save_fill(
                    fill_key(payload),
                    account,
                    book,
                    payload.ts_event,
                    trip_books=handlers.tracker.books_of(payload),
                    trips=handlers.closed_trips,
                )
                if not stored:
                    log.warning(
                        "fill already stored by another writer",
                        extra={"account_id": payload.account_id, "trade_id": payload.trade_id},
                    )
            if reports:
                await self.store.save_reports(reports)
            if handlers.opened_account is not None:
                assert isinstance(payload, AccountOpened)
                await self.store.save_opened(handlers.opened_account, payload.ts_event)
        except Exception as exc:
            raise StoreFailedError(f"portfolio store failed: {exc}") from exc
        if handlers.duplicate_fill:
            await self._republish(envelope, out)
        return out

    async def _republish(self, envelope: Envelope[Any], out: list[Emit]) -> None:
        """A fill applied before this start, delivered again: publish its stored position."""
        payload = envelope.payload
        if not isinstance(payload, ExecutionReport):
            return
        key = fill_key(payload)
        if key not in self.restored_fills:
            return
        try:
            position, applied_by = await self.store.applied(key)
        except Exception as exc:
            raise StoreFailedError(f"portfolio store failed: {exc}") from exc
        if self.same_message_only and applied_by not in (None, envelope.event_id):
            log.info(
                "copy of a fill applied before the start; dropped",
                extra={"account_id": payload.account_id, "trade_id": payload.trade_id},
            )
            return
        self.restored_fills.discard(key)
        if position is not None:
            topic = self.handlers.updates_topic
            out.append(Emit(topic, position, ts_event=position.ts_event))


class PortfolioService(Service[PortfolioSettings]):
    """The portfolio stage: applies each fill once, marks positions, snapshots accounts."""

    name = "portfolio"
    settings_class = PortfolioSettings

    #: Input topics (DESIGN.md); `control` for REPORT_PERFORMANCE, `accounts` for cash.
    consumes: ClassVar[tuple[str, ...]] = (
        Topic.EXEC_REPORTS,
        Topic.MD_TICKS,
        Topic.MD_BARS,
        Topic.CONTROL,
        Topic.ACCOUNTS,
    )
    #: Output topics (DESIGN.md).
    produces: ClassVar[tuple[str, ...]] = (
        Topic.PORTFOLIO_UPDATES,
        Topic.PORTFOLIO_SNAPSHOTS,
        Topic.PORTFOLIO_PERFORMANCE,
    )
    #: What the stage's group `portfolio` subscribes (split between its instances by account).
    subscribed: ClassVar[tuple[str, ...]] = (Topic.EXEC_REPORTS, Topic.ACCOUNTS)
    #: The marks: read whole by every instance (MARKET_DATA_GROUP, broadcast).
    market_data: ClassVar[tuple[str, ...]] = (Topic.MD_TICKS, Topic.MD_BARS)
    #: The commands: read whole by every instance (CONTROL_GROUP, broadcast).
    commands: ClassVar[tuple[str, ...]] = (Topic.CONTROL,)

    def __init__(self, settings: PortfolioSettings) -> None:
        super().__init__(settings)
        self.handlers: PortfolioHandlers | None = None
        self.store: PostgresPortfolioStore | None = None
        #: The storing handler with PostgreSQL (its `flush` is the batch hook).
        self.persistent: PersistentHandlers | None = None
        #: State rebuilds from the store on partition assignment (tests, metrics).
        self.reloads = 0
        #: The fills' subscription when its partitions split the accounts between instances
        #: (with PostgreSQL, the shared store); None: this instance has every account.
        self._flow: Subscription | None = None
        self._reports_topic = settings.portfolio_topic_prefix + Topic.EXEC_REPORTS
        self._partition_count = 1
        self._partition_cache: dict[str, int] = {}
        #: The `exec.reports` partitions owned when memory was last cut to them (None: not
        #: yet), and those whose accounts memory holds as the store had them since it was
        #: given them (a gained partition outside this set is reloaded before it is used).
        self._owned: frozenset[int] | None = None
        self._loaded_for: frozenset[int] = frozenset()

    def _fresh_state(self) -> tuple[Portfolio, PerformanceTracker]:
        """An empty portfolio and performance tracker as the settings make them."""
        settings = self.settings
        portfolio = Portfolio(settings.base_currency, settings.starting_cash)
        tracker_cls = PerformanceTracker if settings.portfolio_performance else NoPerformanceTracker
        tracker = tracker_cls(
            settings.snapshot_interval_ns,
            confidence=settings.performance_confidence,
            risk_free=settings.performance_risk_free,
            report_trips=settings.performance_trips,
        )
        return portfolio, tracker

    async def setup(self, ctx: ServiceContext[PortfolioSettings]) -> None:
        """Rebuild from the store if there is one; subscribe fills in the group, market data
        broadcast.

        With QM_DATABASE_URL the state lives in PostgreSQL: loaded here, reloaded whenever the
        group assigns this member partitions (`reload`), and every applied fill and snapshot
        stored before the output is produced and the offsets committed.
        """
        settings = ctx.settings
        portfolio, tracker = self._fresh_state()
        prefix = settings.portfolio_topic_prefix
        self.handlers = PortfolioHandlers(
            portfolio,
            settings.snapshot_interval_ns,
            tracker=tracker,
            report_interval_ns=settings.performance_interval_ns,
            topic_prefix=prefix,
        )
        handler: Any = self.handlers
        on_batch = None
        on_assign = None
        if ctx.pg is not None:
            self.store = PostgresPortfolioStore(ctx.pg)
            keep = settings.portfolio_keep_fills
            fills = await self.store.load(portfolio, tracker, recent_fills=keep)
            high_water = await self.store.fill_high_water()
            ctx.logger.info(
                "portfolio rebuilt from PostgreSQL",
                extra={"accounts": len(portfolio.accounts), "applied_fills_loaded": fills},
            )
            handler = self.persistent = PersistentHandlers(
                self.handlers, self.store, batched=True, keep_fills=keep
            )
            handler.restart(high_water)
            if settings.order_flow_delivery == "idempotent":
                # The output of the last batches may never have gone out: the boundary last
                # snapshotted is published again, as stored, when an event crosses it again.
                resumed = await self.store.last_snapshot_ts()
                if resumed is not None:
                    self.handlers.resume_at(resumed)
                    handler.republish_at = resumed
                handler.same_message_only = True
            on_batch = handler.flush
            on_assign = self.reload
        # Transactional (default): a batch's output and offsets commit in one Kafka transaction.
        # Idempotent: the output is produced once the batch hook stored the batch; a fill
        # redelivered after that is recognised by its key and its stored position published
        # again (`PersistentHandlers`), as the crash may have come before it went out.
        delivery = settings.order_flow_options()
        flow = ctx.subscribe(
            prefix + self.name,
            [prefix + topic for topic in self.subscribed],
            handler,
            on_batch=on_batch,
            on_assign=on_assign,
            **delivery,
        )
        if self.persistent is not None:
            # Instances split the accounts by partition only when they share the store; without
            # it one instance runs and has them all.
            self._flow = flow
            bus_topics = getattr(ctx.bus, "topics", None)
            names = bus_topics if isinstance(bus_topics, TopicRegistry) else registry()
            self._partition_count = names.partitions(self._reports_topic)
            opened = names.partitions(prefix + Topic.ACCOUNTS)
            if opened != self._partition_count:
                log.warning(
                    "accounts and exec.reports differ in partitions (%d, %d): an account's "
                    "opening may reach another instance than its fills",
                    opened,
                    self._partition_count,
                )
            self.handlers.owns = self.owns_account
            self.persistent.follow = self.follow_partitions
        # Ticks and bars are keyed by instrument, not by account: in the group, each instance
        # would mark only its share of the instruments, whatever its accounts hold. Broadcast:
        # every instance reads every instrument from the latest offsets, commits nothing (a
        # restart marks from the next tick; the store holds the marks of the last snapshot)
        # and produces its snapshots without a transaction. Joined right after the group, so
        # on the in-memory bus every message still reaches this stage in publish order.
        # Idempotent delivery holds the snapshots and reports the broadcasts bring until their
        # batch hook stored them too, as for the fills (on the in-memory bus it always is so).
        held = settings.order_flow_delivery == "idempotent"
        ctx.subscribe(
            prefix + MARKET_DATA_GROUP,
            [prefix + topic for topic in self.market_data],
            handler,
            on_batch=on_batch,
            broadcast=True,
            output_after_batch=held,
        )
        # `control` has one partition: in the group only one instance would get a
        # REPORT_PERFORMANCE, and it owns some accounts only. Broadcast, every instance reads
        # each command published after its start and reports the accounts it owns.
        ctx.subscribe(
            prefix + CONTROL_GROUP,
            [prefix + topic for topic in self.commands],
            handler,
            on_batch=on_batch,
            broadcast=True,
            output_after_batch=held,
        )
        ctx.logger.info(
            "portfolio handlers ready",
            extra={
                "base_currency": settings.base_currency,
                "starting_cash": {k: str(v) for k, v in settings.starting_cash.items()},
                "snapshot_interval_s": settings.snapshot_interval_s,
                "performance_interval_s": settings.performance_interval_s,
                "order_flow_delivery": settings.order_flow_delivery,
            },
        )

    async def reload(self, partitions: Sequence[tuple[str, int]]) -> None:
        """Rebuild the portfolio from the store: the group assigned this member `partitions`
        (the bus's on_assign hook, awaited between batches, before any of their messages).

        The accounts of partitions another member owned until now are in the store as it left
        them (it stored each batch before committing it), and the accounts this member kept are
        there up to its last batch (every batch hook ran), so the whole state is rebuilt, then
        cut to the accounts of the partitions owned now. Kept from memory: newer marks and
        rates (ticks are stored only with snapshots), and the snapshot and report schedules
        (they live in the handlers). The first assignment reloads too: the bus tells it with
        the first batch, which may come after other members applied fills since this member's
        start. Partitions of market data only carry no account: nothing is reloaded.
        """
        persistent = self.persistent
        assert persistent is not None
        prefix = self.settings.portfolio_topic_prefix
        keyed_by_account = {prefix + Topic.EXEC_REPORTS, prefix + Topic.ACCOUNTS}
        if not any(topic in keyed_by_account for topic, _ in partitions):
            return
        # Held throughout: no message is handled and nothing stored while the store is read.
        async with persistent.lock:
            fills = await self._reload_locked()
        log.info(
            "portfolio reloaded from PostgreSQL on partition assignment",
            extra={
                "accounts": len(persistent.handlers.portfolio.accounts),
                "applied_fills_loaded": fills,
                "partitions": [f"{topic}:{partition}" for topic, partition in partitions],
            },
        )

    async def _reload_locked(self) -> int:
        """Rebuild from the store (lock held), then keep only the owned accounts; return the
        applied fill keys loaded."""
        persistent, store = self.persistent, self.store
        assert persistent is not None
        assert store is not None
        # Nothing is held between this group's batches (the bus ran every batch hook), but
        # another subscription, or this one mid-batch, may hold effects: stored before the load.
        await persistent.store_held()
        handlers = persistent.handlers
        portfolio, tracker = self._fresh_state()
        try:
            fills = await store.load(
                portfolio, tracker, recent_fills=self.settings.portfolio_keep_fills
            )
            high_water = await store.fill_high_water()
        except Exception as exc:
            raise StoreFailedError(f"portfolio store failed: {exc}") from exc
        for instrument_id, price in portfolio.carry_prices(handlers.portfolio):
            tracker.mark(instrument_id, price)
        handlers.portfolio, handlers.tracker = portfolio, tracker
        persistent.restart(high_water)
        self.reloads += 1
        owned = self.owned_partitions()
        if owned is not None:
            self._loaded_for = owned
            self._cut_to(owned)
        return fills

    def owned_partitions(self) -> frozenset[int] | None:
        """The `exec.reports` partitions this member owns now (None: every account is its own).

        None without a shared store: then one instance runs and has every account.
        """
        flow = self._flow
        if flow is None:
            return None
        topic = self._reports_topic
        return frozenset(p for t, p in flow.assignment() if t == topic)

    def partition_of_account(self, account_id: str) -> int:
        """The partition of `exec.reports` (and `accounts`) an account's messages are keyed to."""
        partition = self._partition_cache.get(account_id)
        if partition is None:
            partition = partition_of(account_id, self._partition_count)
            self._partition_cache[account_id] = partition
        return partition

    def owns_account(self, account_id: str) -> bool:
        """Whether this member owns the account's partition (as last followed)."""
        owned = self._owned
        return owned is None or self.partition_of_account(account_id) in owned

    async def follow_partitions(self) -> None:
        """Keep in memory exactly the accounts whose partitions this member owns now.

        Awaited before each message with the handlers' lock held. A partition given since the
        last reload and not loaded (the bus calls on_assign only before the group's next
        batch, and a member may get market data long before a fill) is loaded from the store
        now, so the first snapshot after a takeover is of the state the previous owner stored.
        The accounts of partitions lost are dropped: their new owner snapshots, stores and
        reports them, and a copy kept here would only go stale (it comes back by a reload).
        """
        owned = self.owned_partitions()
        if owned is None or owned == self._owned:
            return
        if not owned <= self._loaded_for:
            fills = await self._reload_locked()
            log.info(
                "portfolio reloaded from PostgreSQL for partitions assigned before a message",
                extra={
                    "accounts": len(self.handlers.portfolio.accounts) if self.handlers else 0,
                    "applied_fills_loaded": fills,
                    "partitions": sorted(owned),
                },
            )
            return
        persistent = self.persistent
        assert persistent is not None
        # What is held refers to accounts about to be dropped: stored first.
        await persistent.store_held()
        self._cut_to(owned)

    def _cut_to(self, owned: frozenset[int]) -> None:
        """Drop from memory the accounts of partitions not in `owned`."""
        handlers = self.handlers
        assert handlers is not None
        self._owned = owned
        # A partition given back later is reloaded then: this copy would be stale.
        self._loaded_for = self._loaded_for & owned

        def keep(account_id: str) -> bool:
            return self.partition_of_account(account_id) in owned

        dropped = handlers.portfolio.forget_accounts(keep)
        handlers.tracker.forget_accounts(keep)
        if dropped:
            log.info(
                "dropped %d accounts of partitions this member does not own",
                dropped,
                extra={"partitions": sorted(owned)},
            )
