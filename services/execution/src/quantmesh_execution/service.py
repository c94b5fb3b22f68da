"""The execution stage service: order commands and market data in, execution reports out."""

from __future__ import annotations

import logging
from typing import Any, ClassVar

from quantmesh_common.bus.base import BatchHook, Emit
from quantmesh_common.envelope import Envelope
from quantmesh_common.messages import (
    BookSnapshot,
    ControlAction,
    ControlCommand,
    ExecutionReport,
    OrderCommand,
    Tick,
    format_reason,
)
from quantmesh_common.retention import prune_forever
from quantmesh_common.runtime import Service, ServiceContext
from quantmesh_common.topics import Topic
from quantmesh_execution.claims import PostgresCommandClaims
from quantmesh_execution.config import ExecutionSettings
from quantmesh_execution.guarded import GuardedExecutionHandler
from quantmesh_execution.outputs import OutputLog
from quantmesh_execution.sentlog import (
    MemorySentLog,
    PostgresSentLog,
    SentLog,
    WriteBehindSentLog,
)
from quantmesh_execution.simulated import (
    FixedBpsSlippage,
    NoSlippage,
    SimulatedVenue,
    SimulatedVenueConfig,
    SlippageModel,
    SquareRootImpact,
)
from quantmesh_execution.venue import AsyncVenue, AsyncVenueAdapter, VenueAdapter, dispatch

log = logging.getLogger(__name__)

#: None: the stage has its handlers (tests/stages checks that it then subscribes).
HANDLERS_ISSUE: int | None = None
#: Stored reports older than this are deleted (idempotent delivery): a redelivery reaches back
#: to the last committed offset only, seconds to minutes. The sent-log is kept: it alone keeps
#: a SUBMIT from reaching the venue twice, however late it comes again. A live venue's CANCEL
#: and REPLACE claims (`execution_command_claims`) are kept as long as the stored reports.
OUTPUT_RETENTION_NS = 24 * 3600 * 1_000_000_000


def build_slippage(settings: ExecutionSettings) -> SlippageModel:
    """Return the slippage model the settings name."""
    if settings.sim_slippage == "fixed_bps":
        return FixedBpsSlippage(settings.sim_slippage_bps)
    if settings.sim_slippage == "sqrt_impact":
        assert settings.sim_impact_adv is not None  # the settings validator requires it
        return SquareRootImpact(
            k=settings.sim_impact_k, sigma=settings.sim_impact_sigma, adv=settings.sim_impact_adv
        )
    return NoSlippage()


def build_venue(
    settings: ExecutionSettings, *, id_prefix: str | None = None, keep_closed: int | None = None
) -> SimulatedVenue:
    """Return the simulated venue the settings describe (`keep_closed`: its memory bound)."""
    return SimulatedVenue(
        SimulatedVenueConfig(
            venue=settings.venue,
            maker_fee=settings.sim_maker_fee,
            taker_fee=settings.sim_taker_fee,
            slippage=build_slippage(settings),
            latency_ns=settings.sim_latency_ns,
            market_waits_for_trade=settings.sim_market_waits_for_trade,
        ),
        id_prefix=id_prefix,
        keep_closed=keep_closed,
    )


def build_live_venue(settings: ExecutionSettings) -> AsyncVenue:
    """Return the ccxt live venue the settings describe (QM_EXEC_VENUE=ccxt).

    ccxt is imported here, not at module load: importing it takes seconds, and the simulated
    venue never needs it. Credentials come from `QM_<EXCHANGE>_API_KEY` / `_API_SECRET` /
    `_API_PASSWORD` or their `_FILE` twins, and never reach a log.
    """
    from quantmesh_execution import live

    exchange_id = settings.exec_ccxt_exchange
    assert exchange_id is not None  # the settings validator requires it with ccxt
    credentials = live.Credentials.from_env(exchange_id)
    exchange = live.build_exchange(
        exchange_id,
        credentials,
        sandbox=settings.exec_ccxt_sandbox,
        timeout_ms=settings.exec_ccxt_timeout_ms,
        base_url=settings.exec_ccxt_base_url,
    )
    return live.CcxtVenue(settings.venue, [live.CcxtRoute(exchange_id, exchange, credentials)])


