"""The portfolio on real PostgreSQL: state stored per fill, rebuilt on start, fills applied once."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest

from quantmesh_common.envelope import Envelope
from quantmesh_common.messages import (
    ControlAction,
    ExecutionReport,
    PerformanceReport,
    Position,
    Side,
)
from quantmesh_common.testing import stubs
from quantmesh_common.testing.harness import StageHarness
from quantmesh_common.topics import Topic
from quantmesh_portfolio.service import PortfolioService

from .conftest import T0, new_portfolio, store_batch, whole_fill

pytestmark = pytest.mark.integration

D = Decimal
S = stubs.SECOND_NS
ACC, BTC = stubs.ACCOUNT_ID, stubs.INSTRUMENT_ID


class Instance(StageHarness[PortfolioService]):
    """One portfolio service instance on its own in-memory bus, with the test schema's pool."""

    def __init__(self, pool: Any, delivery: str = "transactional") -> None:
        super().__init__(new_portfolio(order_flow_delivery=delivery), now_ns=T0, pg=pool)

    def positions(self) -> list[Position]:
        return self.payloads(Topic.PORTFOLIO_UPDATES)


FILLS = [
    whole_fill("T-1", Side.BUY, "0.1", "49000", 1, fee="4.9"),
    whole_fill("T-2", Side.BUY, "0.2", "50000", 2, fee="10"),
    # Closes 0.1 @ 49000 (+200) and 0.05 @ 50000 (+50): realised 250 - fees 22.55 = 227.45.
    whole_fill("T-3", Side.SELL, "0.15", "51000", 3, fee="7.65"),
]


async def test_fills_when_redelivered_after_a_restart_are_not_applied_again(
    portfolio_pool: Any,
) -> None:
    first = await Instance(portfolio_pool).start()
    await first.send(Topic.EXEC_REPORTS, *FILLS)
    assert len(first.positions()) == 3

    # Restart: a new instance on the same tables, the same fills delivered again.
    second = await Instance(portfolio_pool).start()
    await second.send(Topic.EXEC_REPORTS, *FILLS)
    rebuilt = second.service.handlers
    assert rebuilt is not None
    account = rebuilt.portfolio.accounts[ACC]
    book = account.positions[BTC]

    # Each redelivered fill is not applied again, but the position it left is published again
    # (the crash may have come before it went out), once per restart.
    republished = second.positions()
    assert [p.quantity for p in republished] == [D("0.1"), D("0.3"), D("0.15")]
    assert [p.ts_event for p in republished] == [f.ts_event for f in FILLS]
    assert republished[-1].realized_pnl == D("227.45")
    await second.send(Topic.EXEC_REPORTS, FILLS[0])
    assert len(second.positions()) == 3
    assert book.quantity == D("0.15")
    assert book.avg_entry_price == D("50000")
    assert book.realized_pnl == D("227.45")
    assert book.fees == D("22.55")
    # 100000 - 4900 - 4.9 - 10000 - 10 + 7650 - 7.65
    assert account.balances == {"USDT": D("92727.45"), "BTC": D("0.15")}


async def test_lots_when_rebuilt_close_fifo_like_before_the_restart(portfolio_pool: Any) -> None:
    first = await Instance(portfolio_pool).start()
    await first.send(Topic.EXEC_REPORTS, *FILLS)

    second = await Instance(portfolio_pool).start()
    await second.send(Topic.EXEC_REPORTS, whole_fill("T-4", Side.SELL, "0.15", "52000", 4))

    # The remaining lot 0.15 @ 50000 closes at 52000: +300.
    [position] = second.positions()
    assert position.quantity == D(0)
    assert position.realized_pnl == D("527.45")
    balances = second.service.handlers.portfolio.accounts[ACC].balances  # type: ignore[union-attr]
    assert balances["USDT"] == D("100527.45")
    rows = await portfolio_pool.fetch("SELECT * FROM portfolio_lots")
    assert rows == []


