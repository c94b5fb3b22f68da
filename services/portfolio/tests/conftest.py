"""Portfolio test harness: a fresh migrated schema, fills, instances sharing the stage's group."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from quantmesh_common.envelope import Envelope
from quantmesh_common.messages import ExecutionReport, OrderStatus, Side, Tick
from quantmesh_common.testing import stubs
from quantmesh_common.testing.harness import GroupMember, StageHarness
from quantmesh_common.testing.kafka import KafkaMember, kafka_settings
from quantmesh_common.testing.postgres import migrated_schema_fixtures
from quantmesh_portfolio.config import PortfolioSettings
from quantmesh_portfolio.service import PortfolioService

portfolio_dsn, portfolio_pool = migrated_schema_fixtures(
    "qm_test_portfolio", dsn="portfolio_dsn", pool="portfolio_pool"
)

D = Decimal
S = stubs.SECOND_NS
#: A minute boundary: the seconds a test spends after it cross no snapshot.
T0 = stubs.TS + 40 * S


def whole_fill(
    trade_id: str, side: Side, qty: str, price: str, second: int, *, fee: str = "0", **fields: Any
) -> ExecutionReport:
    """Report R-<trade_id>: order O-<trade_id> filled whole by trade `trade_id`, `qty` at
    `price`, at T0 + `second` s; `fields` set any other of the report's fields."""
    report: ExecutionReport = stubs.execution_report(
        **{
            "report_id": f"R-{trade_id}",
            "client_order_id": f"O-{trade_id}",
            "trade_id": trade_id,
            "side": side,
            "last_qty": D(qty),
            "last_price": D(price),
            "cum_qty": D(qty),
            "avg_price": D(price),
            "fee": D(fee),
            "order_status": OrderStatus.FILLED,
            "ts_event": T0 + second * S,
            **fields,
        }
    )
    return report


def mark(price: str, second: int) -> Tick:
    """A tick of the stub instrument at `price`, at T0 + `second` s."""
    return stubs.tick(price=D(price), ts_event=T0 + second * S, ts_init=T0 + second * S)


async def store_batch(
    stage: StageHarness[PortfolioService], *events: ExecutionReport | Tick
) -> None:
    """Handle `events` as one consumed batch, then store it (the batch hook)."""
    persistent = stage.service.persistent
    assert persistent is not None
    for event in events:
        await persistent(Envelope.wrap(event, source="test", ts_event=T0, ts_init=T0))
    await persistent.flush()


def account_buy(
    account_id: str, qty: str, price: str, second: int, **fields: Any
) -> ExecutionReport:
    """`account_id`'s one buy (report R-, order O-, trade T-<account_id>), filled whole."""
    return whole_fill(
        f"T-{account_id}",
        Side.BUY,
        qty,
        price,
        second,
        account_id=account_id,
        report_id=f"R-{account_id}",
        client_order_id=f"O-{account_id}",
        **fields,
    )


def new_portfolio(**settings: Any) -> PortfolioService:
    """A portfolio on the in-memory bus: 100000 USDT an account, a snapshot a minute."""
    return PortfolioService(
        PortfolioSettings(
            bus="memory",
            http_port=0,
            starting_cash={"USDT": "100000"},
            snapshot_interval_s=60,
            **settings,
        )
    )


def kafka_portfolio(prefix: str, dsn: str | None, **settings: Any) -> PortfolioService:
    """A portfolio on the stack's broker, on the topics (and in the groups) under `prefix`:
    100000 USDT an account, its state in `dsn`'s schema, or in memory only without one."""
    return PortfolioService(
        PortfolioSettings(
            **kafka_settings(dsn),
            starting_cash={"USDT": "100000"},
            portfolio_topic_prefix=prefix,
            **settings,
        )
    )


class PortfolioMember(GroupMember[PortfolioService]):
    """A portfolio instance in the stage's groups on an in-memory bus other instances share."""

    def holds(self, account_id: str) -> bool:
        return account_id in self.accounts()

    def accounts(self) -> set[str]:
        handlers = self.service.handlers
        assert handlers is not None
        return set(handlers.portfolio.accounts)


class KafkaPortfolio(KafkaMember[PortfolioService]):
    """A portfolio instance on its own Kafka bus, in the groups of its topic prefix."""

    def holds(self, account_id: str) -> bool:
        handlers = self.service.handlers
        return handlers is not None and account_id in handlers.portfolio.accounts

    def price(self, instrument_id: str) -> Decimal | None:
        """The instrument's last mark, as the portfolio converts its base into its quote."""
        handlers = self.service.handlers
        if handlers is None:
            return None
        base, quote = instrument_id.split(".")[0].split("-")
        return handlers.portfolio.rate(base, quote)