def _prune_outputs(ctx: ServiceContext[ExecutionSettings], outputs: OutputLog) -> None:
    """Delete the stored reports past OUTPUT_RETENTION_NS in the background (with PostgreSQL)."""
    if outputs.pool is not None:
        ctx.add_task(
            lambda: prune_forever(outputs.prune, OUTPUT_RETENTION_NS, "execution outputs"),
            "execution.outputs.prune",
        )


def _prune_claims(ctx: ServiceContext[ExecutionSettings], claims: PostgresCommandClaims) -> None:
    """Delete the CANCEL and REPLACE claims past OUTPUT_RETENTION_NS in the background."""
    ctx.add_task(
        lambda: prune_forever(claims.prune, OUTPUT_RETENTION_NS, "execution command claims"),
        "execution.command_claims.prune",
    )


def _store_batch(claims: WriteBehindSentLog, outputs: OutputLog) -> BatchHook:
    """The batch hook of idempotent delivery: the claims, then the reports they led to.

    In this order, stored reports always have their claims: a crash between the two writes
    leaves claims without reports, and their redelivered SUBMITs are answered
    ORDER_NOT_FOUND_AT_VENUE (none of the batch's output was published yet).
    """

    async def store() -> None:
        await claims.flush()
        await outputs.flush()

    return store


class ExecutionHandler:
    """Feeds commands, market data and operator commands to one venue; emits its reports.

    Plain Python: time comes from the events (`ts_event`), never from a clock.
    """

    def __init__(self, venue: VenueAdapter) -> None:
        self.venue = venue

    def __call__(self, envelope: Envelope[Any]) -> list[Emit]:
        """Handle one envelope of orders.commands, md.ticks, md.books or control."""
        return [
            Emit(Topic.EXEC_REPORTS, report, ts_event=report.ts_event)
            for report in self.reports_for(envelope.payload)
        ]

    def reports_for(self, event: object) -> list[ExecutionReport]:
        """Return the venue's reports for one event."""
        if isinstance(event, OrderCommand):
            if event.venue != self.venue.venue:
                return []  # another venue's adapter, in its own consumer group, handles it
            return dispatch(self.venue, event, event.ts_event)
        if isinstance(event, Tick | BookSnapshot):
            return self.venue.on_market_data(event)
        if isinstance(event, ControlCommand):
            return self._on_control(event)
        log.warning("unexpected event ignored", extra={"event_type": type(event).__name__})
        return []

    def _on_control(self, command: ControlCommand) -> list[ExecutionReport]:
        if command.action is not ControlAction.CANCEL_ALL_ORDERS:
            return []
        # Target "*" or this venue's id: every order; anything else names one account.
        accounts = None if command.applies_to(self.venue.venue) else [command.target]
        reason = format_reason(
            "CANCEL_ALL_ORDERS", {"command_id": command.command_id, "issued_by": command.issued_by}
        )
        return self.venue.cancel_all(command.ts_event, accounts, reason)


