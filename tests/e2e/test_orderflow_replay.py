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

from quantmesh_common.messages import ExecType, ExecutionReport, OrderStatus, Side
from quantmesh_common.testing.postgres import fresh_schema, server_dsn_for_tests
from tests.e2e.conftest import kafka_bootstrap
from tests.e2e.orderflow import Lots, RunResult, fifo, oms_vs_venue, run_flow, wait_groups_free

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(420)]

#: 95 recorded seconds replayed in about 20.
COMPRESS = 4.75
MIN_FILLS = 4


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