async def test_snapshot_when_due_is_stored_as_an_equity_row(portfolio_pool: Any) -> None:
    stage = await Instance(portfolio_pool).start()
    await stage.send(Topic.EXEC_REPORTS, *FILLS)
    tick = stubs.tick(price=D("52000"), ts_event=T0 + 61 * S)

    await stage.send(Topic.MD_TICKS, tick)

    row = await portfolio_pool.fetchrow("SELECT * FROM equity_snapshots")
    # At T0 + 60 s: 92727.45 USDT + 0.15 BTC at the last fill price 51000.
    assert row["ts_event"] == T0 + 60 * S
    assert row["equity"] == D("100377.45")
    assert row["balances"] == {"BTC": "0.15", "USDT": "92727.45"}
    position = await portfolio_pool.fetchrow("SELECT quantity, realized_pnl FROM positions")
    assert (position["quantity"], position["realized_pnl"]) == (D("0.15"), D("227.45"))


async def test_round_trips_and_open_lots_when_rebuilt_report_like_before_the_restart(
    portfolio_pool: Any,
) -> None:
    # Arrange: a trip closed (T-1..T-3 leave 0.15 open, so none yet) and one open lot.
    first = await Instance(portfolio_pool).start()
    await first.send(Topic.EXEC_REPORTS, *FILLS)
    await first.send(Topic.MD_TICKS, stubs.tick(price=D("47000"), ts_event=T0 + 5 * S))

    # Act: restart after a snapshot stored the lot's range; close the trip.
    await first.send(Topic.MD_TICKS, stubs.tick(price=D("53000"), ts_event=T0 + 61 * S))
    second = await Instance(portfolio_pool).start()
    await second.send(Topic.EXEC_REPORTS, whole_fill("T-4", Side.SELL, "0.15", "52000", 62))
    await second.send(
        Topic.CONTROL,
        stubs.control_command(
            command_id="P-1",
            action=ControlAction.REPORT_PERFORMANCE,
            target="*",
            ts_event=T0 + 63 * S,
        ),
    )

    # Assert
    reports = second.payloads(Topic.PORTFOLIO_PERFORMANCE)
    account = next(r for r in reports if r.strategy_id is None)
    [trip] = account.round_trips
    # entries 0.1 @ 49000 + 0.2 @ 50000 (VWAP 49666.67), exits 0.15 @ 51000 + 0.15 @ 52000;
    # realised 227.45 (after T-3) + 300 = 527.45 net of fees 22.55
    assert trip.quantity == D("0.3")
    assert trip.exit_price == D(51500)
    assert trip.pnl == D("527.45")
    assert trip.fees == D("22.55")
    # lot @49000 (0.1) saw 49000..51000: 0, 2000; 0.05 of lot @50000 saw 50000..51000: 0, 1000
    # 0.15 of lot @50000 saw 47000..53000 before the snapshot: 3000, 3000
    # MAE (0.15 * 3000) / 0.3 = 1500; MFE (200 + 50 + 450) / 0.3 = 2333.33...
    assert trip.mae == D(1500)
    assert trip.mfe.quantize(D("0.01")) == D("2333.33")
    assert account.points == 1  # the snapshot at T0 + 60 s
    rows = await portfolio_pool.fetch(
        "SELECT strategy_id, close_fill_id, pnl FROM portfolio_round_trips ORDER BY strategy_id"
    )
    assert [(r["strategy_id"], r["close_fill_id"], r["pnl"]) for r in rows] == [
        ("", "T-4", D("527.45")),
        (stubs.STRATEGY_ID, "T-4", D("527.45")),
    ]
    stored = await portfolio_pool.fetch(
        "SELECT strategy_id, ts_event, trades, report FROM portfolio_performance"
        " ORDER BY strategy_id"
    )
    assert [(r["strategy_id"], r["ts_event"], r["trades"]) for r in stored] == [
        ("", T0 + 63 * S, 1),
        (stubs.STRATEGY_ID, T0 + 63 * S, 1),
    ]
    assert PerformanceReport.model_validate(stored[0]["report"]) == account


