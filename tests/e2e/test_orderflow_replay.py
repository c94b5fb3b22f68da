"""Accuracy end to end: recorded trades through the six stages, checked against the venue.

One run (module fixture) replays 2,000 recorded Binance BTCUSDT trades, compressed to about
20 s, on a fresh instrument through marketdata's replay, signals (three strategies, an
account each), risk, oms (a fresh PostgreSQL schema), execution (simulated venue) and
portfolio, each its own process on the session's Kafka. The tests then compare the stages with
the venue's committed ledger (`exec.reports`) and with a FIFO recomputation done here.

The stages' consumer groups are fixed names, so the run waits until no other process is in
them and isolates its data by fresh account and instrument ids.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import pytest

from quantmesh_common.envelope import Envelope
from quantmesh_common.messages import ExecType, ExecutionReport, OrderStatus, Side
from quantmesh_common.testing.postgres import fresh_schema, server_dsn_for_tests
from quantmesh_common.topics import Topic
from tests.e2e.conftest import Record, kafka_bootstrap
from tests.e2e.orderflow import (
    FLOW_TOPICS,
    FlowRecords,
    Lots,
    Run,
    RunResult,
    fifo,
    oms_vs_venue,
    run_flow,
    wait_groups_free,
)

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(420)]

#: 95 recorded seconds replayed in about 20.
COMPRESS = 4.75
MIN_FILLS = 4


def _report(report_id: str, exec_type: ExecType, **fields: object) -> ExecutionReport:
    fill = exec_type in (ExecType.FILL, ExecType.PARTIAL_FILL)
    values: dict[str, object] = {
        "report_id": report_id,
        "account_id": "acc",
        "client_order_id": "o1",
        "venue_order_id": "v1",
        "instrument_id": "BTC-USDT.SIM",
        "exec_type": exec_type,
        "order_status": OrderStatus.ACCEPTED,
        "side": Side.BUY,
        "ts_event": 1,
    }
    if fill:
        values |= {"last_qty": Decimal("0.01"), "last_price": Decimal(100)}
        values |= {"cum_qty": Decimal("0.01"), "trade_id": f"{report_id}-T"}
        values["order_status"] = OrderStatus.PARTIALLY_FILLED
    return ExecutionReport.model_validate(values | fields)


def _flow_of_reports(reports: list[ExecutionReport]) -> FlowRecords:
    records = [
        Record(Topic.EXEC_REPORTS, 0, offset, Envelope.wrap(r, source="t", ts_event=1, ts_init=1))
        for offset, r in enumerate(reports)
    ]
    by_topic: dict[str, list[Record]] = {topic: [] for topic in FLOW_TOPICS}
    by_topic[Topic.EXEC_REPORTS] = records
    return FlowRecords(Run.new(), by_topic)


def _history_answered_twice() -> list[ExecutionReport]:
    """What execution committed for an order the venue first said it did not have (a QUERY
    answered before its SUBMIT arrived), then accepted and filled, then was asked to SUBMIT
    again: the venue's reports, then the same reports once more from its history."""
    unknown = _report(
        "o1:QUERY:q-R",
        ExecType.REJECTED,
        venue_order_id=None,
        order_status=OrderStatus.REJECTED,
        reason="UNKNOWN_ORDER: client_order_id=o1, venue=SIM",
    )
    history = [
        _report("v1-R1", ExecType.ACCEPTED),
        _report("v1-R2", ExecType.PARTIAL_FILL),
        _report("v1-R3", ExecType.CANCELED, order_status=OrderStatus.CANCELED),
    ]
    return [unknown, *history, *history]


def test_flow_records_when_the_venue_history_is_answered_again_count_each_report_once() -> None:
    # Arrange
    flow = _flow_of_reports(_history_answered_twice())

    # Act
    ledger = [r.payload.report_id for r in flow.ledger]

    # Assert: each report id once, at its first commit; one fill; one act of the venue.
    assert ledger == ["o1:QUERY:q-R", "v1-R1", "v1-R2", "v1-R3"]
    assert [r.offset for r in flow.fills] == [2]
    assert flow.venue_acks() == {"o1": 1}
    assert flow.venue_final()["o1"].exec_type is ExecType.CANCELED
    assert flow.replays_that_differ() == []


def test_flow_records_when_a_repeated_report_id_carries_other_content_report_it() -> None:
    # Arrange: the replayed fill says 0.02 where the venue first said 0.01.
    reports = _history_answered_twice()
    reports[5] = reports[5].model_copy(update={"last_qty": Decimal("0.02")})
    flow = _flow_of_reports(reports)

    # Act
    problems = flow.replays_that_differ()

    # Assert
    assert len(problems) == 1
    assert problems[0].startswith("v1-R2: ")


