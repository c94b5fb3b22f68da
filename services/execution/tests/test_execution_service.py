"""The execution stage's own expectations; what every stage must do is in tests/stages/."""

from __future__ import annotations

from quantmesh_common.topics import Topic
from quantmesh_execution.service import HANDLERS_ISSUE, ExecutionService


def test_declared_topics_match_the_design() -> None:
    assert ExecutionService.consumes == (
        Topic.ORDERS_COMMANDS,
        Topic.MD_TICKS,
        Topic.MD_BOOKS,
        Topic.CONTROL,
    )
    assert ExecutionService.produces == (Topic.EXEC_REPORTS,)


def test_handlers_are_announced_for_their_issue() -> None:
    assert HANDLERS_ISSUE == 4
