"""`quantmesh run --alert-rules`: the alerts stage in the one-process mesh, its rules sending
through the service's own channels (here a webhook on a loopback HTTP server)."""

from __future__ import annotations

import io
import json
from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from quantmesh_alerts.channels import SIGNATURE_HEADER, sign
from quantmesh_embedded.cli import main
from quantmesh_embedded.run import RunConfig, run_live

SYMBOL = "ASSET-USD.SIM"
SECOND = 1_000_000_000
T0 = 1_672_531_200 * SECOND  # 2023-01-01T00:00:00Z
SECRET = "webhook-secret"
#: One trade a second: 1 s bars close at 100, 100, 90, 110, 120 (sma_cross 2/3 goes long),
#: then the price halves: the account's drawdown passes 5 % at the next snapshot.
PRICES = ["100", "100", "90", "110", "120", "121", "60", "59", "58"]
RULES = """
rules:
  - {name: dd, kind: drawdown, max_drawdown_pct: 5, channels: [webhook]}
"""


@pytest.fixture
async def webhook(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[list[tuple[bytes, Any]]]:
    """A loopback receiver; the alerts stage's webhook channel points at it (QM_ALERT_*)."""
    received: list[tuple[bytes, Any]] = []

    async def hook(request: web.Request) -> web.Response:
        received.append((await request.read(), request.headers))
        return web.Response(status=204)

    app = web.Application()
    app.router.add_post("/hook", hook)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    monkeypatch.setenv("QM_ALERT_WEBHOOK_URL", f"http://127.0.0.1:{runner.addresses[0][1]}/hook")
    monkeypatch.setenv("QM_ALERT_WEBHOOK_SECRET", SECRET)
    yield received
    await runner.cleanup()


def _files(tmp_path: Path) -> tuple[Path, Path]:
    trades = tmp_path / "trades.csv"
    rows = [f"{T0 + i * SECOND},{p},1000" for i, p in enumerate(PRICES)]
    trades.write_text("timestamp,price,amount\n" + "\n".join(rows) + "\n")
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)
    return trades, rules


async def test_run_live_when_given_alert_rules_posts_the_drawdown_to_the_webhook(
    webhook: list[tuple[bytes, Any]], tmp_path: Path
) -> None:
    # Arrange
    trades, rules = _files(tmp_path)
    config = RunConfig(
        instruments=(SYMBOL,),
        replay=trades,
        bar_interval="1s",
        params={"fast": 2, "slow": 3, "quantity": "100", "allow_short": False},
        alert_rules=rules,
    )

    # Act
    view = await run_live(config, io.StringIO())

    # Assert: bought 100 at 121, marked at 60: one drawdown notification (once per episode),
    # signed with the webhook's secret
    assert [(f.last_qty, f.last_price) for f in view.fills][:1] == [(Decimal(100), Decimal(121))]
    assert len(webhook) == 1
    body, headers = webhook[0]
    assert headers[SIGNATURE_HEADER] == sign(SECRET.encode(), body)
    notification = json.loads(body)
    assert (notification["rule"], notification["kind"], notification["severity"]) == (
        "dd",
        "drawdown",
        "CRITICAL",
    )
    assert notification["account_id"] == "paper"


def test_cli_run_when_the_alert_rules_are_invalid_exits_2_naming_the_problem(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    trades, rules = _files(tmp_path)
    rules.write_text("rules:\n  - {name: dd, kind: drawdown}\n")

    code = main(["run", "--replay", str(trades), "--symbol", SYMBOL, "--alert-rules", str(rules)])

    assert code == 2
    assert "max_drawdown_pct" in capsys.readouterr().err
