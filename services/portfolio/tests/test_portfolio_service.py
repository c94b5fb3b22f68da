"""The portfolio stage's own expectations; what every stage must do is in tests/stages/."""

from __future__ import annotations

from quantmesh_common.topics import Topic
from quantmesh_portfolio.service import HANDLERS_ISSUE, PortfolioService


def test_declared_topics_match_the_design() -> None:
    assert PortfolioService.consumes == (
        Topic.EXEC_REPORTS,
        Topic.MD_TICKS,
        Topic.MD_BARS,
        Topic.CONTROL,
    )
    assert PortfolioService.produces == (Topic.PORTFOLIO_UPDATES, Topic.PORTFOLIO_SNAPSHOTS)


def test_handlers_are_announced_for_their_issue() -> None:
    assert HANDLERS_ISSUE == 4
