"""On the real Kafka and PostgreSQL: two risk instances in one group share a schema; the
instance that takes over an account's partition judges its next intent with the stored
position."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from decimal import Decimal
from typing import Any

import pytest

from quantmesh_common.bus.kafka import KafkaBus
from quantmesh_common.envelope import Envelope
from quantmesh_common.messages import RiskDecision, Side
from quantmesh_common.runtime import ServiceRunner
from quantmesh_common.testing import stubs
from quantmesh_common.testing.kafka import prefixed_topics, until
from quantmesh_common.topics import Topic, TopicRegistry
from quantmesh_risk.config import RiskSettings
from quantmesh_risk.service import RiskService

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

D = Decimal
ACC, BTC = stubs.ACCOUNT_ID, stubs.INSTRUMENT_ID


@pytest.fixture
async def topics() -> AsyncIterator[tuple[str, TopicRegistry]]:
    bootstrap = os.environ.get("QM_KAFKA_BOOTSTRAP")
    if not bootstrap:
        pytest.skip("QM_KAFKA_BOOTSTRAP is not set (start the stack: deploy/local/stack.sh up)")
    async with prefixed_topics(
        bootstrap, "riskassign", (*RiskService.consumes, *RiskService.produces)
    ) as made:
        yield made


class Instance:
    """One risk service on its own Kafka bus, in the test's groups, on the test's schema."""

    def __init__(
        self, name: str, prefix: str, names: TopicRegistry, dsn: str, delivery: str
    ) -> None:
        bootstrap = os.environ["QM_KAFKA_BOOTSTRAP"]
        settings = RiskSettings(
            bus="kafka",
            kafka_bootstrap=bootstrap,
            database_url=dsn,
            http_host="127.0.0.1",
            http_port=0,
            risk_limits={"default": {"max_position": "1"}},
            risk_topic_prefix=prefix,
            order_flow_delivery=delivery,
        )
        self.service = RiskService(settings)
        self.bus = KafkaBus(name, bootstrap, registry=names)
        self.runner = ServiceRunner(self.service, settings, bus=self.bus)
        self.stopped = False

    def assignment(self, topic: str) -> list[tuple[str, int]]:
        ctx = self.runner.ctx
        if ctx is None or self.stopped:
            return []
        return [(t, p) for s in ctx.subscriptions for t, p in s.assignment() if t == topic]

    async def stop(self) -> None:
        if not self.stopped:
            self.stopped = True
            await self.runner.stop()
            await self.bus.close()


@pytest.mark.parametrize("delivery", ["transactional", "idempotent"])
async def test_intent_when_another_instance_takes_over_the_account_sees_its_stored_position(
    topics: tuple[str, TopicRegistry], risk_dsn: str, risk_pool: Any, delivery: str
) -> None:
    # Arrange: two instances start on an empty schema and split the group's partitions; the
    # fill of 0.6 goes to the one owning the account's partition (the portfolio stores it),
    # and that one leaves.
    prefix, names = topics
    bootstrap = os.environ["QM_KAFKA_BOOTSTRAP"]
    intents = prefix + Topic.ORDERS_INTENTS
    partitions = names.partitions(intents)
    feed = KafkaBus("risk-assign-feed", bootstrap, registry=names)
    await feed.start()
    decisions: list[RiskDecision] = []

    def on_decision(envelope: Envelope[Any]) -> None:
        decisions.append(envelope.payload)

    watch = feed.subscribe(
        f"{prefix}watch",
        [prefix + Topic.ORDERS_APPROVED, prefix + Topic.ORDERS_REJECTED],
        on_decision,
    )
    await watch.start()
    first = Instance("risk-assign-1", prefix, names, risk_dsn, delivery)
    second = Instance("risk-assign-2", prefix, names, risk_dsn, delivery)
    try:
        await first.runner.start()
        await second.runner.start()
        await until(
            lambda: (
                bool(first.assignment(intents))
                and bool(second.assignment(intents))
                and len(first.assignment(intents)) + len(second.assignment(intents)) == partitions
            ),
            "both instances owning partitions",
        )
        fill = stubs.execution_report(
            client_order_id="F-1", trade_id="T-1", last_qty=D("0.6"), cum_qty=D("0.6")
        )
        await feed.publish(prefix + Topic.EXEC_REPORTS, fill)
        await feed.flush()
        await until(
            lambda: any(i.service.engine.position(ACC, BTC) == D("0.6") for i in (first, second)),
            "the fill counted",
        )
        await risk_pool.execute(
            "INSERT INTO positions (account_id, instrument_id, side, quantity, ts_event)"
            " VALUES ($1, $2, 'LONG', 0.6, 1)",
            ACC,
            BTC,
        )
        await risk_pool.execute(
            "INSERT INTO portfolio_applied_fills (account_id, instrument_id, fill_id, ts_event)"
            " VALUES ($1, $2, 'T-1', 1)",
            ACC,
            BTC,
        )
        owner = first if first.service.engine.position(ACC, BTC) == D("0.6") else second
        heir = second if owner is first else first
        await owner.stop()
        await until(lambda: len(heir.assignment(intents)) == partitions, "the takeover")

        # Act: 0.6 held + 0.5 bought = 1.1, beyond the max position of 1.
        intent = stubs.order_intent(
            intent_id="I-1", client_order_id="O-1", side=Side.BUY, quantity=D("0.5")
        )
        await feed.publish(intents, intent)
        await feed.flush()
        await until(lambda: len(decisions) == 1, "the decision")
    finally:
        await first.stop()
        await second.stop()
        await watch.stop()
        await feed.close()

    # Assert
    [decision] = decisions
    assert decision.reason == "POSITION_EXCEEDS_MAX"
    assert (decision.details["position"], decision.details["max_position"]) == ("0.6", "1")
    assert heir.service.reloads >= 1
