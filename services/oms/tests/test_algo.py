"""The TWAP/VWAP slice schedule: sizes, times and volume weights, hand-computed."""

from __future__ import annotations

from decimal import Decimal

import pytest

from quantmesh_common.messages import ExecAlgo
from quantmesh_common.settings import load_settings
from quantmesh_oms.algo import (
    DAY_NS,
    HOUR_NS,
    NS_PER_S,
    AlgoPlan,
    apportion,
    interval_ns,
    parse_hourly_profile,
    twap_sizes,
    weights_from_bars,
    weights_from_hourly,
)
from quantmesh_oms.config import OmsSettings

D = Decimal


def test_twap_sizes_when_lot_size_given_floors_slices_and_puts_remainder_last() -> None:
    assert twap_sizes(D("1"), 3, D("0.001")) == (D("0.333"), D("0.333"), D("0.334"))


def test_twap_sizes_when_quantity_divides_evenly_gives_equal_slices() -> None:
    assert twap_sizes(D("0.1"), 4, None) == (D("0.025"), D("0.025"), D("0.025"), D("0.025"))


def test_twap_sizes_when_no_lot_size_floors_to_eight_decimals() -> None:
    assert twap_sizes(D("1"), 3, None) == (D("0.33333333"), D("0.33333333"), D("0.33333334"))


def test_twap_sizes_when_lot_larger_than_slice_leaves_empty_slices_and_all_on_last() -> None:
    assert twap_sizes(D("0.5"), 3, D("1")) == (D("0"), D("0"), D("0.5"))


def test_apportion_when_weights_given_sizes_follow_them() -> None:
    assert apportion(D("10"), [D(1), D(2), D(3), D(4)], D("1")) == (D(1), D(2), D(3), D(4))


def test_interval_when_sixty_seconds_in_four_slices_is_fifteen_seconds() -> None:
    assert interval_ns(60, 4) == 15 * NS_PER_S


def test_weights_from_bars_when_windows_cross_midnight_sum_each_window() -> None:
    # Volume by bar open time of day: 23:59 -> 3, 00:00 -> 5, 00:01 -> 7, 00:02 -> 11.
    minute = 60 * NS_PER_S
    volumes = {DAY_NS - minute: D(3), 0: D(5), minute: D(7), 2 * minute: D(11)}
    start = 10 * DAY_NS + DAY_NS - minute  # 23:59 of some day

    weights = weights_from_bars(volumes, start, minute, 3)
    # A window from 23:59:30 to 00:00:30 holds only the 00:00 bar.
    wrapped = weights_from_bars(volumes, start + 30 * NS_PER_S, minute, 1)

    assert weights == [D(3), D(5), D(7)]
    assert wrapped == [D(5)]


def test_weights_from_hourly_when_slices_span_hours_take_each_start_hour() -> None:
    hourly = [D(h + 1) for h in range(24)]
    start = 3 * DAY_NS + 10 * HOUR_NS + 30 * 60 * NS_PER_S  # 10:30

    weights = weights_from_hourly(hourly, start, 30 * 60 * NS_PER_S, 3)  # 10:30, 11:00, 11:30

    assert weights == [D(11), D(12), D(12)]


def test_parse_hourly_profile_when_not_24_weights_raises() -> None:
    with pytest.raises(ValueError, match="24 comma-separated"):
        parse_hourly_profile("1,2,3")


def test_algo_plan_when_written_as_details_reads_back_the_same() -> None:
    plan = AlgoPlan(ExecAlgo.VWAP, 1_000, 15 * NS_PER_S, (D("0.25"), D("0.5"), D("0.25")))

    again = AlgoPlan.from_details(plan.as_details())

    assert again == plan
    assert plan.due_ns(2) == 1_000 + 30 * NS_PER_S


def test_oms_settings_when_vwap_profile_malformed_exits_2_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("QM_BUS", "memory")
    monkeypatch.setenv("QM_OMS_VWAP_PROFILE", "1,x")

    with pytest.raises(SystemExit) as exited:
        load_settings(OmsSettings)

    assert exited.value.code == 2
    assert "QM_OMS_VWAP_PROFILE" in capsys.readouterr().err


def test_oms_settings_when_vwap_profile_given_parses_24_weights(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("QM_BUS", "memory")
    monkeypatch.setenv("QM_OMS_VWAP_PROFILE", ",".join(str(h) for h in range(24)))

    profile = load_settings(OmsSettings).vwap_hourly_profile()

    assert profile is not None
    assert (len(profile), profile[0], profile[23]) == (24, D(0), D(23))
