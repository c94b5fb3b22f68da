"""Event-loop stalls and GC pauses of the api, as Prometheus histograms.

A request's tail latency on one worker is mostly the time the event loop could not run it:
a handler or callback that held the loop, or a garbage collection. `watch_loop` measures
how late a short timer fires (the loop lag every request queued at that moment also paid)
and, for a late one, how much of the time the loop's thread was on a CPU (its own work) or
not (waiting for a CPU on a busy machine, or for the GIL); `GcTimer` times each collection by
generation.
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
STALL_ON_CPU_RATIO = Histogram(
    "quantmesh_api_loop_stall_on_cpu_ratio",
    "Of a probe interval whose timer fired over 5 ms late, the share the loop's thread spent "
    "on a CPU: near 1, the api's own work held the loop; near 0, the process waited for a "
    "CPU (or the GIL).",
    ("service",),
    buckets=(0.1, 0.25, 0.5, 0.75, 0.9, 1.0),
)
#: A probe this late counts as a stall and gets its on-CPU share observed.
STALL_S = 0.005
GC_PAUSE_SECONDS = Histogram(
    "quantmesh_api_gc_pause_seconds",
    "Time of each cyclic garbage collection in the api's process, by generation.",
    ("service", "generation"),
    buckets=_BUCKETS,
)


async def watch_loop(service: str, interval_s: float = PROBE_INTERVAL_S) -> None:
    """Observe the lag of a timer every `interval_s`, forever."""
    lag = LOOP_LAG_SECONDS.labels(service)
    on_cpu = STALL_ON_CPU_RATIO.labels(service)
    while True:
        started, cpu_started = time.perf_counter(), time.thread_time()
        await asyncio.sleep(interval_s)
        now, cpu = time.perf_counter(), time.thread_time()
        late = max(0.0, now - started - interval_s)
        lag.observe(late)
        if late >= STALL_S:
            on_cpu.observe(min(1.0, (cpu - cpu_started) / (now - started)))


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
