"""What every request handler reaches: settings, stores, the bus, the projections, the hub."""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from quantmesh_api.collector import CollectorJobs
from quantmesh_api.config import ApiSettings
from quantmesh_api.guard import DenyList, RateLimiter, TokenCache
from quantmesh_api.kv import Kv
from quantmesh_api.live import Hub, Projection
from quantmesh_api.store import Account, ApiStore
from quantmesh_api.strategies import RiskLimitsBook, StrategyBook
from quantmesh_common.bus.base import Bus
from quantmesh_common.clock import Clock
from quantmesh_common.envelope import Envelope, Event
from quantmesh_common.topics import Topic

NS = 1_000_000_000
#: Accounts remembered by id: an account's owner and venue never change once stored.
ACCOUNT_CACHE_SIZE = 10_000


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
    #: The latest status of each market-data collection job (md.collector).
    collector: CollectorJobs = field(default_factory=CollectorJobs)
    #: The latest status of each strategy the signals stage runs (`strategies`).
    strategies: StrategyBook = field(default_factory=StrategyBook)
    #: The limits, kill switch and breaker risk applies per account (`risk.limits`).
    risk_limits: RiskLimitsBook = field(default_factory=RiskLimitsBook)
    #: Where control commands go (a test points it at a topic of its own).
    control_topic: str = Topic.CONTROL
    #: The JSON of every latest price and when its read started (monotonic s); `prices_json`.
    _prices: tuple[float, bytes] | None = None
    _prices_refresh: asyncio.Future[None] | None = None
    #: The clock of the price answer's age (tests move one by hand).
    monotonic: Callable[[], float] = field(default=time.monotonic, repr=False)
    tokens: TokenCache = field(init=False)
    deny_list: DenyList = field(init=False)
    limiter: RateLimiter = field(init=False)
    _accounts: OrderedDict[str, Account] = field(default_factory=OrderedDict)
    #: Publishes queued and publishes known acknowledged (a sequence), and the flush under way.
    _published: int = 0
    _acked: int = 0
    _flushing: asyncio.Future[None] | None = None

    def __post_init__(self) -> None:
        self.tokens = TokenCache(self.settings.jwt_key())
        self.deny_list = DenyList(self.kv, self.settings.deny_sync_s)
        self.limiter = RateLimiter(self.kv, self.settings.rate_limit_sync_s)

    def now_s(self) -> int:
        """Service time in whole seconds (token issue and expiry)."""
        return self.clock.now_ns() // NS

    async def publish(self, topic: str, payload: Event, *, key: str | None = None) -> Envelope[Any]:
        """Publish and wait for the broker's ack, so a 202 means the command is durable.

        Concurrent publishes share flushes: one flush runs at a time and acknowledges every
        publish queued before it started (a flush per request would queue behind each other).
        """
        envelope = await self.bus.publish(topic, payload, key=key)
        self._published += 1
        try:
            await asyncio.wait_for(
                self._wait_acked(self._published), self.settings.publish_timeout_s
            )
        except TimeoutError:
            raise PublishError(
                f"no ack from the bus within {self.settings.publish_timeout_s}s"
            ) from None
        return envelope

    async def _wait_acked(self, seq: int) -> None:
        while self._acked < seq:
            flushing = self._flushing
            if flushing is None:
                flushing = self._flushing = asyncio.ensure_future(self._flush())
            await asyncio.shield(flushing)

    async def _flush(self) -> None:
        upto = self._published
        try:
            await self.bus.flush()
        except Exception as exc:
            raise PublishError(f"the bus did not deliver: {exc}") from exc
        finally:
            self._flushing = None
        self._acked = max(self._acked, upto)

    async def account(self, account_id: str) -> Account | None:
        """The stored account `account_id` (remembered once found: accounts never change)."""
        account = self._accounts.get(account_id)
        if account is not None:
            return account
        account = await self.store.get_account(account_id)
        if account is not None:
            self._accounts[account_id] = account
            if len(self._accounts) > ACCOUNT_CACHE_SIZE:
                self._accounts.popitem(last=False)
        return account

    async def prices_json(self, build: Callable[[], Awaitable[bytes]]) -> bytes:
        """The all-instruments price answer, from a read started less than `price_cache_s` ago.

        One read at a time (no stampede on Redis). Once the answer is half the cache time old
        a read starts in the background and requests keep the answer they have; they wait
        only when it is a whole cache time old (a waiting request used to be one Redis round
        trip slower each time the answer expired).
        """
        ttl = self.settings.price_cache_s
        if ttl <= 0:
            return await build()
        cached = self._prices
        if cached is not None:
            age = self.monotonic() - cached[0]
            if age < ttl:
                if age >= ttl / 2:
                    self._refresh_prices(build)
                return cached[1]
        await asyncio.shield(self._refresh_prices(build))
        cached = self._prices
        assert cached is not None  # the refresh stored it, or raised
        return cached[1]

    def _refresh_prices(self, build: Callable[[], Awaitable[bytes]]) -> asyncio.Future[None]:
        """The read under way, else a new one."""
        refresh = self._prices_refresh
        if refresh is None:
            refresh = self._prices_refresh = asyncio.ensure_future(self._read_prices(build))
            refresh.add_done_callback(self._prices_read)
        return refresh

    async def _read_prices(self, build: Callable[[], Awaitable[bytes]]) -> None:
        started = self.monotonic()
        body = await build()
        self._prices = (started, body)

    def _prices_read(self, future: asyncio.Future[None]) -> None:
        self._prices_refresh = None
        if not future.cancelled():
            future.exception()  # a background read's failure is raised to no one
