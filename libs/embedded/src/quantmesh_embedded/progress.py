"""A one-line progress bar for long command-line runs, drawn only on a terminal."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TextIO

#: Width of the bar itself, in characters.
BAR_WIDTH = 30
#: Least time between two redraws, in seconds: drawing must not slow the run down.
REDRAW_EVERY_S = 0.2


class ProgressBar:
    """Draws `[#####.....]  45%  45,000/100,000 bars  12,345 bars/s` on one line of `stream`.

    It draws nothing unless `enabled` (the CLI enables it when stderr is a TTY and --quiet is
    not given), so piped output and logs stay clean. Wall-clock time here measures the run for
    the person watching; it never reaches the simulation.
    """

    def __init__(
        self,
        stream: TextIO,
        *,
        enabled: bool,
        unit: str = "bars",
        now: Callable[[], float] = time.monotonic,
    ) -> None:
        self.stream = stream
        self.enabled = enabled
        self.unit = unit
        self._now = now
        self._started = now()
        self._last_draw: float | None = None
        self._finished = False

    def __call__(self, done: int, total: int) -> None:
        """Report `done` of `total`; redraws at most every REDRAW_EVERY_S, always at the end."""
        if not self.enabled or self._finished:
            return
        now = self._now()
        end = done >= total
        if not end and self._last_draw is not None and now - self._last_draw < REDRAW_EVERY_S:
            return
        self._last_draw = now
        fraction = done / total if total else 1.0
        filled = int(fraction * BAR_WIDTH)
        elapsed = now - self._started
        rate = f"  {done / elapsed:,.0f} {self.unit}/s" if elapsed > 0 else ""
        self.stream.write(
            f"\r[{'#' * filled}{'.' * (BAR_WIDTH - filled)}] {fraction:4.0%}  "
            f"{done:,}/{total:,} {self.unit}{rate}"
        )
        if end:
            self.stream.write("\n")
            self._finished = True
        self.stream.flush()