async def _clean_run(log_dir: Path, database_url: str) -> RunResult:
    bootstrap = kafka_bootstrap()
    busy = await wait_groups_free(bootstrap)
    assert not busy, f"another mesh uses this broker's consumer groups (members): {busy}"
    return await run_flow(
        bootstrap=bootstrap, database_url=database_url, log_dir=log_dir, compress=COMPRESS
    )


@pytest.fixture(scope="module")
def clean_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunResult]:
    """One fault-free run of the recorded flow, shared by this module's tests."""
    server = server_dsn_for_tests()
    if server is None:
        pytest.skip("QM_DATABASE_URL is not set (start the stack: deploy/local/stack.sh up)")
    with fresh_schema(server, "qm_e2e_oms", migrate=True) as dsn:
        yield asyncio.run(_clean_run(tmp_path_factory.mktemp("replay"), dsn))


def _fill(n: int, side: str, qty: str, price: str, fee: str) -> ExecutionReport:
    return ExecutionReport(
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
        fee=Decimal(fee),
        trade_id=f"t{n}",
        ts_event=n,
    )


def test_fifo_when_a_sell_flips_a_long_closes_the_oldest_lots_and_opens_a_short() -> None:
    # Arrange: buy 2 @ 100, buy 1 @ 130, sell 4 @ 120 (closes 2 @ 100: +40, 1 @ 130: -10,
    # opens -1 @ 120), buy 1 @ 110 (covers the short: +10). Fees 1, 0.5, 2, 0.25.
    fills = [
        _fill(1, "BUY", "2", "100", "1"),
        _fill(2, "BUY", "1", "130", "0.5"),
        _fill(3, "SELL", "4", "120", "2"),
        _fill(4, "BUY", "1", "110", "0.25"),
    ]

    # Act
    after = fifo(fills)

    # Assert: quantity, realised net of fees, fees, average entry of the open lots, by hand.
    assert after == [
        Lots(Decimal(2), Decimal("-1"), Decimal("1"), Decimal(100)),
        Lots(Decimal(3), Decimal("-1.5"), Decimal("1.5"), Decimal(110)),
        Lots(Decimal(-1), Decimal("26.5"), Decimal("3.5"), Decimal(120)),
        Lots(Decimal(0), Decimal("36.25"), Decimal("3.75"), Decimal(0)),
    ]


def test_recorded_flow_when_replayed_settles_and_every_stage_stops_cleanly(
    clean_run: RunResult,
) -> None:
    assert clean_run.feed.get("returncode") == 0, clean_run.feed
    assert clean_run.feed["ticks"] == 2000
    assert clean_run.not_running == [], clean_run.logs
    assert clean_run.settled, clean_run.timeline
    assert all(code == 0 for code in clean_run.codes.values()), clean_run.codes
    assert clean_run.dead == {}, "this run's messages were dead-lettered (see the stages' logs)"


def test_recorded_flow_when_replayed_applies_every_ledger_fill_exactly_once(
    clean_run: RunResult,
) -> None:
    fills = clean_run.flow.fills

    assert len(fills) >= MIN_FILLS, clean_run.timeline
    trade_ids = [r.payload.trade_id for r in fills]
    assert len(trade_ids) == len(set(trade_ids))
    assert clean_run.flow.fills_applied_not_once() == {}


def test_recorded_flow_when_replayed_positions_and_pnl_equal_a_fifo_recomputation(
    clean_run: RunResult,
) -> None:
    assert clean_run.flow.fills
    assert clean_run.flow.positions_vs_fifo() == []


def test_recorded_flow_when_replayed_oms_orders_in_postgres_match_the_venue(
    clean_run: RunResult,
) -> None:
    assert clean_run.stored, "the oms stored no order of this run"
    assert oms_vs_venue(clean_run.flow, clean_run.stored) == []
    assert set(clean_run.stored) == clean_run.flow.approved()
    assert all(o.status.is_terminal for o in clean_run.stored.values())


def test_recorded_flow_when_replayed_sends_each_approved_order_to_the_venue_once(
    clean_run: RunResult,
) -> None:
    flow = clean_run.flow

    assert flow.intents() == flow.approved() | flow.rejected()
    assert set(flow.submits()) == flow.approved()
    assert [c for c, n in flow.submits().items() if n != 1] == []
    assert [c for c, n in flow.venue_acks().items() if n != 1] == []
