"""Daily loss and drawdown per account from the portfolio's snapshots and position updates.

Equity comes from `portfolio.snapshots`; between two snapshots each `portfolio.updates`
position moves it by the change of that position's P&L (realised + unrealised, net of fees)
since the snapshot, when the position's quote currency is the snapshot's base currency (other
positions wait for the next snapshot). The two topics are not ordered with each other, so the
P&L a snapshot already holds is found by time: updates stamped at or before the snapshot are
in it, later ones are not.

The day is the UTC calendar day of the event time. The day's opening equity is the last equity
of the previous day (the first equity ever seen opens the first day); the peak is the highest
equity seen. An operator's breaker reset re-bases both to the current equity, so the account
trips again only on a further loss of the limit's size.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import ROUND_HALF_EVEN, Decimal

from quantmesh_common.messages import AccountOpened, InstrumentId, PortfolioSnapshot, Position
from quantmesh_risk.checks import RiskDenial, fmt

NS_PER_DAY = 86_400 * 1_000_000_000
_HUNDRED = Decimal(100)
_PCT_PLACES = Decimal("0.0001")


def utc_day(ts_ns: int) -> int:
    """Return the UTC day number (days since 1970-01-01) of a time in ns."""
    return ts_ns // NS_PER_DAY


def day_label(day: int) -> str:
    """Return a UTC day number as YYYY-MM-DD."""
    return datetime.fromtimestamp(day * 86_400, tz=UTC).date().isoformat()


@dataclass(slots=True)
class _InstrumentPnl:
    """One position's P&L: as of the last snapshot, and the updates stamped after it."""

    baseline: Decimal = Decimal(0)
    later: list[tuple[int, Decimal]] = field(default_factory=list)

    @property
    def current(self) -> Decimal:
        return self.later[-1][1] if self.later else self.baseline

    def add(self, ts_ns: int, pnl: Decimal) -> None:
        later = self.later
        later.append((ts_ns, pnl))
        if len(later) > 1 and later[-2][0] > ts_ns:
            later.sort(key=lambda item: item[0])

    def settle(self, snapshot_ts: int) -> None:
        """Fold the updates the snapshot at `snapshot_ts` already holds into the baseline."""
        held = [item for item in self.later if item[0] <= snapshot_ts]
        if held:
            self.baseline = held[-1][1]
            self.later = [item for item in self.later if item[0] > snapshot_ts]


@dataclass(slots=True)
class AccountLosses:
    """One account's equity estimate, day-opening equity and peak."""

    base_currency: str | None = None
    snapshot_ts: int | None = None
    snapshot_equity: Decimal | None = None
    pnl: dict[str, _InstrumentPnl] = field(default_factory=dict)
    day: int | None = None
    day_open_equity: Decimal | None = None
    peak_equity: Decimal | None = None
    last_ts: int = 0
    #: The account's starting capital in its base currency (AccountOpened), if it was opened.
    opening_equity: Decimal | None = None

    @property
    def equity(self) -> Decimal | None:
        """Return the snapshot's equity moved by the position P&L changes since it."""
        if self.snapshot_equity is None:
            return None
        moved = sum((p.current - p.baseline for p in self.pnl.values()), Decimal(0))
        return self.snapshot_equity + moved

    @property
    def daily_loss(self) -> Decimal | None:
        """Return the day's opening equity minus the equity (negative: a gain)."""
        equity = self.equity
        if equity is None or self.day_open_equity is None:
            return None
        return self.day_open_equity - equity

    @property
    def drawdown_pct(self) -> Decimal | None:
        """Return (peak - equity) / peak in %, or None without a positive peak."""
        equity = self.equity
        peak = self.peak_equity
        if equity is None or peak is None or peak <= 0:
            return None
        return max((peak - equity) / peak * _HUNDRED, Decimal(0))

    def rebase(self) -> None:
        """Accept the losses so far: the day opens, and the peak sits, at the current equity.

        With no equity known yet (just restarted) both wait for the next equity seen.
        """
        equity = self.equity
        self.day_open_equity = equity
        self.peak_equity = equity


