"""The order flow end to end: six stages as separate processes on the real Kafka.

marketdata (synthetic feed) -> signals (sma_cross) -> risk -> oms -> execution (simulated
venue) -> portfolio. The test reads every topic back with a read_committed consumer and checks
the flow against itself: each fill applied once, positions and FIFO P&L recomputed here from
the fills, no client order id sent twice, the oms's order states matching the venue's. The
order-flow stages run with a Kafka transaction per batch (QM_ORDER_FLOW_DELIVERY=transactional)
here; tests/e2e/test_faults.py and test_orderflow_replay.py run the default, idempotent.

The topics and the stages' consumer groups are fixed names shared with every other run on the
broker, so a run starts from the offsets the last one committed. This run isolates itself by
data instead: its own account, strategy and instruments (fresh ids), so history left by earlier
runs is filtered out and cannot feed its strategy. The test refuses to run while another
process is a member of one of those groups (it would take partitions away from this run).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections import Counter, defaultdict, deque
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import pytest
from confluent_kafka.admin import AdminClient

from quantmesh_common.messages import (
    CommandType,
    ControlAction,
    ControlCommand,
    ExecType,
    ExecutionReport,
    InstrumentId,
    Order,
    OrderCommand,
    OrderIntent,
    OrderStatus,
    Position,
    RiskDecision,
    Side,
)
from quantmesh_common.topics import Topic, dlq
from tests.e2e.conftest import Mesh, Record, TopicReader, kafka_bootstrap, publish

log = logging.getLogger("quantmesh.tests.e2e")

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]

MIN_FILLS = 4
FILLS_TIMEOUT_S = 60.0
SETTLE_TIMEOUT_S = 20.0
#: Longer than the bus's consumer session timeout (10 s), after which a dead member is dropped.
GROUPS_FREE_TIMEOUT_S = 20.0
QUANTITY = Decimal("0.1")

#: The fixed consumer groups of the stages this test starts (read from each service.py).
#: A member of one of them outside this test would take partitions away from it.
SHARED_GROUPS = (
    "marketdata.control",
    "signals",
    "signals.control",
    "risk",
    "oms",
    "execution-sim",
)
FLOW_TOPICS = (
    Topic.ORDERS_INTENTS,
    Topic.ORDERS_APPROVED,
    Topic.ORDERS_REJECTED,
    Topic.ORDERS_COMMANDS,
    Topic.ORDERS_UPDATES,
    Topic.EXEC_REPORTS,
    Topic.PORTFOLIO_UPDATES,
)
#: The dead-letter twins of every topic the six stages consume.
DEAD_LETTER_TOPICS = tuple(
    dlq(t)
    for t in (
        Topic.MD_TICKS,
        Topic.MD_BARS,
        Topic.ORDERS_INTENTS,
        Topic.ORDERS_APPROVED,
        Topic.ORDERS_UPDATES,
        Topic.ORDERS_COMMANDS,
        Topic.EXEC_REPORTS,
        Topic.CONTROL,
    )
)


@dataclass(frozen=True)
class Run:
    """The ids that make this run's messages its own."""

    tag: str
    account_id: str
    strategy_id: str
    instruments: tuple[str, ...]

    @classmethod
    def new(cls) -> Run:
        tag = uuid.uuid4().hex[:10]
        upper = tag.upper()
        return cls(
            tag=tag,
            account_id=f"e2e-{tag}",
            strategy_id=f"sma-{tag}",
            instruments=(f"E2EA{upper}-USDT.SIM", f"E2EB{upper}-USDT.SIM"),
        )

    def owns(self, payload: Any) -> bool:
        """Return True if `payload` belongs to this run's account."""
        return getattr(payload, "account_id", None) == self.account_id

    def owns_any(self, payload: Any) -> bool:
        """Return True if `payload` is this run's: its account's, or on its instruments."""
        return self.owns(payload) or getattr(payload, "instrument_id", None) in self.instruments


