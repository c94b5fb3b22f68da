"""The `quantmesh` command: backtests today; the embedded mode and research tools next."""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import sys
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

from quantmesh_common.messages import InstrumentId
from quantmesh_embedded.backtest import BacktestConfig, run_backtest
from quantmesh_marketdata.files import DataFileError, parse_time_ns, read_ohlcv_csv

_UNITS = (("w", 604_800), ("d", 86_400), ("h", 3_600), ("m", 60), ("s", 1))


def infer_interval(path: Path) -> str:
    """The bar interval of an OHLCV CSV, from the spacing of its first two rows."""
    with path.open(newline="") as handle:
        rows = csv.reader(handle)
        header = [c.strip().lower() for c in next(rows, [])]
        col = next(
            (header.index(c) for c in ("timestamp", "date", "time", "datetime") if c in header), 0
        )
        first, second = next(rows, None), next(rows, None)
    if first is None or second is None:
        raise DataFileError(f"{path}: needs at least two bars to infer the interval")
    seconds = (parse_time_ns(second[col]) - parse_time_ns(first[col])) // 1_000_000_000
    for unit, size in _UNITS:
        if seconds > 0 and seconds % size == 0:
            return f"{seconds // size}{unit}"
    raise DataFileError(f"{path}: rows are {seconds} s apart; pass --interval")


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
    bt.add_argument("--data", type=Path, required=True, help="CSV with a header row")
    bt.add_argument("--symbol", type=_instrument, default="ASSET-USD.SIM", help="instrument id")
    bt.add_argument("--interval", help="bar interval, e.g. 1d (default: from the data)")
    bt.add_argument("--strategy", required=True, help="a registered strategy, e.g. sma_cross")
    bt.add_argument("--param", type=_param, action="append", default=[], metavar="KEY=VALUE")
    bt.add_argument("--cash", type=_decimal, default=Decimal("100000"))
    bt.add_argument("--commission", type=_decimal, default=Decimal("0.001"), help="fraction")
    bt.add_argument("--slippage-bps", type=_decimal, default=Decimal(0))
    bt.add_argument("--fill-at", choices=["next_open", "close"], default="next_open")
    bt.add_argument("--allow-short", action="store_true", help="sets the strategy's allow_short")
    bt.add_argument("--json", action="store_true", help="print one JSON object of figures")
    return parser


async def _backtest(args: argparse.Namespace) -> dict[str, Any]:
    interval = args.interval or infer_interval(args.data)
    bars = list(read_ohlcv_csv(args.data, args.symbol, interval))
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
    )
    result = await run_backtest(config, bars)
    return result.figures()


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `quantmesh` console script."""
    args = build_parser().parse_args(argv)
    try:
        figures = asyncio.run(_backtest(args))
    except (DataFileError, ValueError) as exc:
        sys.stderr.write(f"quantmesh backtest: {exc}\n")
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
