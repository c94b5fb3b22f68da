"""Tests of the background prune loop: a failed prune is logged and tried again."""

from __future__ import annotations

import logging

import pytest

from quantmesh_common.retention import prune_forever

DAY_NS = 86400 * 1_000_000_000


class Stop(BaseException):
    """Ends the loop from inside a prune (the loop survives any Exception)."""


async def test_prune_forever_when_a_prune_fails_logs_it_and_prunes_again_next_time(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Arrange: the database is away at the first prune; the second deletes 2 rows.
    calls: list[int] = []

    async def prune(older_than_ns: int) -> int:
        calls.append(older_than_ns)
        if len(calls) == 1:
            raise OSError("connection refused")
        if len(calls) == 3:
            raise Stop
        return 2

    # Act
    with caplog.at_level(logging.INFO, logger="quantmesh_common.retention"), pytest.raises(Stop):
        await prune_forever(prune, DAY_NS, "test rows", interval_s=0)

    # Assert
    assert calls == [DAY_NS, DAY_NS, DAY_NS]
    assert [(r.levelname, r.getMessage()) for r in caplog.records] == [
        ("WARNING", "pruning old test rows failed; retrying later"),
        ("INFO", "pruned 2 test rows stored more than 86400 s ago"),
    ]
