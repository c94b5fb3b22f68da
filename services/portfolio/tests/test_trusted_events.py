"""Portfolio's events built from computed values without validating them again are the events
validation makes: on a seeded replay, every output's JSON is what the validating code emitted."""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

from quantmesh_common.envelope import Envelope, Event
from quantmesh_common.messages import (
    ControlAction,
    ExecType,
    OrderStatus,
    Side,
    Tick,
)
from quantmesh_common.testing import stubs
from quantmesh_portfolio.performance import PerformanceTracker
from quantmesh_portfolio.positions import Portfolio
from quantmesh_portfolio.service import PortfolioHandlers

D = Decimal
S = stubs.SECOND_NS
INTERVAL_NS = 60 * S
#: sha256 of the replay's output lines (`_lines`), as the code that validated every position
#: and snapshot it built (before `quantmesh_common.trusted` was used) emitted them.
GOLDEN_SHA256 = "93f982ed24fb4c771fce684ac1e0662bbdffe538301fd8bf676472cc085d1d7e"
GOLDEN_LINES = 3677
#: Instruments and a walk's starting price each; ETH-BTC's quote is not the base currency.
PRICES = {"BTC-USDT.SIM": D("50000.00"), "ETH-USDT.SIM": D("3000.00"), "ETH-BTC.SIM": D("0.06")}
ACCOUNTS = {"acc-1": ("s-1", "s-2"), "acc-2": ("s-3",), "paper-1": ("s-4",)}
#: Fee currencies a fill may carry: quote (None: the quote), base, a third currency.
FEE_CURRENCIES = (None, "quote", "base", "BNB")


def _envelope(payload: Event, ts: int) -> Envelope[Any]:
    return Envelope.wrap(payload, source="test", ts_event=ts, ts_init=ts)


def _inputs(seed: int, steps: int) -> Iterator[Envelope[Any]]:
    """A seeded mix of fills (partial, flips, fees in every currency, redeliveries, a rebate),
    non-fill reports, trade and quote ticks, bars, an account opening and report requests."""
    rng = random.Random(seed)
    prices = dict(PRICES)
    ts = stubs.TS
    yield _envelope(
        stubs.account_opened(
            account_id="paper-1", starting_cash={"USDT": D("25000"), "BTC": D("0.5")}
        ),
        ts,
    )
    fills: list[Any] = []
    for n in range(steps):
        ts += rng.randint(1, 40) * S // 2
        instrument = rng.choice(list(PRICES))
        step = prices[instrument] * D(rng.randint(-20, 20)) / D(10_000)
        tick_size = D("0.00001") if instrument == "ETH-BTC.SIM" else D("0.01")
        prices[instrument] = max(tick_size, (prices[instrument] + step).quantize(tick_size))
        price = prices[instrument]
        roll = rng.random()
        if roll < 0.40:
            account = rng.choice(list(ACCOUNTS))
            base, _, rest = instrument.partition("-")
            quote = rest.partition(".")[0]
            which = rng.choice(FEE_CURRENCIES)
            currency = {"quote": quote, "base": base}.get(which or "", which)
            qty = D(rng.randint(1, 500)) / D(1000)
            fee = (qty * price * D("0.001")).quantize(D("0.00000001"))
            if currency == base:
                fee = (qty * D("0.001")).quantize(D("0.00000001"))
            elif currency == "BNB":
                fee = D("0.0031")
            if rng.random() < 0.05:
                fee = -fee  # a maker rebate
            report = stubs.execution_report(
                report_id=f"R-{n}",
                account_id=account,
                client_order_id=f"O-{n}",
                venue_order_id=f"V-{n}",
                strategy_id=rng.choice(ACCOUNTS[account]),
                instrument_id=instrument,
                exec_type=rng.choice((ExecType.FILL, ExecType.PARTIAL_FILL)),
                order_status=OrderStatus.FILLED,
                side=rng.choice((Side.BUY, Side.SELL)),
                last_qty=qty,
                last_price=price,
                cum_qty=qty,
                avg_price=price,
                fee=fee,
                fee_currency=currency,
                trade_id=f"T-{n}",
                ts_event=ts,
            )
            fills.append(report)
            yield _envelope(report, ts)
        elif roll < 0.45 and fills:
            again = rng.choice(fills)
            yield _envelope(again, ts)  # a redelivery: applied once
        elif roll < 0.50:
            yield _envelope(
                stubs.order_accepted(
                    report_id=f"A-{n}",
                    client_order_id=f"O-{n}",
                    instrument_id=instrument,
                    ts_event=ts,
                ),
                ts,
            )
        elif roll < 0.75:
            tick: Tick = stubs.tick(instrument_id=instrument, price=price, ts_event=ts)
            yield _envelope(tick, ts)
        elif roll < 0.85:
            spread = tick_size * rng.randint(1, 5)
            yield _envelope(
                stubs.quote_tick(
                    instrument_id=instrument,
                    price=price + spread / 2,
                    bid=price,
                    ask=price + spread,
                    ts_event=ts,
                    ts_init=ts,
                ),
                ts,
            )
        elif roll < 0.97:
            yield _envelope(
                stubs.bar(
                    instrument_id=instrument,
                    open=price,
                    high=price + tick_size,
                    low=price,
                    close=price,
                    ts_open=ts - 60 * S,
                    ts_close=ts,
                ),
                ts,
            )
        else:
            target = rng.choice(("*", "acc-1", "paper-1"))
            yield _envelope(
                stubs.control_command(
                    command_id=f"C-{n}",
                    action=ControlAction.REPORT_PERFORMANCE,
                    target=target,
                    ts_event=ts,
                ),
                ts,
            )


def _handlers() -> PortfolioHandlers:
    portfolio = Portfolio("USDT", {"USDT": D("100000")})
    tracker = PerformanceTracker(INTERVAL_NS, report_trips=5)
    return PortfolioHandlers(
        portfolio, INTERVAL_NS, tracker=tracker, report_interval_ns=5 * INTERVAL_NS
    )


def _outputs() -> list[tuple[str, str | None, int | None, Event]]:
    handlers = _handlers()
    out: list[tuple[str, str | None, int | None, Event]] = []
    for envelope in _inputs(seed=6, steps=3000):
        for emit in handlers(envelope) or []:
            out.append((emit.topic, emit.key, emit.ts_event, emit.payload))
    return out


def _lines(outputs: list[tuple[str, str | None, int | None, Event]]) -> list[str]:
    # report_id is a fresh id per report: left out, so the digest depends on the values only.
    lines = []
    for topic, key, ts, payload in outputs:
        exclude = {"report_id"} if topic == "portfolio.performance" else None
        lines.append(f"{topic} {key} {ts} {payload.model_dump_json(exclude=exclude)}")
    return lines


def test_replay_when_events_are_built_trusted_emits_what_validation_emitted() -> None:
    lines = _lines(_outputs())

    digest = hashlib.sha256("\n".join(lines).encode()).hexdigest()

    assert (len(lines), digest) == (GOLDEN_LINES, GOLDEN_SHA256)


def test_replay_when_each_event_is_validated_again_it_is_unchanged() -> None:
    outputs = _outputs()

    changed = [
        payload
        for _, _, _, payload in outputs
        if (again := type(payload).model_validate(payload.model_dump())) != payload
        or again.model_dump_json() != payload.model_dump_json()
        or again.model_fields_set != payload.model_fields_set
    ]

    assert len(outputs) > 1000
    assert changed == []
