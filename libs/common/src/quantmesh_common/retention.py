"""The background pruning of rows a stage keeps only while their input can be redelivered."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

log = logging.getLogger(__name__)

#: How often a stage deletes its old rows: a row outliving its retention by minutes costs
#: nothing, and each run is one indexed DELETE.
PRUNE_INTERVAL_S = 600.0


async def prune_forever(
    prune: Callable[[int], Awaitable[int]],
    retention_ns: int,
    what: str,
    *,
    interval_s: float = PRUNE_INTERVAL_S,
) -> None:
    """Call `prune(retention_ns)` now and then every `interval_s` seconds, for ever.

    `prune` deletes the rows stored more than `retention_ns` ago and returns how many; `what`
    names them in the log. A background task (`ServiceContext.add_task`): a failure (the
    database away) is logged and tried again at the next interval, never fatal. The interval is
    wall time, as the rows' age is the database's clock, not the stage's (a replay simulates it).
    """
    while True:
        try:
            pruned = await prune(retention_ns)
        except Exception:
            log.warning("pruning old %s failed; retrying later", what, exc_info=True)
        else:
            if pruned:
                log.info(
                    "pruned %d %s stored more than %d s ago",
                    pruned,
                    what,
                    retention_ns // 1_000_000_000,
                )
        await asyncio.sleep(interval_s)
