"""The recorder's batching, retries and settings, with an in-memory sink (unit tests)."""

from __future__ import annotations

import asyncio
from decimal import Decimal
from typing import Any

import pytest

from quantmesh_common.bus.memory import InMemoryBus
from quantmesh_common.clock import SimulatedClock
from quantmesh_common.envelope import Envelope
from quantmesh_common.settings import load_settings
from quantmesh_common.testing import stubs
from quantmesh_common.topics import registry
from quantmesh_marketdata.config import MarketDataSettings
from quantmesh_marketdata.recorder import (
    Lines,
    PostgresSink,
    Recorder,
    RecorderStalledError,
    bar_line,
    bar_row,
    copy_text,
    group_lines,
    row_line,
    tick_line,
    tick_row,
)

SEC = 1_000_000_000


class ListSink(PostgresSink):
    """Keeps written batches as lists of cells; fails the next `fail` writes (unit tests only)."""

    def __init__(self) -> None:
        super().__init__(pool=None)
        self.ticks: list[list[list[str]]] = []
        self.bars: list[list[list[str]]] = []
        self.fail = 0

    async def write_tick_lines(self, lines: Lines) -> int:
        if self.fail:
            self.fail -= 1
            raise ConnectionError("database down")
        return _keep(self.ticks, lines)

    async def write_bar_lines(self, lines: Lines) -> int:
        return _keep(self.bars, lines)


def _keep(batches: list[list[list[str]]], lines: Lines) -> int:
    rows = [line.rstrip("\n").split("\t") for group in lines.values() for line in group]
    if rows:
        batches.append(rows)
    return len(rows)


_BUS = InMemoryBus("test", registry())


def envelope(payload: Any) -> Envelope[Any]:
    return _BUS.wrap(payload)


def ticks(n: int) -> list[Any]:
    return [stubs.tick(trade_id=f"T{i}", ts_event=stubs.TS + i * SEC) for i in range(n)]


def test_tick_row_when_trade_has_columns_of_the_ticks_table() -> None:
    row = tick_row(stubs.tick())

    assert row == (
        "SIM",
        "BTC-USDT.SIM",
        stubs.TS,
        stubs.TS + 1_000_000,
        "TRADE",
        Decimal("50000.10"),
        Decimal("0.5"),
        "BUYER",
        "T-1",
        None,
        None,
        None,
        None,
    )


def test_bar_row_when_bar_has_columns_of_the_bars_table() -> None:
    assert bar_row(stubs.bar())[:4] == ("BTC-USDT.SIM", "1m", stubs.TS, stubs.TS + 60 * SEC)
    assert bar_row(stubs.bar())[-1] == 321


def test_tick_line_when_trade_is_the_tab_separated_row_with_null_quote_columns() -> None:
    line = tick_line(stubs.tick())

    assert line == (
        "SIM\tBTC-USDT.SIM\t1700000000000000000\t1700000000001000000\tTRADE\t50000.10\t0.5"
        "\tBUYER\tT-1\t\\N\t\\N\t\\N\t\\N\n"
    )


def test_tick_line_when_trade_id_has_tab_newline_cr_and_backslash_escapes_each() -> None:
    line = tick_line(stubs.tick(trade_id="a\tb\nc\rd\\e"))

    assert line.split("\t")[8] == "a\\tb\\nc\\rd\\\\e"
    assert line.count("\n") == 1


def test_tick_line_when_trade_has_no_id_writes_null() -> None:
    assert tick_line(stubs.tick(trade_id=None)).split("\t")[8] == "\\N"


def test_tick_line_when_quote_writes_bid_ask_and_sizes() -> None:
    line = tick_line(stubs.quote_tick())

    assert line.rstrip("\n").split("\t")[4:] == [
        "QUOTE",
        "50000.10",
        "0",
        "NO_AGGRESSOR",
        "\\N",
        "50000.00",
        "50000.20",
        "1.5",
        "2.25",
    ]


def test_tick_line_when_trade_carries_a_quote_keeps_its_bid_and_ask() -> None:
    tick = stubs.tick(bid=Decimal("50000.00"), ask=Decimal("50000.20"))

    assert tick_line(tick).rstrip("\n").split("\t")[8:] == [
        "T-1",
        "50000.00",
        "50000.20",
        "\\N",
        "\\N",
    ]


def test_tick_line_when_decimal_has_an_exponent_keeps_its_exact_digits() -> None:
    line = tick_line(stubs.tick(price=Decimal("1E+3"), size=Decimal("1.2E-7")))

    assert line.split("\t")[5:7] == ["1E+3", "1.2E-7"]


def test_row_line_when_given_the_tick_row_equals_tick_line() -> None:
    ticks = [
        stubs.tick(),
        stubs.tick(trade_id="x\\y\tz"),
        stubs.tick(trade_id=None, aggressor_side="SELLER"),
        stubs.quote_tick(),
    ]

    assert [row_line(tick_row(t)) for t in ticks] == [tick_line(t) for t in ticks]


def test_bar_line_when_bar_is_the_tab_separated_row() -> None:
    assert bar_line(stubs.bar()) == (
        "BTC-USDT.SIM\t1m\t1700000000000000000\t1700000060000000000\t50000.00\t50100.50"
        "\t49950.25\t50050.75\t12.34567\t321\n"
    )


def test_group_lines_when_rows_interleave_instruments_keeps_each_instruments_order() -> None:
    rows = [tick_row(stubs.tick(instrument_id=i, trade_id=t)) for i, t in _INTERLEAVED]

    groups = group_lines(rows, 1)

    assert {k: [line.split("\t")[8] for line in v] for k, v in groups.items()} == {
        "BTC-USDT.SIM": ["1", "3"],
        "ETH-USDT.SIM": ["2", "4"],
    }


