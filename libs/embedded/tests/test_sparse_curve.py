"""The columnar run's bulk curve: snapshot times, fills applied and marking prints, by block."""

from __future__ import annotations

import random
from decimal import Decimal

import numpy as np
import numpy.typing as npt
import pytest

from quantmesh_embedded import sparse
from quantmesh_embedded.columns import BarColumns
from quantmesh_embedded.sparse import SparseRun

MINUTE = 60 * 1_000_000_000
T0 = 1_672_531_200 * 1_000_000_000  # 2023-01-01T00:00:00Z, a whole number of minutes
Indices = tuple[npt.NDArray[np.int64], npt.NDArray[np.int64], npt.NDArray[np.int64]]


def _columns(count: int) -> BarColumns:
    ts_open = T0 + np.arange(count, dtype=np.int64) * MINUTE
    prices = np.full(count, 100.0)
    return BarColumns.from_grid(
        "ASSET-USD.SIM",
        "1m",
        ts_open,
        ts_open + MINUTE,
        {"open": prices, "high": prices, "low": prices, "close": prices, "volume": prices},
    )


def _run(count: int, reports: list[tuple[int, int, bool]]) -> SparseRun:
    run = SparseRun(_columns(count), Decimal(1000), MINUTE)
    for after, ts, fill in reports:
        run.report_after.append(after)
        run.report_ts.append(ts)
        run.report_fill.append(int(fill))
    return run


def _reference(run: SparseRun) -> Indices:
    """The whole-run form of the bulk pass (one stable sort of every event), as it was."""
    n = len(run.columns)
    print_ts = np.empty(2 * n + 1, dtype=np.int64)
    print_ts[0:-1:2] = run.columns.ts_open
    print_ts[1:-1:2] = run.columns.ts_close
    print_ts[-1] = run.end_ns
    prints = len(print_ts)
    after = np.asarray(run.report_after, dtype=np.int64)
    order = np.argsort(
        np.concatenate([np.arange(prints, dtype=np.int64) * 2, after * 2 + 1]), kind="stable"
    )
    times = np.concatenate([print_ts, np.asarray(run.report_ts, dtype=np.int64)])[order]
    is_print = order < prints
    is_fill = np.concatenate([np.zeros(prints, dtype=bool), np.asarray(run.report_fill) > 0])
    fills_by = np.cumsum(is_fill[order], dtype=np.int64)
    last_print = np.maximum.accumulate(np.where(is_print, order, -1))
    cells = -(-times // run.interval_ns)
    reached = np.maximum.accumulate(cells)
    trigger = np.flatnonzero(cells[1:] > reached[:-1]) + 1
    before = trigger - 1
    applied = fills_by[before]
    held = applied > 0
    stamps = (cells[trigger][held] - 1) * run.interval_ns
    return stamps, applied[held], last_print[before][held].astype(np.int64)


@pytest.mark.parametrize("block", [1, 2, 3, 1 << 16])
def test_curve_indices_when_one_fill_after_the_next_open_gives_one_snapshot_per_boundary(
    monkeypatch: pytest.MonkeyPatch, block: int
) -> None:
    # Arrange: 2 bars, prints at T0 (open 0), T0+1m (close 0, open 1), T0+2m (close 1) and the
    # end at T0+3m; a fill stamped T0+1m+1us right after print 2 (bar 1's open).
    monkeypatch.setattr(sparse, "_BLOCK", block)
    run = _run(2, [(2, T0 + MINUTE + 1_000, True)])

    # Act
    stamps, applied, marks = run.curve_indices()

    # Assert: the boundary T0+1m passed before the fill (no account yet: no snapshot); the
    # fill's time crosses T0+2m, but only print 2 is before it (no fill yet); the end print
    # crosses T0+3m holding the fill, marked by print 3 (bar 1's close): one snapshot.
    assert stamps.tolist() == [T0 + 2 * MINUTE]
    assert applied.tolist() == [1]
    assert marks.tolist() == [3]


@pytest.mark.parametrize("block", [1, 3, 7, 64, 1 << 16])
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_curve_indices_when_walked_in_blocks_equal_the_whole_run_sort(
    monkeypatch: pytest.MonkeyPatch, block: int, seed: int
) -> None:
    # Arrange: 200 bars, reports after random prints (some before the first), stamped at or
    # after their print, some late enough to cross the next boundary; about half fills.
    rng = random.Random(seed)
    count = 200
    afters = sorted(rng.randrange(-1, 2 * count + 1) for _ in range(150))
    reports = []
    for after in afters:
        base = T0 if after < 0 else T0 + (after // 2 + after % 2) * MINUTE
        reports.append(
            (after, base + rng.choice([0, 1_000, MINUTE // 2, 2 * MINUTE]), rng.random() < 0.5)
        )
    run = _run(count, reports)
    expected = _reference(run)
    monkeypatch.setattr(sparse, "_BLOCK", block)

    # Act
    got = run.curve_indices()

    # Assert
    assert len(expected[0]) > 50
    for want, have in zip(expected, got, strict=True):
        assert have.dtype == np.int64
        assert have.tolist() == want.tolist()


def test_print_times_when_a_range_starts_or_ends_anywhere_match_print_time() -> None:
    # Arrange
    run = _run(5, [])

    # Act
    every = run.print_times(0, run.prints)
    pieces = [run.print_times(a, b) for a, b in [(0, 1), (1, 4), (4, 4), (4, 11), (3, 10)]]

    # Assert: opens at T0 + i min (even prints), closes a minute later (odd), the end T0+6m.
    assert every.tolist() == [run.print_time(p) for p in range(11)]
    assert every.tolist()[:4] == [T0, T0 + MINUTE, T0 + MINUTE, T0 + 2 * MINUTE]
    assert every.tolist()[-1] == T0 + 6 * MINUTE
    assert [p.tolist() for p in pieces] == [
        every[0:1].tolist(),
        every[1:4].tolist(),
        [],
        every[4:11].tolist(),
        every[3:10].tolist(),
    ]