def _busy_shared_groups() -> dict[str, int]:
    """Members of the stages' fixed consumer groups right now, by group."""
    admin = AdminClient({"bootstrap.servers": kafka_bootstrap()})
    listed = {g.group_id for g in admin.list_consumer_groups().result().valid}
    wanted = [g for g in SHARED_GROUPS if g in listed]
    if not wanted:
        return {}
    busy: dict[str, int] = {}
    for group, future in admin.describe_consumer_groups(wanted).items():
        members = len(future.result().members)
        if members:
            busy[group] = members
    return busy


async def _wait_groups_free(timeout: float = GROUPS_FREE_TIMEOUT_S) -> dict[str, int]:
    """Wait for the fixed groups to have no member (a killed stage's stays a session timeout)."""
    deadline = time.monotonic() + timeout
    busy = await asyncio.to_thread(_busy_shared_groups)
    while busy and time.monotonic() < deadline:
        await asyncio.sleep(2.0)
        busy = await asyncio.to_thread(_busy_shared_groups)
    return busy


def _stage_env(run: Run, database_url: str) -> dict[str, dict[str, str]]:
    strategies = [
        {
            "id": run.strategy_id,
            "name": "sma_cross",
            "account_id": run.account_id,
            "instruments": list(run.instruments),
            "params": {"fast": 2, "slow": 5, "quantity": str(QUANTITY)},
        }
    ]
    stages = {
        "signals": {"QM_STRATEGIES": json.dumps(strategies)},
        "risk": {"QM_RISK_LIMITS": "{}"},
        "oms": {},
        "execution": {"QM_VENUE": "SIM"},
        "portfolio": {"QM_STARTING_CASH": '{"USDT": "100000"}', "QM_SNAPSHOT_INTERVAL_S": "1"},
        "marketdata": {
            "QM_FEED": "synthetic",
            "QM_INSTRUMENTS": ",".join(run.instruments),
            "QM_FEED_RATE": "200",
            "QM_BAR_INTERVAL": "1s",
            "QM_VOLATILITY": "2",
            "QM_SEED": str(int(run.tag[:6], 16)),
        },
    }
    # Every stage on the test's own migrated schema (conftest's database_url). The order flow
    # runs with a Kafka transaction per batch here: the fault and replay tests run the default
    # (idempotent) delivery, so each delivery has an end-to-end run.
    common = {"QM_DATABASE_URL": database_url, "QM_ORDER_FLOW_DELIVERY": "transactional"}
    return {stage: {**common, **values} for stage, values in stages.items()}


def _collector(action: ControlAction, run: Run, why: str) -> ControlCommand:
    return ControlCommand(
        command_id=f"e2e-{action.lower()}-{run.tag}",
        action=action,
        target="marketdata",
        issued_by="e2e-test",
        reason=f"order-flow test {run.tag}: {why}",
        ts_event=time.time_ns(),
    )


def _flow_summary(reader: TopicReader, run: Run) -> str:
    """What the run's account has on each topic, and why intents were denied: for failures."""
    counts = {t: len(reader.of(t, run.owns)) for t in FLOW_TOPICS}
    reasons = Counter(r.payload.reason for r in reader.of(Topic.ORDERS_REJECTED, run.owns))
    return f"messages {counts}, denials {dict(reasons)}"


def _fills(reader: TopicReader, run: Run) -> list[Record]:
    return reader.of(Topic.EXEC_REPORTS, lambda p: run.owns(p) and p.is_fill)


def _check_alive(mesh: Mesh) -> None:
    for stage in mesh.stages.values():
        if stage.returncode is not None:
            raise AssertionError(f"{stage.name} exited {stage.returncode}:\n{stage.tail()}")


async def _produced(mesh: Mesh, stage: str, topic: str) -> int:
    """The stage's count of messages produced on `topic`, from its /metrics."""
    _, text = await mesh.get(stage, "/metrics")
    prefix = "quantmesh_bus_messages_produced_total{"
    for line in text.splitlines():
        if line.startswith(prefix) and f'topic="{topic}"' in line:
            return int(float(line.rsplit(" ", 1)[1]))
    return 0


