"""A batch of fills stored in one statement on real PostgreSQL: the rows equal memory after
every batch and a restart, new fills are counted, and the batch is one round trip."""

from __future__ import annotations

import logging
from decimal import Decimal
from typing import Any

import pytest

from quantmesh_common.messages import ExecutionReport, Side, Tick
from quantmesh_common.testing import stubs
from quantmesh_common.testing.harness import StageHarness
from quantmesh_portfolio.config import PortfolioSettings
from quantmesh_portfolio.positions import Portfolio
from quantmesh_portfolio.service import PortfolioService

from .conftest import mark, store_batch

pytestmark = pytest.mark.integration

D = Decimal
S = stubs.SECOND_NS
T0 = stubs.TS + 40 * S  # a minute boundary: the first snapshot is due at T0 + 60 s
BTC, ETH = "BTC-USDT.SIM", "ETH-USDT.SIM"


def _stage(pool: Any) -> StageHarness[PortfolioService]:
    settings = PortfolioSettings(
        bus="memory", http_port=0, starting_cash={"USDT": "100000"}, snapshot_interval_s=60
    )
    return StageHarness(PortfolioService(settings), now_ns=T0, pg=pool)


def _fill(
    trade_id: str,
    side: Side,
    qty: str,
    price: str,
    second: int,
    *,
    instrument: str = BTC,
    strategy: str | None = stubs.STRATEGY_ID,
) -> ExecutionReport:
    quantity, at = D(qty), D(price)
    return stubs.execution_report(
        report_id=f"R-{trade_id}",
        trade_id=trade_id,
        client_order_id=f"O-{trade_id}",
        instrument_id=instrument,
        strategy_id=strategy,
        side=side,
        last_qty=quantity,
        cum_qty=quantity,
        last_price=at,
        avg_price=at,
        fee=D("0.25"),
        ts_event=T0 + second * S,
    )


def _portfolio(stage: StageHarness[PortfolioService]) -> Portfolio:
    handlers = stage.service.handlers
    assert handlers is not None
    return handlers.portfolio


async def _stored(pool: Any) -> dict[str, Any]:
    """The rows the batch statement writes, as comparable values."""
    positions = await pool.fetch(
        "SELECT account_id, instrument_id, side, quantity, avg_entry_price, realized_pnl,"
        " unrealized_pnl, fees, last_price, ts_event FROM positions"
    )
    lots = await pool.fetch(
        "SELECT account_id, instrument_id, seq, quantity, price, direction, ts_event"
        " FROM portfolio_lots ORDER BY account_id, instrument_id, seq"
    )
    balances = await pool.fetch("SELECT account_id, currency, amount FROM portfolio_balances")
    accounts = await pool.fetch(
        "SELECT account_id, base_currency, peak_equity, capital FROM portfolio_accounts"
    )
    fills = await pool.fetch(
        "SELECT account_id, instrument_id, fill_id, position FROM portfolio_applied_fills"
    )
    return {
        "positions": {(r[0], r[1]): tuple(r.values())[2:] for r in positions},
        "lots": [tuple(r.values()) for r in lots],
        "balances": {(r[0], r[1]): r[2] for r in balances},
        "accounts": {r[0]: tuple(r.values())[1:] for r in accounts},
        "fills": {(r[0], r[1], r[2]) for r in fills},
        "filled": sum(r["position"] is not None for r in fills),
    }


def _in_memory(portfolio: Portfolio) -> dict[str, Any]:
    books = [b for a in portfolio.accounts.values() for b in a.positions.values()]
    events = [b.to_event() for b in books]
    return {
        "positions": {
            (p.account_id, p.instrument_id): (
                p.side.value,
                p.quantity,
                p.avg_entry_price,
                p.realized_pnl,
                p.unrealized_pnl,
                p.fees,
                p.last_price,
                p.ts_event,
            )
            for p in events
        },
        "lots": sorted(
            (
                b.account_id,
                b.instrument_id,
                lot.seq,
                lot.quantity,
                lot.price,
                b.direction,
                lot.ts_ns,
            )
            for b in books
            for lot in b.lots
        ),
        "balances": {
            (a.account_id, c): amount
            for a in portfolio.accounts.values()
            for c, amount in a.balances.items()
        },
        "accounts": {
            a.account_id: (a.base_currency, a.peak_equity, a.capital)
            for a in portfolio.accounts.values()
        },
        "fills": portfolio.seen_fills,
        "filled": len(portfolio.seen_fills),
    }


