"""Behaviour of the in-memory bus beyond the shared contract: determinism, retention, clocks."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest

from quantmesh_common.bus.base import Emit, SubscriptionState
from quantmesh_common.bus.memory import InMemoryBus
from quantmesh_common.clock import SimulatedClock
from quantmesh_common.envelope import Envelope, encode
from quantmesh_common.testing import stubs
from quantmesh_common.topics import Topic, dlq


async def _run_pipeline(seed_prices: list[str]) -> list[bytes]:
    """Ticks -> a doubling stage -> a sink; returns the sink's envelopes as bytes, ids aside."""
    clock = SimulatedClock(stubs.TS)
    bus = InMemoryBus("pipeline", clock=clock, retain=True)

    def double(env: Envelope[Any]) -> list[Emit]:
        tick = env.payload
        return [Emit(Topic.MD_TICKS + ".x2", tick.model_copy(update={"price": tick.price * 2}))]

    await bus.subscribe("doubler", [Topic.MD_TICKS], double).start()
    for i, price in enumerate(seed_prices):
        clock.advance(1)
        await bus.publish(
            Topic.MD_TICKS, stubs.tick(price=Decimal(price), instrument_id=f"I{i % 3}-USDT.SIM")
        )
        await bus.run_until_idle()
    out = bus.records(Topic.MD_TICKS + ".x2")
    return [
        encode(
            r.envelope.model_copy(update={"event_id": "", "correlation_id": "", "causation_id": ""})
        )
        for r in out
        if r.envelope is not None
    ]


async def test_run_until_idle_when_same_inputs_gives_byte_identical_outputs() -> None:
    prices = ["1.5", "2.25", "3.125", "100", "0.0001"]

    first = await _run_pipeline(prices)
    second = await _run_pipeline(prices)

    assert first == second
    assert len(first) == len(prices)
    assert b'"price":"3.0"' in first[0] or b'"price":"3.00"' in first[0]


async def test_emitted_events_are_delivered_after_earlier_published_ones() -> None:
    bus = InMemoryBus("order", retain=True)
    seen: list[str] = []

    def stage_a(env: Envelope[Any]) -> list[Emit]:
        seen.append(f"a:{env.payload.trade_id}")
        return [Emit(Topic.SIGNALS, stubs.signal())]

    def stage_b(env: Envelope[Any]) -> None:
        seen.append("b")

    await bus.subscribe("a", [Topic.MD_TICKS], stage_a).start()
    await bus.subscribe("b", [Topic.SIGNALS], stage_b).start()
    await bus.publish(Topic.MD_TICKS, stubs.tick(trade_id="1"))
    await bus.publish(Topic.MD_TICKS, stubs.tick(trade_id="2"))

    delivered = await bus.run_until_idle()

    assert seen == ["a:1", "a:2", "b", "b"]
    assert delivered == 4
    assert bus.pending() == 0


async def test_group_without_members_keeps_messages_until_a_member_joins() -> None:
    bus = InMemoryBus("late")
    got: list[str] = []
    member = bus.subscribe("g", [Topic.MD_TICKS], lambda env: got.append(env.payload.trade_id))
    await member.start()
    await member.stop()
    for i in range(5):
        await bus.publish(Topic.MD_TICKS, stubs.tick(trade_id=str(i)))
    await bus.run_until_idle()
    assert got == []

    await bus.subscribe("g", [Topic.MD_TICKS], lambda env: got.append(env.payload.trade_id)).start()
    await bus.run_until_idle()

    assert got == [str(i) for i in range(5)]


async def test_records_when_retain_is_off_raises() -> None:
    bus = InMemoryBus("noretain")
    with pytest.raises(RuntimeError, match="retain=True"):
        bus.records(Topic.MD_TICKS)


async def test_handler_crash_fails_only_that_member_and_keeps_offset_uncommitted() -> None:
    class Crash(BaseException):
        pass

    bus = InMemoryBus("crash")

    def boom(env: Envelope[Any]) -> None:
        raise Crash

    member = bus.subscribe("g", [Topic.CONTROL], boom)
    await member.start()
    await bus.publish(Topic.CONTROL, stubs.control_command())

    await bus.run_until_idle()

    assert member.state is SubscriptionState.FAILED
    assert isinstance(member.error, Crash)
    assert bus.committed("g") == {}
    assert bus.pending() == 1


async def test_dead_letter_keeps_source_partition_and_original_bytes() -> None:
    bus = InMemoryBus("dlq", retain=True)

    def reject(env: Envelope[Any]) -> None:
        raise ValueError("bad tick")

    await bus.subscribe("g", [Topic.MD_TICKS], reject).start()
    env = await bus.publish(Topic.MD_TICKS, stubs.tick())

    await bus.run_until_idle()

    [source] = bus.records(Topic.MD_TICKS)
    [letter] = bus.records(dlq(Topic.MD_TICKS))
    assert letter.partition == source.partition
    assert letter.value() == encode(env)
    assert letter.header("qm-error") == b"ValueError: bad tick"
    assert letter.header("qm-dlq-group") == b"g"
    assert bus.committed("g") == {(Topic.MD_TICKS, source.partition): 1}


async def test_simulated_clock_stamps_envelopes_and_wakes_sleepers_in_order() -> None:
    clock = SimulatedClock(1_000)
    bus = InMemoryBus("clock", clock=clock)
    env = await bus.publish(Topic.MD_TICKS, stubs.tick())
    fired: list[int] = []
    clock.call_at(3_000, lambda: fired.append(clock.now_ns()))
    clock.call_at(2_000, lambda: fired.append(clock.now_ns()))

    clock.advance_to(5_000)

    assert env.ts_init == 1_000
    assert fired == [2_000, 3_000]
    assert clock.now_ns() == 5_000
    with pytest.raises(ValueError, match="cannot go back"):
        clock.advance_to(4_000)


async def test_failing_handler_on_a_dead_letter_topic_skips_instead_of_looping() -> None:
    bus = InMemoryBus("dlq-reader", retain=True)

    def reject(env: Envelope[Any]) -> None:
        raise ValueError("still bad")

    await bus.subscribe("g", [Topic.MD_TICKS], reject).start()
    await bus.subscribe("dlq-g", [dlq(Topic.MD_TICKS)], reject).start()
    await bus.publish(Topic.MD_TICKS, stubs.tick())

    delivered = await bus.run_until_idle()

    assert delivered == 2
    assert len(bus.records(dlq(Topic.MD_TICKS))) == 1
    assert bus.pending() == 0
