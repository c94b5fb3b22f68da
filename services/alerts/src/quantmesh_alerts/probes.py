"""What the stage measures itself: stages' readiness over HTTP (and consumer lag on Kafka)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from dataclasses import dataclass

import aiohttp

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ProbeResult:
    """One readiness probe: which service, where, and why it failed (None: it answered 2xx)."""

    service: str
    url: str
    error: str | None


class HealthProber:
    """GETs each stage's readiness URL (every stage serves `/readyz`): 2xx is healthy."""

    def __init__(self, targets: Mapping[str, str], *, timeout_s: float) -> None:
        self.targets = dict(targets)
        self.timeout_s = timeout_s
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self.timeout_s)
            )
        return self._session

    async def probe(self, service: str, url: str) -> ProbeResult:
        """Probe one URL; the error says what went wrong (status, refusal, timeout)."""
        try:
            async with self._client().get(url, allow_redirects=False) as response:
                status = response.status
        except TimeoutError:
            return ProbeResult(service, url, f"no answer within {self.timeout_s}s")
        except aiohttp.ClientError as exc:
            return ProbeResult(service, url, f"{type(exc).__name__}: {exc}")
        if 200 <= status < 300:
            return ProbeResult(service, url, None)
        return ProbeResult(service, url, f"HTTP {status}")

    async def probe_all(self) -> list[ProbeResult]:
        """Probe every target concurrently, in the order they were configured."""
        return list(
            await asyncio.gather(*(self.probe(name, url) for name, url in self.targets.items()))
        )

    async def close(self) -> None:
        """Close the HTTP session."""
        if self._session is not None:
            await self._session.close()
