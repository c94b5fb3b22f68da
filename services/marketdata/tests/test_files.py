"""OHLCV CSV files: case-insensitive headers, epoch or ISO times, clear errors."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

import pytest
from pydantic import ValidationError

from quantmesh_common.messages import AggressorSide, Tick
from quantmesh_marketdata import files
from quantmesh_marketdata.files import (
    DataFileError,
    parse_time_ns,
    read_ohlcv_csv,
    read_trades_csv,
    trade_tick,
)

NS = 1_000_000_000


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "bars.csv"
    path.write_text(text)
    return path


def test_read_when_header_is_capitalised_and_times_are_iso_gives_exact_bars(
    tmp_path: Path,
) -> None:
    path = _write(
        tmp_path,
        "Date,Open,High,Low,Close,Volume\n"
        "2024-01-02T00:00:00Z,100.10,101.5,99.9,101.0,12.5\n"
        "2024-01-03 00:00:00,101.0,103,100.5,102.25,8\n",
    )

    bars = list(read_ohlcv_csv(path, "BTC-USDT.SIM", "1d"))

    assert [b.close for b in bars] == [Decimal("101.0"), Decimal("102.25")]
    assert bars[0].open == Decimal("100.10")
    assert bars[0].ts_open == 1_704_153_600 * NS
    assert bars[1].ts_open - bars[0].ts_open == 86_400 * NS
    assert bars[0].ts_close == bars[1].ts_open


@pytest.mark.parametrize(
    ("cell", "expected"),
    [
        ("1704153600", 1_704_153_600 * NS),
        ("1704153600000", 1_704_153_600 * NS),
        ("1704153600000000", 1_704_153_600 * NS),
        ("1704153600000000000", 1_704_153_600 * NS),
        ("2024-01-02T00:00:00+00:00", 1_704_153_600 * NS),
        ("2024-01-02T01:00:00+01:00", 1_704_153_600 * NS),
    ],
)
def test_parse_time_accepts_epoch_units_and_iso(cell: str, expected: int) -> None:
    assert parse_time_ns(cell) == expected


def test_read_when_a_column_is_missing_names_it(tmp_path: Path) -> None:
    path = _write(tmp_path, "timestamp,open,high,low,close\n1,1,1,1,1\n")

    with pytest.raises(DataFileError, match="volume"):
        list(read_ohlcv_csv(path, "BTC-USDT.SIM", "1m"))


def test_read_when_a_row_is_bad_names_file_and_line(tmp_path: Path) -> None:
    path = _write(tmp_path, "timestamp,open,high,low,close,volume\n60,1,2,1,1,1\n120,1,2,1,abc,1\n")

    with pytest.raises(DataFileError, match=r"bars\.csv:3"):
        list(read_ohlcv_csv(path, "BTC-USDT.SIM", "1m"))


def test_read_when_times_go_backwards_is_refused(tmp_path: Path) -> None:
    path = _write(tmp_path, "timestamp,open,high,low,close,volume\n120,1,2,1,1,1\n60,1,2,1,1,1\n")

    with pytest.raises(DataFileError, match="not after"):
        list(read_ohlcv_csv(path, "BTC-USDT.SIM", "1m"))


def test_read_trades_when_file_has_ids_and_sides_gives_exact_ticks_stamped_in_event_time(
    tmp_path: Path,
) -> None:
    path = _write(
        tmp_path,
        ",timestamp,id,type,side,price,amount,cost\n"
        "0,1675329600138,1206419187,,buy,1666.8,26.062,43440.1416\n"
        "1,1675329600214,1206419188,,sell,1666.79,0.152,253.35208\n",
    )

    ticks = list(read_trades_csv(path, "ETH-USDT.SIM"))

    assert [t.trade_id for t in ticks] == ["1206419187", "1206419188"]
    assert [t.price for t in ticks] == [Decimal("1666.8"), Decimal("1666.79")]
    assert [t.size for t in ticks] == [Decimal("26.062"), Decimal("0.152")]
    assert [t.aggressor_side for t in ticks] == [AggressorSide.BUYER, AggressorSide.SELLER]
    assert ticks[0].ts_event == 1_675_329_600_138_000_000
    assert all(t.ts_init == t.ts_event and t.venue == "SIM" for t in ticks)


def test_read_trades_when_prices_repeat_past_the_kept_decimals_gives_each_cell_exactly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Arrange: equal prices spelt differently (1.10 / 1.1), repeats, and more distinct
    # prices than the parser keeps (2 here), so it starts over while reading
    monkeypatch.setattr(files, "_DECIMALS_KEPT", 2)
    cells = [("1.10", "2"), ("1.1", "2"), ("3E+1", " 0.5 "), ("1.10", "2"), ("1.1", "0.5")]
    path = _write(
        tmp_path,
        "time,price,size\n"
        + "".join(f"{1700000000 + i},{p},{q}\n" for i, (p, q) in enumerate(cells)),
    )

    # Act
    ticks = list(read_trades_csv(path, "ETH-USDT.SIM"))

    # Assert: each tick holds its own cell's Decimal, exponent included
    assert [(str(t.price), str(t.size)) for t in ticks] == [
        (str(Decimal(p)), str(Decimal(q))) for p, q in cells
    ]


def test_read_trades_when_times_go_backwards_names_the_line(tmp_path: Path) -> None:
    path = _write(tmp_path, "time,price,size\n1700000001,10,1\n1700000000,10,1\n")

    with pytest.raises(DataFileError, match=r"bars\.csv:3"):
        list(read_trades_csv(path, "ETH-USDT.SIM"))


def test_read_trades_when_size_column_is_missing_names_it(tmp_path: Path) -> None:
    path = _write(tmp_path, "time,price\n1700000000,10\n")

    with pytest.raises(DataFileError, match="amount"):
        list(read_trades_csv(path, "ETH-USDT.SIM"))


def test_read_trades_when_binance_buyer_is_maker_gives_the_seller_as_aggressor(
    tmp_path: Path,
) -> None:
    path = _write(
        tmp_path,
        "time_ms,trade_id,price,quantity,buyer_is_maker\n"
        "1723161255342,3735683259,61837.63,0.02,true\n"
        "1723161255617,3735683260,61837.64,0.048,false\n",
    )

    ticks = list(read_trades_csv(path, "BTC-USDT.BINANCE"))

    assert [t.aggressor_side for t in ticks] == [AggressorSide.SELLER, AggressorSide.BUYER]
    assert [t.ts_event for t in ticks] == [1_723_161_255_342_000_000, 1_723_161_255_617_000_000]
    assert ticks[1].size == Decimal("0.048")


@pytest.mark.parametrize("trade_id", ["T-1", None])
def test_trade_tick_when_values_are_valid_equals_the_validated_tick_and_its_json(
    trade_id: str | None,
) -> None:
    values = {
        "instrument_id": "BTC-USDT.BINANCE",
        "venue": "BINANCE",
        "price": Decimal("61837.63"),
        "size": Decimal("0.020"),
        "aggressor_side": AggressorSide.SELLER,
        "trade_id": trade_id,
        "ts_event": 1_723_161_255_342_000_000,
        "ts_init": 1_723_161_255_342_000_000,
    }
    validated = Tick(**values)

    fast = trade_tick(
        "BTC-USDT.BINANCE",
        "BINANCE",
        Decimal("61837.63"),
        Decimal("0.020"),
        AggressorSide.SELLER,
        trade_id,
        1_723_161_255_342_000_000,
    )

    assert fast == validated
    assert fast.model_fields_set == validated.model_fields_set
    assert fast.model_dump_json() == validated.model_dump_json()
    assert Tick.model_validate_json(fast.model_dump_json()) == validated


@pytest.mark.parametrize(
    ("price", "size", "ts"),
    [
        ("0", "1", 0),
        ("-1", "1", 0),
        ("NaN", "1", 0),
        ("Infinity", "1", 0),
        ("1", "0", 0),
        ("1", "-0.5", 0),
        ("1", "sNaN", 0),
        ("1", "1", -1),
    ],
)
def test_trade_tick_when_a_value_is_refused_by_tick_raises_value_error(
    price: str, size: str, ts: int
) -> None:
    args = ("BTC-USDT.SIM", "SIM", Decimal(price), Decimal(size), AggressorSide.BUYER, "1", ts)
    with pytest.raises(ValidationError):
        Tick(
            instrument_id=args[0],
            venue=args[1],
            price=args[2],
            size=args[3],
            aggressor_side=args[4],
            trade_id=args[5],
            ts_event=ts,
            ts_init=ts,
        )

    with pytest.raises(ValueError, match=r"price|size|time"):
        trade_tick(*args)


@pytest.mark.parametrize("bad", ["0", "-2", "nan"])
def test_read_trades_when_a_later_row_has_a_bad_size_names_its_line(
    tmp_path: Path, bad: str
) -> None:
    path = _write(
        tmp_path, f"time,price,size\n1700000000,10,1\n1700000001,10,1\n1700000002,10,{bad}\n"
    )

    with pytest.raises(DataFileError, match=r"bars\.csv:4"):
        list(read_trades_csv(path, "ETH-USDT.SIM"))


def test_read_trades_when_instrument_id_is_malformed_is_refused(tmp_path: Path) -> None:
    path = _write(tmp_path, "time,price,size\n1700000000,10,1\n")

    with pytest.raises(ValueError, match="eth_usdt"):
        list(read_trades_csv(path, "eth_usdt"))


def test_read_trades_when_lines_are_blank_skips_them_but_not_a_row_with_a_blank_first_cell(
    tmp_path: Path,
) -> None:
    path = _write(
        tmp_path,
        ",time,price,size\n0,1700000000,10,1\n\n , , , \n,1700000001,11,2\n",
    )

    ticks = list(read_trades_csv(path, "ETH-USDT.SIM"))

    assert [(t.ts_event, t.price, t.size) for t in ticks] == [
        (1_700_000_000 * NS, Decimal(10), Decimal(1)),
        (1_700_000_001 * NS, Decimal(11), Decimal(2)),
    ]
