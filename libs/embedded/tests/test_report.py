"""The HTML report: self-contained, deterministic, and showing what the run did."""

from __future__ import annotations

import json
import subprocess
import sys
from decimal import Decimal
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest

from quantmesh_common.messages import Bar
from quantmesh_embedded.backtest import BacktestConfig, run_backtest
from quantmesh_embedded.report import (
    backtest_report,
    monthly_returns,
    render_report,
    thin,
    underwater,
)

DAY = 86_400 * 1_000_000_000
T0 = 1_672_531_200 * 1_000_000_000  # 2023-01-01T00:00:00Z
SYMBOL = "ASSET-USD.SIM"
# sma_cross fast=1 slow=2: long on bar 3's close, flat on bar 5's; next_open fills at bar 4's
# open (9.5) and bar 6's (7.5).
OPENS = ["10", "10", "9", "8", "9.5", "10", "7.5"]
CLOSES = ["10", "9", "8", "9", "10", "8", "7"]


def _bars() -> list[Bar]:
    return [
        Bar(
            instrument_id=SYMBOL,
            interval="1d",
            open=Decimal(o),
            high=max(Decimal(o), Decimal(c)) + 1,
            low=min(Decimal(o), Decimal(c)) - 1,
            close=Decimal(c),
            volume=Decimal(100),
            ts_open=T0 + i * DAY,
            ts_close=T0 + (i + 1) * DAY,
        )
        for i, (o, c) in enumerate(zip(OPENS, CLOSES, strict=True))
    ]


class _Reader(HTMLParser):
    """Collects the charts' JSON specs, the cells of each table row, every tag and attribute."""

    def __init__(self) -> None:
        super().__init__()
        self.charts: dict[str, dict[str, Any]] = {}
        self.placeholders: list[str] = []
        self.tags: list[str] = []
        self.attrs: list[str] = []
        self.rows: list[list[str]] = []
        self._cell: list[str] | None = None
        self._chart: str | None = None
        self._text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        self.attrs += [name for name, _ in attrs]
        found = dict(attrs)
        if tag == "div" and found.get("class") == "chart":
            self.placeholders.append(found.get("data-chart") or "")
        if tag == "script" and (found.get("id") or "").startswith("chart-"):
            self._chart, self._text = (found["id"] or "").removeprefix("chart-"), []
        if tag == "tr":
            self.rows.append([])
        if tag in ("td", "th"):
            self._cell = []

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self._cell is not None:
            self.rows[-1].append("".join(self._cell))
            self._cell = None
        if tag == "script" and self._chart is not None:
            self.charts[self._chart] = json.loads("".join(self._text))
            self._chart = None

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)
        if self._chart is not None:
            self._text.append(data)


def _read(page: str) -> _Reader:
    reader = _Reader()
    reader.feed(page)
    reader.close()
    return reader


def _config() -> BacktestConfig:
    return BacktestConfig(
        instrument_id=SYMBOL,
        strategy="sma_cross",
        params={"fast": 1, "slow": 2, "quantity": "2"},
        cash=Decimal("100000"),
        commission=Decimal("0.001"),
    )


async def test_report_when_rendered_parses_and_shows_figures_fills_and_trades() -> None:
    bars = _bars()
    result = await run_backtest(_config(), bars)

    page = backtest_report(_config(), bars, result)

    reader = _read(page)
    rows = {r[0]: r[1:] for r in reader.rows if r}
    assert Decimal(rows["final_equity"][0]) == Decimal("99995.966")
    assert rows["trades"] == ["1"]
    assert "elapsed_s" not in rows  # machine-dependent: kept out of a deterministic file
    # Trade 1: long 2 at 9.5 -> 7.5, fees 0.034; it lived through bars 4-6 (lows 8.5, 7, 6;
    # highs 11, 11, 8.5): MAE 9.5 - 6 = 3.5, MFE 11 - 9.5 = 1.5; -4.034 / 19 = -21.23 %.
    assert rows["1"] == [
        "LONG", "2", "2023-01-05", "9.5", "2023-01-07", "7.5", "0.034", "-4.034",
        "-21.23", "3.5", "1.5",
    ]  # fmt: skip
    assert rows["strategy"] == ["sma_cross"]
    assert len(rows["data sha256"][0]) == 64


async def test_report_when_rendered_holds_each_charts_data() -> None:
    # Arrange
    bars = _bars()
    result = await run_backtest(_config(), bars)
    # Act
    reader = _read(backtest_report(_config(), bars, result))
    # Assert: one placeholder per chart, each drawn from its own spec.
    assert reader.placeholders == ["equity", "drawdown", "price", "monthly"]
    equity = reader.charts["equity"]["data"][0]
    assert equity["y"] == [float(v) for _, v in result.equity]
    assert equity["x"][0] == "2023-01-01T00:00:00"
    drawdown = reader.charts["drawdown"]["data"][0]
    assert drawdown["fill"] == "tozeroy"
    assert drawdown["y"] == [v for _, v in underwater(result.equity)]
    assert min(drawdown["y"]) < 0
    # Price: the closes, then the buy at bar 4's open (9.5) and the sell at bar 6's (7.5).
    close, buys, sells = reader.charts["price"]["data"]
    assert close["y"] == [float(c) for c in CLOSES]
    assert (buys["y"], sells["y"]) == ([9.5], [7.5])
    assert buys["marker"]["symbol"] == "triangle-up"
    assert buys["text"] == ["BUY 2 @ 9.5"]
    monthly = reader.charts["monthly"]["data"][0]
    assert monthly["type"] == "heatmap"
    assert monthly["y"] == ["2023"]
    jan = (99995.966 / 100000 - 1) * 100
    assert monthly["z"][0][0] == pytest.approx(jan)
    assert monthly["z"][0][1:] == [None] * 11


