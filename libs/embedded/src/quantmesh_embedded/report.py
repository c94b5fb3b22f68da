"""The backtest report: one self-contained HTML file with inline SVG charts and tables.

No script, no stylesheet or font from elsewhere, no external reference at all: the file opens
the same offline, in a mail attachment or years later. The output is a pure function of the
run's inputs: nothing depending on the wall clock (the run's elapsed time and speed are left
out), so the same inputs give a byte-identical file.

Long series are thinned for drawing (the minimum and the maximum of each bucket, in time
order, so no peak or trough is lost); every fill keeps its own marker on the price chart.
"""

from __future__ import annotations

import bisect
import hashlib
import math
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from decimal import Decimal
from html import escape
from typing import Any

from quantmesh_common.messages import Bar, Side
from quantmesh_common.performance import trip_excursion
from quantmesh_embedded.backtest import BacktestConfig, BacktestResult

#: Figures that depend on the machine and the moment, not on the inputs: kept out of the file.
VOLATILE_FIGURES = ("elapsed_s", "bars_per_s")
#: Most points drawn per line (each bucket contributes its minimum and its maximum).
MAX_POINTS = 2_000

_W, _H = 960, 240  # chart size in px
_PAD_L, _PAD_R, _PAD_T, _PAD_B = 70, 12, 12, 24
_NS = 1_000_000_000

_CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:24px auto;max-width:1000px;color:#222}
h1{font-size:22px}h2{font-size:17px;margin-top:28px}
table{border-collapse:collapse;margin:8px 0}
td,th{border:1px solid #ddd;padding:3px 8px;text-align:right}
th{background:#f4f4f4}td.k,th.k{text-align:left}
svg{display:block;background:#fff;border:1px solid #ddd}
.axis{stroke:#999;stroke-width:1}.grid{stroke:#eee;stroke-width:1}
.lbl{font-size:11px;fill:#555}
.equity{fill:none;stroke:#1f5fbf;stroke-width:1.5}
.underwater{fill:#e8b4b4;stroke:#b22;stroke-width:1}
.price{fill:none;stroke:#444;stroke-width:1}
.fill.buy{fill:#1a9850}.fill.sell{fill:#d73027}
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


class _Scale:
    """Maps (ts, value) to chart pixels."""

    def __init__(self, t0: int, t1: int, lo: float, hi: float) -> None:
        if hi <= lo:
            lo, hi = lo - 1, hi + 1
        pad = (hi - lo) * 0.05
        self.t0, self.t1, self.lo, self.hi = t0, max(t1, t0 + 1), lo - pad, hi + pad

    def x(self, ts: int) -> float:
        return _PAD_L + (ts - self.t0) / (self.t1 - self.t0) * (_W - _PAD_L - _PAD_R)

    def y(self, value: float) -> float:
        return _PAD_T + (self.hi - value) / (self.hi - self.lo) * (_H - _PAD_T - _PAD_B)


def _fmt(value: float) -> str:
    return f"{value:.1f}"


def _axes(scale: _Scale, unit: str) -> list[str]:
    parts = []
    for k in range(5):
        value = scale.lo + (scale.hi - scale.lo) * k / 4
        y = _fmt(scale.y(value))
        parts.append(f'<line class="grid" x1="{_PAD_L}" x2="{_W - _PAD_R}" y1="{y}" y2="{y}"/>')
        parts.append(
            f'<text class="lbl" x="{_PAD_L - 4}" y="{y}" text-anchor="end" '
            f'dominant-baseline="middle">{value:,.2f}{unit}</text>'
        )
    bottom = _H - _PAD_B
    parts.append(
        f'<line class="axis" x1="{_PAD_L}" x2="{_W - _PAD_R}" y1="{bottom}" y2="{bottom}"/>'
    )
    parts.append(f'<text class="lbl" x="{_PAD_L}" y="{_H - 6}">{iso(scale.t0)}</text>')
    parts.append(
        f'<text class="lbl" x="{_W - _PAD_R}" y="{_H - 6}" text-anchor="end">{iso(scale.t1)}</text>'
    )
    return parts


def _chart(
    points: Sequence[tuple[int, float]],
    css_class: str,
    *,
    label: str,
    unit: str = "",
    area: bool = False,
    markers: Iterable[tuple[int, float, str, str]] = (),
) -> str:
    """One SVG line chart; `markers` are (ts, value, 'buy'|'sell', tooltip)."""
    marks = list(markers)
    values = [v for _, v in points] + [v for _, v, _, _ in marks] + ([0.0] if area else [])
    if not points:
        return f'<svg viewBox="0 0 {_W} {_H}" role="img" aria-label="{escape(label)}"></svg>'
    scale = _Scale(points[0][0], points[-1][0], min(values), max(values))
    drawn = thin(points)
    coords = " ".join(f"{_fmt(scale.x(t))},{_fmt(scale.y(v))}" for t, v in drawn)
    parts = [
        f'<svg viewBox="0 0 {_W} {_H}" width="{_W}" height="{_H}" role="img" '
        f'aria-label="{escape(label)}">',
        *_axes(scale, unit),
    ]
    if area:
        base = _fmt(scale.y(0.0))
        first, last = _fmt(scale.x(drawn[0][0])), _fmt(scale.x(drawn[-1][0]))
        parts.append(
            f'<polygon class="{css_class}" points="{first},{base} {coords} {last},{base}"/>'
        )
    else:
        parts.append(f'<polyline class="{css_class}" points="{coords}"/>')
    for ts, value, side, tip in marks:
        x, y = _fmt(scale.x(ts)), _fmt(scale.y(value))
        # A triangle pointing up under a buy, down over a sell.
        shape = f"M{x},{y} l-5,9 h10 z" if side == "buy" else f"M{x},{y} l-5,-9 h10 z"
        parts.append(f'<path class="fill {side}" d="{shape}"><title>{escape(tip)}</title></path>')
    parts.append("</svg>")
    return "".join(parts)


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
) -> str:
    """The report as one HTML document (see the module docstring for what it holds)."""
    shown = {k: v for k, v in figures.items() if k not in VOLATILE_FIGURES}
    sections = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{escape(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{escape(title)}</h1>",
        "<h2>Figures</h2>",
        _table(["figure", "value"], ((k, _shown(v)) for k, v in shown.items()), "figures"),
        "<h2>Equity</h2>",
        _chart([(t, float(v)) for t, v in equity], "equity", label="equity curve"),
        "<h2>Drawdown (underwater)</h2>",
        _chart(underwater(equity), "underwater", label="drawdown", unit="%", area=True),
    ]
    if bars:
        closes = [(b.ts_close, float(b.close)) for b in bars]
        markers = [
            (
                f.ts_event,
                float(f.last_price),
                "buy" if f.side is Side.BUY else "sell",
                f"{f.side} {_dec(f.last_qty)} @ {_dec(f.last_price)} on {iso(f.ts_event)}",
            )
            for f in fills
        ]
        sections += [
            "<h2>Price and fills</h2>",
            _chart(closes, "price", label="price with fills", markers=markers),
        ]
    sections += [
        "<h2>Monthly returns (%)</h2>",
        _heat_map(monthly_returns(equity)),
    ]
    if bars or round_trips:
        sections += [
            f"<h2>Trades ({len(round_trips)} round trips)</h2>",
            _trades(bars, round_trips),
        ]
    sections += [
        "<h2>Configuration</h2>",
        _table(["setting", "value"], configuration.items(), "configuration"),
        "</body></html>",
    ]
    return "\n".join(sections) + "\n"


def _trades(bars: Sequence[Bar], trips: Sequence[Any]) -> str:
    header = ["#", "side", "quantity", "entry", "entry price", "exit", "exit price", "fees",
              "P&L", "return %", "MAE", "MFE"]  # fmt: skip
    opens = [b.ts_open for b in bars]
    rows = []
    for n, trip in enumerate(trips, start=1):
        # The whole bars the trade was open in (entry and exit bars included, so their full
        # ranges count: an approximation at both ends, on the cautious side).
        first = max(bisect.bisect_right(opens, trip.entry_ts_ns) - 1, 0)
        last = bisect.bisect_left(opens, trip.exit_ts_ns)
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
    )
