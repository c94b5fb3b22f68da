"""Risk test harness: a fresh migrated schema, the stage in memory or on Kafka, numbered intents."""

from __future__ import annotations

from typing import Any

from quantmesh_common.messages import RiskDecision
from quantmesh_common.testing import stubs
from quantmesh_common.testing.harness import StageHarness
from quantmesh_common.testing.kafka import kafka_settings
from quantmesh_common.testing.postgres import migrated_schema_fixtures
from quantmesh_common.topics import Topic
from quantmesh_risk.config import RiskSettings
from quantmesh_risk.service import RiskService

risk_dsn, risk_pool = migrated_schema_fixtures("qm_test_risk", dsn="risk_dsn", pool="risk_pool")


def new_risk(**settings: Any) -> RiskService:
    """A risk stage on the in-memory bus, configured by `settings`."""
    return RiskService(RiskSettings(bus="memory", http_port=0, **settings))


def kafka_risk(prefix: str, dsn: str | None, **settings: Any) -> RiskService:
    """A risk stage on the stack's broker, on the topics (and in the groups) under `prefix`,
    reading the state it reloads from `dsn`'s schema, or keeping it in memory without one."""
    return RiskService(RiskSettings(**kafka_settings(dsn), risk_topic_prefix=prefix, **settings))


class Deciding(StageHarness[RiskService]):
    """The risk stage on its own in-memory bus; `decide` sends intents O-1, O-2, ... in turn."""

    count = 0

    async def decide(self, **intent: Any) -> RiskDecision:
        """Send the next numbered intent (`intent` sets its fields); return its decision."""
        self.count += 1
        cid = f"O-{self.count}"
        await self.send(
            Topic.ORDERS_INTENTS,
            stubs.order_intent(intent_id=f"I-{cid}", client_order_id=cid, **intent),
        )
        decisions = self.payloads(Topic.ORDERS_APPROVED) + self.payloads(Topic.ORDERS_REJECTED)
        found: RiskDecision = next(d for d in decisions if d.intent.client_order_id == cid)
        return found
