"""Performance trip lots on real PostgreSQL: each batch writes only what changed, as memory."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest

from quantmesh_common.messages import ExecutionReport, Side, Tick
from quantmesh_common.testing import stubs
from quantmesh_common.testing.harness import StageHarness
from quantmesh_portfolio.config import PortfolioSettings
from quantmesh_portfolio.performance import PerformanceTracker
from quantmesh_portfolio.service import PortfolioService

from .conftest import mark, store_batch

pytestmark = pytest.mark.integration

D = Decimal
S = stubs.SECOND_NS
T0 = stubs.TS + 40 * S  # a minute boundary: the first snapshot is due at T0 + 60 s
ACC, STRATEGY = stubs.ACCOUNT_ID, stubs.STRATEGY_ID

#: A lot as (seq, quantity, price, low, high).
LotRow = tuple[int, Decimal, Decimal, Decimal, Decimal]


def _stage(pool: Any) -> StageHarness[PortfolioService]:
    settings = PortfolioSettings(
        bus="memory", http_port=0, starting_cash={"USDT": "100000"}, snapshot_interval_s=60
    )
    return StageHarness(PortfolioService(settings), now_ns=T0, pg=pool)


def _buy(trade_id: str, qty: str, price: str, second: int) -> ExecutionReport:
    return _fill(trade_id, Side.BUY, qty, price, second)


def _sell(trade_id: str, qty: str, price: str, second: int) -> ExecutionReport:
    return _fill(trade_id, Side.SELL, qty, price, second)


def _fill(trade_id: str, side: Side, qty: str, price: str, second: int) -> ExecutionReport:
    # With a strategy (the stub's): the account's book and the strategy's move together.
    quantity, at = D(qty), D(price)
    return stubs.execution_report(
        trade_id=trade_id,
        side=side,
        last_qty=quantity,
        cum_qty=quantity,
        last_price=at,
        avg_price=at,
        fee=D(0),
        ts_event=T0 + second * S,
    )


def _tracker(stage: StageHarness[PortfolioService]) -> PerformanceTracker:
    handlers = stage.service.handlers
    assert handlers is not None
    return handlers.tracker


def _lots_in_memory(stage: StageHarness[PortfolioService]) -> dict[str, list[LotRow]]:
    """Each scope's open lots ('' the account), oldest first."""
    return {
        book.strategy_id or "": [
            (lot.seq, lot.quantity, lot.price, lot.low, lot.high)
            for lot in (book.trip.lots if book.trip is not None else ())
        ]
        for book in _tracker(stage).books.values()
    }


async def _stored_lots(pool: Any) -> dict[str, list[LotRow]]:
    rows = await pool.fetch(
        "SELECT strategy_id, seq, quantity, price, low, high FROM portfolio_trip_lots"
        " WHERE account_id = $1 ORDER BY strategy_id, seq",
        ACC,
    )
    stored: dict[str, list[LotRow]] = {
        r["strategy_id"]: []
        for r in await pool.fetch("SELECT strategy_id FROM portfolio_trip_books")
    }
    for r in rows:
        stored[r["strategy_id"]].append((r["seq"], r["quantity"], r["price"], r["low"], r["high"]))
    return stored


async def _assert_stored_as_in_memory(pool: Any, stage: StageHarness[PortfolioService]) -> None:
    assert await _stored_lots(pool) == _lots_in_memory(stage)
    states = await pool.fetch("SELECT strategy_id, state FROM portfolio_trip_books")
    assert {r["strategy_id"]: r["state"] for r in states} == {
        b.strategy_id or "": b.state() for b in _tracker(stage).books.values()
    }


def _lots(*lots: tuple[int, str, str, str, str]) -> list[LotRow]:
    return [(seq, D(q), D(p), D(low), D(high)) for seq, q, p, low, high in lots]


