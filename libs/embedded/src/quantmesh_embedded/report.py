"""The backtest report: one self-contained HTML file, charts by plotly, tables in HTML.

Charts (equity, drawdown, price with fills, monthly returns as a heat map) are plotly figures:
each figure's spec sits in the page as JSON (`<script type="application/json"
id="chart-NAME">`) and plotly.js, embedded once in the page, draws it. Nothing is loaded from
elsewhere (no `src`, no stylesheet, font or image link): the file opens the same offline, in
a mail attachment or years later. The output is a pure function of the run's inputs:
nothing depends on the wall clock (the run's elapsed time and speed are left out), so the
same inputs give a byte-identical file.

Long series are thinned for drawing (the minimum and the maximum of each bucket, in time
order, so no peak or trough is lost); every fill keeps its own marker on the price chart.
"""

from __future__ import annotations

import bisect
import functools
import hashlib
import math
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from decimal import Decimal
from html import escape
from typing import Any

# plotly ships no type information: its objects are Any here.
import plotly.graph_objects as go  # type: ignore[import-untyped]
import plotly.io as pio  # type: ignore[import-untyped]
import plotly.offline  # type: ignore[import-untyped]

from quantmesh_common.messages import Bar, Side
from quantmesh_common.performance import trip_excursion
from quantmesh_embedded.backtest import BacktestConfig, BacktestResult

#: Figures that depend on the machine and the moment, not on the inputs: kept out of the file.
VOLATILE_FIGURES = ("elapsed_s", "bars_per_s")
#: Most points drawn per line (each bucket contributes its minimum and its maximum).
MAX_POINTS = 2_000

_NS = 1_000_000_000

_CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:24px auto;max-width:1000px;color:#222}
h1{font-size:22px}h2{font-size:17px;margin-top:28px}
table{border-collapse:collapse;margin:8px 0}
td,th{border:1px solid #ddd;padding:3px 8px;text-align:right}
th{background:#f4f4f4}td.k,th.k{text-align:left}
div.chart{border:1px solid #ddd;margin:8px 0}
.pos{color:#1a7a30}.neg{color:#b22}
""".strip()


def iso(ts_ns: int) -> str:
    """A UTC timestamp in ns as `YYYY-MM-DD HH:MM:SS` (seconds dropped when zero at midnight)."""
    moment = datetime.fromtimestamp(ts_ns // _NS, UTC)
    if moment.hour == moment.minute == moment.second == 0:
        return moment.strftime("%Y-%m-%d")
    return moment.strftime("%Y-%m-%d %H:%M:%S")


def data_fingerprint(bars: Sequence[Bar]) -> str:
    """SHA-256 over every bar's time and OHLCV, so a report names the exact data it came from."""
    digest = hashlib.sha256()
    for bar in bars:
        digest.update(
            f"{bar.ts_open},{bar.open},{bar.high},{bar.low},{bar.close},{bar.volume}\n".encode()
        )
    return digest.hexdigest()


def thin(
    points: Sequence[tuple[int, float]], max_points: int = MAX_POINTS
) -> list[tuple[int, float]]:
    """At most about `max_points` points: each bucket's minimum and maximum, in time order."""
    if len(points) <= max_points:
        return list(points)
    size = math.ceil(len(points) / (max_points // 2))
    out: list[tuple[int, float]] = []
    for start in range(0, len(points), size):
        bucket = range(start, min(start + size, len(points)))
        lo = min(bucket, key=lambda i: points[i][1])
        hi = max(bucket, key=lambda i: points[i][1])
        out.extend(points[i] for i in sorted({lo, hi}))
    return out


def underwater(equity: Sequence[tuple[int, Decimal]]) -> list[tuple[int, float]]:
    """Drawdown from the running peak at each point, in percent (0 at a peak, negative below)."""
    out: list[tuple[int, float]] = []
    peak: Decimal | None = None
    for ts, value in equity:
        peak = value if peak is None or value > peak else peak
        out.append((ts, float(value / peak - 1) * 100 if peak > 0 else 0.0))
    return out


def monthly_returns(equity: Sequence[tuple[int, Decimal]]) -> dict[tuple[int, int], float]:
    """Return of each calendar month (UTC), from the last equity of the month before it."""
    last: dict[tuple[int, int], Decimal] = {}
    for ts, value in equity:
        moment = datetime.fromtimestamp(ts // _NS, UTC)
        last[(moment.year, moment.month)] = value
    out: dict[tuple[int, int], float] = {}
    previous = equity[0][1] if equity else None
    for month in sorted(last):
        if previous is not None and previous > 0:
            out[month] = float(last[month] / previous - 1) * 100
        previous = last[month]
    return out


#: The chart names, in page order, each drawn from `<script id="chart-NAME">`.
CHARTS = ("equity", "drawdown", "price", "monthly")
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
_LAYOUT: dict[str, Any] = {
    "template": "plotly_white",
    "height": 300,
    "margin": {"l": 70, "r": 20, "t": 30, "b": 40},
    "showlegend": False,
    "hovermode": "x unified",
}
# Draws every chart from its JSON; plotly.js itself is embedded just before this.
_DRAW = """
document.querySelectorAll("div.chart").forEach(function (div) {
  var spec = JSON.parse(document.getElementById("chart-" + div.dataset.chart).textContent);
  Plotly.newPlot(div, spec.data, spec.layout, {displaylogo: false, responsive: true});
});
""".strip()


def _time(ts_ns: int) -> str:
    # ISO text, not datetimes: plotly reads it as a date axis and the JSON stays stable.
    return datetime.fromtimestamp(ts_ns // _NS, UTC).strftime("%Y-%m-%dT%H:%M:%S")


def _spec(figure: go.Figure) -> str:
    text = str(pio.to_json(figure, validate=False, engine="json"))
    return text.replace("</", "<\\/")  # never close the script element early


def _chart(name: str, figure: go.Figure) -> str:
    """A chart's placeholder and its figure as JSON."""
    return (
        f'<div class="chart" data-chart="{name}"></div>'
        f'<script type="application/json" id="chart-{name}">{_spec(figure)}</script>'
    )


def _line(
    points: Sequence[tuple[int, float]], title: str, unit: str, *, area: bool = False
) -> go.Figure:
    drawn = thin(points)
    trace = go.Scatter(
        x=[_time(t) for t, _ in drawn],
        y=[v for _, v in drawn],
        mode="lines",
        line={"width": 1.5, "color": "#b22222" if area else "#1f5fbf"},
        fill="tozeroy" if area else None,
        name=title,
    )
    figure = go.Figure(trace)
    figure.update_layout(_LAYOUT, title={"text": title}, yaxis={"ticksuffix": unit})
    return figure


def _price(bars: Sequence[Bar], fills: Sequence[Any]) -> go.Figure:
    closes = thin([(b.ts_close, float(b.close)) for b in bars])
    figure = go.Figure(
        go.Scatter(
            x=[_time(t) for t, _ in closes],
            y=[v for _, v in closes],
            mode="lines",
            line={"width": 1, "color": "#444"},
            name="close",
        )
    )
    for side, symbol, color in (
        (Side.BUY, "triangle-up", "#1a9850"),
        (Side.SELL, "triangle-down", "#d73027"),
    ):
        chosen = [f for f in fills if f.side is side]
        figure.add_trace(
            go.Scatter(
                x=[_time(f.ts_event) for f in chosen],
                y=[float(f.last_price) for f in chosen],
                mode="markers",
                marker={"symbol": symbol, "size": 9, "color": color},
                name=str(side).lower(),
                text=[f"{f.side} {_dec(f.last_qty)} @ {_dec(f.last_price)}" for f in chosen],
                hoverinfo="text+x",
            )
        )
    figure.update_layout(_LAYOUT, title={"text": "Price and fills"}, hovermode="closest")
    return figure


def _monthly(months: Mapping[tuple[int, int], float]) -> go.Figure:
    years = sorted({y for y, _ in months})
    z = [[months.get((year, m)) for m in range(1, 13)] for year in years]
    figure = go.Figure(
        go.Heatmap(
            x=list(_MONTHS),
            y=[str(y) for y in years],
            z=z,
            zmid=0,
            colorscale="RdYlGn",
            texttemplate="%{z:+.2f}",
            hovertemplate="%{y} %{x}: %{z:+.2f} %<extra></extra>",
            colorbar={"ticksuffix": " %"},
        )
    )
    figure.update_layout(
        _LAYOUT,
        title={"text": "Monthly returns (%)"},
        height=120 + 40 * len(years),
        yaxis={"type": "category", "autorange": "reversed"},
        hovermode="closest",
    )
    return figure


def _table(header: Sequence[str], rows: Iterable[Sequence[Any]], css: str = "") -> str:
    head = "".join(
        f'<th class="k">{escape(h)}</th>' if i == 0 else f"<th>{escape(h)}</th>"
        for i, h in enumerate(header)
    )
    body = []
    for row in rows:
        cells = "".join(
            f'<td class="k">{escape(str(c))}</td>' if i == 0 else f"<td>{escape(str(c))}</td>"
            for i, c in enumerate(row)
        )
        body.append(f"<tr>{cells}</tr>")
    cls = f' class="{css}"' if css else ""
    return f"<table{cls}><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _dec(value: Decimal) -> str:
    """A Decimal without trailing zeros or an exponent: 0.03400000 -> 0.034, 1E+2 -> 100."""
    return format(value.normalize(), "f")


def _shown(value: Any) -> str:
    return "n/a" if value is None else str(value)


def _signed(value: float) -> str:
    css = "pos" if value > 0 else "neg" if value < 0 else ""
    return f'<td class="{css}">{value:+.2f}</td>'


def _heat_map(months: Mapping[tuple[int, int], float]) -> str:
    if not months:
        return "<p>No full month.</p>"
    years = sorted({y for y, _ in months})
    head = '<th class="k">year</th>' + "".join(f"<th>{m:02d}</th>" for m in range(1, 13))
    rows = []
    for year in years:
        cells = [f'<td class="k">{year}</td>']
        for month in range(1, 13):
            value = months.get((year, month))
            if value is None:
                cells.append("<td></td>")
                continue
            # Green for gains, red for losses, saturating at +/-10 %.
            alpha = min(abs(value) / 10, 1.0) * 0.6
            rgb = "26,152,80" if value >= 0 else "215,48,39"
            cells.append(f'<td style="background:rgba({rgb},{alpha:.2f})">{value:+.2f}</td>')
        rows.append(f"<tr>{''.join(cells)}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def render_report(
    *,
    title: str,
    configuration: Mapping[str, str],
    figures: Mapping[str, Any],
    equity: Sequence[tuple[int, Decimal]],
    bars: Sequence[Bar] = (),
    fills: Sequence[Any] = (),
    round_trips: Sequence[Any] = (),
    fills_at_open: bool = False,
) -> str:
    """The report as one HTML document (see the module docstring for what it holds).

    `fills_at_open`: fills are stamped at a bar's opening print (`--fill-at next_open`), so a
    fill at a bar's open time is in that bar, not in the one that closed then.
    """
    shown = {k: v for k, v in figures.items() if k not in VOLATILE_FIGURES}
    months = monthly_returns(equity)
    sections = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{escape(title)}</title><style>{_CSS}</style>",
        f'<script type="text/javascript">{plotly_js()}</script></head><body>',
        f"<h1>{escape(title)}</h1>",
        "<h2>Figures</h2>",
        _table(["figure", "value"], ((k, _shown(v)) for k, v in shown.items()), "figures"),
        "<h2>Equity</h2>",
        _chart("equity", _line([(t, float(v)) for t, v in equity], "Equity", "")),
        "<h2>Drawdown (underwater)</h2>",
        _chart("drawdown", _line(underwater(equity), "Drawdown", " %", area=True)),
    ]
    if bars:
        sections += ["<h2>Price and fills</h2>", _chart("price", _price(bars, fills))]
    sections += ["<h2>Monthly returns (%)</h2>"]
    if months:
        sections.append(_chart("monthly", _monthly(months)))
    sections.append(_heat_map(months))
    if bars or round_trips:
        sections += [
            f"<h2>Trades ({len(round_trips)} round trips)</h2>",
            _trades(bars, round_trips, fills_at_open),
        ]
    sections += [
        "<h2>Configuration</h2>",
        _table(["setting", "value"], configuration.items(), "configuration"),
        f'<script type="text/javascript">{_DRAW}</script>',
        "</body></html>",
    ]
    return "\n".join(sections) + "\n"


@functools.cache
def plotly_js() -> str:
    """The plotly.js bundle that ships with the plotly package (embedded in every report)."""
    return str(plotly.offline.get_plotlyjs())


def _trades(bars: Sequence[Bar], trips: Sequence[Any], fills_at_open: bool) -> str:
    header = ["#", "side", "quantity", "entry", "entry price", "exit", "exit price", "fees",
              "P&L", "return %", "MAE", "MFE"]  # fmt: skip
    opens = [b.ts_open for b in bars]
    rows = []
    for n, trip in enumerate(trips, start=1):
        # The whole bars the trade was open in (entry and exit bars included, so their full
        # ranges count: an approximation at both ends, on the cautious side).
        first = max(bisect.bisect_right(opens, trip.entry_ts_ns) - 1, 0)
        exit_bar = bisect.bisect_right if fills_at_open else bisect.bisect_left
        last = exit_bar(opens, trip.exit_ts_ns)
        path = [p for b in bars[first:last] for p in (b.low, b.high)]
        exc = trip_excursion(trip, path)
        cost = trip.entry_price * trip.quantity
        ret = float(trip.pnl / cost) * 100 if cost else 0.0
        cells = [
            str(n),
            str(trip.side),
            _dec(trip.quantity),
            iso(trip.entry_ts_ns),
            _dec(trip.entry_price),
            iso(trip.exit_ts_ns),
            _dec(trip.exit_price),
            _dec(trip.fees),
            _dec(trip.pnl),
        ]
        row = "".join(
            f'<td class="k">{escape(c)}</td>' if i == 0 else f"<td>{escape(c)}</td>"
            for i, c in enumerate(cells)
        )
        row += _signed(ret) + f"<td>{_dec(exc.mae)}</td><td>{_dec(exc.mfe)}</td>"
        rows.append(f"<tr>{row}</tr>")
    head = "".join(f"<th>{escape(h)}</th>" for h in header)
    body = "".join(rows)
    return f'<table class="trades"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def backtest_report(config: BacktestConfig, bars: Sequence[Bar], result: BacktestResult) -> str:
    """The HTML report of one backtest run."""
    configuration = {
        **config.describe(),
        "order flow": result.engine,
        "bars": str(len(bars)),
        "first bar": iso(bars[0].ts_open) if bars else "-",
        "last bar": iso(bars[-1].ts_close) if bars else "-",
        "data sha256": data_fingerprint(bars),
    }
    return render_report(
        title=f"Backtest: {config.strategy} on {config.instrument_id}",
        configuration=configuration,
        figures=result.figures(),
        equity=result.equity,
        bars=bars,
        fills=result.fills,
        round_trips=result.round_trips,
        fills_at_open=config.fill_at == "next_open",
    )
