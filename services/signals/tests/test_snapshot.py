"""Engine snapshots: stored and restored exactly; a foreign, corrupt or absent one is not used."""

from __future__ import annotations

import random
from decimal import Decimal
from pathlib import Path
from typing import Any

from quantmesh_common.messages import Bar, OrderIntent
from quantmesh_common.testing import stubs
from quantmesh_signals.engine import SignalsEngine, StrategySpec
from quantmesh_signals.snapshot import Snapshot, SnapshotStore, config_digest

INSTRUMENTS = ["AAA-USDT.SIM", "BBB-USDT.SIM"]
MINUTE = 60 * stubs.SECOND_NS
SPECS = [
    StrategySpec(
        id="sma",
        name="sma_cross",
        account_id="acc",
        instruments=INSTRUMENTS,
        params={"fast": 2, "slow": 5, "allow_short": True},
    ),
    StrategySpec(
        id="rsi",
        name="rsi_reversion",
        account_id="acc",
        instruments=INSTRUMENTS,
        params={"period": 3, "oversold": 40, "overbought": 60},
    ),
]


def _bars(steps: int) -> list[Bar]:
    rng = random.Random(3)
    prices = dict.fromkeys(INSTRUMENTS, 100.0)
    out = []
    for n in range(steps):
        for instrument in INSTRUMENTS:
            prices[instrument] *= 1 + rng.gauss(0, 0.02)
            close = Decimal(f"{prices[instrument]:.2f}")
            out.append(
                stubs.bar(
                    instrument_id=instrument,
                    open=close,
                    high=close,
                    low=close,
                    close=close,
                    ts_open=stubs.TS + n * MINUTE,
                    ts_close=stubs.TS + (n + 1) * MINUTE,
                )
            )
    return out


def _intents(engine: SignalsEngine, bars: list[Bar]) -> list[dict[str, Any]]:
    return [
        e.model_dump(exclude={"intent_id"})
        for bar in bars
        for e in engine.on_bar(bar)
        if isinstance(e, OrderIntent)
    ]


def _engine() -> SignalsEngine:
    engine = SignalsEngine.from_specs(SPECS)
    engine.start(stubs.TS)
    return engine


def test_snapshot_when_restored_continues_exactly_as_the_engine_it_was_taken_from(
    tmp_path: Path,
) -> None:
    bars = _bars(60)
    first, rest = bars[:50], bars[50:]
    live = _engine()
    _intents(live, first)
    store = SnapshotStore(tmp_path, "signals.one")
    offsets = {"signals": {("md.bars", 0): 50}}
    config = config_digest(SPECS, False)

    store.save(Snapshot(config, live, offsets, 1))
    restored = store.load(config)

    assert restored is not None
    assert restored.offsets == offsets
    expected = _intents(live, rest)
    assert len(expected) > 0
    assert _intents(restored.engine, rest) == expected


def test_snapshot_when_the_strategy_configuration_changed_is_not_used(tmp_path: Path) -> None:
    store = SnapshotStore(tmp_path, "signals.one")
    store.save(Snapshot(config_digest(SPECS, False), _engine()))
    other = [SPECS[0]]

    assert store.load(config_digest(other, False)) is None
    assert store.load(config_digest(SPECS, True)) is None


def test_snapshot_when_the_file_is_corrupt_or_absent_is_not_used(tmp_path: Path) -> None:
    store = SnapshotStore(tmp_path, "signals.one")
    config = config_digest(SPECS, False)
    assert store.load(config) is None

    store.path.write_bytes(b"not a snapshot")

    assert store.load(config) is None


def test_snapshot_copy_when_the_copy_moves_on_leaves_the_original_as_it_was() -> None:
    bars = _bars(40)
    original = Snapshot("c", _engine())
    _intents(original.engine, bars[:30])
    copy = original.copy()

    _intents(copy.engine, bars[30:])

    assert _intents(original.engine, bars[30:]) == _intents(_replayed(bars), bars[30:])


def _replayed(bars: list[Bar]) -> SignalsEngine:
    engine = _engine()
    _intents(engine, bars[:30])
    return engine