async def _wait_feed_stopped(mesh: Mesh, timeout: float = 10.0) -> bool:
    """Wait until marketdata publishes no tick for a second."""
    deadline = time.monotonic() + timeout
    last = await _produced(mesh, "marketdata", Topic.MD_TICKS)
    while time.monotonic() < deadline:
        await asyncio.sleep(1.0)
        now = await _produced(mesh, "marketdata", Topic.MD_TICKS)
        if now == last:
            return True
        last = now
    return False


async def _poll_until(
    mesh: Mesh, reader: TopicReader, done: Callable[[], bool], timeout: float
) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        await asyncio.to_thread(reader.poll, 0.5)
        _check_alive(mesh)
        if done():
            return True
    return False


def _flow_settled(reader: TopicReader, run: Run) -> bool:
    """Every intent decided, every approval sent, every order finished, every fill applied."""
    mine = {t: [r.payload for r in reader.records[t] if run.owns(r.payload)] for t in FLOW_TOPICS}
    intents = {p.client_order_id for p in mine[Topic.ORDERS_INTENTS]}
    decided = {p.intent.client_order_id for p in mine[Topic.ORDERS_APPROVED]} | {
        p.intent.client_order_id for p in mine[Topic.ORDERS_REJECTED]
    }
    approved = {p.intent.client_order_id for p in mine[Topic.ORDERS_APPROVED]}
    submitted = {p.client_order_id for p in mine[Topic.ORDERS_COMMANDS]}
    last_state: dict[str, Order] = {p.client_order_id: p for p in mine[Topic.ORDERS_UPDATES]}
    fills = [p for p in mine[Topic.EXEC_REPORTS] if p.is_fill]
    return (
        intents <= decided
        and approved <= submitted
        and all(
            last_state.get(c) is not None and last_state[c].status.is_terminal for c in approved
        )
        and len(mine[Topic.PORTFOLIO_UPDATES]) == len(fills)
    )


def _fifo_realized(fills: list[ExecutionReport]) -> list[tuple[Decimal, Decimal, Decimal]]:
    """Recompute (position, realised P&L net of fees, fees) after each fill, FIFO, by hand.

    Lots are signed quantities at a price; a fill against the open direction closes the
    oldest lots first, and what is left of it opens a lot the other way.
    """
    lots: deque[list[Decimal]] = deque()  # [signed quantity, price]
    position = realized = fees = Decimal(0)
    out: list[tuple[Decimal, Decimal, Decimal]] = []
    for fill in fills:
        assert fill.last_price is not None
        signed = fill.last_qty if fill.side is Side.BUY else -fill.last_qty
        remaining = signed
        while remaining and lots and (lots[0][0] > 0) != (remaining > 0):
            lot_qty, lot_price = lots[0]
            closed = min(abs(lot_qty), abs(remaining))
            direction = 1 if lot_qty > 0 else -1
            realized += (fill.last_price - lot_price) * closed * direction
            lots[0][0] = lot_qty - closed * direction
            remaining += closed * direction
            if not lots[0][0]:
                lots.popleft()
        if remaining:
            lots.append([remaining, fill.last_price])
        position += signed
        fees += fill.fee
        out.append((position, realized - fees, fees))
    return out


