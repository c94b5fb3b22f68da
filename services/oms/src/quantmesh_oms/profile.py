"""Volume profiles for VWAP parents: configured hourly weights, or recorded bars in PostgreSQL."""

from __future__ import annotations

import logging
from decimal import Decimal
from typing import Any

from quantmesh_oms.algo import DAY_NS, weights_from_bars, weights_from_hourly

log = logging.getLogger(__name__)

#: Recorded volume by time of day (ns since UTC midnight of the bar's open) over a window.
_SELECT_TOD_VOLUME = """
SELECT ts_open % 86400000000000 AS tod, sum(volume) AS volume
FROM bars
WHERE instrument_id = $1 AND interval = $2 AND ts_open >= $3 AND ts_open < $4
GROUP BY 1
"""


class VolumeProfiles:
    """Slice weights for a VWAP parent; None with the reason when there is no profile.

    A configured hourly profile wins; else the volume of the recorded bars of the instrument
    over the last `lookback_days` days, summed per time-of-day window of each slice.
    """

    def __init__(
        self,
        pool: Any | None,
        *,
        hourly: tuple[Decimal, ...] | None = None,
        lookback_days: int = 5,
        bar_interval: str = "1m",
    ) -> None:
        self._pool = pool
        self._hourly = hourly
        self._days = lookback_days
        self._interval = bar_interval

    async def weights(
        self, instrument_id: str, start_ns: int, step_ns: int, slices: int
    ) -> tuple[list[Decimal] | None, str]:
        """Return (one weight per slice, where they came from), or (None, why there are none)."""
        if self._hourly is not None:
            return weights_from_hourly(self._hourly, start_ns, step_ns, slices), "configured"
        if self._pool is None:
            return None, "no database (QM_DATABASE_URL unset)"
        try:
            rows = await self._pool.fetch(
                _SELECT_TOD_VOLUME,
                instrument_id,
                self._interval,
                start_ns - self._days * DAY_NS,
                start_ns,
            )
        except Exception as exc:  # a profile is an optimisation: slice equally rather than stop
            log.warning("volume profile of %s unavailable: %r", instrument_id, exc)
            return None, f"bars query failed: {type(exc).__name__}"
        volumes = {int(row["tod"]): Decimal(row["volume"]) for row in rows}
        if not volumes:
            return None, f"no {self._interval} bars in the last {self._days} days"
        weights = weights_from_bars(volumes, start_ns, step_ns, slices)
        if sum(weights, Decimal(0)) <= 0:
            return None, f"no {self._interval} bar volume in the slices' windows"
        return weights, "bars"