class ExecutionService(Service[ExecutionSettings]):
    """The execution stage over the simulated venue named by QM_VENUE."""

    name = "execution"
    settings_class = ExecutionSettings

    #: Input topics (DESIGN.md).
    consumes: ClassVar[tuple[str, ...]] = (
        Topic.ORDERS_COMMANDS,
        Topic.MD_TICKS,
        Topic.MD_BOOKS,
        Topic.CONTROL,
    )
    #: Output topics (DESIGN.md).
    produces: ClassVar[tuple[str, ...]] = (Topic.EXEC_REPORTS,)

    def __init__(self, settings: ExecutionSettings) -> None:
        super().__init__(settings)
        self.handler: ExecutionHandler | GuardedExecutionHandler | None = None
        self.live_venue: AsyncVenue | None = None

    async def setup(self, ctx: ServiceContext[ExecutionSettings]) -> None:
        """Subscribe one handler to every input: the venue's book and its orders are one state.

        The consumer group is per venue, so every venue's adapter sees every command and keeps
        the ones for its venue.
        """
        settings = ctx.settings
        delivery = settings.order_flow_options()
        idempotent = settings.order_flow_delivery == "idempotent"
        if idempotent and not settings.uses_sent_log and settings.bus == "kafka":
            ctx.logger.warning(
                "QM_ORDER_FLOW_DELIVERY=idempotent without the sent-log (QM_DATABASE_URL): "
                "a restart forgets what reached the venue, and its inputs may act again"
            )
        if settings.exec_venue == "ccxt":
            live = build_live_venue(settings)
            self.live_venue = live
            # A live venue is async: always through the guarded handler, with the durable
            # sent-log when PostgreSQL is there, else one process's memory.
            sent_log: SentLog = MemorySentLog()
            command_claims = None
            if settings.uses_sent_log:
                postgres = PostgresSentLog(ctx.require_pg())
                await postgres.check()
                sent_log = postgres
                # A CANCEL or REPLACE is claimed before its call too: the venue acts on it.
                command_claims = PostgresCommandClaims(live.venue, ctx.require_pg())
                await command_claims.check()
                _prune_claims(ctx, command_claims)
            live_outputs = None
            if idempotent:
                live_outputs = OutputLog(
                    live.venue, ctx.require_pg() if settings.uses_sent_log else None
                )
                await live_outputs.start()
                _prune_outputs(ctx, live_outputs)
            self.handler = GuardedExecutionHandler(
                live, sent_log, outputs=live_outputs, command_claims=command_claims
            )
            ctx.subscribe(
                f"execution-{live.venue.lower()}",
                list(self.consumes),
                self.handler,
                on_batch=live_outputs.flush if live_outputs is not None else None,
                **delivery,
            )
            ctx.logger.info(
                "live venue %s ready (ccxt %s)",
                live.venue,
                settings.exec_ccxt_exchange,
                extra={
                    "sandbox": settings.exec_ccxt_sandbox,
                    "base_url": settings.exec_ccxt_base_url,
                    "sent_log": "postgres" if settings.uses_sent_log else "memory",
                },
            )
            return
        # With the sent-log, closed orders past a bound leave memory: the log, not the venue's
        # memory, keeps an old client order id from being sent again. A one-process backtest
        # asks for the bound without it (sim_forget_closed): nothing there is ever resent.
        bounded = settings.uses_sent_log or settings.sim_forget_closed
        venue = build_venue(settings, keep_closed=settings.sim_keep_closed if bounded else None)
        on_batch: BatchHook | None = None
        if settings.uses_sent_log:
            # The simulated venue lives in this process: its claims are written per batch,
            # before the batch (and the reports of its sends) is committed.
            behind = WriteBehindSentLog(PostgresSentLog(ctx.require_pg()))
            await behind.start()
            outputs = None
            on_batch = behind.flush
            if idempotent:
                outputs = OutputLog(venue.venue, ctx.require_pg())
                await outputs.start()
                _prune_outputs(ctx, outputs)
                on_batch = _store_batch(behind, outputs)
            self.handler = GuardedExecutionHandler(
                AsyncVenueAdapter(venue), behind, outputs=outputs
            )
        else:
            self.handler = ExecutionHandler(venue)
        ctx.subscribe(
            f"execution-{venue.venue.lower()}",
            list(self.consumes),
            self.handler,
            on_batch=on_batch,
            **delivery,
        )
        ctx.logger.info(
            "simulated venue %s ready",
            venue.venue,
            extra={
                "maker_fee": str(venue.config.maker_fee),
                "taker_fee": str(venue.config.taker_fee),
                "slippage": settings.sim_slippage,
                "latency_ns": venue.config.latency_ns,
                "market_waits_for_trade": venue.config.market_waits_for_trade,
                "sent_log": "postgres" if settings.uses_sent_log else "none",
                "delivery": settings.order_flow_delivery,
            },
        )

    async def teardown(self, ctx: ServiceContext[ExecutionSettings]) -> None:
        """Close the live venue's HTTP sessions."""
        if self.live_venue is not None:
            close = getattr(self.live_venue, "close", None)
            if close is not None:
                await close()
