"""The risk stage's own expectations; what every stage must do is in tests/stages/."""

from __future__ import annotations

from quantmesh_common.topics import Topic
from quantmesh_risk.service import HANDLERS_ISSUE, RiskService


def test_declared_topics_match_the_design() -> None:
    assert RiskService.consumes == (
        Topic.ORDERS_INTENTS,
        Topic.PORTFOLIO_UPDATES,
        Topic.MD_TICKS,
        Topic.CONTROL,
    )
    assert RiskService.produces == (Topic.ORDERS_APPROVED, Topic.ORDERS_REJECTED, Topic.ALERTS)


def test_handlers_are_announced_for_their_issue() -> None:
    assert HANDLERS_ISSUE == 4