class LossTracker:
    """Every account's `AccountLosses`, fed with snapshots and position updates."""

    def __init__(self) -> None:
        self.accounts: dict[str, AccountLosses] = {}

    def account(self, account_id: str) -> AccountLosses:
        """Return the account's state, creating an empty one."""
        found = self.accounts.get(account_id)
        if found is None:
            found = self.accounts[account_id] = AccountLosses()
        return found

    def on_opened(self, opened: AccountOpened) -> AccountLosses | None:
        """Take an opened account's starting capital (its cash in the base currency).

        Kept as the account's opening equity (sizing's equity until there is one), and, if
        nothing is known of the account yet, as its equity, day-opening equity and peak
        until the portfolio's first snapshot: losses count from the starting capital. None
        if the account was known already (a re-read of the compacted topic changes nothing).
        """
        state = self.account(opened.account_id)
        if state.opening_equity is not None:
            return None
        cash = opened.starting_cash.get(opened.base_currency, Decimal(0))
        state.opening_equity = cash
        if state.snapshot_ts is None and state.day_open_equity is None:
            state.base_currency = opened.base_currency
            state.snapshot_ts = opened.ts_event
            state.snapshot_equity = cash
            self._advance(state, None, opened.ts_event)
        return state

    def on_snapshot(self, snapshot: PortfolioSnapshot, ts_ns: int) -> AccountLosses | None:
        """Take a snapshot's equity; None if it is older than the one held (ignored)."""
        state = self.account(snapshot.account_id)
        if state.snapshot_ts is not None and snapshot.ts_event < state.snapshot_ts:
            return None
        before = state.equity
        state.base_currency = snapshot.base_currency
        state.snapshot_ts = snapshot.ts_event
        state.snapshot_equity = snapshot.equity
        for pnl in state.pnl.values():
            pnl.settle(snapshot.ts_event)
        for position in snapshot.positions:
            # The snapshot's own marks are fresher than the updates it already holds.
            entry = state.pnl.setdefault(position.instrument_id, _InstrumentPnl())
            entry.baseline = position.realized_pnl + position.unrealized_pnl
        self._advance(state, before, ts_ns)
        return state

    def on_position(self, position: Position, ts_ns: int) -> AccountLosses | None:
        """Move the account's equity by a position's P&L; None if it cannot count it yet."""
        state = self.account(position.account_id)
        quote = InstrumentId.parse(position.instrument_id).quote
        if state.snapshot_ts is None or quote != state.base_currency:
            return None
        pnl = position.realized_pnl + position.unrealized_pnl
        if position.ts_event <= state.snapshot_ts:
            return None  # already in the snapshot's equity
        entry = state.pnl.get(position.instrument_id)
        if entry is None:
            # Flat at the snapshot (it lists open positions only) and never seen before: its
            # realised P&L then is unknown, so it counts from here on (the opening fill's fee
            # reaches the equity with the next snapshot).
            entry = state.pnl[position.instrument_id] = _InstrumentPnl(position.realized_pnl)
        before = state.equity
        entry.add(position.ts_event, pnl)
        self._advance(state, before, ts_ns)
        return state

    @staticmethod
    def _advance(state: AccountLosses, before: Decimal | None, ts_ns: int) -> None:
        equity = state.equity
        if equity is None:
            return
        day = utc_day(ts_ns)
        if state.day is None or state.day_open_equity is None:
            state.day, state.day_open_equity = day, equity
        elif day > state.day:
            # The previous day's last equity opens the new day.
            state.day, state.day_open_equity = day, before if before is not None else equity
        state.last_ts = max(state.last_ts, ts_ns)
        if state.peak_equity is None or equity > state.peak_equity:
            state.peak_equity = equity


def check_loss_limits(
    state: AccountLosses, max_daily_loss: Decimal | None, max_drawdown_pct: Decimal | None
) -> RiskDenial | None:
    """Return the breach that trips the breaker: loss beyond the limit; at the limit passes."""
    loss = state.daily_loss
    if max_daily_loss is not None and loss is not None and loss > max_daily_loss:
        assert state.day_open_equity is not None
        assert state.day is not None
        return RiskDenial(
            "DAILY_LOSS_LIMIT_BREACHED",
            {
                "max_daily_loss": fmt(max_daily_loss),
                "daily_loss": fmt(loss),
                "day_open_equity": fmt(state.day_open_equity),
                "equity": fmt(state.day_open_equity - loss),
                "day": day_label(state.day),
            },
        )
    drawdown = state.drawdown_pct
    if max_drawdown_pct is not None and drawdown is not None and drawdown > max_drawdown_pct:
        assert state.peak_equity is not None
        equity = state.equity
        assert equity is not None
        return RiskDenial(
            "MAX_DRAWDOWN_BREACHED",
            {
                "max_drawdown_pct": fmt(max_drawdown_pct),
                "drawdown_pct": fmt(drawdown.quantize(_PCT_PLACES, rounding=ROUND_HALF_EVEN)),
                "peak_equity": fmt(state.peak_equity),
                "equity": fmt(equity),
            },
        )
    return None
