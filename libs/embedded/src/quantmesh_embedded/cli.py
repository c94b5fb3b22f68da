"""The `quantmesh` command: the embedded mode, backtests and equity-curve reports."""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import logging
import os
import sys
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

from quantmesh_common.messages import InstrumentId
from quantmesh_embedded.backtest import BacktestConfig, run_backtest
from quantmesh_embedded.data import read_bars
from quantmesh_embedded.equity import equity_figures, read_equity_csv, write_equity_csv
from quantmesh_embedded.optimize import add_optimize_parser, optimize_command
from quantmesh_embedded.progress import ProgressBar
from quantmesh_embedded.report import backtest_report, iso, render_report
from quantmesh_embedded.run import add_run_parser, run_command
from quantmesh_embedded.sizing import SizeSpec
from quantmesh_embedded.ticks import DEFAULT_TICK_INTERVAL, is_trades_file, run_tick_backtest
from quantmesh_marketdata.files import DataFileError


def _param(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"--param wants KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def _decimal(text: str) -> Decimal:
    try:
        return Decimal(text)
    except InvalidOperation:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None


def _size(text: str) -> SizeSpec:
    try:
        return SizeSpec.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _positive(text: str) -> Decimal:
    value = _decimal(text)
    if not value.is_finite() or value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive: {text!r}")
    return value


def _instrument(text: str) -> str:
    try:
        InstrumentId.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{exc} (e.g. BTC-USDT.SIM)") from None
    return text


def build_parser() -> argparse.ArgumentParser:
    """The command line of `quantmesh`."""
    parser = argparse.ArgumentParser(prog="quantmesh", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    bt = commands.add_parser("backtest", help="replay OHLCV bars through the order flow")
    bt.add_argument(
        "--data",
        type=Path,
        required=True,
        help="OHLCV: CSV with a header row, or .parquet (needs pyarrow); or trades, CSV or "
        ".parquet (time, price, size[, id, side]): every trade through the stages, --interval bars",
    )
    bt.add_argument("--symbol", type=_instrument, default="ASSET-USD.SIM", help="instrument id")
    bt.add_argument(
        "--interval",
        help="bar interval, e.g. 1d (default: from the data; 1m for a file of trades)",
    )
    bt.add_argument("--strategy", required=True, help="a registered strategy, e.g. sma_cross")
    bt.add_argument("--param", type=_param, action="append", default=[], metavar="KEY=VALUE")
    bt.add_argument("--cash", type=_decimal, default=Decimal("100000"))
    bt.add_argument("--commission", type=_decimal, default=Decimal("0.001"), help="fraction")
    bt.add_argument("--slippage-bps", type=_decimal, default=Decimal(0))
    bt.add_argument("--fill-at", choices=["next_open", "close"], default="next_open")
    bt.add_argument("--allow-short", action="store_true", help="sets the strategy's allow_short")
    bt.add_argument(
        "--size",
        type=_size,
        help="N (a fixed quantity), N%% (of equity) or all-in (default: the strategy's quantity)",
    )
    bt.add_argument(
        "--lot-size",
        type=_positive,
        help="orders are rounded down to it (default: fractional, 1e-8 for --size N%% / all-in)",
    )
    bt.add_argument("--report", type=Path, metavar="PATH.html", help="write an HTML report")
    bt.add_argument(
        "--equity-csv", type=Path, metavar="PATH.csv", help="write the equity curve (see report)"
    )
    bt.add_argument("--json", action="store_true", help="print one JSON object of figures")
    bt.add_argument("--quiet", action="store_true", help="no progress bar on stderr")
    bt.add_argument(
        "--mode",
        choices=["auto", "columnar", "per_bar"],
        default="auto",
        help="columnar: decide over all bars at once, stages only around orders (auto: when the "
        "strategy can); per_bar: every bar through every stage. Same results",
    )
    bt.add_argument(
        "--engine",
        choices=["auto", "stages", "columnar"],
        default="auto",
        help="order flow of a columnar run: columnar computes what risk, oms, venue and "
        "portfolio would (proven equal; fails if the run does not qualify); stages sends every "
        "order through them; auto: columnar when the run qualifies, else the stages",
    )
    rp = commands.add_parser("report", help="the figures of an equity curve (CSV)")
    rp.add_argument(
        "--equity", type=Path, required=True, metavar="PATH.csv", help="CSV: timestamp, equity"
    )
    rp.add_argument("--report", type=Path, metavar="PATH.html", help="write an HTML report")
    rp.add_argument("--json", action="store_true", help="print one JSON object of figures")
    add_run_parser(commands, _param, _instrument)
    add_optimize_parser(
        commands,
        {
            "path": Path,
            "instrument": _instrument,
            "param": _param,
            "decimal": _decimal,
            "size": _size,
            "positive": _positive,
        },
    )
    return parser


async def _backtest(args: argparse.Namespace) -> dict[str, Any]:
    params = dict(args.param)
    if args.allow_short:
        params["allow_short"] = True
    config = BacktestConfig(
        instrument_id=args.symbol,
        strategy=args.strategy,
        params=params,
        cash=args.cash,
        commission=args.commission,
        slippage_bps=args.slippage_bps,
        fill_at=args.fill_at,
        size=args.size,
        lot_size=args.lot_size,
    )
    # Only for a person watching a terminal: never in pipes, logs or --json consumers' stderr.
    enabled = not args.quiet and sys.stderr.isatty()
    if is_trades_file(args.data):
        bar = ProgressBar(sys.stderr, enabled=enabled, unit="trades")
        interval = args.interval or DEFAULT_TICK_INTERVAL
        result, bars = await run_tick_backtest(config, args.data, interval, progress=bar)
    else:
        bars = read_bars(args.data, args.symbol, args.interval)
        bar = ProgressBar(sys.stderr, enabled=enabled)
        result = await run_backtest(config, bars, progress=bar, mode=args.mode, engine=args.engine)
    if args.report is not None:
        args.report.write_text(backtest_report(config, bars, result), encoding="utf-8")
    if args.equity_csv is not None:
        write_equity_csv(args.equity_csv, result.equity)
    figures = result.figures()
    figures["engine"] = result.engine
    if result.declined is not None:
        figures["engine_declined"] = result.declined
    return figures


def _report(args: argparse.Namespace) -> dict[str, Any]:
    curve = read_equity_csv(args.equity)
    figures = equity_figures(curve)
    if args.report is not None:
        page = render_report(
            title=f"Equity curve: {args.equity.name}",
            configuration={
                "file": args.equity.name,
                "points": str(len(curve)),
                "first point": iso(curve[0][0]),
                "last point": iso(curve[-1][0]),
                "data sha256": hashlib.sha256(args.equity.read_bytes()).hexdigest(),
            },
            figures=figures,
            equity=curve,
        )
        args.report.write_text(page, encoding="utf-8")
    return figures


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `quantmesh` console script."""
    args = build_parser().parse_args(argv)
    # The stages log for operators of a long-running service; in a one-process run their
    # start-up warnings (e.g. "no risk limits configured") are noise on every backtest.
    level = os.environ.get("QM_LOG_LEVEL", "ERROR").upper()
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "run":
            return run_command(args, sys.stdout)
        if args.command == "optimize":
            return optimize_command(args, sys.stdout)
        figures = asyncio.run(_backtest(args)) if args.command == "backtest" else _report(args)
    except (DataFileError, ValueError, OSError) as exc:
        sys.stderr.write(f"quantmesh {args.command}: {exc}\n")
        return 2
    if args.json:
        sys.stdout.write(json.dumps(figures) + "\n")
    else:
        width = max(len(k) for k in figures)
        for key, value in figures.items():
            sys.stdout.write(f"{key:<{width}}  {value}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
