"""Two portfolio instances on one in-memory bus: each marks its accounts' positions with the ticks
of every instrument, whichever half of the market-data partitions a shared group would have
given it (the market data is a broadcast subscription; the fills stay split by account)."""

from __future__ import annotations

import zlib
from decimal import Decimal

from quantmesh_common.bus.memory import InMemoryBus
from quantmesh_common.clock import SimulatedClock
from quantmesh_common.messages import PortfolioSnapshot
from quantmesh_common.testing import stubs
from quantmesh_common.topics import Topic, registry
from quantmesh_portfolio.service import MARKET_DATA_GROUP

from .conftest import T0, PortfolioMember, account_buy, new_portfolio

D = Decimal
S = stubs.SECOND_NS
BTC, ETH = "BTC-USDT.SIM", "ETH-USDT.SIM"
#: exec.reports partition 0: the first member's half of 6 in a group of two.
ACC_FIRST = "acc-4"
#: exec.reports partition 3: the second member's half.
ACC_SECOND = "acc-2"


def _partition(topic: str, key: str) -> int:
    """The partition the in-memory bus gives `key` (crc32)."""
    return zlib.crc32(key.encode()) % registry().partitions(topic)


async def test_ticks_when_two_instances_split_accounts_mark_each_position_held() -> None:
    # Arrange: in a shared group of two, ETH's market data (partition 9 of 12) would go to the
    # second member and BTC's (1) to the first, while ACC_FIRST (holding ETH) is the first's and
    # ACC_SECOND (holding BTC) the second's: each account holds the other half's instrument.
    assert (_partition(Topic.MD_TICKS, BTC), _partition(Topic.MD_TICKS, ETH)) == (1, 9)
    assert _partition(Topic.EXEC_REPORTS, ACC_FIRST) == 0
    assert _partition(Topic.EXEC_REPORTS, ACC_SECOND) == 3
    clock = SimulatedClock(T0)
    bus = InMemoryBus("test", clock=clock, retain=True)
    first = await PortfolioMember.join(new_portfolio(), bus, clock)
    second = await PortfolioMember.join(new_portfolio(), bus, clock)
    await bus.publish(Topic.EXEC_REPORTS, account_buy(ACC_FIRST, "2", "3000", 1, instrument_id=ETH))
    await bus.publish(
        Topic.EXEC_REPORTS, account_buy(ACC_SECOND, "0.5", "50000", 1, instrument_id=BTC)
    )
    await bus.run_until_idle()
    assert (first.accounts(), second.accounts()) == ({ACC_FIRST}, {ACC_SECOND})

    # Act: both instruments tick within the minute; a tick after it closes the minute.
    await bus.publish(
        Topic.MD_TICKS, stubs.tick(instrument_id=ETH, price=D("3100"), ts_event=T0 + 2 * S)
    )
    await bus.publish(
        Topic.MD_TICKS, stubs.tick(instrument_id=BTC, price=D("49000"), ts_event=T0 + 3 * S)
    )
    await bus.publish(
        Topic.MD_TICKS, stubs.tick(instrument_id=BTC, price=D("49500"), ts_event=T0 + 61 * S)
    )
    await bus.run_until_idle()

    # Assert: the minute's snapshot of each account, by the instance owning it, marks at the
    # last price within the minute: ACC_FIRST (3100 - 3000) x 2 = +200, equity 100000 + 200;
    # ACC_SECOND (49000 - 50000) x 0.5 = -500, equity 100000 - 500.
    snapshots: list[PortfolioSnapshot] = [
        e.payload for e in bus.messages(Topic.PORTFOLIO_SNAPSHOTS)
    ]
    marked = {
        s.account_id: (s.ts_event, s.unrealized_pnl, s.equity, [p.last_price for p in s.positions])
        for s in snapshots
    }
    assert len(snapshots) == 2
    assert marked == {
        ACC_FIRST: (T0 + 60 * S, D(200), D(100200), [D(3100)]),
        ACC_SECOND: (T0 + 60 * S, D(-500), D(99500), [D(49000)]),
    }
    for instance in (first, second):
        assert len(instance.subscription(MARKET_DATA_GROUP).assignment()) == 24
