"""The portfolio stage service: fills to positions, marks to P&L, snapshots on event time."""

from __future__ import annotations

import logging
from typing import Any, ClassVar

from quantmesh_common.bus.base import Emit
from quantmesh_common.envelope import Envelope
from quantmesh_common.messages import Bar, ExecutionReport, PortfolioSnapshot, Tick
from quantmesh_common.runtime import Service, ServiceContext
from quantmesh_common.topics import Topic
from quantmesh_portfolio.config import PortfolioSettings
from quantmesh_portfolio.positions import Portfolio, fill_key
from quantmesh_portfolio.store import PostgresPortfolioStore

#: The issue that brings this stage's handlers; None: they exist.
HANDLERS_ISSUE: int | None = None

log = logging.getLogger("quantmesh.portfolio")


class PortfolioHandlers:
    """The stage's domain handler over one `Portfolio`: an envelope in, the events to emit out.

    Snapshots follow event time, not the wall clock: the time of a fill (`ts_event`), a tick
    (`ts_event`) or a bar (`ts_close`, when its close is known). Boundaries are the multiples
    of the interval since the epoch. The snapshot at boundary B holds the state after every
    event with time <= B; it is emitted, stamped B, when the first event after B arrives and
    before that event is applied. Several boundaries crossed by one gap give one snapshot, at
    the last of them (nothing changed in between). No events, no snapshots.
    """

    def __init__(self, portfolio: Portfolio, snapshot_interval_ns: int) -> None:
        if snapshot_interval_ns <= 0:
            raise ValueError("snapshot_interval_ns must be positive")
        self.portfolio = portfolio
        self.interval_ns = snapshot_interval_ns
        #: The next boundary to snapshot at; None until the first event.
        self.next_snapshot_ns: int | None = None

    def __call__(self, envelope: Envelope[Any]) -> list[Emit]:
        """Handle one envelope of exec.reports, md.ticks or md.bars."""
        payload = envelope.payload
        if isinstance(payload, ExecutionReport):
            out = self._snapshots_due(payload.ts_event)
            if payload.is_fill:
                position = self.portfolio.apply_fill(payload)
                if position is None:
                    log.info(
                        "fill already applied; ignored",
                        extra={
                            "account_id": payload.account_id,
                            "trade_id": payload.trade_id,
                            "report_id": payload.report_id,
                        },
                    )
                else:
                    out.append(Emit(Topic.PORTFOLIO_UPDATES, position, ts_event=payload.ts_event))
            return out
        if isinstance(payload, Tick):
            out = self._snapshots_due(payload.ts_event)
            self.portfolio.mark(payload.instrument_id, payload.price, payload.ts_event)
            return out
        if isinstance(payload, Bar):
            out = self._snapshots_due(payload.ts_close)
            self.portfolio.mark(payload.instrument_id, payload.close, payload.ts_close)
            return out
        # Raising sends the message to the dead-letter topic of where it came from.
        raise TypeError(f"portfolio cannot handle {type(payload).__name__}")

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
        return [
            Emit(Topic.PORTFOLIO_SNAPSHOTS, portfolio.snapshot(account_id, at), ts_event=at)
            for account_id in sorted(portfolio.accounts)
        ]


class StoreFailedError(BaseException):
    """The store refused what the handler applied in memory: stop consuming, uncommitted.

    A BaseException, not an Exception, so the bus neither dead-letters the message nor commits
    it: the stage stops and, restarted, rebuilds its memory from the store and gets the
    message again.
    """


class PersistentHandlers:
    """`PortfolioHandlers` whose applied fills and snapshots are stored before they are emitted."""

    def __init__(self, handlers: PortfolioHandlers, store: PostgresPortfolioStore) -> None:
        self.handlers = handlers
        self.store = store

    async def __call__(self, envelope: Envelope[Any]) -> list[Emit]:
        """Handle one envelope, then store its effects (one transaction per kind)."""
        out = self.handlers(envelope)
        portfolio = self.handlers.portfolio
        payload = envelope.payload
        snapshots = [e.payload for e in out if isinstance(e.payload, PortfolioSnapshot)]
        applied = isinstance(payload, ExecutionReport) and any(
            e.topic == Topic.PORTFOLIO_UPDATES for e in out
        )
        try:
            if snapshots:
                await self.store.save_snapshots(snapshots, portfolio)
            if applied:
                assert isinstance(payload, ExecutionReport)
                account = portfolio.accounts[payload.account_id]
                book = account.positions[payload.instrument_id]
                stored = await self.store.save_fill(
                    fill_key(payload), account, book, payload.ts_event
                )
                if not stored:
                    log.warning(
                        "fill already stored by another writer",
                        extra={"account_id": payload.account_id, "trade_id": payload.trade_id},
                    )
        except Exception as exc:
            raise StoreFailedError(f"portfolio store failed: {exc}") from exc
        return out


class PortfolioService(Service[PortfolioSettings]):
    """The portfolio stage: applies each fill once, marks positions, snapshots accounts."""

    name = "portfolio"
    settings_class = PortfolioSettings

    #: Input topics (DESIGN.md). `control` is declared by the design but not handled yet.
    consumes: ClassVar[tuple[str, ...]] = (
        Topic.EXEC_REPORTS,
        Topic.MD_TICKS,
        Topic.MD_BARS,
        Topic.CONTROL,
    )
    #: Output topics (DESIGN.md).
    produces: ClassVar[tuple[str, ...]] = (
        Topic.PORTFOLIO_UPDATES,
        Topic.PORTFOLIO_SNAPSHOTS,
    )
    #: What the stage subscribes today.
    subscribed: ClassVar[tuple[str, ...]] = (Topic.EXEC_REPORTS, Topic.MD_TICKS, Topic.MD_BARS)

    def __init__(self, settings: PortfolioSettings) -> None:
        super().__init__(settings)
        self.handlers: PortfolioHandlers | None = None
        self.store: PostgresPortfolioStore | None = None

    async def setup(self, ctx: ServiceContext[PortfolioSettings]) -> None:
        """Rebuild from the store if there is one; subscribe fills and market data in one group.

        With QM_DATABASE_URL the state lives in PostgreSQL: loaded here, and every applied
        fill and snapshot stored before the output is produced and the offsets committed.
        """
        settings = ctx.settings
        portfolio = Portfolio(settings.base_currency, settings.starting_cash)
        self.handlers = PortfolioHandlers(portfolio, settings.snapshot_interval_ns)
        handler: Any = self.handlers
        if ctx.pg is not None:
            self.store = PostgresPortfolioStore(ctx.pg)
            fills = await self.store.load(portfolio)
            ctx.logger.info(
                "portfolio rebuilt from PostgreSQL",
                extra={"accounts": len(portfolio.accounts), "applied_fills": fills},
            )
            handler = PersistentHandlers(self.handlers, self.store)
        ctx.subscribe(self.name, self.subscribed, handler, transactional=True)
        ctx.logger.info(
            "portfolio handlers ready",
            extra={
                "base_currency": settings.base_currency,
                "starting_cash": {k: str(v) for k, v in settings.starting_cash.items()},
                "snapshot_interval_s": settings.snapshot_interval_s,
            },
        )
