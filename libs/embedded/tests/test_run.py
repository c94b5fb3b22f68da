"""`quantmesh run`: the live embedded mode on the synthetic feed, its view and its command line."""

from __future__ import annotations

import asyncio
import io
import json
import sqlite3
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from quantmesh_common.messages import OrderIntent, RiskDecision, Side
from quantmesh_common.topics import Topic
from quantmesh_embedded.cli import main
from quantmesh_embedded.history import TOPICS as HISTORY_TOPICS
from quantmesh_embedded.history import alert_row
from quantmesh_embedded.mesh import EmbeddedMesh
from quantmesh_embedded.run import DEFAULT_SMA_PARAMS, RunConfig, run_live

SECOND = 1_000_000_000
T0 = 1_700_000_000 * SECOND  # a whole second, hence a 1 s bar boundary


class FastClock:
    """A clock whose driver's sleep moves time on at once: seconds of feed in ms of test.

    The driver is the task that first reads the clock (the run loop). Other tasks (a stage's
    background task) sleep until the driver has moved time past their deadline, as on a
    simulated clock, instead of moving time themselves.
    """

    def __init__(self, start_ns: int, stop_at_ns: int | None = None) -> None:
        self.now = start_ns
        self.stop_at_ns = stop_at_ns
        self.stop = asyncio.Event()
        self.driver: asyncio.Task[Any] | None = None
        self._sleepers: list[tuple[int, asyncio.Future[None]]] = []

    def now_ns(self) -> int:
        if self.driver is None:
            self.driver = asyncio.current_task()
        return self.now

    async def sleep(self, seconds: float) -> None:
        deadline = self.now + round(seconds * SECOND)
        if asyncio.current_task() is not self.driver:
            future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._sleepers.append((deadline, future))
            await future
            return
        self.now = deadline
        for due, future in [s for s in self._sleepers if s[0] <= deadline]:
            self._sleepers.remove((due, future))
            if not future.done():
                future.set_result(None)
        if self.stop_at_ns is not None and self.now >= self.stop_at_ns:
            self.stop.set()
        await asyncio.sleep(0)


def _config(**changes: object) -> RunConfig:
    base: dict[str, object] = {
        "rate": 20.0,
        "bar_interval": "1s",
        "duration_s": 12.0,
        "params": {"fast": 1, "slow": 2},
    }
    base.update(changes)
    return RunConfig(**base)  # type: ignore[arg-type]


async def test_run_live_when_fed_for_12_seconds_publishes_every_tick_and_closed_bar() -> None:
    # Arrange: 20 ticks/s from T0 on, stopping at T0 + 12 s
    out = io.StringIO()

    # Act
    view = await run_live(_config(), out, clock=FastClock(T0))

    # Assert: ticks at 0, 0.05, ..., 11.95 s = 240 per instrument; bars 0..10 closed per
    # instrument (bar 11 would close on a tick at 12 s, which is not published).
    assert view.ticks == 2 * 240
    assert view.bars == 2 * 11


async def test_run_live_when_fed_trades_fills_and_prints_prices_every_second() -> None:
    # Arrange
    out = io.StringIO()

    # Act
    view = await run_live(_config(), out, clock=FastClock(T0))

    # Assert
    text = out.getvalue()
    assert view.fills, "sma_cross 1/2 on 1 s bars trades within 12 s"
    assert view.orders >= 1
    assert "FILL   " in text
    summaries = [line for line in text.splitlines() if line.startswith("[")]
    # One line per elapsed second (1..11) plus the final one.
    assert len(summaries) == 12
    assert all("BTC-USDT.SIM" in line and "ETH-USDT.SIM" in line for line in summaries)
    assert "stopped after 12.0 s: 480 ticks, 22 bars" in text
    assert view.equity != Decimal("100000")


