"""The signals stage's own expectations; what every stage must do is in tests/stages/."""

from __future__ import annotations

from quantmesh_common.topics import Topic
from quantmesh_signals.service import HANDLERS_ISSUE, SignalsService


def test_declared_topics_match_the_design() -> None:
    assert SignalsService.consumes == (Topic.MD_TICKS, Topic.MD_BARS, Topic.MD_BOOKS, Topic.CONTROL)
    assert SignalsService.produces == (Topic.SIGNALS, Topic.ORDERS_INTENTS)


def test_handlers_are_announced_for_their_issue() -> None:
    assert HANDLERS_ISSUE == 3
