"""Risk takes an instrument's trading rules from the venue (`ref.instruments`); the
configuration overrides them for the instruments it names."""

from __future__ import annotations

import json
from decimal import Decimal

from quantmesh_common.envelope import Envelope, encode
from quantmesh_common.messages import OrderType, Side
from quantmesh_common.testing import stubs
from quantmesh_common.topics import Topic, dlq
from quantmesh_risk.engine import RiskEngine
from quantmesh_risk.limits import RiskConfig

from .test_risk_service import NOW, _risk

D = Decimal
#: The venue's rules: coarser than the stub's (tick 0.01, lot 0.00001, min notional 5).
VENUE_RULES = {
    "tick_size": D("0.5"),
    "lot_size": D("0.001"),
    "min_notional": D("10"),
    "min_quantity": D("0.001"),
}


def _engine(*configured: object) -> RiskEngine:
    return RiskEngine(RiskConfig.model_validate({}), configured)  # type: ignore[arg-type]


def test_engine_when_the_venue_describes_an_instrument_rounds_to_its_lot() -> None:
    engine = _engine()
    engine.on_tick(stubs.tick(price=D("50000")))

    learnt = engine.on_instrument(stubs.instrument(**VENUE_RULES))
    decision = engine.evaluate(stubs.order_intent(quantity=D("0.12345")), NOW)

    assert learnt is True
    assert decision.approved is True
    # 0.12345 rounded down to a lot of 0.001
    assert decision.adjusted_quantity == D("0.123")


def test_engine_when_a_price_is_off_the_venues_tick_denies_it_with_the_values() -> None:
    engine = _engine()
    engine.on_instrument(stubs.instrument(**VENUE_RULES))

    decision = engine.evaluate(
        stubs.limit_order_intent(limit_price=D("49000.25"), quantity=D("0.1")), NOW
    )

    assert decision.approved is False
    assert decision.reason == "PRICE_NOT_ON_TICK"
    assert decision.details == {"field": "limit_price", "price": "49000.25", "tick_size": "0.5"}


def test_engine_when_a_quantity_is_below_the_venues_lot_denies_with_the_values() -> None:
    engine = _engine()
    engine.on_instrument(stubs.instrument(**VENUE_RULES))

    # 0.0002 is below one lot of 0.001 (the stub's lot, 0.00001, would pass it)
    decision = engine.evaluate(
        stubs.limit_order_intent(limit_price=D("49000.5"), quantity=D("0.0002")), NOW
    )

    assert decision.reason == "QUANTITY_BELOW_LOT"
    assert decision.details == {"quantity": "0.0002", "lot_size": "0.001"}


def test_engine_when_the_lot_rounded_order_is_worth_too_little_denies_notional_below_min() -> None:
    engine = _engine()
    engine.on_instrument(stubs.instrument(**VENUE_RULES))

    # 0.001 x 9000.5 = 9.0005 < 10
    decision = engine.evaluate(
        stubs.limit_order_intent(limit_price=D("9000.5"), quantity=D("0.001")), NOW
    )

    assert decision.reason == "NOTIONAL_BELOW_MIN"
    assert decision.details == {"notional": "9.0005", "min_notional": "10"}


def test_engine_when_the_configuration_names_the_instrument_keeps_the_configured_rules() -> None:
    engine = _engine(stubs.instrument())
    engine.on_tick(stubs.tick(price=D("50000")))

    learnt = engine.on_instrument(stubs.instrument(**VENUE_RULES))
    decision = engine.evaluate(stubs.order_intent(quantity=D("0.12345")), NOW)

    assert learnt is False
    assert engine.instruments[stubs.INSTRUMENT_ID].lot_size == D("0.00001")
    # The configured lot (0.00001) leaves 0.12345 whole; the venue's would have cut it.
    assert decision.approved is True
    assert decision.adjusted_quantity is None


def test_engine_when_the_venue_describes_an_instrument_again_takes_the_latest_rules() -> None:
    engine = _engine()
    engine.on_instrument(stubs.instrument(**VENUE_RULES))

    again = engine.on_instrument(stubs.instrument(**VENUE_RULES))
    changed = engine.on_instrument(stubs.instrument(**{**VENUE_RULES, "lot_size": D("0.01")}))

    assert again is False
    assert changed is True
    assert engine.instruments[stubs.INSTRUMENT_ID].lot_size == D("0.01")


def test_engine_when_the_venue_describes_an_instrument_it_is_no_longer_unknown() -> None:
    engine = RiskEngine(
        RiskConfig.model_validate({"default": {"allow_unknown_instruments": False}})
    )
    eth = stubs.instrument(
        instrument_id="ETH-USDT.SIM", symbol="ETH/USDT", base="ETH", min_notional=D(0)
    )
    before = engine.evaluate(stubs.order_intent(instrument_id="ETH-USDT.SIM"), NOW)

    engine.on_instrument(eth)
    after = engine.evaluate(
        stubs.order_intent(instrument_id="ETH-USDT.SIM", client_order_id="C-2"), NOW
    )

    assert before.reason == "UNKNOWN_INSTRUMENT"
    assert after.approved is True


async def test_service_when_an_instrument_arrives_on_ref_instruments_applies_its_lot() -> None:
    risk = await _risk()
    await risk.send(Topic.MD_TICKS, stubs.tick())

    await risk.send(Topic.REF_INSTRUMENTS, stubs.instrument(**VENUE_RULES))
    decision = await risk.decide(side=Side.SELL, quantity=D("0.0005"))

    assert decision.reason == "QUANTITY_BELOW_LOT"
    assert decision.details == {"quantity": "0.0005", "lot_size": "0.001"}


async def test_service_when_configured_and_the_venue_disagrees_applies_the_configuration() -> None:
    risk = await _risk(instruments=[stubs.instrument()])
    await risk.send(Topic.MD_TICKS, stubs.tick())

    await risk.send(Topic.REF_INSTRUMENTS, stubs.instrument(**VENUE_RULES))
    decision = await risk.decide(order_type=OrderType.LIMIT, limit_price=D("49000.01"))

    assert decision.approved is True


async def test_service_when_an_instrument_is_malformed_dead_letters_it_and_keeps_going() -> None:
    risk = await _risk()
    envelope = Envelope.wrap(
        stubs.instrument(**VENUE_RULES), source="test", ts_event=NOW, ts_init=NOW
    )
    document = json.loads(encode(envelope))
    document["payload"]["lot_size"] = "-0.001"
    await risk.bus.publish_raw(Topic.REF_INSTRUMENTS, json.dumps(document).encode())
    await risk.bus.publish(Topic.REF_INSTRUMENTS, stubs.tick())
    await risk.bus.run_until_idle()

    await risk.send(Topic.REF_INSTRUMENTS, stubs.instrument(**VENUE_RULES))
    decision = await risk.decide(quantity=D("0.0005"))

    assert len(risk.bus.records(dlq(Topic.REF_INSTRUMENTS))) == 2
    assert decision.reason == "QUANTITY_BELOW_LOT"
