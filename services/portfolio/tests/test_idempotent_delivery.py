"""Idempotent order-flow delivery (QM_ORDER_FLOW_DELIVERY): the subscriptions it asks for, and
the duplicate-fill rule it relies on (effects once, the first output published again)."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest

from quantmesh_common.bus.base import Emit
from quantmesh_common.envelope import Envelope
from quantmesh_common.messages import (
    ExecutionReport,
    PerformanceReport,
    PortfolioSnapshot,
    Position,
    Side,
)
from quantmesh_common.testing import stubs
from quantmesh_common.testing.harness import StageHarness
from quantmesh_common.topics import Topic
from quantmesh_portfolio.config import PortfolioSettings
from quantmesh_portfolio.positions import FillKey, Portfolio
from quantmesh_portfolio.service import (
    CONTROL_GROUP,
    MARKET_DATA_GROUP,
    PersistentHandlers,
    PortfolioHandlers,
    PortfolioService,
)
from quantmesh_portfolio.store import PortfolioBatch, PostgresPortfolioStore

from .conftest import T0, whole_fill

D = Decimal
S = stubs.SECOND_NS
ACC, BTC = stubs.ACCOUNT_ID, stubs.INSTRUMENT_ID
MINUTE_NS = 60 * S


BUY = whole_fill("T-1", Side.BUY, "2", "100", 1, fee="1")
SELL = whole_fill("T-2", Side.SELL, "0.5", "110", 2, fee="1")


def _wrap(report: ExecutionReport) -> Envelope[Any]:
    return Envelope.wrap(report, source="test", ts_event=report.ts_event, ts_init=report.ts_event)


def _tick(ts: int) -> Envelope[Any]:
    return Envelope.wrap(stubs.tick(ts_event=ts), source="test", ts_event=ts, ts_init=ts)


class FakeStore:
    """What `PersistentHandlers` asks of the store, in memory: the applied fills' positions."""

    def __init__(self) -> None:
        self.positions: dict[FillKey, dict[str, Any]] = {}
        self.events: dict[FillKey, str] = {}
        self.batches_with_fills = 0

    async def save_batch(self, batch: PortfolioBatch, *_: Any) -> int:
        new = 0
        for key, _ts, position, event_id in batch.fills:
            if key not in self.positions:
                self.positions[key] = position
                self.events[key] = event_id
                new += 1
        self.batches_with_fills += bool(batch.fills)
        return new

    async def applied(self, key: FillKey) -> tuple[Position | None, str | None]:
        raw = self.positions.get(key)
        return (None if raw is None else Position.model_validate(raw)), self.events.get(key)


def _persistent(store: FakeStore, *, same_message_only: bool = False) -> PersistentHandlers:
    handlers = PortfolioHandlers(Portfolio("USDT", {"USDT": D(1000)}), MINUTE_NS)
    fake: Any = store  # stands in for PostgresPortfolioStore
    typed: PostgresPortfolioStore = fake
    persistent = PersistentHandlers(handlers, typed, batched=True)
    persistent.same_message_only = same_message_only
    return persistent


def _rebuilt(store: FakeStore, *reports: ExecutionReport) -> PersistentHandlers:
    """A fresh process with the book the store holds (applied here as the load rebuilds it),
    every stored key counted as applied before its start; idempotent delivery's rule."""
    rebuilt = _persistent(store, same_message_only=True)
    for report in reports:
        rebuilt.handlers.portfolio.apply_fill(report)
    rebuilt.restart(high_water=max(r.ts_event for r in reports))
    return rebuilt


def _positions(out: list[Emit]) -> list[Position]:
    return [e.payload for e in out if isinstance(e.payload, Position)]


async def test_fills_when_redelivered_after_a_rebuild_apply_once_and_republish_first_output() -> (
    None
):
    # Arrange: one process applies and stores the BUY and the SELL (its output may be lost),
    # then a fresh one is rebuilt from the store.
    store = FakeStore()
    first = _persistent(store, same_message_only=True)
    messages = [_wrap(BUY), _wrap(SELL)]
    published = [p for m in messages for p in _positions(await first(m))]
    await first.flush()
    rebuilt = _rebuilt(store, BUY, SELL)
    account = rebuilt.handlers.portfolio.accounts[ACC]
    balances_before = dict(account.balances)

    # Act: both messages are redelivered, then the BUY's a third time.
    again = [p for m in messages for p in _positions(await rebuilt(m))]
    await rebuilt.flush()
    third = await rebuilt(messages[0])

    # Assert: each redelivered fill publishes the position it first left, keys and all
    # (2 @ 100, then 1.5 @ 100 with 0.5 x (110 - 100) - fees 2 = 3 realised); none is
    # applied or stored again; the third delivery publishes nothing more.
    assert again == published
    assert [(p.account_id, p.instrument_id) for p in again] == [(ACC, BTC), (ACC, BTC)]
    assert [(p.quantity, p.realized_pnl, p.ts_event) for p in again] == [
        (D(2), D(-1), BUY.ts_event),
        (D("1.5"), D(3), SELL.ts_event),
    ]
    assert third == []
    book = account.positions[BTC]
    assert (book.quantity, book.realized_pnl) == (D("1.5"), D(3))
    # 1000 - 200 - 1 + 55 - 1
    assert account.balances == balances_before == {"USDT": D(853), "BTC": D("1.5")}
    assert store.batches_with_fills == 1
    assert len(store.positions) == 2