async def test_each_batch_of_fills_stores_rows_equal_to_memory_and_a_restart_rebuilds_it(
    portfolio_pool: Any,
) -> None:
    buy, sell = Side.BUY, Side.SELL
    batches: list[list[ExecutionReport | Tick]] = [
        [_fill("B-1", buy, "0.1", "100", 1), _fill("B-2", buy, "0.2", "110", 2)],
        [_fill("E-1", buy, "1", "20", 3, instrument=ETH, strategy=None)],
        [mark("107", 4), _fill("B-3", buy, "0.3", "105", 5)],
        # Lot 0 closed and lot 1 cut (a closed lot deleted, the front one updated).
        [_fill("S-1", sell, "0.15", "109", 6), _fill("E-2", sell, "0.4", "21", 7, instrument=ETH)],
        # A snapshot is due (T0 + 60 s): the fill's statement runs in a transaction with it.
        [mark("108", 61), _fill("B-4", buy, "0.05", "106", 62)],
        # Flips long to short, and ETH flat.
        [
            _fill("S-2", sell, "0.7", "103", 63),
            _fill("E-3", sell, "0.6", "22", 63, instrument=ETH, strategy=None),
        ],
        [_fill("B-5", buy, "0.1", "101", 64), _fill("B-6", buy, "0.1", "102", 65)],
    ]
    stage = await _stage(portfolio_pool).start()
    for events in batches:
        await store_batch(stage, *events)
        assert await _stored(portfolio_pool) == _in_memory(_portfolio(stage))
    trips = await portfolio_pool.fetchval("SELECT count(*) FROM portfolio_round_trips")
    handlers = stage.service.handlers
    assert handlers is not None
    assert trips == sum(len(t) for t in handlers.tracker.trips.values()) > 0
    # Each position written once per batch that moved it, however many fills did, and once
    # by the snapshot: BTC in six batches, ETH in three.
    versions = await portfolio_pool.fetch("SELECT instrument_id, version FROM positions")
    assert {r["instrument_id"]: r["version"] for r in versions} == {BTC: 7, ETH: 4}

    restarted = await _stage(portfolio_pool).start()
    assert _in_memory(_portfolio(restarted))["lots"] == _in_memory(_portfolio(stage))["lots"]
    await store_batch(restarted, _fill("S-3", sell, "0.05", "100", 66))
    assert await _stored(portfolio_pool) == _in_memory(_portfolio(restarted))


async def test_a_fill_another_writer_stored_is_not_counted_and_the_batch_warns(
    portfolio_pool: Any, caplog: pytest.LogCaptureFixture
) -> None:
    stage = await _stage(portfolio_pool).start()
    await store_batch(stage, _fill("B-1", Side.BUY, "0.1", "100", 1))
    taken = _fill("B-3", Side.BUY, "0.1", "101", 3)
    await portfolio_pool.execute(
        "INSERT INTO portfolio_applied_fills (account_id, instrument_id, fill_id, ts_event)"
        " VALUES ($1, $2, $3, $4)",
        taken.account_id,
        taken.instrument_id,
        taken.trade_id,
        taken.ts_event,
    )
    store = stage.service.persistent
    assert store is not None
    counted: list[int] = []
    save = store.store.save_batch

    async def counting(*args: Any) -> int:
        counted.append(await save(*args))
        return counted[-1]

    store.store.save_batch = counting  # type: ignore[method-assign,assignment]
    with caplog.at_level(logging.WARNING, logger="quantmesh_portfolio.service"):
        await store_batch(
            stage,
            _fill("B-2", Side.BUY, "0.1", "102", 2),
            taken,
            _fill("E-1", Side.BUY, "1", "20", 4, instrument=ETH),
        )
    assert counted == [2]
    warned = [
        r for r in caplog.records if r.getMessage() == "fills already stored by another writer"
    ]
    assert [(r.__dict__["fills"], r.__dict__["stored"]) for r in warned] == [(3, 2)]
    # The batch's effects are stored all the same (as before: the key is what was taken).
    assert await _stored(portfolio_pool) == {
        **_in_memory(_portfolio(stage)),
        "filled": 3,
    }


class _CountingPool:
    """The test's pool, counting the calls that take a connection (each one round trip or
    more) while `counting`."""

    def __init__(self, pool: Any) -> None:
        self._pool = pool
        self.calls: list[str] = []
        self.counting = False

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self._pool, name)
        if name in {"acquire", "execute", "executemany", "fetch", "fetchrow", "fetchval"}:

            def counted(*args: Any, **kwargs: Any) -> Any:
                if self.counting:
                    self.calls.append(name)
                return attribute(*args, **kwargs)

            return counted
        return attribute


async def test_a_batch_of_fills_alone_is_one_statement(portfolio_pool: Any) -> None:
    pool = _CountingPool(portfolio_pool)
    stage = await _stage(pool).start()
    await store_batch(stage, _fill("B-1", Side.BUY, "0.1", "100", 1))
    pool.counting = True
    await store_batch(
        stage,
        _fill("B-2", Side.BUY, "0.1", "102", 2),
        _fill("S-1", Side.SELL, "0.15", "103", 3),
        _fill("E-1", Side.BUY, "1", "20", 4, instrument=ETH),
    )
    assert pool.calls == ["fetchval"]
    assert await _stored(portfolio_pool) == _in_memory(_portfolio(stage))