def test_fifo_recomputation_when_a_fill_flips_the_position_closes_the_oldest_lots_first() -> None:
    # Arrange: buy 1 @ 100 and 1 @ 110; sell 1.5 @ 120 (closes 1 @ 100: +20, 0.5 @ 110: +5);
    # sell 1 @ 100 (closes 0.5 @ 110: -5, opens -0.5 @ 100); buy 0.5 @ 90 (short: +5). Fee 0.1.
    trades = [("BUY", "1", "100"), ("BUY", "1", "110"), ("SELL", "1.5", "120")]
    trades += [("SELL", "1", "100"), ("BUY", "0.5", "90")]
    fills = [
        ExecutionReport(
            report_id=f"r{n}",
            account_id="acc",
            client_order_id=f"o{n}",
            instrument_id="BTC-USDT.SIM",
            exec_type=ExecType.FILL,
            order_status=OrderStatus.FILLED,
            side=Side(side),
            last_qty=Decimal(qty),
            last_price=Decimal(price),
            cum_qty=Decimal(qty),
            fee=Decimal("0.1"),
            trade_id=f"t{n}",
            ts_event=n,
        )
        for n, (side, qty, price) in enumerate(trades)
    ]

    # Act
    after = _fifo_realized(fills)

    # Assert: (position, realised net of fees, fees) after each fill, computed by hand.
    assert after == [
        (Decimal(1), Decimal("-0.1"), Decimal("0.1")),
        (Decimal(2), Decimal("-0.2"), Decimal("0.2")),
        (Decimal("0.5"), Decimal("24.7"), Decimal("0.3")),
        (Decimal("-0.5"), Decimal("19.6"), Decimal("0.4")),
        (Decimal(0), Decimal("24.5"), Decimal("0.5")),
    ]