def test_render_report_when_curve_spans_months_heat_map_has_their_returns() -> None:
    # Arrange: 100 -> 110 by Jan 31, 99 by Feb 28, 108.9 by Mar 31 (+10 %, -10 %, +10 %).
    day = DAY
    feb1, mar1 = T0 + 31 * day, T0 + 59 * day
    curve = [
        (T0, Decimal(100)),
        (feb1 - day, Decimal(110)),
        (mar1 - day, Decimal(99)),
        (mar1 + 30 * day, Decimal("108.9")),
    ]
    # Act
    reader = _read(render_report(title="t", configuration={}, figures={}, equity=curve))
    # Assert
    z = reader.charts["monthly"]["data"][0]["z"][0]
    assert z[:3] == [pytest.approx(10.0), pytest.approx(-10.0), pytest.approx(10.0)]
    assert "price" not in reader.charts  # no bars, no price chart


async def test_report_when_rendered_twice_is_byte_identical_and_self_contained() -> None:
    first = await run_backtest(_config(), _bars())
    second = await run_backtest(_config(), _bars())

    a = backtest_report(_config(), _bars(), first)
    b = backtest_report(_config(), _bars(), second)

    assert a.encode() == b.encode()
    reader = _read(a)
    # Nothing is loaded from elsewhere: no src/href attribute, no link element; plotly.js is
    # in the page itself, once.
    assert "src" not in reader.attrs
    assert "href" not in reader.attrs
    assert "link" not in reader.tags
    assert a.count("plotly.js v") == 1
    assert len(a) > 1_000_000


def test_thin_when_series_is_long_keeps_extremes_and_bounds_the_length() -> None:
    points = [(i, float(i % 100)) for i in range(10_000)]
    points[5_123] = (5_123, 1_000.0)
    points[7_777] = (7_777, -50.0)

    drawn = thin(points, max_points=200)

    assert len(drawn) <= 200
    assert (5_123, 1_000.0) in drawn
    assert (7_777, -50.0) in drawn
    assert [t for t, _ in drawn] == sorted(t for t, _ in drawn)


def test_underwater_when_equity_falls_from_a_peak_is_the_percent_below_it() -> None:
    curve = [(0, Decimal(100)), (1, Decimal(120)), (2, Decimal(90)), (3, Decimal(130))]

    assert underwater(curve) == [(0, 0.0), (1, 0.0), (2, -25.0), (3, 0.0)]


def test_monthly_returns_when_months_end_chain_from_the_previous_month_end() -> None:
    jan15, jan31, feb10, mar1 = (T0 + d * DAY for d in (14, 30, 40, 59))
    curve = [(T0, Decimal(100)), (jan15, Decimal(90)), (jan31, Decimal(110))]
    curve += [(feb10, Decimal(99)), (mar1, Decimal("108.9"))]

    months = monthly_returns(curve)

    assert list(months) == [(2023, 1), (2023, 2), (2023, 3)]
    assert abs(months[(2023, 1)] - 10.0) < 1e-9  # 110 / 100
    assert abs(months[(2023, 2)] + 10.0) < 1e-9  # 99 / 110
    assert abs(months[(2023, 3)] - 10.0) < 1e-9  # 108.9 / 99


def test_cli_when_report_and_all_in_are_asked_writes_the_file(tmp_path: Path) -> None:
    data = tmp_path / "bars.csv"
    rows = ["date,open,high,low,close,volume"] + [
        f"2023-01-{i + 1:02d},{b.open},{b.high},{b.low},{b.close},100"
        for i, b in enumerate(_bars())
    ]
    data.write_text("\n".join(rows) + "\n")
    report = tmp_path / "run.html"
    exe = Path(sys.executable).parent / "quantmesh"
    args = ["backtest", "--data", str(data), "--symbol", SYMBOL, "--strategy", "sma_cross"]
    args += ["--param", "fast=1", "--param", "slow=2", "--fill-at", "close"]
    args += ["--size", "all-in", "--lot-size", "1", "--report", str(report), "--json"]

    done = subprocess.run([exe, *args], capture_output=True, text=True, check=False)

    assert done.returncode == 0, done.stderr
    # 11100 bought at 9 (100000 / 9.009 = 11100.01), sold at 8: 0.10 + 88800 - 88.80.
    assert Decimal(json.loads(done.stdout)["final_equity"]) == Decimal("88711.3")
    page = report.read_text()
    _, buys, sells = _read(page).charts["price"]["data"]
    assert (buys["y"], sells["y"]) == ([9.0], [8.0])
    assert "all-in" in page
