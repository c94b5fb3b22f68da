"""Sortable unique identifiers (UUIDv7, RFC 9562) for events and orders."""

from __future__ import annotations

import random
import threading
import time
import uuid

_lock = threading.Lock()
_last_ms = 0
_seq = 0
# The text of the last millisecond used, "tttttttt-tttt-7", as (ms, text): new_id runs on every
# publish, and the timestamp part of an id only changes once a millisecond.
_prefix: tuple[int, str] = (-1, "")
# event_id's texts of the last millisecond used: (ms, "tttttttt-tttt-7", "-rrrr-rrrrrrrrrrrr").
_event_parts: tuple[int, str, str] = (-1, "", "")
# Mersenne Twister seeded from os.urandom, and reseeded in forked children by the random
# module: unique across processes, and ten times cheaper than a urandom syscall per id.
_rand = random.Random()
random_bits = _rand.getrandbits
#: The 12-bit counter as the three hex digits an id holds: indexing this tuple costs a seventh
#: of formatting the number, on every id.
_HEX3 = tuple(f"{i:03x}" for i in range(0x1000))


def _next_ms_seq(ms: int) -> tuple[int, int]:
    global _last_ms, _seq
    with _lock:
        if ms <= _last_ms:
            _seq += 1
            if _seq > 0xFFF:  # counter exhausted: borrow the next millisecond
                _last_ms += 1
                _seq = 0
            return _last_ms, _seq
        _last_ms = ms
        _seq = random_bits(10)  # start low in the 12-bit space, leaving room to count up
        return ms, _seq


def uuid7_int(now_ns: int | None = None) -> int:
    """Return a UUIDv7 as an int: 48-bit Unix milliseconds, a 12-bit counter, 62 random bits.

    Identifiers made in one process strictly increase, also within one millisecond, because
    the counter (RFC 9562, method 1) is bumped while the clock has not moved.
    """
    ms, seq = _next_ms_seq((time.time_ns() if now_ns is None else now_ns) // 1_000_000)
    return (ms & 0xFFFF_FFFF_FFFF) << 80 | 0x7 << 76 | seq << 64 | 0b10 << 62 | random_bits(62)


def uuid7(now_ns: int | None = None) -> uuid.UUID:
    """Return a new UUIDv7."""
    return uuid.UUID(int=uuid7_int(now_ns))


def new_id() -> str:
    """Return a new sortable event id as a canonical (lower-case, dashed) UUID string.

    The same layout and ordering as `uuid7_int`, formatted without building the 128-bit int.
    """
    global _last_ms, _seq, _prefix
    ms = time.time_ns() // 1_000_000
    # _next_ms_seq inlined: this runs on every publish.
    with _lock:
        if ms <= _last_ms:
            seq = _seq + 1
            if seq > 0xFFF:
                _last_ms += 1
                seq = 0
            ms = _last_ms
        else:
            _last_ms = ms
            seq = random_bits(10)
        _seq = seq
        cached = _prefix
        if cached[0] != ms:
            h = f"{ms & 0xFFFF_FFFF_FFFF:012x}"
            cached = _prefix = (ms, f"{h[:8]}-{h[8:]}-7")
    # Variant 0b10 then 62 random bits: the top hex digit is 8-b, as in uuid7_int.
    tail = f"{0x8000_0000_0000_0000 | random_bits(62):016x}"
    return f"{cached[1]}{_HEX3[seq]}-{tail[:4]}-{tail[4:]}"


def event_id() -> str:
    """Return a new event id: a UUIDv7 like `new_id`'s, in the same increasing sequence.

    For envelopes, made on every publish: the 62 random bits are drawn once per millisecond
    (and process) instead of per id, so an id costs a counter step and one short format. Ids
    of one process stay unique and strictly increasing by (millisecond, counter), as `new_id`'s;
    two processes would have to draw the same 62 bits in the same millisecond to collide. Not
    for identifiers that must be hard to guess from another one (use `new_id`).
    """
    global _last_ms, _seq, _event_parts
    ms = time.time_ns() // 1_000_000
    with _lock:
        if ms <= _last_ms:
            seq = _seq + 1
            if seq > 0xFFF:
                _last_ms += 1
                seq = 0
            ms = _last_ms
        else:
            _last_ms = ms
            seq = random_bits(10)
        _seq = seq
        parts = _event_parts
        if parts[0] != ms:
            h = f"{ms & 0xFFFF_FFFF_FFFF:012x}"
            t = f"{0x8000_0000_0000_0000 | random_bits(62):016x}"
            parts = _event_parts = (ms, f"{h[:8]}-{h[8:]}-7", f"-{t[:4]}-{t[4:]}")
    # Two concatenations of cached texts: a quarter of the cost of one f-string of the parts.
    return parts[1] + _HEX3[seq] + parts[2]


def uuid7_time_ms(value: str | uuid.UUID) -> int:
    """Return the Unix millisecond timestamp embedded in a UUIDv7."""
    u = value if isinstance(value, uuid.UUID) else uuid.UUID(value)
    return u.int >> 80
