"""The synthetic feed as plain data: each step yields the ticks and closed bars to publish."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

from quantmesh_common.envelope import Event
from quantmesh_common.messages import Tick
from quantmesh_common.topics import Topic
from quantmesh_marketdata.bars import BarAggregator
from quantmesh_marketdata.synthetic import GbmParams, gbm_ticks


@dataclass
class SyntheticFeed:
    """Seeded GBM trades for several instruments, with time bars aggregated from them.

    Instrument i uses seed `seed + i`, so adding an instrument never changes the others.
    """

    instruments: list[str]
    params: GbmParams
    start_ns: int
    seed: int
    bar_interval: str
    _streams: dict[str, Iterator[Tick]] = field(init=False, default_factory=dict)
    _bars: dict[str, BarAggregator] = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        for i, instrument_id in enumerate(self.instruments):
            self._streams[instrument_id] = gbm_ticks(
                instrument_id, self.params, self.start_ns, self.seed + i
            )
            self._bars[instrument_id] = BarAggregator(instrument_id, self.bar_interval)

    def step(self) -> list[tuple[str, Event]]:
        """One tick per instrument, each followed by the bar it closed, if any."""
        out: list[tuple[str, Event]] = []
        ticks_topic, bars = Topic.MD_TICKS, self._bars
        for instrument_id, stream in self._streams.items():
            tick = next(stream)
            out.append((ticks_topic, tick))
            # The stream's ticks are this instrument's trades: update()'s checks are not needed.
            bar = bars[instrument_id].add_trade(tick.ts_event, tick.price, tick.size)
            if bar is not None:
                out.append((Topic.MD_BARS, bar))
        return out
