"""TWAP/VWAP parent orders: the slice schedule (sizes and times), pure and deterministic."""

from __future__ import annotations

import bisect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from decimal import ROUND_FLOOR, Decimal

from quantmesh_common.messages import ExecAlgo

NS_PER_S = 1_000_000_000
DAY_NS = 86_400 * NS_PER_S
HOUR_NS = 3_600 * NS_PER_S
#: Slice granularity when the intent gives no lot size (the venues' usual smallest step).
DEFAULT_STEP = Decimal("0.00000001")
#: Tag of an algo parent's child orders: `ALGO_TWAP` / `ALGO_VWAP`.
ALGO_TAG_PREFIX = "ALGO_"


def child_id(parent_id: str, n: int) -> str:
    """Return the client order id of a parent's `n`-th child (1-based): `<parent>:<n>`."""
    return f"{parent_id}:{n}"


@dataclass(frozen=True, slots=True)
class AlgoPlan:
    """A parent's schedule: slice k (0-based) of `sizes[k]` is due at start + k * interval."""

    algo: ExecAlgo
    start_ns: int
    interval_ns: int
    sizes: tuple[Decimal, ...]

    def due_ns(self, k: int) -> int:
        """Return when slice `k` (0-based) is due."""
        return self.start_ns + k * self.interval_ns

    def as_details(self) -> dict[str, str]:
        """Return the plan as strings, for the stored event."""
        return {
            "algo": self.algo.value,
            "algo_start_ns": str(self.start_ns),
            "algo_interval_ns": str(self.interval_ns),
            "algo_sizes": ",".join(format(s, "f") for s in self.sizes),
        }

    @classmethod
    def from_details(cls, details: Mapping[str, str]) -> AlgoPlan | None:
        """Return the plan `as_details` wrote, or None if there is none."""
        if not details.get("algo"):
            return None
        return cls(
            ExecAlgo(details["algo"]),
            int(details["algo_start_ns"]),
            int(details["algo_interval_ns"]),
            tuple(Decimal(s) for s in details["algo_sizes"].split(",")),
        )


def interval_ns(duration_s: int, slices: int) -> int:
    """Return the time between slices: the duration split into `slices` equal windows."""
    return duration_s * NS_PER_S // slices


def _floor(value: Decimal, step: Decimal) -> Decimal:
    return (value / step).to_integral_value(rounding=ROUND_FLOOR) * step


def apportion(
    quantity: Decimal, weights: Sequence[Decimal], lot_size: Decimal | None
) -> tuple[Decimal, ...]:
    """Split `quantity` by `weights`: each slice floored to the lot, the last takes the rest.

    The sizes sum exactly to `quantity`; a slice may be zero (it is then not sent).
    """
    step = lot_size or DEFAULT_STEP
    total = sum(weights, Decimal(0))
    sizes = [_floor(quantity * w / total, step) for w in weights[:-1]]
    return (*sizes, quantity - sum(sizes, Decimal(0)))


def twap_sizes(quantity: Decimal, slices: int, lot_size: Decimal | None) -> tuple[Decimal, ...]:
    """Return equal slices (floored to the lot size), the remainder on the last."""
    return apportion(quantity, [Decimal(1)] * slices, lot_size)


def weights_from_bars(
    tod_volumes: Mapping[int, Decimal], start_ns: int, step_ns: int, slices: int
) -> list[Decimal]:
    """Return each slice's weight: the recorded volume whose time of day falls in its window.

    `tod_volumes` maps a bar's open time of day (ns since UTC midnight) to its summed volume
    over the look-back days. Slice k's window is [start + k*step, start + (k+1)*step) taken
    modulo a day.
    """
    tods = sorted(tod_volumes)
    prefix = [Decimal(0)]
    for tod in tods:
        prefix.append(prefix[-1] + tod_volumes[tod])

    def between(lo: int, hi: int) -> Decimal:
        return prefix[bisect.bisect_left(tods, hi)] - prefix[bisect.bisect_left(tods, lo)]

    weights: list[Decimal] = []
    for k in range(slices):
        if step_ns >= DAY_NS:
            weights.append(prefix[-1])
            continue
        lo = (start_ns + k * step_ns) % DAY_NS
        hi = lo + step_ns
        weight = between(lo, min(hi, DAY_NS))
        if hi > DAY_NS:  # the window wraps past midnight
            weight += between(0, hi - DAY_NS)
        weights.append(weight)
    return weights


def weights_from_hourly(
    hourly: Sequence[Decimal], start_ns: int, step_ns: int, slices: int
) -> list[Decimal]:
    """Return each slice's weight: the configured weight of the UTC hour the slice starts in."""
    return [hourly[((start_ns + k * step_ns) % DAY_NS) // HOUR_NS] for k in range(slices)]


def parse_hourly_profile(text: str) -> tuple[Decimal, ...]:
    """Return 24 non-negative hourly weights from `w0,w1,...,w23`; ValueError otherwise."""
    parts = [p.strip() for p in text.split(",")]
    if len(parts) != 24:
        raise ValueError(f"24 comma-separated weights (UTC hours 0..23) expected, got {len(parts)}")
    weights = tuple(Decimal(p) for p in parts)
    if any(not w.is_finite() or w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError("weights must be non-negative with a positive sum")
    return weights
