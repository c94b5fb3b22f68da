"""A long backtest keeps a bounded number of closed orders in memory, with the same fills."""

from __future__ import annotations

import math
import random
from decimal import Decimal
from typing import Any

import pytest

from quantmesh_common.clock import SimulatedClock
from quantmesh_common.messages import Bar, ExecutionReport
from quantmesh_embedded import backtest
from quantmesh_embedded.backtest import BacktestConfig, BacktestResult, Mode, run_backtest
from quantmesh_embedded.mesh import EmbeddedMesh
from quantmesh_embedded.sparse import FillKeeper, FillLog
from quantmesh_execution.service import ExecutionHandler, ExecutionService
from quantmesh_execution.simulated import SimulatedVenue
from quantmesh_oms.service import OmsService
from quantmesh_portfolio.service import PortfolioService

MINUTE = 60 * 1_000_000_000
T0 = 1_672_531_200 * 1_000_000_000  # 2023-01-01T00:00:00Z
SYMBOL = "ASSET-USD.SIM"
KEEP = 20


def _walk(count: int, seed: int) -> list[Bar]:
    rng = random.Random(seed)
    price, bars = 100.0, []
    for i in range(count):
        start = price
        price *= math.exp(rng.gauss(0.0, 0.004))
        o, c = Decimal(f"{start:.2f}"), Decimal(f"{price:.2f}")
        bars.append(
            Bar(
                instrument_id=SYMBOL,
                interval="1m",
                open=o,
                high=max(o, c),
                low=min(o, c),
                close=c,
                volume=Decimal(10),
                ts_open=T0 + i * MINUTE,
                ts_close=T0 + (i + 1) * MINUTE,
            )
        )
    return bars


def _config() -> BacktestConfig:
    return BacktestConfig(
        instrument_id=SYMBOL,
        strategy="sma_cross",
        params={"fast": 2, "slow": 5, "allow_short": True},
    )


async def _run(
    monkeypatch: pytest.MonkeyPatch, keep: int, mode: Mode, bars: list[Bar]
) -> tuple[BacktestResult, EmbeddedMesh]:
    """Run with `keep` closed orders kept; return the result and the mesh it ran on."""
    meshes: list[EmbeddedMesh] = []
    build = backtest.build_mesh

    def capture(*args: Any, **kwargs: Any) -> EmbeddedMesh:
        mesh = build(*args, **kwargs)
        meshes.append(mesh)
        return mesh

    monkeypatch.setattr(backtest, "KEEP_CLOSED", keep)
    monkeypatch.setattr(backtest, "build_mesh", capture)
    # The stages' own memory is what is measured here: every order goes through them.
    result = await run_backtest(_config(), bars, mode=mode, engine="stages")
    return result, meshes[0]


def _fills(result: BacktestResult) -> list[tuple[Any, ...]]:
    return [
        (f.ts_event, f.side, f.last_qty, f.last_price, f.fee, f.client_order_id)
        for f in result.fills
    ]


def _venue(mesh: EmbeddedMesh) -> SimulatedVenue:
    for service in mesh.services:
        if isinstance(service, ExecutionService):
            assert isinstance(service.handler, ExecutionHandler)
            assert isinstance(service.handler.venue, SimulatedVenue)
            return service.handler.venue
    raise AssertionError("no execution stage")


def _oms(mesh: EmbeddedMesh) -> OmsService:
    for service in mesh.services:
        if isinstance(service, OmsService):
            return service
    raise AssertionError("no oms stage")


@pytest.mark.parametrize("mode", ["columnar", "per_bar"])
async def test_backtest_when_orders_outnumber_the_bound_keeps_at_most_the_bound_closed(
    monkeypatch: pytest.MonkeyPatch, mode: Mode
) -> None:
    # Arrange: SMA 2/5 with shorts on a noisy walk trades every few bars: far more than KEEP.
    bars = _walk(1_500, seed=11)

    # Act
    result, mesh = await _run(monkeypatch, KEEP, mode, bars)

    # Assert: every order was a filled market order, so all are closed; the oms keeps the
    # latest KEEP terminal ones, the venue the latest KEEP plus the last advance's close.
    order_ids = list(dict.fromkeys(f.client_order_id for f in result.fills))
    assert len(order_ids) > 10 * KEEP
    oms_kept = [o for o in _oms(mesh).orders.orders.values() if o.order.status.is_terminal]
    assert len(oms_kept) == KEEP
    venue = _venue(mesh)
    venue_kept = [c for c in order_ids if venue.history(c, backtest.ACCOUNT_ID)]
    assert KEEP <= len(venue_kept) <= KEEP + 1
    assert venue_kept == order_ids[-len(venue_kept) :]  # the newest ones, oldest forgotten
    portfolio = next(s for s in mesh.services if isinstance(s, PortfolioService))
    assert portfolio.handlers is not None
    assert (portfolio.handlers.tracker.trips, portfolio.handlers.tracker.curves) == ({}, {})


