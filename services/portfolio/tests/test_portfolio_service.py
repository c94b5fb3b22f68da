"""The portfolio stage on the in-memory bus: fills to positions, marks, snapshots, settings."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import pytest

from quantmesh_common.bus.memory import InMemoryBus
from quantmesh_common.clock import SimulatedClock
from quantmesh_common.messages import (
    Bar,
    ControlAction,
    ExecType,
    ExecutionReport,
    OrderStatus,
    PerformanceReport,
    PortfolioSnapshot,
    Position,
    PositionSide,
    Side,
)
from quantmesh_common.runtime import ServiceRunner
from quantmesh_common.settings import CONFIG_ERROR_EXIT_CODE, load_settings
from quantmesh_common.testing import stubs
from quantmesh_common.topics import Topic, dlq
from quantmesh_portfolio.config import PortfolioSettings
from quantmesh_portfolio.service import HANDLERS_ISSUE, PortfolioService

D = Decimal
S = stubs.SECOND_NS
#: A minute boundary: 1_700_000_040 s = 28_333_334 minutes since the epoch.
T0 = stubs.TS + 40 * S
BTC = stubs.INSTRUMENT_ID
ACC = stubs.ACCOUNT_ID


@dataclass
class Stage:
    bus: InMemoryBus
    clock: SimulatedClock

    async def send(self, topic: str, payload: Any) -> None:
        await self.bus.publish(topic, payload)
        await self.bus.run_until_idle()

    def positions(self) -> list[Position]:
        return [e.payload for e in self.bus.messages(Topic.PORTFOLIO_UPDATES)]

    def snapshots(self) -> list[PortfolioSnapshot]:
        return [e.payload for e in self.bus.messages(Topic.PORTFOLIO_SNAPSHOTS)]


@pytest.fixture
async def stage() -> AsyncIterator[Stage]:
    clock = SimulatedClock(T0)
    bus = InMemoryBus("test", clock=clock, retain=True)
    settings = PortfolioSettings(
        bus="memory",
        http_host="127.0.0.1",
        http_port=0,
        starting_cash={"USDT": "1000"},
        snapshot_interval_s=60,
        database_url=None,  # in memory, whatever the environment points at
    )
    runner = ServiceRunner(PortfolioService(settings), settings, bus=bus, clock=clock, pump=False)
    await runner.start()
    try:
        yield Stage(bus, clock)
    finally:
        await runner.stop()


def fill(
    side: Side, qty: str, price: str, trade_id: str, ts: int, fee: str = "0"
) -> ExecutionReport:
    return stubs.execution_report(
        report_id=f"R-{trade_id}",
        exec_type=ExecType.FILL,
        order_status=OrderStatus.FILLED,
        side=side,
        last_qty=D(qty),
        last_price=D(price),
        cum_qty=D(qty),
        avg_price=D(price),
        fee=D(fee),
        trade_id=trade_id,
        ts_event=ts,
    )


def test_declared_topics_match_the_design() -> None:
    assert PortfolioService.consumes == (
        Topic.EXEC_REPORTS,
        Topic.MD_TICKS,
        Topic.MD_BARS,
        Topic.CONTROL,
        Topic.ACCOUNTS,
    )
    assert PortfolioService.produces == (
        Topic.PORTFOLIO_UPDATES,
        Topic.PORTFOLIO_SNAPSHOTS,
        Topic.PORTFOLIO_PERFORMANCE,
    )


def test_handlers_exist() -> None:
    assert HANDLERS_ISSUE is None


async def test_fills_when_published_emit_positions_keyed_by_account(stage: Stage) -> None:
    await stage.send(Topic.EXEC_REPORTS, fill(Side.BUY, "1", "100", "T1", T0 + S, fee="0.1"))
    await stage.send(Topic.EXEC_REPORTS, fill(Side.BUY, "1", "110", "T2", T0 + 2 * S, fee="0.1"))

    await stage.send(
        Topic.EXEC_REPORTS, fill(Side.SELL, "1.5", "120", "T3", T0 + 3 * S, fee="0.18")
    )

    positions = stage.positions()
    last = positions[-1]
    records = stage.bus.records(Topic.PORTFOLIO_UPDATES)
    assert [p.quantity for p in positions] == [D(1), D(2), D("0.5")]
    # FIFO (120 - 100) * 1 + (120 - 110) * 0.5 = 25, minus fees 0.38
    assert last.realized_pnl == D("24.62")
    assert last.unrealized_pnl == D(5)  # (120 - 110) * 0.5 at the last fill price
    assert last.side is PositionSide.LONG
    assert last.ts_event == T0 + 3 * S
    assert {r.key for r in records} == {ACC}
    assert records[-1].envelope is not None
    assert records[-1].envelope.ts_event == T0 + 3 * S


async def test_fill_when_redelivered_is_applied_once(stage: Stage) -> None:
    report = fill(Side.BUY, "1", "100", "T1", T0 + S)

    await stage.send(Topic.EXEC_REPORTS, report)
    await stage.send(Topic.EXEC_REPORTS, report)

    assert [p.quantity for p in stage.positions()] == [D(1)]


async def test_report_when_not_a_fill_emits_nothing(stage: Stage) -> None:
    await stage.send(Topic.EXEC_REPORTS, stubs.order_accepted(ts_event=T0 + S))

    assert stage.positions() == []
    assert stage.snapshots() == []


async def test_ticks_when_minutes_pass_emit_snapshots_on_event_time(stage: Stage) -> None:
    await stage.send(Topic.EXEC_REPORTS, fill(Side.BUY, "1", "100", "T1", T0 + S, fee="0.1"))
    await stage.send(Topic.MD_TICKS, stubs.tick(price=D(110), ts_event=T0 + 30 * S))
    await stage.send(Topic.MD_TICKS, stubs.tick(price=D(120), ts_event=T0 + 61 * S))
    await stage.send(Topic.MD_TICKS, stubs.tick(price=D(90), ts_event=T0 + 300 * S))

    await stage.send(Topic.MD_TICKS, stubs.tick(price=D(130), ts_event=T0 + 360 * S))

    snaps = stage.snapshots()
    # T0+60: mark 110 -> 1000 - 100 - 0.1 + 110 = 1009.9
    # T0+240 (the gap from 61 s to 300 s gives one snapshot): mark 120 -> 1019.9, the peak
    # T0+300: the tick at exactly 300 s belongs to it: mark 90 -> 989.9
    assert [s.ts_event for s in snaps] == [T0 + 60 * S, T0 + 240 * S, T0 + 300 * S]
    assert [s.equity for s in snaps] == [D("1009.9"), D("1019.9"), D("989.9")]
    assert [s.unrealized_pnl for s in snaps] == [D(10), D(20), D(-10)]
    assert snaps[-1].peak_equity == D("1019.9")
    assert snaps[-1].drawdown == D(30) / D("1019.9")
    assert snaps[-1].realized_pnl == D("-0.1")
    assert snaps[-1].balances == {"BTC": D(1), "USDT": D("899.9")}
    assert [p.last_price for p in snaps[-1].positions] == [D(90)]


def _bar(open_: str, close: str, ts_open: int) -> Bar:
    prices = (D(open_), D(close))
    return stubs.bar(
        open=prices[0],
        high=max(prices),
        low=min(prices),
        close=prices[1],
        ts_open=ts_open,
        ts_close=ts_open + 60 * S,
    )


async def test_bars_when_closed_mark_positions_at_their_close(stage: Stage) -> None:
    await stage.send(Topic.EXEC_REPORTS, fill(Side.BUY, "2", "100", "T1", T0 + S))
    await stage.send(Topic.MD_BARS, _bar("100", "120", T0))

    await stage.send(Topic.MD_BARS, _bar("120", "130", T0 + 60 * S))

    [snap] = stage.snapshots()
    # at T0+60 the first bar's close (120) is the mark: (120 - 100) * 2
    assert snap.ts_event == T0 + 60 * S
    assert snap.unrealized_pnl == D(40)
    assert snap.equity == D(1040)


async def test_snapshots_when_no_account_yet_are_not_emitted(stage: Stage) -> None:
    await stage.send(Topic.MD_TICKS, stubs.tick(price=D(100), ts_event=T0 + S))

    await stage.send(Topic.MD_TICKS, stubs.tick(price=D(100), ts_event=T0 + 600 * S))

    assert stage.snapshots() == []


async def test_message_when_malformed_goes_to_the_dead_letter_topic(stage: Stage) -> None:
    await stage.bus.publish_raw(Topic.EXEC_REPORTS, b'{"not": "an envelope"}', key=ACC)

    await stage.bus.run_until_idle()

    assert len(stage.bus.records(dlq(Topic.EXEC_REPORTS))) == 1
    assert stage.positions() == []


# -- settings ----------------------------------------------------------------------------------


def test_settings_when_starting_cash_is_json_read_it_exactly(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("QM_STARTING_CASH", '{"USDT": "100000.10", "BTC": 0.5}')
    monkeypatch.setenv("QM_SNAPSHOT_INTERVAL_S", "0.5")

    settings = load_settings(PortfolioSettings, bus="memory")

    assert settings.starting_cash == {"USDT": D("100000.10"), "BTC": D("0.5")}
    assert settings.snapshot_interval_ns == 500_000_000


def test_settings_when_env_is_empty_use_the_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("QM_STARTING_CASH", "QM_SNAPSHOT_INTERVAL_S", "QM_BASE_CURRENCY"):
        monkeypatch.delenv(var, raising=False)

    settings = load_settings(PortfolioSettings, bus="memory")

    assert settings.starting_cash == {"USDT": D(100_000)}
    assert settings.snapshot_interval_ns == 60 * S
    assert settings.base_currency == "USDT"


@pytest.mark.parametrize(
    ("var", "value", "phrase"),
    [
        ("QM_STARTING_CASH", "{USDT: 1}", "is not valid JSON"),
        ("QM_STARTING_CASH", '["USDT", 1]', "must be a JSON object"),
        ("QM_STARTING_CASH", '{"usdt": "1"}', "is not an upper-case code"),
        ("QM_STARTING_CASH", '{"USDT": "-5"}', "is not a finite, non-negative decimal"),
        ("QM_STARTING_CASH", '{"USDT": "lots"}', "is not a finite, non-negative decimal"),
        ("QM_SNAPSHOT_INTERVAL_S", "0", "greater than or equal to 0.001"),
        ("QM_SNAPSHOT_INTERVAL_S", "soon", "is not a valid number"),
        ("QM_BASE_CURRENCY", "us dollar", "should match pattern"),
        ("QM_PORTFOLIO_TOPIC_PREFIX", "my run/", "should match pattern"),
    ],
)
def test_settings_when_value_is_bad_exit_2_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    var: str,
    value: str,
    phrase: str,
) -> None:
    monkeypatch.setenv(var, value)

    with pytest.raises(SystemExit) as exited:
        load_settings(PortfolioSettings, bus="memory")

    err = capsys.readouterr().err
    assert exited.value.code == CONFIG_ERROR_EXIT_CODE
    assert f"{var}={value!r}" in err
    assert phrase in err


@pytest.fixture
async def reporting() -> AsyncIterator[Stage]:
    clock = SimulatedClock(T0)
    bus = InMemoryBus("test", clock=clock, retain=True)
    settings = PortfolioSettings(
        bus="memory",
        http_host="127.0.0.1",
        http_port=0,
        starting_cash={"USDT": "1000"},
        snapshot_interval_s=60,
        performance_interval_s=120,
        database_url=None,
    )
    runner = ServiceRunner(PortfolioService(settings), settings, bus=bus, clock=clock, pump=False)
    await runner.start()
    try:
        yield Stage(bus, clock)
    finally:
        await runner.stop()


def _reports(stage: Stage) -> list[PerformanceReport]:
    return [e.payload for e in stage.bus.messages(Topic.PORTFOLIO_PERFORMANCE)]


async def test_reports_when_a_boundary_is_a_multiple_of_the_interval_go_out_per_scope(
    reporting: Stage,
) -> None:
    # Arrange: T0 is a multiple of 120 s; the boundary at T0 + 60 s is not.
    await reporting.send(Topic.EXEC_REPORTS, fill(Side.BUY, "1", "100", "T1", T0 + S))
    await reporting.send(Topic.MD_TICKS, stubs.tick(price=D(110), ts_event=T0 + 61 * S))
    assert _reports(reporting) == []

    # Act
    await reporting.send(Topic.EXEC_REPORTS, fill(Side.SELL, "1", "120", "T2", T0 + 121 * S))

    # Assert
    reports = _reports(reporting)
    assert [(r.account_id, r.strategy_id) for r in reports] == [
        (ACC, None),
        (ACC, stubs.STRATEGY_ID),
    ]
    account, strategy = reports
    # snapshots hold what came before them: T0+60 -> 1000 - 100 + 100 (the fill price) = 1000;
    # T0+120 -> marked at 110 by the tick at T0+61 s: 1010
    assert account.ts_event == T0 + 120 * S
    assert (account.points, account.start_equity, account.final_equity) == (2, D(1000), D(1010))
    assert account.total_return == pytest.approx(0.01)
    # the strategy's curve: capital 1000 + its P&L (unrealised 0, then 10)
    assert (strategy.points, strategy.start_equity, strategy.final_equity) == (2, D(1000), D(1010))
    assert account.trades == 0  # the sell at T0+121 s comes after the boundary
    records = reporting.bus.records(Topic.PORTFOLIO_PERFORMANCE)
    assert {r.key for r in records} == {ACC}


async def test_control_when_performance_is_requested_reports_the_target_account_now(
    reporting: Stage,
) -> None:
    # Arrange
    await reporting.send(Topic.EXEC_REPORTS, fill(Side.BUY, "1", "100", "T1", T0 + S))
    await reporting.send(Topic.EXEC_REPORTS, fill(Side.SELL, "1", "120", "T2", T0 + 2 * S))
    other = stubs.control_command(
        command_id="C-1", action=ControlAction.REPORT_PERFORMANCE, target="acc-other"
    )
    await reporting.send(Topic.CONTROL, other)
    assert _reports(reporting) == []

    # Act
    request = stubs.control_command(
        command_id="C-2",
        action=ControlAction.REPORT_PERFORMANCE,
        target=ACC,
        ts_event=T0 + 3 * S,
    )
    await reporting.send(Topic.CONTROL, request)

    # Assert
    reports = _reports(reporting)
    assert [r.strategy_id for r in reports] == [None, stubs.STRATEGY_ID]
    assert all(r.ts_event == T0 + 3 * S for r in reports)
    assert [(r.trades, r.wins, r.net_pnl) for r in reports] == [(1, 1, D(20))] * 2
    [trip] = reports[0].round_trips
    assert (trip.entry_price, trip.exit_price, trip.mae, trip.mfe) == (D(100), D(120), D(0), D(20))


async def test_control_when_another_action_emits_nothing(reporting: Stage) -> None:
    await reporting.send(Topic.EXEC_REPORTS, fill(Side.BUY, "1", "100", "T1", T0 + S))

    await reporting.send(Topic.CONTROL, stubs.control_command())

    assert _reports(reporting) == []


async def test_account_opened_when_published_seeds_the_snapshot_cash_once(stage: Stage) -> None:
    opened = stubs.account_opened(starting_cash={"USDT": D("50000"), "BTC": D("1")})
    await stage.send(Topic.ACCOUNTS, opened)
    await stage.send(Topic.ACCOUNTS, opened)  # redelivered

    await stage.send(Topic.EXEC_REPORTS, fill(Side.BUY, "0.5", "100", "T1", T0 + S, fee="0.1"))
    # The next minute's first event emits the snapshot of T0 + 60 s.
    await stage.send(Topic.EXEC_REPORTS, fill(Side.BUY, "0.5", "100", "T2", T0 + 61 * S))

    snapshot = stage.snapshots()[0]
    # USDT 50000 - 0.5 * 100 - 0.1 = 49949.9 (not the default 1000); BTC 1 + 0.5
    assert snapshot.balances == {"BTC": D("1.5"), "USDT": D("49949.9")}
    assert snapshot.equity == D("50099.9")  # 49949.9 + 1.5 * 100


async def test_fill_when_topics_are_prefixed_is_read_and_answered_on_the_prefixed_topics() -> None:
    # Arrange: a stage behind QM_PORTFOLIO_TOPIC_PREFIX, and a fill on the unprefixed topic
    # that must not reach it.
    clock = SimulatedClock(T0)
    bus = InMemoryBus("test", clock=clock, retain=True)
    settings = PortfolioSettings(
        bus="memory",
        http_host="127.0.0.1",
        http_port=0,
        starting_cash={"USDT": "1000"},
        database_url=None,
        portfolio_topic_prefix="run7.",
    )
    runner = ServiceRunner(PortfolioService(settings), settings, bus=bus, clock=clock, pump=False)
    await runner.start()
    try:
        await bus.publish(Topic.EXEC_REPORTS, fill(Side.BUY, "1", "100", "T1", T0 + 1))
        await bus.publish("run7." + Topic.EXEC_REPORTS, fill(Side.BUY, "2", "100", "T2", T0 + 2))

        # Act
        await bus.run_until_idle()
    finally:
        await runner.stop()

    # Assert: only the prefixed fill is applied, its position on the prefixed topic.
    assert bus.messages(Topic.PORTFOLIO_UPDATES) == []
    assert [e.payload.quantity for e in bus.messages("run7." + Topic.PORTFOLIO_UPDATES)] == [D(2)]
