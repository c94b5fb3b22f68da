"""Event-loop stalls and GC pauses of the api, as Prometheus histograms.

A request's tail latency on one worker is mostly the time the event loop could not run it:
a handler or callback that held the loop, or a garbage collection. `watch_loop` measures
how late a short timer fires (the loop lag every request queued at that moment also paid);
`track_gc` times each collection by generation.
"""

from __future__ import annotations

import asyncio
import gc
import time
from typing import Any

from prometheus_client import Histogram

#: How often the loop-lag probe wakes up (s); its cost is one timer per interval.
PROBE_INTERVAL_S = 0.01

_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)

LOOP_LAG_SECONDS = Histogram(
    "quantmesh_api_loop_lag_seconds",
    "How late a timer of the api's event loop fired: the time the loop was held by other work.",
    ("service",),
    buckets=_BUCKETS,
)
GC_PAUSE_SECONDS = Histogram(
    "quantmesh_api_gc_pause_seconds",
    "Time of each cyclic garbage collection in the api's process, by generation.",
    ("service", "generation"),
    buckets=_BUCKETS,
)


async def watch_loop(service: str, interval_s: float = PROBE_INTERVAL_S) -> None:
    """Observe the lag of a timer every `interval_s`, forever."""
    lag = LOOP_LAG_SECONDS.labels(service)
    while True:
        due = time.perf_counter() + interval_s
        await asyncio.sleep(interval_s)
        lag.observe(max(0.0, time.perf_counter() - due))


class GcTimer:
    """A `gc.callbacks` entry timing each collection; `install` / `remove` it."""

    def __init__(self, service: str) -> None:
        self._by_generation = [GC_PAUSE_SECONDS.labels(service, str(g)) for g in range(3)]
        self._started = 0.0

    def __call__(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        else:
            self._by_generation[info["generation"]].observe(time.perf_counter() - self._started)

    def install(self) -> None:
        """Start timing collections (once)."""
        if self not in gc.callbacks:
            gc.callbacks.append(self)

    def remove(self) -> None:
        """Stop timing collections."""
        if self in gc.callbacks:
            gc.callbacks.remove(self)