@pytest.mark.parametrize("mode", ["columnar", "per_bar"])
async def test_backtest_when_closed_orders_are_forgotten_fills_and_curve_are_unchanged(
    monkeypatch: pytest.MonkeyPatch, mode: Mode
) -> None:
    # Arrange: the same bars with nothing ever forgotten (a bound above the order count).
    bars = _walk(1_500, seed=11)
    unbounded, _ = await _run(monkeypatch, 1_000_000, mode, bars)

    # Act
    bounded, _ = await _run(monkeypatch, KEEP, mode, bars)

    # Assert
    assert len(unbounded.fills) > 10 * KEEP
    assert _fills(bounded) == _fills(unbounded)
    assert list(bounded.equity) == list(unbounded.equity)
    assert bounded.round_trips == unbounded.round_trips


def test_build_mesh_when_backtesting_bounds_the_oms_and_the_venue() -> None:
    # Arrange / Act
    mesh = backtest.build_mesh(_config(), SimulatedClock(T0), MINUTE)

    # Assert: the settings each stage got (applied by their setup).
    settings = {type(s).__name__: s.settings for s in mesh.services}
    assert settings["OmsService"].oms_forget_terminal is True
    assert settings["OmsService"].oms_keep_terminal == backtest.KEEP_CLOSED
    assert settings["ExecutionService"].sim_forget_closed is True
    assert settings["ExecutionService"].sim_keep_closed == backtest.KEEP_CLOSED


async def test_fill_keeper_when_keeping_reports_copies_them_sharing_one_name_set(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Arrange: fill reports of a run, and a fresh keeper.
    bars = _walk(300, seed=3)
    result, _ = await _run(monkeypatch, 1_000_000, "per_bar", bars)
    first, second = result.fills[0], result.fills[1]
    keeper = FillKeeper()

    # Act
    kept_first, kept_second = keeper.keep(first), keeper.keep(second)

    # Assert
    assert kept_first.model_dump() == first.model_dump()
    assert kept_second.model_dump_json() == second.model_dump_json()
    assert kept_first.model_fields_set == first.model_fields_set
    assert kept_first.model_fields_set is kept_second.model_fields_set


async def test_backtest_result_when_repr_names_counts_not_contents(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Arrange: a run with fills (asyncio.run formats its result's repr on the way out).
    bars = _walk(300, seed=3)
    result, _ = await _run(monkeypatch, 1_000_000, "columnar", bars)

    # Act: the repr before and after the round trips are read (paired on first read)
    before = repr(result)
    paired = len(result.round_trips)
    text = repr(result)

    # Assert: 300 bars, 301 curve points (the start and one per bar), no fill written out;
    # a repr pairs no fills.
    assert "round_trips=unpaired" in before
    assert text.startswith(f"BacktestResult(bars=300, fills={len(result.fills)}, ")
    assert "equity_points=301" in text
    assert f"round_trips={paired}" in text
    assert "ExecutionReport" not in text
    assert len(text) < 200


async def test_fill_log_when_reports_are_read_back_equals_them_sharing_recurring_values(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Arrange: the fill reports of a run, kept as they came (a plain list).
    bars = _walk(300, seed=3)
    result, _ = await _run(monkeypatch, 1_000_000, "per_bar", bars)
    reports = list(result.fills)
    log = FillLog()

    # Act
    for report in reports:
        log.append(report)
    read = list(log)

    # Assert: the same reports, field for field and in their JSON; one name set; a recurring
    # value is one object (the account; the quantities: 1 to open, 2 on every reversal).
    assert len(log) == len(reports) > 10
    assert [r.model_dump_json() for r in read] == [r.model_dump_json() for r in reports]
    assert read == reports
    assert log == reports
    assert [r.model_fields_set for r in read] == [r.model_fields_set for r in reports]
    assert read[0].model_fields_set is read[1].model_fields_set
    assert read[0].account_id is read[1].account_id
    assert len({id(r.last_qty) for r in read}) == len({str(r.last_qty) for r in read}) == 2
    assert log[-1] == reports[-1]
    assert log[1:3] == reports[1:3]


def test_fill_log_when_equal_decimals_differ_in_exponent_keeps_each_as_given() -> None:
    # Arrange: two fills of the same quantity written 2 and 2.0.
    base = {
        "report_id": "R1",
        "account_id": "acct",
        "client_order_id": "C1",
        "instrument_id": SYMBOL,
        "exec_type": "FILL",
        "order_status": "FILLED",
        "side": "BUY",
        "last_price": Decimal("100.5"),
        "trade_id": "T1",
        "ts_event": T0,
    }
    two = ExecutionReport(**base, last_qty=Decimal("2"), cum_qty=Decimal("2"))
    two_point_zero = ExecutionReport(**base, last_qty=Decimal("2.0"), cum_qty=Decimal("2.0"))
    log = FillLog()

    # Act
    log.append(two)
    log.append(two_point_zero)

    # Assert
    assert str(log[0].last_qty) == "2"
    assert str(log[1].last_qty) == "2.0"
    assert log[0].last_price is log[1].last_price  # the same text: one object
