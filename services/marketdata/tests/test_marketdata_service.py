"""The marketdata stage's own expectations; what every stage must do is in tests/stages/."""

from __future__ import annotations

from quantmesh_common.topics import Topic
from quantmesh_marketdata.service import HANDLERS_ISSUE, MarketDataService


def test_declared_topics_match_the_design() -> None:
    assert MarketDataService.consumes == (Topic.CONTROL,)
    assert MarketDataService.produces == (Topic.MD_TICKS, Topic.MD_BARS, Topic.MD_BOOKS)


def test_handlers_are_announced_for_their_issue() -> None:
    assert HANDLERS_ISSUE == 3