async def test_order_flow_when_every_stage_runs_as_a_process_applies_each_fill_exactly_once(
    mesh: Mesh, topic_reader: Callable[..., TopicReader], database_url: str
) -> None:
    # Arrange: no one else in the stages' fixed consumer groups, then the six stages.
    began = time.monotonic()
    timeline: dict[str, float] = {}  # seconds since `began` at the end of each phase

    def reached(phase: str) -> None:
        timeline[phase] = round(time.monotonic() - began, 1)
        log.info("order-flow e2e: %s at %.1f s", phase, timeline[phase])

    busy = await _wait_groups_free()
    assert not busy, f"another mesh uses this broker's consumer groups (members): {busy}"
    run = Run.new()
    env = _stage_env(run, database_url)
    for stage in ("signals", "risk", "oms", "execution", "portfolio"):
        await mesh.start(stage, env[stage])
    await mesh.wait_ready()
    # A stop an earlier, killed run left unconsumed in the feed's group must not pause this one.
    await publish(Topic.CONTROL, _collector(ControlAction.COLLECTOR_START, run, "test starts"))
    await mesh.start("marketdata", env["marketdata"])
    await mesh.wait_ready("marketdata")
    reached("ready")
    live = topic_reader(*FLOW_TOPICS)

    # Act: trade until enough fills, stop the feed, let the flow drain, SIGTERM everything.
    enough = await _poll_until(
        mesh, live, lambda: len(_fills(live, run)) >= MIN_FILLS, FILLS_TIMEOUT_S
    )
    assert enough, (
        f"only {len(_fills(live, run))} fills in {FILLS_TIMEOUT_S} s; {_flow_summary(live, run)}"
    )
    reached("fills")
    await publish(Topic.CONTROL, _collector(ControlAction.COLLECTOR_STOP, run, "enough fills"))
    feed_stopped = await _wait_feed_stopped(mesh)
    reached("feed stopped")
    settled = await _poll_until(mesh, live, lambda: _flow_settled(live, run), SETTLE_TIMEOUT_S)
    reached("settled")
    codes = await mesh.stop()
    reached("stopped")
    reader = topic_reader(*FLOW_TOPICS, Topic.PORTFOLIO_SNAPSHOTS, *DEAD_LETTER_TOPICS)
    await asyncio.to_thread(reader.read_to_end, 30.0)
    reached("read back")

    # Assert: every process stopped cleanly on SIGTERM.
    for name, code in codes.items():
        assert code == 0, f"{name} exited {code}:\n{mesh.stages[name].tail()}"
    assert feed_stopped, "marketdata kept publishing after COLLECTOR_STOP"
    assert settled, f"the flow did not settle: {timeline}; {_flow_summary(reader, run)}"
    mine = {t: reader.of(t, run.owns) for t in FLOW_TOPICS}
    dead = {t: n for t in DEAD_LETTER_TOPICS if (n := len(reader.of(t, run.owns_any)))}
    assert dead == {}, "this run's messages were dead-lettered (see the stages' logs)"

    # The venue reported each trade once.
    fills = [r for r in mine[Topic.EXEC_REPORTS] if r.payload.is_fill]
    assert len(fills) >= MIN_FILLS
    trade_ids = Counter(r.payload.trade_id for r in fills)
    assert all(n == 1 for n in trade_ids.values()), trade_ids.most_common(3)

    # Every fill appears exactly once as applied in portfolio.updates (the update's envelope
    # is the child of the fill's), and every update is a fill's.
    updates = mine[Topic.PORTFOLIO_UPDATES]
    applied = Counter(r.envelope.causation_id for r in updates)
    fill_ids = {r.envelope.event_id for r in fills}
    assert {eid: applied[eid] for eid in fill_ids if applied[eid] != 1} == {}
    assert set(applied) == fill_ids

    # Per instrument, the position after each fill is the running signed sum of the fills and
    # its realised P&L and fees are an independent FIFO recomputation from the fills.
    fills_by_instrument: dict[str, list[Record]] = defaultdict(list)
    for record in sorted(fills, key=lambda r: (r.partition, r.offset)):
        fills_by_instrument[record.payload.instrument_id].append(record)
    position_after: dict[str | None, Position] = {
        r.envelope.causation_id: r.payload for r in updates
    }
    for instrument, records in fills_by_instrument.items():
        its_fills: list[ExecutionReport] = [r.payload for r in records]
        quote = InstrumentId.parse(instrument).quote
        assert all(f.fee_currency in (None, quote) for f in its_fills)
        got = [position_after[r.envelope.event_id] for r in records]
        assert [(p.quantity, p.realized_pnl, p.fees) for p in got] == _fifo_realized(its_fills)
        signed_sum = sum(
            (f.last_qty if f.side is Side.BUY else -f.last_qty for f in its_fills), Decimal(0)
        )
        assert got[-1].quantity == signed_sum, instrument

    # No client order id was submitted twice, and every approval was submitted once.
    submits = Counter(
        r.payload.client_order_id
        for r in mine[Topic.ORDERS_COMMANDS]
        if isinstance(r.payload, OrderCommand) and r.payload.command_type is CommandType.SUBMIT
    )
    assert all(n == 1 for n in submits.values()), submits.most_common(3)
    approved = {
        r.payload.intent.client_order_id
        for r in mine[Topic.ORDERS_APPROVED]
        if isinstance(r.payload, RiskDecision)
    }
    assert set(submits) == approved
    intents = {
        r.payload.client_order_id
        for r in mine[Topic.ORDERS_INTENTS]
        if isinstance(r.payload, OrderIntent)
    }
    rejected = {r.payload.intent.client_order_id for r in mine[Topic.ORDERS_REJECTED]}
    assert intents == approved | rejected

    # The oms's final state of each order agrees with the venue: what filled, at what average
    # price, and how it ended; an order filled in full is FILLED.
    final: dict[str, Order] = {
        r.payload.client_order_id: r.payload for r in mine[Topic.ORDERS_UPDATES]
    }
    venue_last: dict[str, ExecutionReport] = {
        r.payload.client_order_id: r.payload for r in mine[Topic.EXEC_REPORTS]
    }
    filled_qty: dict[str, Decimal] = defaultdict(Decimal)
    for record in fills:
        filled_qty[record.payload.client_order_id] += record.payload.last_qty
    for client_order_id, venue in venue_last.items():
        order = final[client_order_id]
        assert order.status is venue.order_status, (client_order_id, order, venue)
        assert order.filled_quantity == filled_qty[client_order_id] == venue.cum_qty
        assert order.avg_fill_price == venue.avg_price, client_order_id
        if filled_qty[client_order_id] == order.quantity:
            assert order.status is OrderStatus.FILLED, client_order_id
    assert set(final) == approved
    assert all(order.status.is_terminal for order in final.values())

    # Portfolio snapshots on the 1 s interval reached the account.
    snapshots = reader.of(Topic.PORTFOLIO_SNAPSHOTS, run.owns)
    assert snapshots, "no portfolio snapshot for the run's account"
