"""The oms stage's own expectations; what every stage must do is in tests/stages/."""

from __future__ import annotations

from quantmesh_common.topics import Topic
from quantmesh_oms.service import HANDLERS_ISSUE, OmsService


def test_declared_topics_match_the_design() -> None:
    assert OmsService.consumes == (Topic.ORDERS_APPROVED, Topic.EXEC_REPORTS, Topic.CONTROL)
    assert OmsService.produces == (Topic.ORDERS_COMMANDS, Topic.ORDERS_UPDATES)


def test_handlers_are_announced_for_their_issue() -> None:
    assert HANDLERS_ISSUE == 4