async def test_run_live_when_run_twice_with_same_seed_gives_the_same_fills() -> None:
    # Arrange: the second run starts 0.3 s into the first second: the bar grid is the same
    first_clock, second_clock = FastClock(T0), FastClock(T0 + 3 * SECOND // 10)

    # Act
    first = await run_live(_config(), io.StringIO(), clock=first_clock)
    second = await run_live(_config(), io.StringIO(), clock=second_clock)

    # Assert: compare the fills up to the first run's end, the horizon both runs saw
    horizon = T0 + 12 * SECOND
    key = [(f.instrument_id, f.side, f.last_qty, f.last_price) for f in first.fills]
    later = [f for f in second.fills if f.ts_event < horizon]
    assert key == [(f.instrument_id, f.side, f.last_qty, f.last_price) for f in later]
    assert key


async def test_run_live_when_seed_differs_gives_other_prices() -> None:
    # Arrange / Act
    one = await run_live(_config(seed=1), io.StringIO(), clock=FastClock(T0))
    two = await run_live(_config(seed=2), io.StringIO(), clock=FastClock(T0))

    # Assert
    assert one.prices != two.prices


async def test_run_live_when_stop_is_set_stops_without_a_duration() -> None:
    # Arrange: no duration; the clock sets `stop` once 3 s have passed
    clock = FastClock(T0, stop_at_ns=T0 + 3 * SECOND)
    out = io.StringIO()

    # Act
    view = await run_live(_config(duration_s=None), out, clock=clock, stop=clock.stop)

    # Assert: stopped at the first check after 3 s: ticks 0 .. 2.95 s, or one step beyond
    assert 2 * 60 <= view.ticks <= 2 * 61
    assert "stopped after 3.0 s" in out.getvalue()


async def test_run_live_when_tty_draws_the_rich_view_with_positions_and_fills() -> None:
    # Arrange
    out = io.StringIO()

    # Act
    view = await run_live(_config(), out, tty=True, clock=FastClock(T0))

    # Assert: the live view was drawn with cursor control (redrawn in place, not scrolled)
    text = out.getvalue()
    assert "\x1b[" in text
    assert view.snapshot is not None
    assert view.snapshot.positions, "sma_cross with shorting is always in the market once in"
    # ...and its last frame, rendered plainly, shows what the portfolio held and did.
    console = Console(record=True, width=160, file=io.StringIO())
    console.print(view.render(12))
    last = console.export_text()
    for heading in ("Prices", "Positions", "P&L", "Recent orders and fills", "Alerts (0)"):
        assert heading in last
    for position in view.snapshot.positions:
        assert position.instrument_id in last
        assert f"{position.quantity:+}" in last
    last_fill = view.fills[-1]
    assert f"FILL   {last_fill.side} {last_fill.last_qty} {last_fill.instrument_id}" in last
    assert f"equity {view.equity:.2f}" in last


async def test_run_live_when_given_a_history_file_stores_exactly_what_the_mesh_published(
    tmp_path: Path,
) -> None:
    # Arrange: a recorder of its own on the mesh's bus, beside the history
    db = tmp_path / "run.sqlite"
    published: dict[str, list[Any]] = {topic: [] for topic in HISTORY_TOPICS}

    async def attach(mesh: EmbeddedMesh) -> None:
        for topic in HISTORY_TOPICS:
            keep = published[topic].append
            await mesh.bus.subscribe(f"test.{topic}", [topic], keep).start()

    # Act
    await run_live(_config(), io.StringIO(), clock=FastClock(T0), history=db, on_mesh=attach)

    # Assert
    with sqlite3.connect(db) as conn:
        runs = conn.execute("SELECT run_id, started_ns, stopped_ns, config FROM runs").fetchall()
        orders = conn.execute(
            "SELECT event_id, client_order_id, side, quantity, status FROM orders ORDER BY rowid"
        ).fetchall()
        fills = conn.execute(
            "SELECT event_id, trade_id, side, quantity, price, fee FROM fills ORDER BY rowid"
        ).fetchall()
        positions = conn.execute(
            "SELECT event_id, instrument_id, quantity, realized_pnl FROM positions ORDER BY rowid"
        ).fetchall()
        equity = conn.execute(
            "SELECT event_id, ts_ns, equity FROM equity ORDER BY rowid"
        ).fetchall()
        alerts = conn.execute("SELECT count(*) FROM alerts").fetchone()
    [(run_id, started, stopped, config)] = runs
    assert (started, stopped) == (T0, T0 + 12 * SECOND)
    assert json.loads(config)["seed"] == 1
    order_events = published[Topic.ORDERS_UPDATES]
    assert orders == [
        (
            e.event_id,
            e.payload.client_order_id,
            e.payload.side,
            str(e.payload.quantity),
            e.payload.status,
        )
        for e in order_events
    ]
    fill_events = [e for e in published[Topic.EXEC_REPORTS] if e.payload.is_fill]
    assert fill_events, "sma_cross 1/2 on 1 s bars trades within 12 s"
    assert fills == [
        (
            e.event_id,
            e.payload.trade_id,
            e.payload.side,
            str(e.payload.last_qty),
            str(e.payload.last_price),
            str(e.payload.fee),
        )
        for e in fill_events
    ]
    assert positions == [
        (e.event_id, e.payload.instrument_id, str(e.payload.quantity), str(e.payload.realized_pnl))
        for e in published[Topic.PORTFOLIO_UPDATES]
    ]
    assert len(positions) == len(fill_events)
    assert equity == [
        (e.event_id, e.payload.ts_event, str(e.payload.equity))
        for e in published[Topic.PORTFOLIO_SNAPSHOTS]
    ]
    assert equity, "the portfolio snapshots every second once the account traded"
    expected_alerts = len(published[Topic.ORDERS_REJECTED]) + len(published[Topic.ALERTS])
    assert alerts == (expected_alerts,)
    assert run_id == 1


async def test_run_live_when_the_history_file_exists_appends_a_second_run(
    tmp_path: Path,
) -> None:
    # Arrange
    db = tmp_path / "run.sqlite"
    first = await run_live(_config(), io.StringIO(), clock=FastClock(T0), history=db)

    # Act: the same seeded run again, into the same file
    await run_live(_config(), io.StringIO(), clock=FastClock(T0), history=db)

    # Assert: two runs, each with its own rows, the same number (same seed, same bar grid)
    with sqlite3.connect(db) as conn:
        counts = conn.execute(
            "SELECT run_id, count(*) FROM fills GROUP BY run_id ORDER BY run_id"
        ).fetchall()
    assert counts == [(1, len(first.fills)), (2, len(first.fills))]


def test_alert_row_when_risk_denies_an_intent_is_a_warning_with_the_reason() -> None:
    # Arrange
    intent = OrderIntent(
        intent_id="i1",
        client_order_id="c1",
        account_id="paper",
        strategy_id="s1",
        instrument_id="BTC-USDT.SIM",
        side=Side.BUY,
        quantity=Decimal("1"),
        ts_event=T0,
    )
    decision = RiskDecision(
        decision_id="d1",
        account_id="paper",
        intent=intent,
        approved=False,
        reason="MAX_POSITION",
        details={"limit": "5"},
        ts_event=T0,
    )

    # Act
    row = alert_row(decision)

    # Assert
    assert row == (
        "WARNING",
        "risk",
        "MAX_POSITION",
        "intent c1 denied: MAX_POSITION: limit=5",
        "paper",
        "BTC-USDT.SIM",
    )


def test_run_config_when_sma_cross_fills_unset_params_from_defaults() -> None:
    # Arrange
    config = RunConfig(params={"fast": 5, "slow": 9})

    # Act
    params = config.strategy_params()

    # Assert
    assert params == {"fast": 5, "slow": 9, "quantity": "0.01", "allow_short": True}
    assert DEFAULT_SMA_PARAMS["fast"] == 2


def test_run_config_when_another_strategy_passes_only_given_params() -> None:
    # Arrange / Act
    params = RunConfig(strategy="rsi_reversion", params={"period": 7}).strategy_params()

    # Assert
    assert params == {"period": 7}


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"instruments": ("BTC-USDT.SIM", "ETH-USDT.BINANCE")}, "one venue"),
        ({"instruments": ("BTC-USDT.SIM", "ETH-USD.SIM")}, "one quote"),
        ({"rate": 0.0}, "rate"),
        ({"duration_s": -1.0}, "duration"),
        ({"bar_interval": "5x"}, "bar interval"),
    ],
)
def test_run_config_when_invalid_raises(changes: dict[str, object], message: str) -> None:
    # Arrange / Act / Assert
    with pytest.raises(ValueError, match=message):
        RunConfig(**changes)  # type: ignore[arg-type]


def test_cli_run_when_given_a_duration_exits_0_after_trading(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    # Arrange: the real wall clock; fast=1 slow=2 on 1 s bars trades within 4 s
    argv = ["run", "--duration", "4", "--rate", "50", "--bar-interval", "1s"]
    argv += ["--param", "fast=1", "--param", "slow=2", "--symbol", "BTC-USDT.SIM", "--no-tui"]
    argv += ["--db", str(tmp_path / "h.sqlite"), "--no-api"]

    # Act
    code = main(argv)

    # Assert
    text = capsys.readouterr().out
    assert code == 0
    assert "BTC-USDT.SIM 6" in text  # a price near the 60000 start
    assert "ETH-USDT.SIM" not in text
    assert "stopped after 4.0 s" in text
    assert "FILL   " in text
    assert f"history in {tmp_path / 'h.sqlite'}" in text
    with sqlite3.connect(tmp_path / "h.sqlite") as conn:
        assert conn.execute("SELECT count(*) FROM fills").fetchone()[0] >= 1