_INTERLEAVED = [
    ("BTC-USDT.SIM", "1"),
    ("ETH-USDT.SIM", "2"),
    ("BTC-USDT.SIM", "3"),
    ("ETH-USDT.SIM", "4"),
]


def test_chunks_when_instruments_differ_in_size_deals_whole_instruments_largest_first() -> None:
    sink = PostgresSink(pool=None, parallel=2, min_chunk_rows=1)
    lines = {"A": ["a\n"] * 5, "B": ["b\n"] * 3, "C": ["c\n"] * 2}

    chunks = sink._chunks(lines, 10)

    # A (5) to the first chunk, B (3) to the second, C (2) to the emptier second: 5 / 5.
    assert chunks == [(b"a\n" * 5, 5), (b"b\n" * 3 + b"c\n" * 2, 5)]


def test_chunks_when_batch_is_below_two_chunks_of_rows_copies_one_buffer() -> None:
    sink = PostgresSink(pool=None, parallel=2, min_chunk_rows=4)
    lines = {"A": ["a\n"] * 4, "B": ["b\n"] * 3}

    assert sink._chunks(lines, 7) == [(b"a\n" * 4 + b"b\n" * 3, 7)]


def test_copy_text_when_plain_returns_the_same_string() -> None:
    assert copy_text("T-123/x") == "T-123/x"


async def test_flush_when_sink_fails_puts_rows_back_ahead_per_instrument() -> None:
    sink = ListSink()
    recorder = Recorder(sink, None, SimulatedClock(), batch_rows=100)
    for instrument_id, trade_id in _INTERLEAVED[:3]:
        recorder.add(stubs.tick(instrument_id=instrument_id, trade_id=trade_id))
    sink.fail = 1

    with pytest.raises(ConnectionError):
        await recorder.flush()
    recorder.add(stubs.tick(instrument_id="ETH-USDT.SIM", trade_id="4"))
    pending = recorder.pending
    result = await recorder.flush()

    assert pending == 4
    assert result.ticks == 4
    # BTC's 1 and 3 stored ahead of ETH's 2, then ETH's 4 that arrived after the failure.
    assert [(row[1], row[8]) for row in sink.ticks[0]] == [
        ("BTC-USDT.SIM", "1"),
        ("BTC-USDT.SIM", "3"),
        ("ETH-USDT.SIM", "2"),
        ("ETH-USDT.SIM", "4"),
    ]


async def test_add_when_batch_is_full_flushes_exactly_one_batch() -> None:
    sink = ListSink()
    recorder = Recorder(sink, None, SimulatedClock(), batch_rows=3)

    for tick in ticks(4):
        await recorder.handle(envelope(tick))

    assert [len(batch) for batch in sink.ticks] == [3]
    assert recorder.pending == 1


async def test_flush_when_sink_fails_keeps_rows_and_writes_them_in_order_later() -> None:
    sink = ListSink()
    recorder = Recorder(sink, None, SimulatedClock(), batch_rows=100)
    for tick in ticks(2):
        recorder.add(tick)
    sink.fail = 1

    with pytest.raises(ConnectionError):
        await recorder.flush()
    recorder.add(ticks(3)[2])
    result = await recorder.flush()

    assert result.ticks == 3
    assert [row[8] for row in sink.ticks[0]] == ["T0", "T1", "T2"]


async def test_handle_when_sink_stays_down_past_the_cap_stalls() -> None:
    sink = ListSink()
    sink.fail = 10
    recorder = Recorder(sink, None, SimulatedClock(), batch_rows=2, max_pending_rows=4)
    items = ticks(4)
    for tick in items[:3]:
        await recorder.handle(envelope(tick))

    with pytest.raises(RecorderStalledError):
        await recorder.handle(envelope(items[3]))

    assert recorder.pending == 4


async def test_run_when_rows_are_older_than_the_interval_flushes_them() -> None:
    sink = ListSink()
    clock = SimulatedClock(start_ns=stubs.TS)
    recorder = Recorder(sink, None, clock, batch_rows=1000, flush_interval_s=0.5)
    task = asyncio.create_task(recorder.run())
    recorder.add(stubs.bar())
    await asyncio.sleep(0)

    clock.advance(0.4)
    for _ in range(5):
        await asyncio.sleep(0)
    before = len(sink.bars)
    clock.advance(0.2)
    for _ in range(5):
        await asyncio.sleep(0)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)

    assert before == 0
    assert len(sink.bars) == 1


def test_settings_when_recorder_on_without_database_exit_naming_it(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("QM_BUS", "memory")
    monkeypatch.setenv("QM_RECORDER", "on")
    monkeypatch.delenv("QM_DATABASE_URL", raising=False)
    monkeypatch.setenv("QM_REDIS_URL", "redis://127.0.0.1:1/0")

    with pytest.raises(SystemExit):
        load_settings(MarketDataSettings)

    err = capsys.readouterr().err
    assert "QM_RECORDER=on needs QM_DATABASE_URL" in err
    assert "QM_REDIS_URL" not in err.split("needs", 1)[1]


def test_settings_when_recorder_on_without_redis_exit_naming_it(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("QM_BUS", "memory")
    monkeypatch.setenv("QM_RECORDER", "on")
    monkeypatch.setenv("QM_DATABASE_URL", "postgresql://u:p@127.0.0.1:1/db")
    monkeypatch.delenv("QM_REDIS_URL", raising=False)

    with pytest.raises(SystemExit):
        load_settings(MarketDataSettings)

    assert "QM_RECORDER=on needs QM_REDIS_URL" in capsys.readouterr().err
