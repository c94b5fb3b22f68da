"""The execution handler that sends each SUBMIT at most once, whatever crashes: the sent-log."""

from __future__ import annotations

import logging
from typing import Any

from quantmesh_common.bus.base import Emit
from quantmesh_common.envelope import Envelope
from quantmesh_common.messages import (
    BookSnapshot,
    CommandType,
    ControlAction,
    ControlCommand,
    ExecType,
    ExecutionReport,
    OrderCommand,
    OrderStatus,
    Side,
    Tick,
    format_reason,
)
from quantmesh_common.topics import Topic
from quantmesh_execution.claims import CommandClaims
from quantmesh_execution.outputs import OutputLog, command_cause, event_cause, merge
from quantmesh_execution.sentlog import SentEntry, SentLog
from quantmesh_execution.venue import AsyncVenue, dispatch_async, unknown_order

log = logging.getLogger(__name__)


class GuardedExecutionHandler:
    """Feeds events to an `AsyncVenue`; a SUBMIT reaches it only after the sent-log claims it.

    The order of a SUBMIT's handling is the guarantee: (1) the sent-log records the client
    order id durably, (2) the venue is called, (3) the reports are published and the offset
    committed (one Kafka transaction). A crash between (2) and (3) redelivers the SUBMIT; its
    claim then fails, and instead of sending again the handler asks the venue what it knows of
    the client order id and publishes that (the order's history: fills keep their trade ids,
    so oms and portfolio apply each once). If the venue knows nothing — the crash came between
    (1) and (2), or a simulated venue lost its memory with the process — the order is
    reported REJECTED (`ORDER_NOT_FOUND_AT_VENUE`): it was not sent, and never will be.

    With an `OutputLog` (idempotent order-flow delivery: output published after the batch hook,
    no transaction) every input is applied once: one whose reports the log holds — a command
    by its command id, market data and control commands by their envelope's event id — is not
    given to the venue again, and gets its reports published again with their report ids and
    trade ids (a command: its order's whole history, from the venue or else the log).

    With `command_claims` (a live venue with PostgreSQL) a CANCEL or REPLACE is claimed by its
    command id before its venue call, as a SUBMIT is by client order id: redelivered after a
    crash between the call and the batch hook (or the Kafka commit), it is not sent again but
    answered from what the venue says of the order (`recover_command`).
    """

    def __init__(
        self,
        venue: AsyncVenue,
        sent_log: SentLog,
        *,
        reports_topic: str = Topic.EXEC_REPORTS,
        outputs: OutputLog | None = None,
        command_claims: CommandClaims | None = None,
    ) -> None:
        self.venue = venue
        self.sent_log = sent_log
        self.reports_topic = reports_topic
        self.outputs = outputs
        self.command_claims = command_claims

    async def __call__(self, envelope: Envelope[Any]) -> list[Emit]:
        """Handle one envelope of orders.commands, md.ticks, md.books or control."""
        if self.outputs is None:
            reports = await self.reports_for(envelope.payload)
        else:
            reports = await self.reports_once(envelope, self.outputs)
        return [Emit(self.reports_topic, report, ts_event=report.ts_event) for report in reports]

    async def reports_once(
        self, envelope: Envelope[Any], outputs: OutputLog
    ) -> list[ExecutionReport]:
        """The reports of one input applied at most once: a known input's reports again."""
        event = envelope.payload
        if isinstance(event, OrderCommand):
            if event.venue != self.venue.venue or event.command_type is CommandType.QUERY:
                return await self.reports_for(event)  # a QUERY only reads: answered afresh
            cause, ts = command_cause(event.command_id), event.ts_event
            # A SUBMIT not in memory is the sent-log's to recognise (its claim).
            look_up = event.command_type is not CommandType.SUBMIT
        elif isinstance(event, Tick | BookSnapshot | ControlCommand):
            # Only redeliveries repeat an event id, and those reach back to the last commit.
            cause, ts, look_up = event_cause(envelope.event_id), event.ts_event, False
        else:
            return await self.reports_for(event)
        earlier = await outputs.known(cause, ts, look_up=look_up)
        if earlier is not None:
            return await self._replay(event, earlier, outputs)
        if isinstance(event, OrderCommand) and event.command_type is CommandType.SUBMIT:
            claimed = await self.sent_log.claim(event, self.venue.route_for(event))
            if claimed is not None:
                return await self.recover(event, claimed)  # a replay: nothing new to record
            reports = await self.venue.submit(event, event.ts_event)
        else:
            reports = await self.reports_for(event)
        outputs.record(cause, ts, reports)
        return reports

    async def _replay(
        self, event: object, earlier: list[ExecutionReport], outputs: OutputLog
    ) -> list[ExecutionReport]:
        log.warning(
            "input already applied: its reports published again, the venue not asked",
            extra={"event_type": type(event).__name__, "reports": len(earlier)},
        )
        if not isinstance(event, OrderCommand):
            return earlier
        # What execution knows of the order now (its fills since included), then anything
        # else the command's handling made (another order's expiry on the way).
        entry = await self.sent_log.get(event.venue, event.client_order_id)
        if entry is not None and entry.account_id != event.account_id:
            return earlier
        history = await self.venue.history(
            event, entry.route if entry else None, event.ts_event
        ) or await outputs.history(event.client_order_id, event.account_id)
        return merge(history, earlier)

    async def reports_for(self, event: object) -> list[ExecutionReport]:
        """Return the venue's reports for one event."""
        if isinstance(event, OrderCommand):
            if event.venue != self.venue.venue:
                return []
            if event.command_type is CommandType.SUBMIT:
                return await self._submit(event)
            if (
                self.command_claims is not None
                and event.command_type in _CLAIMED
                and not await self.command_claims.claim(event)
            ):
                return await self.recover_command(event)
            route = None
            if event.command_type is CommandType.QUERY:
                # Ask the route the order went to, as recorded when it was sent.
                entry = await self.sent_log.get(event.venue, event.client_order_id)
                if entry is not None and entry.account_id != event.account_id:
                    # Another account's order holds the id: not this account's to read.
                    return [unknown_order(event, event.ts_event)]
                route = entry.route if entry is not None else None
            return await dispatch_async(self.venue, event, event.ts_event, route)
        if isinstance(event, Tick | BookSnapshot):
            return await self.venue.on_market_data(event)
        if isinstance(event, ControlCommand):
            return await self._on_control(event)
        log.warning("unexpected event ignored", extra={"event_type": type(event).__name__})
        return []

    async def _submit(self, command: OrderCommand) -> list[ExecutionReport]:
        earlier = await self.sent_log.claim(command, self.venue.route_for(command))
        if earlier is None:
            return await self.venue.submit(command, command.ts_event)
        return await self.recover(command, earlier)

    async def recover(self, command: OrderCommand, entry: SentEntry) -> list[ExecutionReport]:
        """Answer a SUBMIT already sent from what the venue says, without sending it again."""
        log.warning(
            "SUBMIT of a client order id already sent: asking the venue instead of sending",
            extra={
                "client_order_id": command.client_order_id,
                "command_id": command.command_id,
                "first_command_id": entry.command_id,
                "route": entry.route,
            },
        )
        if entry.account_id != command.account_id:
            # Another account's order holds the id: its history is not this command's to read.
            return [_rejected(command, "CLIENT_ORDER_ID_TAKEN", {"route": entry.route})]
        reports = await self.venue.history(command, entry.route, command.ts_event)
        if not reports and self.outputs is not None:
            # A restarted simulated venue lost the order: the log has what was published.
            reports = await self.outputs.history(command.client_order_id, command.account_id)
        if reports:
            return reports
        return [_rejected(command, "ORDER_NOT_FOUND_AT_VENUE", {"route": entry.route})]

    async def recover_command(self, command: OrderCommand) -> list[ExecutionReport]:
        """Answer a CANCEL or REPLACE already claimed from what the venue says of its order.

        Whether the first call reached the venue is not known (the crash may have come before
        it). The venue's answer tells: an order that ended (canceled, filled, expired) is
        reported as it is, and that ends the command; an order still open, or unknown to the
        venue, gets its reports and one CANCEL_REJECTED (`COMMAND_ALREADY_SENT`, id
        `<command id>-R`, the order's status as the venue gives it), so the oms stops waiting
        for the command and a new one, with a new command id, reaches the venue.
        """
        entry = await self.sent_log.get(command.venue, command.client_order_id)
        log.warning(
            "%s already sent: asking the venue instead of sending it again",
            command.command_type.value,
            extra={
                "client_order_id": command.client_order_id,
                "command_id": command.command_id,
                "route": entry.route if entry is not None else None,
            },
        )
        history: list[ExecutionReport] = []
        if entry is None or entry.account_id == command.account_id:
            route = entry.route if entry is not None else None
            history = await self.venue.history(command, route, command.ts_event)
            if not history and self.outputs is not None:
                history = await self.outputs.history(command.client_order_id, command.account_id)
        if history and history[-1].order_status.is_terminal:
            return history
        return [*history, _not_sent_again(command, history)]

    async def _on_control(self, command: ControlCommand) -> list[ExecutionReport]:
        if command.action is not ControlAction.CANCEL_ALL_ORDERS:
            return []
        accounts = None if command.applies_to(self.venue.venue) else [command.target]
        reason = format_reason(
            "CANCEL_ALL_ORDERS", {"command_id": command.command_id, "issued_by": command.issued_by}
        )
        return await self.venue.cancel_all(command.ts_event, accounts, reason)


