"""Position sizing for backtests: a fixed quantity, a fraction of equity, or all-in.

`--size` takes three forms (`SizeSpec.parse`):

- `N` — a fixed quantity: the backtest passes it to the strategy as its `quantity` parameter,
  so the strategy's own code sizes every order and nothing is rewritten.
- `N%` — at each decision, a position worth N % of equity: `floor_lot(equity x N/100 / p)`.
- `all-in` — the most whole lots the cash covers after commission, counting the cash the
  current position would release: `floor_lot(budget / (p x (1 + commission)))` with
  `budget = cash + q x p - |q| x p x commission` (q the signed position). Flat, `budget` is
  simply the cash.

Here `p` is the reference price: the last trade price when the strategy decided (the deciding
bar's close for a bar strategy) raised by the slippage, and `floor_lot` rounds down to the lot
size. With `--fill-at next_open` the order fills at the next bar's open, not at `p`, so the
notional can differ from the budget by that gap (all-in can then leave a little negative cash:
nothing in the mesh checks buying power yet).

Mechanism: `Sizer.rewrite` changes the magnitude of the target-position intents (and the
matching `Signal`) a strategy emits, keeping their sign; quantity intents (`buy`/`sell`) pass
unchanged. `SizedSignalsService` is the signals stage with its output passed through a sizer —
the stage's own handlers, wrapped in the embedded process only, so the bus, risk, the OMS, the
venue and the portfolio see nothing but ordinary intents. The sizer keeps its own cash and
position from the account's fills (the same arithmetic as the portfolio for one instrument in
the quote currency) because it must be current when the strategy decides, and the portfolio's
snapshot of that instant is still queued behind the bar on the bus.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from decimal import ROUND_FLOOR, Decimal, InvalidOperation
from typing import Any, Literal

from quantmesh_common.bus.base import Emit
from quantmesh_common.envelope import Envelope
from quantmesh_common.messages import (
    Bar,
    ExecutionReport,
    InstrumentId,
    OrderIntent,
    PositionSide,
    Side,
    Signal,
    Tick,
    TickKind,
)
from quantmesh_signals.config import SignalsSettings
from quantmesh_signals.service import SignalsService

SizeKind = Literal["fixed", "percent", "all_in"]
_BPS = Decimal(10_000)
_HUNDRED = Decimal(100)


@dataclass(frozen=True)
class SizeSpec:
    """What `--size` asked for: a fixed quantity, a percentage of equity, or all-in."""

    kind: SizeKind
    value: Decimal = Decimal(0)

    @classmethod
    def parse(cls, text: str) -> SizeSpec:
        """Parse `N`, `N%` or `all-in`; ValueError for anything else or a non-positive N."""
        raw = text.strip().lower()
        if raw in ("all-in", "all_in", "allin"):
            return cls("all_in")
        kind: SizeKind = "percent" if raw.endswith("%") else "fixed"
        try:
            value = Decimal(raw.removesuffix("%"))
        except InvalidOperation:
            raise ValueError(f"--size wants N, N% or all-in, got {text!r}") from None
        if not value.is_finite() or value <= 0:
            raise ValueError(f"--size must be positive, got {text!r}")
        return cls(kind, value)

    def __str__(self) -> str:
        if self.kind == "all_in":
            return "all-in"
        return f"{self.value}%" if self.kind == "percent" else str(self.value)


def floor_to_lot(quantity: Decimal, lot_size: Decimal) -> Decimal:
    """Round a non-negative quantity down to a whole number of lots (0 if below one lot)."""
    if quantity <= 0:
        return Decimal(0)
    lots = (quantity / lot_size).to_integral_value(rounding=ROUND_FLOOR)
    return lots * lot_size


class Sizer:
    """Sizes target positions from the account's cash, its position and the last price."""

    def __init__(
        self,
        spec: SizeSpec,
        instrument_id: str,
        *,
        cash: Decimal,
        commission: Decimal,
        lot_size: Decimal,
        slippage_bps: Decimal = Decimal(0),
    ) -> None:
        if spec.kind == "fixed":
            raise ValueError("a fixed --size is the strategy's quantity parameter, not a sizer")
        if lot_size <= 0:
            raise ValueError(f"lot size must be positive, got {lot_size}")
        self.spec = spec
        self.instrument_id = instrument_id
        self.quote = InstrumentId.parse(instrument_id).quote
        self.cash = cash
        self.position = Decimal(0)
        self.commission = commission
        self.lot_size = lot_size
        self.slippage = slippage_bps / _BPS
        self.last_price: Decimal | None = None
        self._seen: set[str] = set()

    def on_tick(self, tick: Tick) -> None:
        """Remember the last trade price of the instrument."""
        if tick.instrument_id == self.instrument_id and tick.kind is TickKind.TRADE:
            self.last_price = tick.price

    def on_bar(self, bar: Bar) -> None:
        """A bar's close is the last price when a strategy decides on it."""
        if bar.instrument_id == self.instrument_id:
            self.last_price = bar.close

    def on_report(self, report: ExecutionReport) -> None:
        """Apply a fill of the instrument to cash and position, each trade once."""
        if not report.exec_type.is_fill or report.instrument_id != self.instrument_id:
            return
        key = report.trade_id or report.report_id
        if key in self._seen:
            return
        self._seen.add(key)
        assert report.last_price is not None  # a fill always has one
        fee = report.fee if report.fee_currency in (None, self.quote) else None
        self.apply_fill(report.side, report.last_qty, report.last_price, fee)

    def apply_fill(
        self, side: Side, quantity: Decimal, price: Decimal, fee: Decimal | None
    ) -> None:
        """Apply one fill to cash and position (`fee` in the quote currency; None: none)."""
        notional = quantity * price
        if side is Side.BUY:
            self.position += quantity
            self.cash -= notional
        else:
            self.position -= quantity
            self.cash += notional
        if fee is not None:
            self.cash -= fee

    @property
    def equity(self) -> Decimal | None:
        """Cash plus the position marked at the last price; None before any price."""
        if self.last_price is None:
            return None
        return self.cash + self.position * self.last_price

    def quantity(self) -> Decimal:
        """The size of a new non-flat target now (0 without a price or with no money)."""
        if self.last_price is None or self.last_price <= 0:
            return Decimal(0)
        price = self.last_price * (1 + self.slippage)
        mark = self.position * self.last_price
        if self.spec.kind == "percent":
            budget = (self.cash + mark) * self.spec.value / _HUNDRED
            return floor_to_lot(budget / price, self.lot_size)
        budget = self.cash + mark - abs(mark) * self.commission
        return floor_to_lot(budget / (price * (1 + self.commission)), self.lot_size)

    def rewrite(self, emits: Sequence[Emit]) -> list[Emit]:
        """Resize the non-flat target intents (and their Signals) among `emits`, keeping signs."""
        size: Decimal | None = None
        out: list[Emit] = []
        for emit in emits:
            payload = emit.payload
            target = getattr(payload, "target_position", None)
            is_ours = isinstance(payload, OrderIntent | Signal) and (
                payload.instrument_id == self.instrument_id
            )
            if not is_ours or not target:
                out.append(emit)
                continue
            if size is None:
                size = self.quantity()  # once: the intent and its Signal must agree
            sized = size if target > 0 else -size
            update: dict[str, Any] = {"target_position": sized}
            if isinstance(payload, Signal):
                update["direction"] = PositionSide.of(sized)
            out.append(Emit(emit.topic, payload.model_copy(update=update), emit.key, emit.ts_event))
        return out


class SizedSignalsService(SignalsService):
    """The signals stage whose target intents are sized by a `Sizer` before they leave it.

    The sizer learns prices and fills from the very envelopes the stage consumes (md.ticks,
    md.bars, exec.reports), before the strategies see them.
    """

    def __init__(self, settings: SignalsSettings, sizer: Sizer) -> None:
        super().__init__(settings)
        self.sizer = sizer

    def on_event(self, envelope: Envelope[Any]) -> list[Emit]:
        """Feed the sizer, run the strategies, and size what they asked for."""
        payload = envelope.payload
        if isinstance(payload, Tick):
            self.sizer.on_tick(payload)
        elif isinstance(payload, Bar):
            self.sizer.on_bar(payload)
        elif isinstance(payload, ExecutionReport):
            self.sizer.on_report(payload)
        return self.sizer.rewrite(super().on_event(envelope))
