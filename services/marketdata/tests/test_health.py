"""Backoff with jitter and the feed-health rules, as plain logic."""

from __future__ import annotations

import random

from quantmesh_common.messages import AlertSeverity
from quantmesh_marketdata.health import Backoff, FeedHealth

S = 1_000_000_000
ID = "BTC-USDT.BINANCE"


def test_backoff_when_failures_repeat_grows_exponentially_up_to_the_cap() -> None:
    backoff = Backoff(base_s=1.0, cap_s=8.0, floor_s=0.0, rng=random.Random(7))

    delays = [backoff.next_delay() for _ in range(6)]

    # full jitter: attempt n waits at most min(8, 1 * 2^n) = 1, 2, 4, 8, 8, 8
    assert all(0.0 <= d <= c for d, c in zip(delays, [1, 2, 4, 8, 8, 8], strict=True))
    assert len(set(delays)) == 6  # jittered, not in lock step


def test_backoff_when_reset_starts_again_from_the_base() -> None:
    backoff = Backoff(base_s=1.0, cap_s=30.0, floor_s=0.0, rng=random.Random(1))
    for _ in range(5):
        backoff.next_delay()

    backoff.reset()

    assert backoff.next_delay() <= 1.0


def test_backoff_when_jitter_draws_zero_waits_at_least_the_floor() -> None:
    class Zero(random.Random):
        def uniform(self, a: float, b: float) -> float:
            return 0.0

    assert Backoff(floor_s=0.05, rng=Zero()).next_delay() == 0.05


def test_check_stale_when_silent_past_threshold_alerts_once_per_episode() -> None:
    health = FeedHealth("BINANCE", stale_after_ns=5 * S)
    health.register("trades", ID, 0)

    early = health.check_stale(4 * S)
    first = health.check_stale(5 * S)
    again = health.check_stale(9 * S)

    assert early == []
    assert [a.code for a in first] == ["FEED_STALE"]
    assert first[0].severity is AlertSeverity.WARNING
    assert first[0].details["silent_s"] == "5.000"
    assert again == []


def test_on_update_when_stream_was_stale_alerts_recovered_and_rearms() -> None:
    health = FeedHealth("BINANCE", stale_after_ns=5 * S)
    health.register("trades", ID, 0)
    health.check_stale(6 * S)

    recovered = health.on_update("trades", ID, 7 * S)
    quiet = health.on_update("trades", ID, 8 * S)
    stale_again = health.check_stale(13 * S)

    assert [a.code for a in recovered] == ["FEED_RECOVERED"]
    assert recovered[0].details["was"] == "stale"
    assert quiet == []
    assert [a.code for a in stale_again] == ["FEED_STALE"]


def test_on_disconnect_when_retries_fail_repeatedly_alerts_once() -> None:
    health = FeedHealth("BINANCE", stale_after_ns=5 * S)

    first = health.on_disconnect("trades", ID, "refused", 0.5, 1)
    second = health.on_disconnect("trades", ID, "refused", 1.0, 2)

    assert [a.code for a in first] == ["FEED_DISCONNECTED"]
    assert first[0].details["retry_in_s"] == "0.500"
    assert second == []


def test_on_trade_id_when_ids_skip_reports_the_missing_count() -> None:
    health = FeedHealth("BINANCE", stale_after_ns=5 * S, sequential_trade_ids=True)
    health.on_trade_id(ID, "100", 1)
    health.on_trade_id(ID, "101", 1)

    gap = health.on_trade_id(ID, "105", 2)
    replayed = health.on_trade_id(ID, "103", 3)

    assert [a.code for a in gap] == ["FEED_GAP"]
    assert (gap[0].details["after_id"], gap[0].details["missing"]) == ("101", "3")
    assert replayed == []


def test_on_trade_id_when_venue_ids_are_not_sequential_never_alerts() -> None:
    health = FeedHealth("BYBIT", stale_after_ns=5 * S, sequential_trade_ids=False)
    health.on_trade_id(ID, "1", 1)

    assert health.on_trade_id(ID, "9", 2) == []