async def test_report_when_unbounded_is_stored_with_infinite_ratios(portfolio_pool: Any) -> None:
    # Arrange: equity only rises over the snapshots: no losing period.
    stage = await Instance(portfolio_pool).start()
    await stage.send(Topic.EXEC_REPORTS, FILLS[0])
    for minute, price in ((1, "50000"), (2, "51000"), (3, "52000")):
        await stage.send(Topic.MD_TICKS, stubs.tick(price=D(price), ts_event=T0 + minute * 60 * S))
    await stage.send(Topic.MD_TICKS, stubs.tick(price=D("52000"), ts_event=T0 + 181 * S))

    # Act
    await stage.send(
        Topic.CONTROL,
        stubs.control_command(
            command_id="P-2", action=ControlAction.REPORT_PERFORMANCE, ts_event=T0 + 200 * S
        ),
    )

    # Assert
    row = await portfolio_pool.fetchrow(
        "SELECT sharpe, report FROM portfolio_performance WHERE strategy_id = ''"
    )
    report = PerformanceReport.model_validate(row["report"])
    assert report.omega == float("inf")
    assert report.points == 3
    assert row["sharpe"] == report.sharpe


async def test_account_opened_when_redelivered_after_a_restart_is_not_applied_again(
    portfolio_pool: Any,
) -> None:
    opened = stubs.account_opened(starting_cash={"USDT": D("50000")})
    first = await Instance(portfolio_pool).start()
    await first.send(Topic.ACCOUNTS, opened)
    await first.send(Topic.EXEC_REPORTS, FILLS[0])  # USDT 50000 - 4900 - 4.9

    # Restart: the opening is delivered again (e.g. a consumer group reset).
    second = await Instance(portfolio_pool).start()
    await second.send(Topic.ACCOUNTS, opened)

    account = second.service.handlers.portfolio.accounts[ACC]  # type: ignore[union-attr]
    assert account.balances == {"USDT": D("45095.1"), "BTC": D("0.1")}
    assert account.capital == D(50000)
    assert account.opened
    async with portfolio_pool.acquire() as conn:
        opened_ts = await conn.fetchval(
            "SELECT opened_ts FROM portfolio_accounts WHERE account_id = $1", ACC
        )
    assert opened_ts == stubs.TS


async def test_batch_when_several_fills_are_stored_at_its_end_rebuilds_the_same_position(
    portfolio_pool: Any,
) -> None:
    first = await Instance(portfolio_pool).start()
    persistent = first.service.persistent
    assert persistent is not None
    for fill in FILLS:
        await persistent(Envelope.wrap(fill, source="test", ts_event=T0, ts_init=T0))
    stored_before_flush = await portfolio_pool.fetchval(
        "SELECT count(*) FROM portfolio_applied_fills"
    )

    await persistent.flush()
    second = await Instance(portfolio_pool).start()

    assert stored_before_flush == 0
    assert await portfolio_pool.fetchval("SELECT count(*) FROM portfolio_applied_fills") == 3
    row = await portfolio_pool.fetchrow("SELECT quantity, realized_pnl FROM positions")
    # Left: 0.15 @ 50000; realised 250 - fees (4.9 + 10 + 7.65) = 227.45.
    assert (row["quantity"], row["realized_pnl"]) == (D("0.15"), D("227.45"))
    lots = await portfolio_pool.fetch("SELECT quantity, price FROM portfolio_lots ORDER BY seq")
    assert [(r["quantity"], r["price"]) for r in lots] == [(D("0.15"), D("50000"))]
    book = second.service.handlers
    assert book is not None
    rebuilt = book.portfolio.accounts[ACC].positions[BTC]
    assert (rebuilt.quantity, rebuilt.realized_pnl) == (D("0.15"), D("227.45"))
    assert len(book.portfolio.seen_fills) == 3


class Bounded(Instance):
    """An instance that keeps at most two applied fill keys in memory."""

    def __init__(self, pool: Any) -> None:
        super().__init__(pool)
        self.settings = self.settings.model_copy(update={"portfolio_keep_fills": 2})


