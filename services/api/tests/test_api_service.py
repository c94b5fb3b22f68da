"""The api stage's own expectations; what every stage must do is in tests/stages/."""

from __future__ import annotations

from quantmesh_api.service import HANDLERS_ISSUE, ApiService
from quantmesh_common.topics import Topic


def test_declared_topics_match_the_design() -> None:
    assert ApiService.consumes == (
        Topic.ORDERS_UPDATES,
        Topic.EXEC_REPORTS,
        Topic.PORTFOLIO_UPDATES,
        Topic.PORTFOLIO_SNAPSHOTS,
        Topic.ALERTS,
    )
    assert ApiService.produces == (Topic.CONTROL, Topic.ORDERS_INTENTS)


def test_handlers_are_announced_for_their_issue() -> None:
    assert HANDLERS_ISSUE == 6
