"""The loop-lag probe: a held event loop is seen late, and whether its thread ran meanwhile."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable

from prometheus_client import REGISTRY

from quantmesh_api.stalls import watch_loop


def _stalls(service: str) -> tuple[float, float]:
    """The on-CPU share histogram's count and sum for `service` (0 before any)."""
    labels = {"service": service}
    count = REGISTRY.get_sample_value("quantmesh_api_loop_stall_on_cpu_ratio_count", labels)
    total = REGISTRY.get_sample_value("quantmesh_api_loop_stall_on_cpu_ratio_sum", labels)
    return count or 0.0, total or 0.0


async def _hold(service: str, hold: Callable[[], None]) -> tuple[float, float]:
    """Hold the loop once with `hold`; return the stalls' count and mean on-CPU share."""
    before = _stalls(service)
    await asyncio.sleep(0.03)  # the probe is waiting on its timer
    hold()
    await asyncio.sleep(0.03)  # the late probe observes
    after = _stalls(service)
    count = after[0] - before[0]
    return count, (after[1] - before[1]) / count if count else float("nan")


def _blocked() -> None:
    time.sleep(0.06)  # the thread is held off the CPU


def _busy() -> None:
    end = time.thread_time() + 0.06
    while time.thread_time() < end:  # the thread holds a CPU for 60 ms of its own time
        pass


async def test_watch_loop_when_the_loop_is_held_sees_a_stall_and_whether_its_thread_ran() -> None:
    service = f"test-{uuid.uuid4().hex[:8]}"
    probe = asyncio.ensure_future(watch_loop(service, 0.01))
    try:
        blocked_count, blocked_share = await _hold(service, _blocked)
        busy_count, busy_share = await _hold(service, _busy)
    finally:
        probe.cancel()
    lag_count = REGISTRY.get_sample_value(
        "quantmesh_api_loop_lag_seconds_count", {"service": service}
    )
    within_20ms = REGISTRY.get_sample_value(
        "quantmesh_api_loop_lag_seconds_bucket", {"service": service, "le": "0.02"}
    )

    assert lag_count is not None
    assert within_20ms is not None
    assert lag_count - within_20ms >= 2  # both holds made a probe more than 20 ms late
    assert blocked_count >= 1
    assert busy_count >= 1
    # A sleeping thread used almost no CPU during its stall; a spinning one used 60 ms of it.
    assert blocked_share < busy_share