async def test_fill_when_delivered_again_in_the_process_that_applied_it_publishes_nothing() -> None:
    # Arrange: in the process that applied it, its position went out before the offset was
    # committed (the bus acknowledges a batch's output first), so a copy (e.g. the venue's
    # history re-emitted by execution) is only dropped.
    store = FakeStore()
    persistent = _persistent(store)
    await persistent(_wrap(BUY))
    await persistent.flush()

    # Act
    out = await persistent(_wrap(BUY))

    # Assert
    assert out == []
    assert persistent.handlers.portfolio.accounts[ACC].positions[BTC].quantity == D(2)
    assert store.positions[(ACC, BTC, "T-1")]["quantity"] == "2"


class Recording(StageHarness[PortfolioService]):
    """The stage set up on the in-memory bus, recording the options of each subscription."""

    def __init__(self, delivery: str) -> None:
        settings = PortfolioSettings(
            bus="memory", http_port=0, database_url=None, order_flow_delivery=delivery
        )
        super().__init__(PortfolioService(settings), now_ns=T0)
        self.options: dict[str, dict[str, Any]] = {}
        subscribe = self.bus.subscribe

        def recording(group: str, topics: Any, handler: Any, **kwargs: Any) -> Any:
            self.options[group] = {
                k: v for k, v in kwargs.items() if k in ("transactional", "output_after_batch")
            }
            return subscribe(group, topics, handler, **kwargs)

        self.bus.subscribe = recording  # type: ignore[method-assign]


@pytest.mark.parametrize(
    ("delivery", "fills", "broadcast"),
    [
        (
            "transactional",
            {"transactional": True, "output_after_batch": False},
            {"transactional": False, "output_after_batch": False},
        ),
        (
            "idempotent",
            {"transactional": False, "output_after_batch": True},
            {"transactional": False, "output_after_batch": True},
        ),
    ],
)
async def test_setup_when_delivery_is_configured_subscribes_fills_and_broadcasts_accordingly(
    delivery: str, fills: dict[str, bool], broadcast: dict[str, bool]
) -> None:
    # Act
    stage = await Recording(delivery).start()

    # Assert
    assert stage.options == {
        PortfolioService.name: fills,
        MARKET_DATA_GROUP: broadcast,
        CONTROL_GROUP: broadcast,
    }
    await stage.send(Topic.EXEC_REPORTS, BUY, BUY)
    assert [p.quantity for p in stage.payloads(Topic.PORTFOLIO_UPDATES)] == [D(2)]


async def test_boundary_when_crossed_again_after_resuming_publishes_the_stored_events_once() -> (
    None
):
    # Arrange: a portfolio rebuilt after a restart with two accounts, reporting every minute;
    # the snapshot of one of them at the boundary B (and its report) was stored before the
    # restart, the other's not.
    handlers = PortfolioHandlers(
        Portfolio("USDT", {"USDT": D(1000)}), MINUTE_NS, report_interval_ns=MINUTE_NS
    )
    handlers.portfolio.account(ACC)
    handlers.portfolio.account("ACC-2")
    boundary = T0 + MINUTE_NS
    stored = stubs.portfolio_snapshot(account_id=ACC, equity=D(990), ts_event=boundary)
    report = stubs.performance_report(account_id=ACC, ts_event=boundary)
    handlers.resume_at(boundary)
    handlers.stored_boundary = (boundary, {ACC: stored}, [report])

    # Act: a tick before B (redelivered from before it), then one after it, then the next
    # minute's.
    before = handlers(_tick(boundary - S))
    crossing = handlers(_tick(boundary + S))
    republished = list(handlers.republished)
    later = handlers(_tick(boundary + MINUTE_NS + S))

    # Assert: B's stored events as they were, the other account's snapshot and report
    # computed (the default 1000 USDT); nothing was due before B; the next minute is computed
    # for both.
    assert before == []
    computed, computed_report = crossing[0].payload, crossing[3].payload
    assert isinstance(computed, PortfolioSnapshot)
    assert isinstance(computed_report, PerformanceReport)
    assert [e.payload for e in crossing] == [computed, stored, report, computed_report]
    assert (computed.account_id, computed.equity, computed.ts_event) == ("ACC-2", D(1000), boundary)
    assert (computed_report.account_id, computed_report.ts_event) == ("ACC-2", boundary)
    assert republished == [stored, report]
    assert [(type(e.payload).__name__, getattr(e.payload, "account_id", None)) for e in later] == [
        ("PortfolioSnapshot", "ACC-2"),
        ("PortfolioSnapshot", ACC),
        ("PerformanceReport", "ACC-2"),
        ("PerformanceReport", ACC),
    ]
    assert handlers.stored_boundary is None
    assert handlers.republished == []


async def test_fill_when_a_copy_under_another_envelope_follows_a_rebuild_publishes_nothing() -> (
    None
):
    # Arrange: the BUY applied and stored by one process; a fresh one rebuilt from the store.
    store = FakeStore()
    first = _persistent(store, same_message_only=True)
    original = _wrap(BUY)
    await first(original)
    await first.flush()
    rebuilt = _rebuilt(store, BUY)

    # Act: a copy of the fill (execution re-emitting the order's reports: another envelope),
    # then the original message, as the bus redelivers it.
    copy = await rebuilt(_wrap(BUY))
    redelivered = await rebuilt(original)

    # Assert: the copy is dropped (the original's position went out with the original); the
    # original publishes its stored position: 2 @ 100, fee 1.
    assert copy == []
    assert [(p.quantity, p.realized_pnl) for p in _positions(redelivered)] == [(D(2), D(-1))]
    assert [e.topic for e in redelivered] == [Topic.PORTFOLIO_UPDATES]
    assert rebuilt.handlers.portfolio.accounts[ACC].positions[BTC].quantity == D(2)
