"""The simulated venue's reports built without validating again: what validation builds."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest

from quantmesh_common.messages import ExecType, ExecutionReport, OrderType, Side, TimeInForce
from quantmesh_common.testing import stubs
from quantmesh_common.testing.stubs import TS
from quantmesh_execution.simulated import SimulatedVenue, SimulatedVenueConfig


@pytest.mark.parametrize(
    "terms",
    [
        {"quantity": Decimal("0.10")},
        {"side": Side.SELL, "quantity": Decimal("2.5000"), "strategy_id": None},
        {
            "order_type": OrderType.LIMIT,
            "limit_price": Decimal("40000.01"),
            "time_in_force": TimeInForce.GTD,
            "expire_time_ns": TS + 10**9,
        },
    ],
)
def test_submit_when_accepted_reports_what_validated_construction_would(
    terms: dict[str, Any],
) -> None:
    # Arrange: a limit far from any market rests, so the ACCEPTED report is the only one
    venue = SimulatedVenue(SimulatedVenueConfig(), id_prefix="SIM")
    fields: dict[str, Any] = {"order_type": OrderType.LIMIT, "limit_price": Decimal("1.00")}
    command = stubs.order_command(**{**fields, **terms})

    # Act
    (accepted,) = venue.submit(command, TS)

    # Assert
    expected = ExecutionReport(
        report_id="SIM-R1",
        account_id=command.account_id,
        client_order_id=command.client_order_id,
        venue_order_id="SIM-O1",
        strategy_id=command.strategy_id,
        instrument_id=command.instrument_id,
        exec_type=ExecType.ACCEPTED,
        order_status="ACCEPTED",
        side=command.side,
        leaves_qty=command.quantity,
        ts_event=TS,
    )
    assert accepted == expected
    assert accepted.model_dump_json() == expected.model_dump_json()
    assert list(accepted.__dict__) == list(expected.__dict__)
    assert venue.history(command.client_order_id, command.account_id) == [expected]


@pytest.mark.parametrize("prefix", ["-SIM", "SIM 1", "SIM\u00e9", "S" * 101])
def test_venue_when_id_prefix_cannot_start_an_identifier_refuses_it(prefix: str) -> None:
    # Act / Assert
    with pytest.raises(ValueError, match="id_prefix"):
        SimulatedVenue(SimulatedVenueConfig(), id_prefix=prefix)