#: The command types claimed by command id (a SUBMIT is claimed by client order id).
_CLAIMED = frozenset({CommandType.CANCEL, CommandType.REPLACE})


def _not_sent_again(command: OrderCommand, history: list[ExecutionReport]) -> ExecutionReport:
    """The CANCEL_REJECTED of a claimed command not sent again; the order's status as reported."""
    last = history[-1] if history else None
    return ExecutionReport(
        report_id=f"{command.command_id}-R",
        account_id=command.account_id,
        client_order_id=command.client_order_id,
        venue_order_id=command.venue_order_id or (last.venue_order_id if last else None),
        strategy_id=command.strategy_id,
        instrument_id=command.instrument_id,
        exec_type=ExecType.CANCEL_REJECTED,
        # The venue does not know the order: FIX's answer, as the simulated venue gives it.
        order_status=last.order_status if last is not None else OrderStatus.REJECTED,
        side=command.side or (last.side if last is not None else Side.BUY),
        reason=format_reason(
            "COMMAND_ALREADY_SENT",
            {"client_order_id": command.client_order_id, "command_id": command.command_id},
        ),
        ts_event=command.ts_event,
    )


def _rejected(command: OrderCommand, code: str, details: dict[str, str]) -> ExecutionReport:
    return ExecutionReport(
        report_id=f"{command.command_id}-R",
        account_id=command.account_id,
        client_order_id=command.client_order_id,
        strategy_id=command.strategy_id,
        instrument_id=command.instrument_id,
        exec_type=ExecType.REJECTED,
        order_status=OrderStatus.REJECTED,
        side=command.side or Side.BUY,
        reason=format_reason(code, {"client_order_id": command.client_order_id, **details}),
        ts_event=command.ts_event,
    )
