"""The recorder's batching, retries and settings, with an in-memory sink (unit tests)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
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
    PostgresSink,
    Recorder,
    RecorderStalledError,
    Row,
    bar_row,
    tick_row,
)

SEC = 1_000_000_000


class ListSink(PostgresSink):
    """Keeps written batches in lists; fails the next `fail` writes (unit tests only)."""

    def __init__(self) -> None:
        super().__init__(pool=None)
        self.ticks: list[list[Row]] = []
        self.bars: list[list[Row]] = []
        self.fail = 0

    async def write_ticks(self, rows: Sequence[Row]) -> int:
        if self.fail:
            self.fail -= 1
            raise ConnectionError("database down")
        if rows:
            self.ticks.append(list(rows))
        return len(rows)

    async def write_bars(self, rows: Sequence[Row]) -> int:
        if rows:
            self.bars.append(list(rows))
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
