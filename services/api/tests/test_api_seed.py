"""Stored positions and snapshots folded into the projections at start (no stack needed)."""

from __future__ import annotations

import json
from decimal import Decimal
from typing import Any

import pytest

from quantmesh_api.live import Projection
from quantmesh_api.seed import seed

T = 1_767_225_600_000_000_000


def _position(instrument_id: str, side: str, quantity: str, ts: int) -> dict[str, Any]:
    return {
        "account_id": "a1",
        "instrument_id": instrument_id,
        "side": side,
        "quantity": Decimal(quantity),
        "avg_entry_price": Decimal(100),
        "realized_pnl": Decimal(0),
        "unrealized_pnl": Decimal("1.5"),
        "fees": Decimal("0.1"),
        "last_price": Decimal("100.75"),
        "ts_event": ts,
    }


def _snapshot(ts: int, equity: str, cash: str) -> dict[str, Any]:
    return {
        "account_id": "a1",
        "ts_event": ts,
        "base_currency": "USDT",
        "equity": Decimal(equity),
        "realized_pnl": Decimal(0),
        "unrealized_pnl": Decimal(0),
        "fees": Decimal(0),
        "peak_equity": Decimal(equity),
        "drawdown": Decimal(0),
        "balances": json.dumps({"USDT": cash}),  # jsonb as text, as asyncpg hands it over
    }


def test_seed_when_rows_stored_folds_positions_latest_snapshot_and_curve() -> None:
    projection = Projection()

    taken = seed(
        projection,
        [_position("X-USDT.SIM", "LONG", "2", T + 5), _position("Y-USDT.SIM", "SHORT", "-1", T)],
        [_snapshot(T + 1, "1000", "800"), _snapshot(T + 2, "1010", "810")],
    )

    view = projection.view("a1")
    assert taken == (2, 2)
    assert view.positions["X-USDT.SIM"].quantity == Decimal(2)
    assert view.positions["Y-USDT.SIM"].quantity == Decimal(-1)
    assert view.snapshot is not None
    assert (view.snapshot.ts_event, view.snapshot.balances) == (T + 2, {"USDT": Decimal(810)})
    assert list(view.equity) == [(T + 1, Decimal(1000)), (T + 2, Decimal(1010))]


def test_seed_when_a_row_does_not_validate_skips_it_and_keeps_the_rest(
    caplog: pytest.LogCaptureFixture,
) -> None:
    projection = Projection()
    # A side that disagrees with its quantity: Position refuses it.
    bad = _position("Y-USDT.SIM", "LONG", "-1", T)

    taken = seed(projection, [bad, _position("X-USDT.SIM", "LONG", "2", T)], [])

    assert taken == (1, 0)
    assert sorted(projection.view("a1").positions) == ["X-USDT.SIM"]
    assert "does not validate" in caplog.text