async def test_fill_keys_when_past_the_bound_leave_memory_and_a_redelivery_is_not_reapplied(
    portfolio_pool: Any,
) -> None:
    stage = await Bounded(portfolio_pool).start()
    await stage.send(Topic.EXEC_REPORTS, *FILLS)
    persistent = stage.service.persistent
    assert persistent is not None

    in_memory = sorted(k[2] for k in persistent.handlers.portfolio.seen_fills)
    floor = persistent.floor

    await stage.send(Topic.EXEC_REPORTS, FILLS[0])

    assert in_memory == ["T-2", "T-3"]
    assert floor == FILLS[0].ts_event
    assert persistent.lookups == 1
    assert len(stage.positions()) == 3
    row = await portfolio_pool.fetchrow("SELECT quantity FROM positions")
    assert row["quantity"] == D("0.15")


async def test_fill_when_applied_before_a_restart_and_not_loaded_republishes_its_position(
    portfolio_pool: Any,
) -> None:
    first = await Bounded(portfolio_pool).start()
    await first.send(Topic.EXEC_REPORTS, *FILLS)
    second = await Bounded(portfolio_pool).start()
    assert second.service.persistent is not None
    loaded = sorted(k[2] for k in second.service.persistent.handlers.portfolio.seen_fills)

    await second.send(Topic.EXEC_REPORTS, FILLS[0])

    assert loaded == ["T-2", "T-3"]
    [republished] = second.positions()
    # The position stored with T-1: 0.1 bought at 49000.
    assert (republished.quantity, republished.avg_entry_price) == (D("0.1"), D("49000"))
    row = await portfolio_pool.fetchrow("SELECT quantity FROM positions")
    assert row["quantity"] == D("0.15")


#: Every table the stage writes, each row as a tuple (ts_updated left out: the database's clock).
_TABLES = {
    "portfolio_applied_fills": "account_id, instrument_id, fill_id, ts_event, position::text",
    "positions": "account_id, instrument_id, side, quantity, avg_entry_price, realized_pnl,"
    " unrealized_pnl, fees, last_price, version, ts_event",
    "portfolio_lots": "account_id, instrument_id, seq, quantity, price, direction, ts_event",
    "portfolio_balances": "account_id, currency, amount, ts_event",
    "portfolio_accounts": "account_id, base_currency, peak_equity, ts_event, capital, opened_ts",
    "equity_snapshots": "account_id, ts_event, equity, peak_equity, drawdown",
    "portfolio_trip_books": "account_id, strategy_id, instrument_id, state::text, ts_event",
    "portfolio_round_trips": "account_id, strategy_id, instrument_id, close_fill_id, pnl",
    "portfolio_strategy_equity": "account_id, strategy_id, ts_event, equity",
    "portfolio_performance": "account_id, strategy_id, ts_event, report_id",
}


async def _dump(pool: Any) -> dict[str, list[tuple[Any, ...]]]:
    async with pool.acquire() as conn:
        return {
            table: [
                tuple(r) for r in await conn.fetch(f"SELECT {cols} FROM {table} ORDER BY 1, 2, 3")
            ]
            for table, cols in _TABLES.items()
        }


