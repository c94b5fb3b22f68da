"""The collector endpoints: the start body's checks and params, and each job's latest status."""

from __future__ import annotations

from typing import Any

import pytest

from quantmesh_api.collector import CollectorJobs
from quantmesh_api.security import Role
from quantmesh_common.messages import CollectorState, CollectorStatus, ControlAction, ControlCommand
from quantmesh_common.topics import Topic

from .conftest import T0_NS, ApiWorld

START = "/api/v1/market/collector/start"


def _commands(world: ApiWorld) -> list[ControlCommand]:
    return [e.payload for e in world.bus.messages(Topic.CONTROL)]


def _status(job_id: str, ts_event: int, **fields: Any) -> CollectorStatus:
    values: dict[str, Any] = {
        "job_id": job_id,
        "kind": "backfill.ohlcv",
        "state": CollectorState.RUNNING,
        "venue": "BINANCE",
        "instrument_id": "BTC-USDT.BINANCE",
        "timeframe": "1m",
        "ts_event": ts_event,
    }
    values.update(fields)
    return CollectorStatus(**values)


async def test_start_when_given_the_whole_config_sends_it_as_the_scheduler_params(
    api_world: ApiWorld,
) -> None:
    admin = await api_world.headers("root", Role.MANAGE_STRATEGIES)
    body = {
        "symbols": ["BTC/USDT", "ETH/USDT:USDT"],
        "timeframes": ["1m", "1h", "trades"],
        "interval_s": 30,
        "since": "2024-01-02T00:00:00.5+01:00",
        "until": 1_704_240_000_000_000_000,
        "lookback_s": 3600,
        "venue": "binance",
        "page_limit": 1000,
    }

    response = await api_world.client.post(START, headers=admin, json=body)

    # 2024-01-01T23:00:00.5Z is 1_704_067_200 s + 23 h = 1_704_150_000.5 s.
    expected = {
        "symbols": "BTC/USDT,ETH/USDT:USDT",
        "timeframes": "1m,1h,trades",
        "interval": "30.0",
        "since": "1704150000500000000",
        "until": "1704240000000000000",
        "lookback": "3600.0",
        "venue": "binance",
        "page_limit": "1000",
    }
    assert response.status_code == 202
    assert response.json()["params"] == expected
    [command] = _commands(api_world)
    assert (command.action, command.target, command.params) == (
        ControlAction.COLLECTOR_START,
        "marketdata",
        expected,
    )


async def test_start_when_given_only_symbols_leaves_the_rest_to_the_scheduler(
    api_world: ApiWorld,
) -> None:
    admin = await api_world.headers("root", Role.MANAGE_STRATEGIES)

    response = await api_world.client.post(
        START, headers=admin, json={"symbols": ["BTC/USDT", "ETH/USDT"]}
    )

    assert response.status_code == 202
    assert [c.params for c in _commands(api_world)] == [{"symbols": "BTC/USDT,ETH/USDT"}]


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        ({}, "Field required"),
        ({"symbols": []}, "at least 1 item"),
        ({"symbols": ["BTC/USDT,ETH/USDT"]}, "String should match pattern"),
        ({"symbols": ["BTC/USDT"], "timeframes": ["1x"]}, "String should match pattern"),
        ({"symbols": ["BTC/USDT"], "timeframes": []}, "at least 1 item"),
        ({"symbols": ["BTC/USDT"], "since": "yesterday"}, "since: 'yesterday' is not epoch ns"),
        ({"symbols": ["BTC/USDT"], "since": "2024-01-01T00:00:00"}, "needs a time zone"),
        ({"symbols": ["BTC/USDT"], "until": 5}, "until: 5 ns is outside"),
        (
            {
                "symbols": ["BTC/USDT"],
                "since": "2024-01-02T00:00:00Z",
                "until": "2024-01-01T00:00:00Z",
            },
            "until must be after since",
        ),
        ({"symbols": ["BTC/USDT"], "interval_s": 0}, "greater than 0"),
        ({"symbols": ["BTC/USDT"], "interval_s": 604_801}, "less than or equal to 604800"),
        ({"symbols": ["BTC/USDT"], "lookback_s": -1}, "greater than 0"),
        ({"symbols": ["BTC/USDT"], "page_limit": 5001}, "less than or equal to 5000"),
        ({"symbols": ["BTC/USDT"], "venue": "bin ance"}, "String should match pattern"),
        ({"symbols": ["BTC/USDT"], "symbol": "ETH/USDT"}, "Extra inputs are not permitted"),
    ],
)
async def test_start_when_the_config_is_bad_is_422_with_the_reason_and_sends_nothing(
    api_world: ApiWorld, body: dict[str, Any], reason: str
) -> None:
    admin = await api_world.headers("root", Role.MANAGE_STRATEGIES)

    response = await api_world.client.post(START, headers=admin, json=body)

    assert response.status_code == 422
    messages = [d["msg"] for d in response.json()["detail"]]
    assert any(reason in m for m in messages), messages
    assert _commands(api_world) == []


