"""What every request handler reaches: settings, stores, the bus, the projections, the hub."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from quantmesh_api.config import ApiSettings
from quantmesh_api.kv import Kv
from quantmesh_api.live import Hub, Projection
from quantmesh_api.store import ApiStore
from quantmesh_common.bus.base import Bus
from quantmesh_common.clock import Clock
from quantmesh_common.envelope import Envelope, Event

NS = 1_000_000_000


class PublishError(RuntimeError):
    """Kafka did not acknowledge a command in time."""


@dataclass
class ApiState:
    """The gateway's shared state, built once by the service (or a test)."""

    settings: ApiSettings
    store: ApiStore
    kv: Kv
    bus: Bus
    clock: Clock
    projection: Projection = field(default_factory=Projection)
    hub: Hub = field(default_factory=Hub)
    #: The JSON of every latest price and when it goes stale (monotonic s); see `prices_json`.
    _prices: tuple[float, bytes] | None = None
    _prices_lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    def now_s(self) -> int:
        """Service time in whole seconds (token issue and expiry)."""
        return self.clock.now_ns() // NS

    async def publish(self, topic: str, payload: Event, *, key: str | None = None) -> Envelope[Any]:
        """Publish and wait for the broker's ack, so a 202 means the command is durable."""
        envelope = await self.bus.publish(topic, payload, key=key)
        try:
            await asyncio.wait_for(self.bus.flush(), self.settings.publish_timeout_s)
        except TimeoutError:
            raise PublishError(
                f"no ack from the bus within {self.settings.publish_timeout_s}s"
            ) from None
        return envelope

    async def prices_json(self, build: Callable[[], Awaitable[bytes]]) -> bytes:
        """The all-instruments price answer, built at most once per `price_cache_s`.

        One request rebuilds it while the others wait for that one (no stampede on Redis).
        """
        ttl = self.settings.price_cache_s
        cached = self._prices
        if ttl <= 0:
            return await build()
        if cached is not None and cached[0] > time.monotonic():
            return cached[1]
        async with self._prices_lock:
            cached = self._prices
            if cached is not None and cached[0] > time.monotonic():
                return cached[1]
            body = await build()
            self._prices = (time.monotonic() + ttl, body)
            return body
