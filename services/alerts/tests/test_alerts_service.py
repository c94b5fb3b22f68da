"""The alerts stage's own expectations; what every stage must do is in tests/stages/."""

from __future__ import annotations

from quantmesh_alerts.service import HANDLERS_ISSUE, AlertsService
from quantmesh_common.topics import Topic


def test_declared_topics_match_the_design() -> None:
    assert AlertsService.consumes == (
        Topic.ORDERS_REJECTED,
        Topic.EXEC_REPORTS,
        Topic.ALERTS,
        Topic.CONTROL,
    )
    assert AlertsService.produces == ()


def test_handlers_are_announced_for_their_issue() -> None:
    assert HANDLERS_ISSUE == 4