def test_jobs_when_an_older_status_arrives_late_keep_the_newer() -> None:
    jobs = CollectorJobs()

    kept = [
        jobs.apply(_status("job-a", 200, progress=0.5, fetched=500)),
        jobs.apply(_status("job-a", 100, progress=0.25, fetched=250)),
        jobs.apply(_status("job-b", 150, state=CollectorState.FAILED, message="venue down")),
    ]

    assert kept == [True, False, True]
    assert [(j.job_id, j.state, j.progress, j.fetched, j.message) for j in jobs.jobs()] == [
        ("job-a", "RUNNING", 0.5, 500, ""),
        ("job-b", "FAILED", 0.0, 0, "venue down"),
    ]


def test_jobs_when_two_statuses_share_an_event_time_keep_the_later_one() -> None:
    jobs = CollectorJobs()

    jobs.apply(_status("job-a", 100, progress=0.5))
    jobs.apply(_status("job-a", 100, state=CollectorState.COMPLETED, progress=1.0))

    assert [(j.state, j.progress) for j in jobs.jobs()] == [("COMPLETED", 1.0)]


def test_jobs_when_over_the_limit_drop_the_oldest_job() -> None:
    jobs = CollectorJobs(limit=2)

    jobs.apply(_status("job-a", 300))
    jobs.apply(_status("job-b", 100))
    jobs.apply(_status("job-c", 200))

    assert [j.job_id for j in jobs.jobs()] == ["job-a", "job-c"]


async def test_collector_when_jobs_reported_shows_the_last_command_and_each_job(
    api_world: ApiWorld,
) -> None:
    admin = await api_world.headers("root", Role.ADMIN)
    started = await api_world.client.post(START, headers=admin, json={"symbols": ["BTC/USDT"]})
    api_world.state.collector.apply(
        _status("job-a", T0_NS + 5, progress=0.75, fetched=1500, cursor_ns=T0_NS - 60)
    )

    response = await api_world.client.get("/api/v1/market/collector", headers=admin)

    body = response.json()
    assert response.status_code == 200
    assert (body["state"], body["last_command_id"], body["params"]) == (
        "STARTED",
        started.json()["last_command_id"],
        {"symbols": "BTC/USDT"},
    )
    assert body["jobs"] == [
        {
            "job_id": "job-a",
            "kind": "backfill.ohlcv",
            "state": "RUNNING",
            "venue": "BINANCE",
            "instrument_id": "BTC-USDT.BINANCE",
            "timeframe": "1m",
            "start_ns": None,
            "end_ns": None,
            "cursor_ns": T0_NS - 60,
            "fetched": 1500,
            "progress": 0.75,
            "message": "",
            "ts_event": T0_NS + 5,
        }
    ]


async def test_collector_when_nothing_was_sent_or_reported_is_unknown_with_no_jobs(
    api_world: ApiWorld,
) -> None:
    reader = await api_world.headers("reader", Role.READ_PORTFOLIO)

    response = await api_world.client.get("/api/v1/market/collector", headers=reader)

    assert response.json() == {
        "state": "UNKNOWN",
        "last_command_id": None,
        "issued_by": None,
        "ts_event": None,
        "params": {},
        "jobs": [],
    }