async def test_trip_lots_when_opened_widened_cut_flipped_closed_and_restarted_are_stored_as_memory(
    portfolio_pool: Any,
) -> None:
    # Each batch writes the front lot, the lots from the oldest whose range a price widened
    # (always a suffix: ranges nest), new ones, and deletes those closed; after every batch
    # the table must equal memory, here and after a restart.
    steps: list[tuple[list[ExecutionReport | Tick], list[LotRow]]] = [
        # Opened: each fill's price widens the older lots' ranges.
        (
            [
                _buy("B-1", "0.1", "100", 1),
                _buy("B-2", "0.2", "110", 2),
                _buy("B-3", "0.3", "105", 3),
            ],
            _lots(
                (0, "0.1", "100", "100", "110"),
                (1, "0.2", "110", "105", "110"),
                (2, "0.3", "105", "105", "105"),
            ),
        ),
        # Marks widen lot 2, then lots 1 and 2 (lot 0's range holds 104); a fill adds lot 3.
        (
            [mark("107", 4), mark("104", 5), _buy("B-4", "0.05", "106", 6)],
            _lots(
                (0, "0.1", "100", "100", "110"),
                (1, "0.2", "110", "104", "110"),
                (2, "0.3", "105", "104", "107"),
                (3, "0.05", "106", "106", "106"),
            ),
        ),
        # No fill: a mark widens lots 2 and 3; the snapshot at T0 + 60 s stores the ranges.
        (
            [mark("108", 30), mark("107.5", 61)],
            _lots(
                (0, "0.1", "100", "100", "110"),
                (1, "0.2", "110", "104", "110"),
                (2, "0.3", "105", "104", "108"),
                (3, "0.05", "106", "106", "108"),
            ),
        ),
        # Partial close: lot 0 closed, lot 1 cut to 0.15; 109 widens lots 2 and 3.
        (
            [_sell("S-1", "0.15", "109", 62)],
            _lots(
                (1, "0.15", "110", "104", "110"),
                (2, "0.3", "105", "104", "109"),
                (3, "0.05", "106", "106", "109"),
            ),
        ),
        # Flip: the long 0.5 closed, a short 0.2 opened.
        ([_sell("S-2", "0.7", "103", 63)], _lots((4, "0.2", "103", "103", "103"))),
        # Full close: flat.
        ([_buy("B-5", "0.2", "101", 64)], []),
        # Opened again.
        (
            [_buy("B-6", "0.1", "100", 65), _buy("B-7", "0.1", "102", 66)],
            _lots((5, "0.1", "100", "100", "102"), (6, "0.1", "102", "102", "102")),
        ),
    ]
    first = await _stage(portfolio_pool).start()
    for events, lots in steps:
        await store_batch(first, *events)
        assert _lots_in_memory(first) == {"": lots, STRATEGY: lots}
        await _assert_stored_as_in_memory(portfolio_pool, first)

    # Restart: the same books rebuilt; lots go on being numbered after the stored ones.
    second = await _stage(portfolio_pool).start()
    assert _lots_in_memory(second) == _lots_in_memory(first)
    assert {k: b.state() for k, b in _tracker(second).books.items()} == {
        k: b.state() for k, b in _tracker(first).books.items()
    }
    after_restart: list[tuple[list[ExecutionReport | Tick], list[LotRow]]] = [
        # A mark widens lot 6 only; a fill adds lot 7.
        (
            [mark("101", 67), _buy("B-8", "0.1", "101.5", 68)],
            _lots(
                (5, "0.1", "100", "100", "102"),
                (6, "0.1", "102", "101", "102"),
                (7, "0.1", "101.5", "101.5", "101.5"),
            ),
        ),
        ([_sell("S-3", "0.25", "102", 69)], _lots((7, "0.05", "101.5", "101.5", "102"))),
    ]
    for events, lots in after_restart:
        await store_batch(second, *events)
        assert _lots_in_memory(second) == {"": lots, STRATEGY: lots}
        await _assert_stored_as_in_memory(portfolio_pool, second)


async def test_trip_book_when_stored_with_its_lots_in_the_json_loads_them_and_moves_them_to_rows(
    portfolio_pool: Any,
) -> None:
    # Arrange: books as the version before V0031 stored them (the lots in `state.trip.lots`,
    # numbered from 0 by their position) and no lot rows.
    first = await _stage(portfolio_pool).start()
    await store_batch(
        first,
        _buy("B-1", "0.1", "100", 1),
        _buy("B-2", "0.2", "110", 2),
        _buy("B-3", "0.3", "105", 3),
        _buy("B-4", "0.1", "107", 4),
        _sell("S-1", "0.15", "104", 5),
    )
    before = _lots_in_memory(first)
    async with portfolio_pool.acquire() as conn, conn.transaction():
        for strategy_id, lots in before.items():
            state = await conn.fetchval(
                "SELECT state FROM portfolio_trip_books WHERE strategy_id = $1", strategy_id
            )
            state["trip"]["lots"] = [[str(v) for v in lot[1:]] for lot in lots]
            await conn.execute(
                "UPDATE portfolio_trip_books SET state = $1 WHERE strategy_id = $2",
                state,
                strategy_id,
            )
        await conn.execute("DELETE FROM portfolio_trip_lots")

    # Act: a restart, then a fill on the books (105: inside every lot's range, none widened)
    second = await _stage(portfolio_pool).start()
    loaded = _lots_in_memory(second)
    await store_batch(second, _buy("B-5", "0.05", "105", 6))

    # Assert: the same lots loaded (renumbered from 0), all stored as rows by the next write,
    # the JSON without them; a restart rebuilds the books from the rows.
    renumbered = _lots(
        (0, "0.15", "110", "104", "110"),
        (1, "0.3", "105", "104", "107"),
        (2, "0.1", "107", "104", "107"),
    )
    assert [lot[1:] for lot in before[""]] == [lot[1:] for lot in renumbered]
    assert loaded == {"": renumbered, STRATEGY: renumbered}
    assert await _stored_lots(portfolio_pool) == {
        "": [*renumbered, (3, D("0.05"), D(105), D(105), D(105))],
        STRATEGY: [*renumbered, (3, D("0.05"), D(105), D(105), D(105))],
    }
    await _assert_stored_as_in_memory(portfolio_pool, second)
    states = await portfolio_pool.fetch("SELECT state FROM portfolio_trip_books")
    assert len(states) == 2
    assert all("lots" not in r["state"]["trip"] for r in states)
    third = await _stage(portfolio_pool).start()
    assert _lots_in_memory(third) == _lots_in_memory(second)
