"""Feed health as plain logic: reconnect backoff, stale streams, trade-id gaps -> Alert events."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from quantmesh_common.ids import new_id
from quantmesh_common.messages import Alert, AlertSeverity

SOURCE = "marketdata"


@dataclass
class Backoff:
    """Exponential backoff with full jitter: attempt n waits uniform(0, min(cap, base * 2^n)).

    Full jitter keeps many clients that lost one venue at once from reconnecting in step.
    `floor` keeps a minimum wait so a venue that refuses at once is not hammered.
    """

    base_s: float = 0.5
    cap_s: float = 30.0
    floor_s: float = 0.05
    rng: random.Random = field(default_factory=random.Random)
    attempt: int = 0

    def next_delay(self) -> float:
        """The wait before the next attempt; each call counts one more failure."""
        ceiling = min(self.cap_s, self.base_s * (2.0**self.attempt))
        self.attempt += 1
        return max(self.floor_s, self.rng.uniform(0.0, ceiling))

    def reset(self) -> None:
        """A success: the next failure starts from `base_s` again."""
        self.attempt = 0


def _alert(
    severity: AlertSeverity,
    code: str,
    message: str,
    now_ns: int,
    instrument_id: str | None,
    details: dict[str, str],
) -> Alert:
    return Alert(
        alert_id=new_id(),
        severity=severity,
        source_service=SOURCE,
        code=code,
        message=message,
        instrument_id=instrument_id,
        details=details,
        ts_event=now_ns,
    )


@dataclass
class _Stream:
    instrument_id: str
    channel: str
    last_update_ns: int
    stale: bool = False
    down: bool = False
    last_trade_id: int | None = None


class FeedHealth:
    """Tracks each (channel, instrument) stream of one venue and says when to raise an alert.

    Alerts (on `alerts`, source `marketdata`): FEED_STALE when a stream had no update for
    `stale_after_ns`, FEED_RECOVERED when it updates again or reconnects, FEED_DISCONNECTED on a
    failed watch, FEED_GAP when consecutive trade ids skip, BOOK_RESYNC when a book's sequence
    broke and it is being rebuilt from a snapshot. Each episode raises one alert, not one per check.
    """

    def __init__(self, venue: str, stale_after_ns: int, sequential_trade_ids: bool = False) -> None:
        self.venue = venue
        self.stale_after_ns = stale_after_ns
        self.sequential_trade_ids = sequential_trade_ids
        self._streams: dict[tuple[str, str], _Stream] = {}

    def _stream(self, channel: str, instrument_id: str, now_ns: int) -> _Stream:
        key = (channel, instrument_id)
        stream = self._streams.get(key)
        if stream is None:
            stream = self._streams[key] = _Stream(instrument_id, channel, now_ns)
        return stream

    def register(self, channel: str, instrument_id: str, now_ns: int) -> None:
        """Start watching a stream: it is stale if nothing arrives within the threshold."""
        self._stream(channel, instrument_id, now_ns)

    def on_update(self, channel: str, instrument_id: str, now_ns: int) -> list[Alert]:
        """Data arrived on a stream: FEED_RECOVERED if it was stale or down."""
        stream = self._stream(channel, instrument_id, now_ns)
        stream.last_update_ns = now_ns
        if not (stream.stale or stream.down):
            return []
        what = "stale" if stream.stale else "disconnected"
        stream.stale = stream.down = False
        return [
            _alert(
                AlertSeverity.INFO,
                "FEED_RECOVERED",
                f"{self.venue} {channel} {instrument_id}: updates again after being {what}",
                now_ns,
                instrument_id,
                {"venue": self.venue, "channel": channel, "was": what},
            )
        ]

    def on_trade_id(self, instrument_id: str, trade_id: str | None, now_ns: int) -> list[Alert]:
        """FEED_GAP when a venue with consecutive integer trade ids skips some."""
        if not self.sequential_trade_ids or trade_id is None or not trade_id.isdigit():
            return []
        stream = self._stream("trades", instrument_id, now_ns)
        current = int(trade_id)
        previous, stream.last_trade_id = (
            stream.last_trade_id,
            max(current, stream.last_trade_id or 0),
        )
        if previous is None or current <= previous + 1:
            return []
        missing = current - previous - 1
        return [
            _alert(
                AlertSeverity.WARNING,
                "FEED_GAP",
                f"{self.venue} trades {instrument_id}: {missing} missing after trade id {previous}",
                now_ns,
                instrument_id,
                {
                    "venue": self.venue,
                    "after_id": str(previous),
                    "next_id": str(current),
                    "missing": str(missing),
                },
            )
        ]

    def on_disconnect(
        self, channel: str, instrument_id: str, error: str, retry_in_s: float, now_ns: int
    ) -> list[Alert]:
        """A watch failed (connection lost or refused): FEED_DISCONNECTED once per outage."""
        stream = self._stream(channel, instrument_id, now_ns)
        if stream.down:
            return []
        stream.down = True
        return [
            _alert(
                AlertSeverity.WARNING,
                "FEED_DISCONNECTED",
                f"{self.venue} {channel} {instrument_id}: {error}; reconnecting",
                now_ns,
                instrument_id,
                {
                    "venue": self.venue,
                    "channel": channel,
                    "error": error[:200],
                    "retry_in_s": f"{retry_in_s:.3f}",
                },
            )
        ]

    def on_book_gap(self, instrument_id: str, error: str, now_ns: int) -> list[Alert]:
        """A book's update sequence broke: it is dropped and rebuilt from a new snapshot."""
        return [
            _alert(
                AlertSeverity.WARNING,
                "BOOK_RESYNC",
                f"{self.venue} book {instrument_id}: sequence gap, resynchronising from a snapshot",
                now_ns,
                instrument_id,
                {"venue": self.venue, "error": error[:200]},
            )
        ]

    def check_stale(self, now_ns: int) -> list[Alert]:
        """FEED_STALE for each stream silent for longer than the threshold (once per episode)."""
        alerts: list[Alert] = []
        for stream in self._streams.values():
            silent_ns = now_ns - stream.last_update_ns
            if stream.stale or silent_ns < self.stale_after_ns:
                continue
            stream.stale = True
            alerts.append(
                _alert(
                    AlertSeverity.WARNING,
                    "FEED_STALE",
                    f"{self.venue} {stream.channel} {stream.instrument_id}: no update for "
                    f"{silent_ns / 1e9:.1f} s",
                    now_ns,
                    stream.instrument_id,
                    {
                        "venue": self.venue,
                        "channel": stream.channel,
                        "silent_s": f"{silent_ns / 1e9:.3f}",
                    },
                )
            )
        return alerts

    def is_stale(self, channel: str, instrument_id: str) -> bool:
        """Whether the stream is in a stale episode."""
        stream = self._streams.get((channel, instrument_id))
        return stream is not None and stream.stale