async def test_inputs_when_handed_again_to_a_fresh_instance_republish_the_output_store_nothing(
    portfolio_pool: Any,
) -> None:
    # Arrange: idempotent delivery; an account's opening and four fills, the last one past a
    # minute boundary (each account's snapshot at it stored); the store holds the batches'
    # effects, their output may never have gone out.
    opened = stubs.account_opened(account_id="ACC-OPENED", starting_cash={"USDT": D("50000")})
    late = whole_fill("T-4", Side.BUY, "0.05", "52000", 61)
    first = await Instance(portfolio_pool, "idempotent").start()
    inputs = [(Topic.ACCOUNTS, e) for e in await first.send(Topic.ACCOUNTS, opened)]
    inputs += [(Topic.EXEC_REPORTS, e) for e in await first.send(Topic.EXEC_REPORTS, *FILLS, late)]
    published = first.positions()
    snapshots = first.payloads(Topic.PORTFOLIO_SNAPSHOTS)
    stored = await _dump(portfolio_pool)

    # Act: a fresh instance (a restart: rebuilt from the store) is handed a copy of a fill
    # under another envelope (execution re-emitting an order's reports), then the same
    # messages, as the bus redelivers them.
    second = await Instance(portfolio_pool, "idempotent").start()
    await second.send(Topic.EXEC_REPORTS, FILLS[1])
    after_copy = second.positions()
    for topic, envelope in inputs:
        await second.bus.publish_envelope(topic, envelope)
    await second.bus.run_until_idle()

    # Assert: every fill's position and the boundary's snapshots again, equal to the first
    # (same account and time: readers keep the newest by time); the copy publishes nothing;
    # the store as it was.
    assert after_copy == []
    assert second.positions() == published
    assert [(p.quantity, p.ts_event) for p in published] == [
        (D("0.1"), FILLS[0].ts_event),
        (D("0.3"), FILLS[1].ts_event),
        (D("0.15"), FILLS[2].ts_event),
        (D("0.2"), late.ts_event),
    ]
    assert second.payloads(Topic.PORTFOLIO_SNAPSHOTS) == snapshots
    # At T0 + 60 s, before T-4: 0.15 BTC marked at 51000 + 92727.45 USDT.
    assert [(s.account_id, s.equity, s.ts_event) for s in snapshots] == [
        ("ACC-OPENED", D(50000), T0 + 60 * S),
        (ACC, D("100377.45"), T0 + 60 * S),
    ]
    assert await _dump(portfolio_pool) == stored
    assert [r[0] for r in stored["portfolio_applied_fills"]] == [ACC] * 4
    book = second.service.handlers.portfolio.accounts[ACC].positions[BTC]  # type: ignore[union-attr]
    assert (book.quantity, book.realized_pnl) == (D("0.2"), D("227.45"))


async def _stored_lots(pool: Any) -> list[tuple[Decimal, Decimal, int]]:
    rows = await pool.fetch("SELECT quantity, price, direction FROM portfolio_lots ORDER BY seq")
    return [(r["quantity"], r["price"], r["direction"]) for r in rows]


def _lots_in_memory(stage: Instance) -> list[tuple[Decimal, Decimal, int]]:
    handlers = stage.service.handlers
    assert handlers is not None
    book = handlers.portfolio.accounts[ACC].positions[BTC]
    return [(lot.quantity, lot.price, book.direction) for lot in book.lots]


async def test_lots_when_cut_closed_flipped_and_restarted_are_stored_as_memory_holds_them(
    portfolio_pool: Any,
) -> None:
    # Each batch writes only the lots that changed; after every one the table must still
    # equal memory: the front lot cut, lots closed, the position flipped, after a restart.
    steps: list[list[ExecutionReport]] = [
        [
            whole_fill("L-1", Side.BUY, "0.1", "100", 1),
            whole_fill("L-2", Side.BUY, "0.2", "101", 2),
            whole_fill("L-3", Side.BUY, "0.3", "102", 3),
        ],
        [whole_fill("L-4", Side.SELL, "0.15", "103", 4)],  # L-1 closed, L-2 cut to 0.15
        [whole_fill("L-5", Side.SELL, "0.5", "104", 5)],  # long closed, short 0.05 opened
    ]
    expected = [
        [(D("0.1"), D("100"), 1), (D("0.2"), D("101"), 1), (D("0.3"), D("102"), 1)],
        [(D("0.15"), D("101"), 1), (D("0.3"), D("102"), 1)],
        [(D("0.05"), D("104"), -1)],
    ]
    first = await Instance(portfolio_pool).start()
    for fills, lots in zip(steps, expected, strict=True):
        await store_batch(first, *fills)
        assert _lots_in_memory(first) == lots
        assert await _stored_lots(portfolio_pool) == lots

    second = await Instance(portfolio_pool).start()
    assert _lots_in_memory(second) == expected[-1]
    for fill, lots in [
        (whole_fill("L-6", Side.BUY, "0.05", "105", 6), []),
        (whole_fill("L-7", Side.BUY, "0.2", "106", 7), [(D("0.2"), D("106"), 1)]),
        (
            whole_fill("L-8", Side.BUY, "0.1", "107", 8),
            [(D("0.2"), D("106"), 1), (D("0.1"), D("107"), 1)],
        ),
    ]:
        await store_batch(second, fill)
        assert _lots_in_memory(second) == lots
        assert await _stored_lots(portfolio_pool) == lots
