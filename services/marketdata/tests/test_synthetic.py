"""The seeded synthetic feed: reproducible, on the tick grid, moving like its parameters."""

from __future__ import annotations

import itertools
import math
import statistics
from decimal import Decimal

import pytest

from quantmesh_common.messages import Tick
from quantmesh_marketdata.synthetic import GbmParams, gbm_ticks

START = 1_700_000_000_000_000_000
SEC = 1_000_000_000


def _take(n: int, seed: int, params: GbmParams) -> list[Tick]:
    return list(itertools.islice(gbm_ticks("BTC-USDT.SIM", params, START, seed), n))


def test_same_seed_gives_identical_ticks_and_another_seed_does_not() -> None:
    params = GbmParams()

    first, again, other = _take(500, 7, params), _take(500, 7, params), _take(500, 8, params)

    assert first == again
    assert first != other


def test_prices_sit_on_the_tick_grid_and_times_step_by_the_interval() -> None:
    params = GbmParams(tick_size=Decimal("0.05"), interval_ns=250_000_000)

    ticks = _take(200, 1, params)

    assert all(t.price % Decimal("0.05") == 0 and t.price > 0 for t in ticks)
    assert [t.ts_event - START for t in ticks[:3]] == [0, 250_000_000, 500_000_000]
    assert all(params.min_size <= t.size <= params.max_size for t in ticks)
    assert len({t.trade_id for t in ticks}) == 200


def test_log_returns_have_the_configured_volatility() -> None:
    # One tick a minute for a year's worth of minutes would be slow; 20,000 minutes suffice to
    # estimate sigma within a few percent: std of log returns ~ volatility * sqrt(dt).
    params = GbmParams(
        start_price=Decimal("1000"),
        volatility=0.8,
        spread_bps=0,
        tick_size=Decimal("0.0001"),
        interval_ns=60_000_000_000,
    )
    ticks = _take(20_000, 3, params)
    prices = [float(t.price) for t in ticks]

    returns = [math.log(b / a) for a, b in itertools.pairwise(prices)]
    per_step = 0.8 * math.sqrt(60 / (365 * 24 * 3600))

    assert statistics.stdev(returns) == pytest.approx(per_step, rel=0.05)


def test_bad_parameters_are_refused() -> None:
    with pytest.raises(ValueError, match="min_size"):
        GbmParams(min_size=Decimal("2"), max_size=Decimal("1"))
    with pytest.raises(ValueError, match="positive"):
        GbmParams(start_price=Decimal("0"))


def test_ticks_after_the_first_equal_the_model_validated_from_their_values() -> None:
    params = GbmParams(volatility=2.0, spread_bps=5.0)

    ticks = _take(300, 3, params)

    for tick in ticks:
        validated = Tick.model_validate(tick.model_dump())
        assert tick == validated
        assert tick.model_fields_set == {
            "instrument_id",
            "venue",
            "price",
            "size",
            "aggressor_side",
            "trade_id",
            "ts_event",
            "ts_init",
        }
        assert tick.model_dump_json() == validated.model_dump_json()
    assert (ticks[1].trade_id, ticks[1].venue, ticks[1].ts_event) == ("SYN-3-2", "SIM", START + SEC)
