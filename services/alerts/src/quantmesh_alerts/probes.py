"""What the stage measures itself: stages' readiness over HTTP (and consumer lag on Kafka)."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any

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


#: The group id of the probe's own consumer (it never subscribes, so it never lags).
LAG_PROBE_GROUP = "alerts.lag-probe"


def is_group_pattern(name: str) -> bool:
    """Whether a consumer_lag rule's group is a glob pattern (`*`, `?` or `[`) or a name."""
    return any(c in name for c in "*?[")


class KafkaLagReader:
    """Measures consumer groups' lag on Kafka: high watermark minus committed offset.

    Blocking (confluent_kafka); the stage runs `measure` in a worker thread. The consumer
    here never subscribes, so it joins no group: it only asks for watermarks.
    """

    def __init__(self, bootstrap: str, *, timeout_s: float = 10.0) -> None:
        self.bootstrap = bootstrap
        self.timeout_s = timeout_s
        self._admin: Any = None
        self._consumer: Any = None
        # A measurement still running in its thread when the stage stops must not meet close.
        self._lock = threading.Lock()

    def _clients(self) -> tuple[Any, Any]:
        if self._admin is None:
            from confluent_kafka import Consumer
            from confluent_kafka.admin import AdminClient

            self._admin = AdminClient({"bootstrap.servers": self.bootstrap})
            self._consumer = Consumer(
                {
                    "bootstrap.servers": self.bootstrap,
                    "group.id": LAG_PROBE_GROUP,
                    "enable.auto.commit": False,
                }
            )
        return self._admin, self._consumer

    def measure(self, groups: Sequence[str]) -> dict[tuple[str, str], int]:
        """Messages behind per (group, topic), summed over the partitions the group committed.

        A name with a glob pattern (`*`, `?`, `[...]`, as in `oms*` or `*`) stands for every
        group on the broker it matches, looked up each time (this probe's own group aside).
        A partition without a committed offset is left out (its lag is unknown, not zero); a
        group that cannot be read is logged and left out.
        """
        with self._lock:
            return self._measure(groups)

    def _measure(self, groups: Sequence[str]) -> dict[tuple[str, str], int]:
        from confluent_kafka import ConsumerGroupTopicPartitions, KafkaException, TopicPartition

        admin, consumer = self._clients()
        lags: dict[tuple[str, str], int] = {}
        for group in self._resolve(admin, groups):
            try:
                # One group per request: the client supports no more.
                futures = admin.list_consumer_group_offsets(
                    [ConsumerGroupTopicPartitions(group)], request_timeout=self.timeout_s
                )
                committed = futures[group].result(timeout=self.timeout_s).topic_partitions or []
                for tp in committed:
                    if tp.offset < 0:
                        continue
                    _, high = consumer.get_watermark_offsets(
                        TopicPartition(tp.topic, tp.partition), timeout=self.timeout_s
                    )
                    key = (group, tp.topic)
                    lags[key] = lags.get(key, 0) + max(0, high - tp.offset)
            except (KafkaException, TimeoutError) as exc:
                log.warning("cannot measure the lag of consumer group %s: %s", group, exc)
        return lags

    def _resolve(self, admin: Any, groups: Sequence[str]) -> list[str]:
        """`groups` with each pattern replaced by the broker's groups it matches, sorted."""
        names = {g for g in groups if not is_group_pattern(g)}
        patterns = [g for g in groups if is_group_pattern(g)]
        if patterns:
            from confluent_kafka import KafkaException

            try:
                listed = admin.list_consumer_groups(request_timeout=self.timeout_s)
                found = listed.result(timeout=self.timeout_s).valid
            except (KafkaException, TimeoutError) as exc:
                log.warning("cannot list the consumer groups: %s", exc)
                found = []
            for listing in found:
                name = listing.group_id
                if name != LAG_PROBE_GROUP and any(fnmatchcase(name, p) for p in patterns):
                    names.add(name)
        return sorted(names)

    def close(self) -> None:
        """Close the watermark consumer."""
        with self._lock:
            if self._consumer is not None:
                self._consumer.close()
                self._consumer = None
                self._admin = None
